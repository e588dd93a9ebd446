"""The batched multi-adapter engine: many generation requests, each for its own adapter (or none), decode
together in one forward pass over one resident Llama-family base. Plain PyTorch (no Ray, no PEFT at run
time), so it runs in a unit test, a Ray Serve replica or a benchmark alike.

How a step works:
- **Slots.** Every adapter on the device has a slot in a bank per target module: LoRA as padded
  ``A[slot]`` (r_max × in) and ``B[slot]`` (out × r_max) with a per-slot scale, so adapters of different
  ranks and module sets coexist (zeros where an adapter has no rank or no module); LoRA-XS as ``R[slot]``
  (r × r) beside its basis' shared ``A`` (in × r) and ``B`` (r × out). Slot 0 is "no adapter" (zeros).
- **Per-row deltas.** A target Linear computes ``x Wᵀ`` once for the whole batch, then for LoRA rows
  ``s[slot]·(x·A[slot]ᵀ)·B[slot]ᵀ`` as a gathered batched matmul, and for LoRA-XS rows ``x·A`` and
  ``·B`` once for the whole batch with only the r×r ``R[slot]`` per row.
- **KV cache per request**: a preallocated ``[layers, slots, kv_heads, max_len, head_dim]`` cache; each
  running request owns a cache row and its own positions, so requests of any length decode together.
  Rows are handed out lowest first, so the running requests sit in the first rows of the cache.
- **Decode step with static shapes**: a decode step runs over the first ``nb`` cache rows (idle rows
  among them compute a dummy token at position 0, in rows nobody owns) and attends over the first
  ``span`` cache positions as a view of the cache (no gather); LoRA factors are gathered only up to the
  highest rank in the batch. It reads nothing back from the device until the logits. With
  ``cuda_graphs`` (the default on CUDA) ``nb``, ``span`` and that rank are rounded up to buckets and
  each bucket's step is captured once in a CUDA graph and replayed, so a decode step costs a few
  launches instead of several per layer (eager per-layer launches dominate small decode steps: the
  H100 run in bench/RESULTS.md). A graph is recaptured when a new adapter bank (a module no adapter used yet, or a new
  LoRA-XS basis) appears; adapters placed in existing banks are in-place writes the graphs see.
- **Continuous batching**: a scheduler thread admits waiting requests between decode steps (their
  prompts are prefilled together: right-padded into one forward pass, in chunks of at most
  ``prefill_tokens`` padded tokens, each row's logits taken at its own last prompt token), decodes every
  running request one token per step, and
  retires finished ones; callers get text deltas as they are produced (``generate``), greedy or sampled
  (temperature, top_p, seed), with stop strings, max_tokens and usage counts.

Only Llama-shaped decoders (Llama, SmolLM2, Mistral-style GQA) are supported; others are refused.
"""

from __future__ import annotations

import collections
import heapq
import json
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterfab.errors import AdapterfabError
from adapterfab.methods import LOW_RANK, SHARED_BASIS, method_of_adapter
from adapterfab.serve.engine import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DTYPES,
    AdapterNotLoaded,
    AdapterRejected,
    PromptTooLong,
    SamplingParams,
    TextGeneration,
    _sample,
    seed_of,
)
from adapterfab.threads import use_torch_threads

log = logging.getLogger("adapterfab.serve.batched")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class EngineFull(AdapterfabError):
    """Every adapter slot is held by a running request."""


@dataclass
class _XSBank:
    """One LoRA-XS basis on the device: its shared factors per (layer, module) and the R of each slot."""

    basis_id: str
    r: int
    a: dict[tuple[int, str], Any]  # in x r
    b: dict[tuple[int, str], Any]  # r x out
    rr: dict[tuple[int, str], Any] = field(default_factory=dict)  # [slots, r, r]


@dataclass
class ParsedAdapter:
    """An adapter read from its folder and checked against the base, not yet on the device."""

    kind: str  # its bank layout: LOW_RANK or SHARED_BASIS (adapterfab.methods)
    cfg: dict
    tensors: dict  # (layer, module) -> (A, B) for LoRA, R for LoRA-XS
    basis: Any  # the LoRA-XS basis, else None
    nbytes: int = 0


@dataclass
class _Request:
    prompt: list[int]
    adapter: str | None
    params: SamplingParams
    out: queue.Queue
    gen: Any
    cache_row: int = -1
    pos: int = 0  # tokens in the cache
    produced: int = 0
    last: int = -1
    budget: int = 0
    cancelled: bool = False
    retired: bool = False


@dataclass
class _Graph:
    """One captured decode step: its static input ([rows, nb] long: ids, positions, LoRA slots, one row
    per LoRA-XS basis) and output (logits [nb, vocab]) tensors."""

    graph: Any
    inp: Any
    out: Any


def _bucket(n: int, cap: int, smallest: int) -> int:
    """The smallest power-of-two multiple of ``smallest`` that holds ``n``, at most ``cap``."""
    b = smallest
    while b < n:
        b *= 2
    return min(b, cap)


class BatchedEngine(TextGeneration):
    """A resident base with up to ``max_adapters`` adapters on the device and up to ``max_batch``
    requests decoding together; ``generate`` streams events like ``serve.engine.Engine``."""

    def __init__(self, model_path: str | Path, dtype: str = "float32", device: str = "cpu",
                 max_batch: int = 16, max_len: int = 1024, max_adapters: int = 64, max_rank: int = 64,
                 torch_threads: int | None = None, prefill_tokens: int = 8192, cuda_graphs: bool | None = None,
                 buckets: bool | None = None, max_graphs: int = 512, tenant_max_rows: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch_threads = torch_threads
        use_torch_threads(torch_threads)
        path = str(Path(model_path).expanduser())
        self.dtype = getattr(torch, DTYPES.get(dtype, dtype)) if isinstance(dtype, str) else dtype
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if not getattr(self.tokenizer, "chat_template", None):
            raise AdapterfabError(f"the tokenizer in {path} has no chat template; serving needs one")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        cfg = model.config
        if getattr(cfg, "model_type", "") not in ("llama", "mistral", "qwen2"):
            raise AdapterfabError(f"the batched engine runs Llama-shaped decoders, not {cfg.model_type!r}")
        self.model = model
        self.cfg = cfg
        self.layers = list(model.model.layers)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.max_len = min(max_len, int(getattr(cfg, "max_position_embeddings", max_len) or max_len))
        self.max_batch, self.max_adapters, self.max_rank = max_batch, max_adapters, max_rank
        # fair admission: waiting requests are admitted tenant by tenant (the tenant holding the fewest
        # rows first), and one tenant holds at most this many rows, so others always find one free
        # (default three quarters of the batch; 0: no cap). Requests without a tenant are not capped.
        if tenant_max_rows is None:
            tenant_max_rows = max(1, (3 * max_batch) // 4)
        self.tenant_max_rows = tenant_max_rows if tenant_max_rows > 0 else max_batch
        shape = (len(self.layers), max_batch, self.n_kv, self.max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.linear = {(i, name): self._module(layer, name) for i, layer in enumerate(self.layers) for name in TARGETS}
        # LoRA banks per (layer, module), created on first use; slot 0 stays zero (no adapter)
        self.lora_a: dict[tuple[int, str], Any] = {}
        self.lora_b: dict[tuple[int, str], Any] = {}
        self.lora_scale = torch.zeros(max_adapters + 1, dtype=torch.float32, device=self.device)
        self.lora_rank = [0] * (max_adapters + 1)  # per slot
        self.xs: dict[str, _XSBank] = {}
        self.xs_scale = torch.zeros(max_adapters + 1, dtype=torch.float32, device=self.device)
        self._slot_of: dict[str, tuple[str, int, str | None]] = {}  # name -> (kind, slot, basis id)
        self._free_slots = list(range(max_adapters, 0, -1))
        self._in_use: collections.Counter[str] = collections.Counter()
        self.eos_ids = self.eos_ids_of(model)
        self._lock = threading.Lock()  # adapters and the waiting queue
        self._tokenizer_lock = threading.Lock()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._wake = threading.Condition(self._lock)
        self._free_rows = list(range(max_batch))  # a heap: the lowest free row is taken first
        self._running: list[_Request] = []
        self.steps = 0
        self.batch_rows_total = 0
        self.prefill_tokens = max(prefill_tokens, self.max_len)
        self.prefills = 0  # prefill forward passes
        self.prefill_rows_total = 0  # prompts they carried
        if cuda_graphs and self.device.type != "cuda":
            raise AdapterfabError(f"cuda_graphs needs a CUDA device, not {self.device}")
        rope = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        if rope_type in ("dynamic", "longrope"):  # their rotary embedding reads max(position) on the host
            if cuda_graphs:
                raise AdapterfabError(f"cuda_graphs cannot capture {rope_type} RoPE (it reads positions on the host)")
            cuda_graphs = False
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        self.buckets = self.cuda_graphs if buckets is None else bool(buckets)  # static (bucketed) decode shapes
        if self.cuda_graphs and not self.buckets:
            raise AdapterfabError("cuda_graphs needs bucketed decode shapes")
        self.max_graphs = max(1, max_graphs)  # evicting every graph would leave their pool unusable
        self._graphs: collections.OrderedDict[tuple, _Graph] = collections.OrderedDict()
        self._graph_pool: Any = None
        self._capture_stream: Any = None
        self._banks_version = 0  # bumped when a bank tensor is created: graphs captured before miss it
        self._graphs_version = 0
        self.graph_captures = 0
        self.graph_replays = 0
        self.decode_shapes: collections.Counter[tuple] = collections.Counter()  # (nb, span, rank, bases) -> steps
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="batched-engine", daemon=True)
        self._thread.start()

    # -- set-up -----------------------------------------------------------------------------------
    @staticmethod
    def _module(layer: Any, name: str) -> Any:
        return getattr(layer.self_attn, name) if name in ("q_proj", "k_proj", "v_proj", "o_proj") \
            else getattr(layer.mlp, name)

    def close(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        self._thread.join(timeout=30)

    # -- adapters ---------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return sorted(self._slot_of)

    def has_adapter(self, name: str) -> bool:
        return name in self._slot_of

    @property
    def busy(self) -> bool:
        return bool(self._running or self._waiting)

    def _take_slot(self) -> int:
        if not self._free_slots:
            raise EngineFull(f"all {self.max_adapters} adapter slots are loaded; unload one first")
        return self._free_slots.pop()

    def read_adapter(self, local_dir: str | Path, basis: Any = None) -> ParsedAdapter:
        """Read and check an adapter folder (no engine state touched): a PEFT LoRA, or a LoRA-XS adapter
        with its ``basis`` (methods.lora_xs.Basis). Shapes are checked against the base here."""
        local_dir = Path(local_dir)
        cfg_path = local_dir / ADAPTER_CONFIG
        if not cfg_path.is_file() or not (local_dir / ADAPTER_WEIGHTS).is_file():
            raise AdapterRejected(f"{local_dir} is not an adapter folder ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
        try:
            cfg = json.loads(cfg_path.read_text())
        except ValueError as e:
            raise AdapterRejected(f"{cfg_path} is not valid JSON: {e}") from None
        method = method_of_adapter(cfg.get("peft_type"))
        if method is None or method.family is None:
            raise AdapterRejected(f"{local_dir}: unknown adapter type {cfg.get('peft_type')!r}")
        if method.family == LOW_RANK:
            tensors: dict = self._read_lora(local_dir, cfg)
            parsed = ParsedAdapter(LOW_RANK, cfg, tensors, None)
        else:
            if basis is None:
                raise AdapterRejected(f"{local_dir} is a {method.name} adapter: its basis is needed to load it")
            rs, scale = self._read_shared_basis(local_dir, basis, method.read_adapter)
            parsed = ParsedAdapter(SHARED_BASIS, {**cfg, "scale": scale}, rs, basis)
        parsed.nbytes = sum(t.numel() * t.element_size() for v in parsed.tensors.values()
                            for t in (v if isinstance(v, tuple) else (v,)))
        return parsed

    def place(self, name: str, parsed: ParsedAdapter) -> None:
        """Put a read adapter into a free device slot under ``name`` (a no-op if it is there)."""
        with self._lock:
            if name in self._slot_of:
                return
            slot = self._take_slot()
            if parsed.kind == LOW_RANK:
                self._place_lora(slot, parsed.tensors, parsed.cfg)
                self._slot_of[name] = (LOW_RANK, slot, None)
            else:
                bank = self._xs_bank(parsed.basis)
                for key, r in parsed.tensors.items():
                    bank.rr[key][slot] = r.to(self.device, self.dtype)
                self.xs_scale[slot] = parsed.cfg["scale"]
                self._slot_of[name] = (SHARED_BASIS, slot, parsed.basis.id)
        log.info("placed adapter %s in slot %s", name, slot)

    def load_adapter(self, name: str, local_dir: str | Path, basis: Any = None) -> None:
        """``read_adapter`` + ``place``; a no-op if ``name`` is loaded."""
        if name not in self._slot_of:
            self.place(name, self.read_adapter(local_dir, basis))

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    def in_use(self, name: str) -> int:
        return self._in_use.get(name, 0)

    def unload_adapter(self, name: str) -> None:
        """Free an adapter's slot; refused while a running request uses it; a no-op if not loaded."""
        with self._lock:
            entry = self._slot_of.get(name)
            if entry is None:
                return
            if self._in_use[name]:
                raise AdapterfabError(f"adapter {name} is in use by {self._in_use[name]} request(s)")
            kind, slot, bid = self._slot_of.pop(name)
            if kind == LOW_RANK:
                for t in (*self.lora_a.values(), *self.lora_b.values()):
                    t[slot].zero_()
                self.lora_scale[slot] = 0
                self.lora_rank[slot] = 0
            else:
                for t in self.xs[bid].rr.values():  # type: ignore[index]
                    t[slot].zero_()
                self.xs_scale[slot] = 0
            self._free_slots.append(slot)

    def _key(self, module_path: str) -> tuple[int, str] | None:
        parts = module_path.split(".")
        if "layers" not in parts:
            return None
        i = parts.index("layers")
        name = parts[-1]
        return (int(parts[i + 1]), name) if name in TARGETS else None

    def _read_lora(self, local_dir: Path, cfg: dict) -> dict[tuple[int, str], tuple[Any, Any]]:
        from safetensors.torch import load_file

        try:
            state = load_file(str(local_dir / ADAPTER_WEIGHTS))
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt file: refuse the adapter, keep serving
            raise AdapterRejected(f"{ADAPTER_WEIGHTS} is not a readable safetensors file "
                                  f"({e.__class__.__name__})") from None
        r = int(cfg.get("r", 0))
        if not 0 < r <= self.max_rank:
            raise AdapterRejected(f"rank {r} is outside 1..{self.max_rank} (the engine's max_rank)")
        pairs: dict[tuple[int, str], list[Any]] = {}
        for k, v in state.items():
            for part, idx in ((".lora_A.", 0), (".lora_B.", 1)):
                if part in k:
                    key = self._key(k.split(part)[0])
                    if key is None or key not in self.linear:
                        raise AdapterRejected(f"tensor {k} targets no supported module of the base")
                    pairs.setdefault(key, [None, None])[idx] = v
                    break
            else:
                raise AdapterRejected(f"unexpected tensor {k} in {local_dir}")
        out = {}
        for key, (a, b) in pairs.items():
            lin = self.linear[key]
            if (
                a is None
                or b is None
                or tuple(a.shape) != (r, lin.in_features)
                or tuple(b.shape) != (lin.out_features, r)
            ):
                raise AdapterRejected(f"{local_dir}: module {key} has shapes {getattr(a, 'shape', None)}, "
                                      f"{getattr(b, 'shape', None)}; the base needs ({r}, {lin.in_features}) and "
                                      f"({lin.out_features}, {r})")
            out[key] = (a, b)
        if not out:
            raise AdapterRejected(f"{local_dir} holds no LoRA tensors")
        return out

    def _place_lora(self, slot: int, tensors: dict, cfg: dict) -> None:
        import math

        import torch

        r = int(cfg["r"])
        alpha = float(cfg.get("lora_alpha", r))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        for key, (a, b) in tensors.items():
            if key not in self.lora_a:
                lin = self.linear[key]
                n = self.max_adapters + 1
                bank_a = torch.zeros(n, self.max_rank, lin.in_features, dtype=self.dtype, device=self.device)
                # B first: the engine thread reads lora_b[key] whenever key is in lora_a
                self.lora_b[key] = torch.zeros(n, lin.out_features, self.max_rank, dtype=self.dtype, device=self.device)
                self.lora_a[key] = bank_a
                self._banks_version += 1
            self.lora_a[key][slot].zero_()
            self.lora_b[key][slot].zero_()
            self.lora_a[key][slot, :r] = a.to(self.device, self.dtype)
            self.lora_b[key][slot, :, :r] = b.to(self.device, self.dtype)
        for key in self.lora_a:  # modules this adapter does not target stay zero for its slot
            if key not in tensors:
                self.lora_a[key][slot].zero_()
                self.lora_b[key][slot].zero_()
        self.lora_scale[slot] = scale
        self.lora_rank[slot] = r

    def _read_shared_basis(self, local_dir: Path, basis: Any, read: Any) -> tuple[dict[tuple[int, str], Any], float]:
        """A SHARED_BASIS adapter's R per module, through its method's ``read_adapter`` (which checks
        the basis id and digest), and its scale."""
        try:
            cfg, rs = read(local_dir, basis)
        except AdapterfabError as e:
            raise AdapterRejected(str(e)) from None
        out = {}
        for name, r in rs.items():
            key = self._key(name)
            if key is None or key not in self.linear or tuple(r.shape) != (basis.r, basis.r):
                raise AdapterRejected(f"{local_dir}: R for {name} has shape {tuple(r.shape)}; needs "
                                      f"({basis.r}, {basis.r}) on a module of the base")
            out[key] = r
        return out, float(cfg["alpha"]) / float(cfg["r"])

    def _xs_bank(self, basis: Any) -> _XSBank:
        import torch

        bank = self.xs.get(basis.id)
        if bank is None:
            a, b = {}, {}
            for name, (fa, fb) in basis.factors.items():
                key = self._key(name)
                if key is None or key not in self.linear:
                    raise AdapterRejected(f"basis {basis.id}: module {name} is not in the base")
                a[key], b[key] = fa.to(self.device, self.dtype), fb.to(self.device, self.dtype)
            bank = _XSBank(basis.id, basis.r, a, b)
            for key in a:
                bank.rr[key] = torch.zeros(
                    self.max_adapters + 1, basis.r, basis.r, dtype=self.dtype, device=self.device
                )
            self.xs[basis.id] = bank
            self._banks_version += 1
        return bank

    # -- the model, one step over rows --------------------------------------------------------------
    def _linear(self, key: tuple[int, str], x: Any, lora: tuple[Any, int] | None, xs_slots: dict[str, Any]) -> Any:
        """``x Wᵀ`` plus each row's adapter delta; ``lora`` is (slot per row, rank to gather up to)."""
        import torch

        y = self.linear[key](x)
        if lora is not None and key in self.lora_a:
            slots, r = lora
            a, b = self.lora_a[key][slots, :r], self.lora_b[key][slots, :, :r]  # [B, r, in], [B, out, r]
            xa = torch.bmm(x, a.transpose(1, 2))  # [B, T, r]
            y = y + torch.bmm(xa, b.transpose(1, 2)) * self.lora_scale[slots].to(y.dtype)[:, None, None]
        for bid, slots in xs_slots.items():
            bank = self.xs[bid]
            if key in bank.a:
                xa = x @ bank.a[key]  # shared basis: one product for every row
                xr = torch.bmm(xa, bank.rr[key][slots])  # only the r x r R per row
                y = y + (xr @ bank.b[key]) * self.xs_scale[slots].to(y.dtype)[:, None, None]
        return y

    def _block(self, i: int, layer: Any, h: Any, cos: Any, sin: Any, lora: Any, xs: dict[str, Any],
               attend: Any) -> Any:
        """One decoder layer; ``attend(i, q, k, v)`` stores K/V in the cache and returns attention."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        bsz, t = h.shape[:2]
        x = layer.input_layernorm(h)
        q = self._linear((i, "q_proj"), x, lora, xs).view(bsz, t, self.n_heads, self.head_dim)
        k = self._linear((i, "k_proj"), x, lora, xs).view(bsz, t, self.n_kv, self.head_dim)
        v = self._linear((i, "v_proj"), x, lora, xs).view(bsz, t, self.n_kv, self.head_dim)
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        attn = attend(i, q, k, v.transpose(1, 2))
        attn = attn.transpose(1, 2).reshape(bsz, t, self.n_heads * self.head_dim)
        h = h + self._linear((i, "o_proj"), attn, lora, xs)
        x = layer.post_attention_layernorm(h)
        gate = self._linear((i, "gate_proj"), x, lora, xs)
        up = self._linear((i, "up_proj"), x, lora, xs)
        return h + self._linear((i, "down_proj"), layer.mlp.act_fn(gate) * up, lora, xs)

    def _prefill_forward(self, ids: Any, rows: Any, lora: Any, xs: dict[str, Any], last: Any) -> Any:
        """Prompts ``ids`` [B, T] (right-padded) from position 0 into cache ``rows`` [B]; returns the
        logits [B, vocab] at each row's last prompt token ``last`` [B]. A prompt attends only to its own
        keys, so attention runs on them directly with the fused causal kernel (no mask, no cache read);
        right padding is harmless: no real token sees a pad, and the pads' cache slots are overwritten
        as the request decodes."""
        import torch

        bsz, t = ids.shape
        h = self.model.model.embed_tokens(ids)
        cos, sin = self.model.model.rotary_emb(h, torch.arange(t, device=self.device)[None, :].expand(bsz, t))

        def attend(i: int, q: Any, k: Any, v: Any) -> Any:
            self.k_cache[i, rows, :, :t] = k
            self.v_cache[i, rows, :, :t] = v
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)

        for i, layer in enumerate(self.layers):
            h = self._block(i, layer, h, cos, sin, lora, xs, attend)
        h = h[torch.arange(bsz, device=self.device), last]
        return self.model.lm_head(self.model.model.norm(h)).float()

    def _decode_core(self, inp: Any, nb: int, span: int, r: int, bids: tuple[str, ...]) -> Any:
        """One decode step over cache rows ``0..nb-1`` with static shapes (what a CUDA graph captures):
        ``inp`` [3 + len(bids), nb] holds each row's last token, its position, its LoRA slot and its slot
        in each LoRA-XS basis ``bids``; attention reads cache positions ``0..span-1`` (a view) under a
        mask of each row's own positions. Returns the logits [nb, vocab]; nothing is read back."""
        import torch

        ids, pos = inp[0], inp[1]
        lora = (inp[2], r) if r else None
        xs = {bid: inp[3 + j] for j, bid in enumerate(bids)}
        rows = torch.arange(nb, device=self.device)
        h = self.model.model.embed_tokens(ids[:, None])
        cos, sin = self.model.model.rotary_emb(h, pos[:, None])
        mask = (torch.arange(span, device=self.device)[None, :] <= pos[:, None])[:, None, None, :]

        def attend(i: int, q: Any, k: Any, v: Any) -> Any:
            self.k_cache[i, rows, :, pos] = k[:, :, 0]
            self.v_cache[i, rows, :, pos] = v[:, :, 0]
            return torch.nn.functional.scaled_dot_product_attention(
                q, self.k_cache[i, :nb, :, :span], self.v_cache[i, :nb, :, :span], attn_mask=mask,
                enable_gqa=self.n_kv != self.n_heads)

        for i, layer in enumerate(self.layers):
            h = self._block(i, layer, h, cos, sin, lora, xs, attend)
        return self.model.lm_head(self.model.model.norm(h[:, 0])).float()

    def _adapter_table(
        self, reqs: list[_Request], at: list[int], n: int
    ) -> tuple[list[int], int, dict[str, list[int]]]:
        """Per row of an ``n``-row batch (request k sits at row ``at[k]``): its LoRA slot (0: none), the
        highest LoRA rank among them, and its slot in each LoRA-XS basis that has rows."""
        lora, rank, xs = [0] * n, 0, {}
        for req, i in zip(reqs, at):
            if req.adapter is None:
                continue
            kind, slot, bid = self._slot_of[req.adapter]
            if kind == LOW_RANK:
                lora[i] = slot
                rank = max(rank, self.lora_rank[slot])
            else:
                xs.setdefault(bid, [0] * n)[i] = slot
        return lora, rank, xs

    def _decode(self, running: list[_Request], rows: list[int]) -> Any:
        """The logits [nb, vocab] of one decode step; request ``running[i]``'s row is ``rows[i]`` (its
        ``cache_row``)."""
        import torch

        nb = max(rows) + 1
        span = max(q.pos for q in running) + 1
        lora, r, xs = self._adapter_table(running, rows, nb)
        if self.buckets:
            nb_b = _bucket(nb, self.max_batch, 1)
            span = _bucket(span, self.max_len, 64)
            r = _bucket(r, self.max_rank, 8) if r else 0
            lora += [0] * (nb_b - nb)
            xs = {b: v + [0] * (nb_b - nb) for b, v in xs.items()}
            nb = nb_b
        ids, pos = [0] * nb, [0] * nb  # idle rows: a dummy token at position 0 of a row nobody owns
        for q in running:
            ids[q.cache_row], pos[q.cache_row] = q.last, q.pos
        bids = tuple(sorted(xs))
        self.decode_shapes[(nb, span, r, bids)] += 1
        host = torch.tensor([ids, pos, lora, *(xs[b] for b in bids)], dtype=torch.long)
        if self.cuda_graphs:
            logits = self._replay((nb, span, r, bids), host)
            if logits is not None:
                return logits
        return self._decode_core(host.to(self.device), nb, span, r, bids)

    def _replay(self, key: tuple, host: Any) -> Any:
        """Run the decode step ``key`` = (nb, span, rank, bases) from its CUDA graph (captured on first use);
        None when it cannot be captured (graphs are then off and the caller runs the step eagerly)."""
        if self._graphs_version != self._banks_version:  # a new bank: graphs captured before miss it
            self._drop_graphs()
            self._graphs_version = self._banks_version
        g = self._graphs.get(key)
        if g is None:
            try:
                g = self._capture(key, host)
            except Exception:  # noqa: BLE001 - a step that cannot be captured still runs, eagerly
                log.exception("CUDA graph capture failed; decoding eagerly from now on")
                self.cuda_graphs = False
                self._drop_graphs()
                return None
        else:
            self._graphs.move_to_end(key)
            g.inp.copy_(host, non_blocking=True)
        g.graph.replay()
        self.graph_replays += 1
        return g.out

    def _drop_graphs(self) -> None:
        """Forget every graph, and their memory pool with them: PyTorch refuses a capture into a pool
        whose graphs are all gone (its use count is 0), so the next capture starts a new pool."""
        self._graphs.clear()
        self._graph_pool = None

    def _capture(self, key: tuple, host: Any) -> _Graph:
        import torch

        inp = host.to(self.device)
        prev = torch.cuda.current_stream(self.device)
        if self._capture_stream is None:  # one stream for every warm-up and capture (cuBLAS handles are
            self._capture_stream = torch.cuda.Stream(self.device)  # cached per stream; the pool is shared)
        side = self._capture_stream
        with self._lock:  # no adapter is placed (no bank created) while the step is captured
            side.wait_stream(prev)
            with torch.cuda.stream(side):  # warm-up: lazy handles and workspaces before capture; its
                self._decode_core(inp, *key)  # cache writes are the ones the replay makes again
            prev.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self._graph_pool, stream=side, capture_error_mode="thread_local"):
                    out = self._decode_core(inp, *key)
            finally:  # a capture that fails to begin leaves the side stream current
                torch.cuda.set_stream(prev)
        if self._graph_pool is None:
            self._graph_pool = graph.pool()  # every bucket's graph shares one memory pool (replays are serial)
        g = self._graphs[key] = _Graph(graph, inp, out)
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        self.graph_captures += 1
        return g

    # -- scheduling -------------------------------------------------------------------------------
    def prompt_token_limit(self) -> int:
        return self.max_len - 1

    def submit(self, prompt_ids: list[int], adapter: str | None, params: SamplingParams) -> _Request:
        import torch

        if len(prompt_ids) >= self.max_len:
            raise PromptTooLong(f"the prompt has {len(prompt_ids)} tokens; this engine takes at most "
                                f"{self.max_len - 1}")
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed_of(params))
        req = _Request(list(prompt_ids), adapter, params, queue.Queue(), gen)
        req.budget = min(params.max_tokens, self.max_len - len(prompt_ids))
        with self._wake:
            if adapter is not None:
                if adapter not in self._slot_of:
                    raise AdapterNotLoaded(f"adapter {adapter} is not loaded")
                self._in_use[adapter] += 1  # pinned until the request ends
            self._waiting.append(req)
            self._wake.notify()
        return req

    def _emit(self, req: _Request, token: int) -> bool:
        """Send one token; True when the request is done."""
        req.produced += 1
        req.last = token
        req.out.put(token)
        if token in self.eos_ids or req.produced >= req.budget or req.cancelled:
            return True
        return False

    def _fail(self, req: _Request, error: BaseException) -> None:
        """End one request with ``error`` (raised to its caller); the others go on."""
        if not req.retired:
            req.out.put(error)
            self._retire(req)

    def _retire(self, req: _Request) -> None:
        if req.retired:  # once only: a second retire would unpin its adapter for another request
            return
        req.retired = True
        req.out.put(None)
        with self._lock:
            if req.adapter is not None:
                self._in_use[req.adapter] -= 1
                if not self._in_use[req.adapter]:
                    del self._in_use[req.adapter]
            if req.cache_row >= 0:
                heapq.heappush(self._free_rows, req.cache_row)
                req.cache_row = -1

    def _loop(self) -> None:
        import torch

        use_torch_threads(self.torch_threads)  # the loop's own thread (adapterfab/threads.py)
        while True:
            with self._wake:
                while not self._stop and not self._waiting and not self._running:
                    self._wake.wait()
                if self._stop:
                    return
                dropped = self._drop_cancelled_waiting()
                admit = self._admit()
            for req in dropped:  # cancelled while queued: never admitted, its pin released now
                self._retire(req)
            try:
                with torch.inference_mode():
                    for chunk in self._prefill_chunks(admit):
                        try:
                            self._prefill(chunk)
                        except Exception as e:  # noqa: BLE001 - this chunk's requests fail, the running rows go on
                            log.exception("prefill failed")
                            for r in chunk:
                                self._fail(r, e)
                    running = [r for r in self._running if not r.cancelled and not r.retired]
                    for r in self._running:
                        if r.cancelled:
                            self._retire(r)
                    if not running:
                        self._running = []
                        continue
                    rows = [q.cache_row for q in running]
                    logits = self._decode(running, rows)
                    self.steps += 1
                    self.batch_rows_total += len(running)
                    still = []
                    for r, token in zip(running, self._sample_rows(logits, running, rows)):
                        r.pos += 1
                        if isinstance(token, Exception):
                            self._fail(r, token)
                        elif self._emit(r, token):
                            self._retire(r)
                        else:
                            still.append(r)
                    self._running = still
            except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep the engine alive
                log.exception("engine step failed")
                for r in {id(r): r for r in [*admit, *self._running]}.values():  # requests are unhashable
                    self._fail(r, e)
                self._running = []

    def _drop_cancelled_waiting(self) -> list[_Request]:
        """Waiting requests whose client went away leave the queue (caller holds the lock)."""
        if not any(r.cancelled for r in self._waiting):
            return []
        dropped = [r for r in self._waiting if r.cancelled]
        self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
        return dropped

    def _admit(self) -> list[_Request]:
        """Waiting requests for the free rows (caller holds the lock): round-robin over tenants, the one
        holding the fewest rows first (ties: the longest waiting), none beyond ``tenant_max_rows``; within
        a tenant, first come first served. One tenant's flood cannot hold every row or starve another."""
        if not self._waiting or not self._free_rows:
            return []
        held: collections.Counter[str | None] = collections.Counter(r.params.tenant for r in self._running)
        queues: dict[str | None, collections.deque[_Request]] = {}
        for r in self._waiting:  # per tenant, in arrival order; dict order: whose oldest request came first
            queues.setdefault(r.params.tenant, collections.deque()).append(r)
        admit: list[_Request] = []
        while self._free_rows:
            open_ = [t for t, q in queues.items() if q and (t is None or held[t] < self.tenant_max_rows)]
            if not open_:
                break
            tenant = min(open_, key=lambda t: held[t])  # min keeps the first of equals: the longest waiting
            req = queues[tenant].popleft()
            held[tenant] += 1
            req.cache_row = heapq.heappop(self._free_rows)
            admit.append(req)
        if admit:
            taken = {id(r) for r in admit}
            self._waiting = collections.deque(r for r in self._waiting if id(r) not in taken)
        return admit

    @staticmethod
    def _sample_rows(logits: Any, reqs: list[_Request], rows: list[int] | None = None) -> list[Any]:
        """Each request's next token from its logits row (``rows[k]`` for request k, default k): the
        greedy ones with one argmax and one device-to-host copy for the whole batch (not a sync per
        request); sampled ones each with their own generator. A row whose sampling fails gets its
        exception instead of a token: that request fails alone."""
        import torch

        rows = rows if rows is not None else list(range(len(reqs)))
        out = [0] * len(reqs)
        if any(r.params.temperature == 0 for r in reqs):
            best = torch.argmax(logits, dim=-1).tolist()
            out = [best[row] for row in rows]
        for n, r in enumerate(reqs):
            if r.params.temperature != 0:
                try:
                    out[n] = _sample(logits[rows[n]], r.params, r.gen)
                except Exception as e:  # noqa: BLE001 - this row's request fails alone, the batch goes on
                    log.warning("sampling failed for one request (%s: %s)", type(e).__name__, e)
                    out[n] = e
        return out

    def _prefill_chunks(self, reqs: list[_Request]) -> list[list[_Request]]:
        """Admitted requests by prompt length, cut so that no chunk pads to over ``prefill_tokens``."""
        chunks: list[list[_Request]] = []
        for req in sorted(reqs, key=lambda r: len(r.prompt)):
            if chunks and len(req.prompt) * (len(chunks[-1]) + 1) <= self.prefill_tokens:
                chunks[-1].append(req)
            else:
                chunks.append([req])
        return chunks

    def _prefill(self, reqs: list[_Request]) -> None:
        """One forward pass over the prompts of ``reqs`` (right-padded), then each one's first token."""
        import torch

        t = max(len(r.prompt) for r in reqs)
        ids = torch.tensor([r.prompt + [0] * (t - len(r.prompt)) for r in reqs], device=self.device)
        lora, rank, xs = self._adapter_table(reqs, list(range(len(reqs))), len(reqs))
        as_t = lambda v: torch.tensor(v, device=self.device)  # noqa: E731
        logits = self._prefill_forward(ids, as_t([r.cache_row for r in reqs]), (as_t(lora), rank) if rank else None,
                                       {b: as_t(v) for b, v in xs.items()}, as_t([len(r.prompt) - 1 for r in reqs]))
        self.prefills += 1
        self.prefill_rows_total += len(reqs)
        for req, token in zip(reqs, self._sample_rows(logits, reqs)):
            req.pos = len(req.prompt)
            if isinstance(token, Exception):
                self._fail(req, token)
            elif self._emit(req, token):
                self._retire(req)
            else:
                self._running.append(req)

    # -- the public contract (as serve.engine.Engine) ---------------------------------------------
    def generate_token_ids(self, prompt_ids: list[int], adapter: str | None, params: SamplingParams,
                           timeout_s: float = 600) -> Iterator[int]:
        req = self.submit(prompt_ids, adapter, params)
        try:
            while True:
                item = req.out.get(timeout=timeout_s)
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            req.cancelled = True  # a consumer that stops early frees its row at the next step

    def stats(self) -> dict[str, Any]:
        return {"steps": self.steps, "mean_batch_rows": self.batch_rows_total / max(1, self.steps),
                "cuda_graphs": self.cuda_graphs, "graph_captures": self.graph_captures,
                "graph_replays": self.graph_replays, "decode_shapes": len(self.decode_shapes),
                "prefills": self.prefills, "mean_prefill_rows": self.prefill_rows_total / max(1, self.prefills),
                "adapters": len(self._slot_of), "running": len(self._running), "waiting": len(self._waiting),
                "free_rows": len(self._free_rows), "in_use": sum(self._in_use.values()),
                "time": time.time()}
