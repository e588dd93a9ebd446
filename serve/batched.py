"""The batched multi-adapter engine: many generation requests, each for its own adapter (or none), decode
together in one forward pass over one resident Llama-family base. Plain PyTorch (no Ray, no PEFT at run
time), so it runs in a unit test, a Ray Serve replica or a benchmark alike. This module holds the engine
and its scheduler; its adapter slots are ``batched_bank.py``, its forward pass ``batched_forward.py``.

How a step works:
- **Slots.** Every adapter on the device has a slot in a bank per target module: LoRA as padded
  ``A[slot]`` (r_max × in) and ``B[slot]`` (out × r_max) with a per-slot scale, so adapters of different
  ranks and module sets coexist (zeros where an adapter has no rank or no module); LoRA-XS as ``R[slot]``
  (r × r) beside its basis' shared ``A`` (in × r) and ``B`` (r × out). Slot 0 is "no adapter" (zeros).
- **Adapter deltas.** A target Linear computes ``x Wᵀ`` once for the whole batch (q/k/v and gate/up as
  one matmul each; on a CPU in bf16 from weights packed once into oneDNN's layout, ``_prepack``). LoRA
  rows add ``s[slot]·(x·A[slot]ᵀ)·B[slot]ᵀ``: in an exact-shape decode step per distinct adapter of
  the step (``_Factors``: the step's adapters' A and B stacked once per admission, two plain matmuls per
  fused group for all rows); in prefill and in bucketed (CUDA-graph) steps as a per-row gathered batched
  matmul. LoRA-XS rows compute ``x·A`` and ``·B`` once for the whole batch with only the r×r
  ``R[slot]`` per row.
- **One OpenMP pool.** The set-up runs on a passing thread and adapter placement on one torch thread, so
  the decode loop's thread owns the process's only multi-thread pool (``adapterfab/threads.py``: a second
  pool throttles libgomp's spin-wait and slowed the decode step 25 %).
- **KV cache per request**: a preallocated ``[layers, slots, kv_heads, max_len, head_dim]`` cache; each
  running request owns a cache row and its own positions, so requests of any length decode together.
  Rows are handed out lowest first, so the running requests sit in the first rows of the cache.
- **Decode step with static shapes**: a decode step runs over the first ``nb`` cache rows (idle rows
  among them compute a dummy token at the cache's last position, which no prompt token occupies: such a
  row may hold a prompt still being prefilled in pieces) and attends over the first
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
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterfab.errors import AdapterfabError
from adapterfab.serve.batched_bank import TARGETS, AdapterBank, EngineFull, ParsedAdapter, _XSBank
from adapterfab.serve.batched_forward import FUSED, BatchedForward, _Graph
from adapterfab.serve.engine import (
    DTYPES,
    AdapterNotLoaded,
    PromptTooLong,
    SamplingParams,
    TextGeneration,
    seed_of,
)
from adapterfab.serve.sampling import is_plain_greedy, sample_rows
from adapterfab.threads import in_passing_thread, use_torch_threads

log = logging.getLogger("adapterfab.serve.batched")
__all__ = ["BatchedEngine", "EngineFull", "ParsedAdapter"]  # the bank's errors and parsed adapters, named here too


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
    state: Any = None  # sampling.RowState when its sampling needs one (penalties, guide, ...)


class BatchedEngine(AdapterBank, BatchedForward, TextGeneration):
    """A resident base with up to ``max_adapters`` adapters on the device and up to ``max_batch``
    requests decoding together; ``generate`` streams events like ``serve.engine.Engine``."""

    def __init__(self, model_path: str | Path, dtype: str = "float32", device: str = "cpu",
                 max_batch: int = 16, max_len: int = 1024, max_adapters: int = 64, max_rank: int = 64,
                 torch_threads: int | None = None, prefill_tokens: int = 8192, cuda_graphs: bool | None = None,
                 buckets: bool | None = None, max_graphs: int = 512, tenant_max_rows: int | None = None,
                 prepack: bool | None = None, prefill_chunk: int | None = None, lora_kernel: str | None = None):
        # the set-up's torch work (loading, fusing, packing) runs on a thread that ends with it, so the
        # caller's thread keeps no OpenMP pool beside the decode loop's (adapterfab/threads.py)
        in_passing_thread(self._setup, model_path, dtype, device, max_batch, max_len, max_adapters, max_rank,
                          torch_threads, prefill_tokens, cuda_graphs, buckets, max_graphs, tenant_max_rows,
                          prepack, prefill_chunk, lora_kernel, name="batched-engine-setup")
        self._thread = threading.Thread(target=self._loop, name="batched-engine", daemon=True)
        self._thread.start()

    def use_lora_kernel(self, kernel: str | None) -> None:
        """Switch how decode steps add their LoRA rows' updates (the constructor's ``lora_kernel``; None:
        the engine's own choice, and "factors", the per-adapter path, on unbucketed shapes), with the
        constructor's checks; graphs captured under the previous kernel are dropped. Call it between steps."""
        if kernel not in (None, "row", "grouped", "factors") or (kernel == "factors" and self.buckets):
            allowed = "'row' or 'grouped'" + ("" if self.buckets else " or 'factors'")
            raise AdapterfabError(f"lora_kernel must be {allowed}, not {kernel!r}")
        if kernel == "grouped":
            from adapterfab.serve.batched_forward import grouped_lora_supported

            ok, why = grouped_lora_supported(self.device, self.dtype, self.max_adapters + 1, self.max_rank)
            if not ok:
                raise AdapterfabError(f"lora_kernel 'grouped' cannot run here: {why}")
        kernel = kernel or ("row" if self.buckets else "factors")
        if self.lora_kernel and kernel != self.lora_kernel:
            self._drop_graphs()
        self.lora_kernel = kernel

    def _setup(self, model_path: str | Path, dtype: str, device: str, max_batch: int, max_len: int,
               max_adapters: int, max_rank: int, torch_threads: int | None, prefill_tokens: int,
               cuda_graphs: bool | None, buckets: bool | None, max_graphs: int, tenant_max_rows: int | None,
               prepack: bool | None, prefill_chunk: int | None, lora_kernel: str | None) -> None:
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
        # this engine's attention sees every earlier position; a base trained with a sliding window (Mistral;
        # Qwen2 when use_sliding_window) sees the last ``window`` only: the two agree on sequences within it
        window = getattr(cfg, "sliding_window", None) if cfg.model_type == "mistral" or \
            getattr(cfg, "use_sliding_window", False) else None
        if window and int(window) < self.max_len:
            log.warning("the base attends over a sliding window of %d tokens: sequences are limited to it "
                        "(max_len %d -> %d)", window, self.max_len, int(window))
            self.max_len = int(window)
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
        # q/k/v and gate/up as one weight each (one larger matmul instead of three or two small ones); the
        # modules' own weights become views into it, so nothing is held twice
        self.fused = {(i, group): self._fuse([self.linear[(i, n)] for n in names])
                      for i in range(len(self.layers)) for group, names in FUSED.items()}
        self.packed: dict[Any, tuple[Any, Any]] = {}  # matmul key -> (weight in oneDNN's layout, bias)
        self.prepacked = self._prepack() if prepack is not False else False
        # LoRA banks per (layer, module), created on first use; slot 0 stays zero (no adapter)
        self.lora_a: dict[tuple[int, str], Any] = {}
        self.lora_b: dict[tuple[int, str], Any] = {}
        self.lora_scale = torch.zeros(max_adapters + 1, dtype=torch.float32, device=self.device)
        self.lora_rank = [0] * (max_adapters + 1)  # per slot
        self.lora_scale_host = [0.0] * (max_adapters + 1)  # the same scales, read on the host
        self._lora_version = 0  # bumped when a LoRA slot is written or cleared
        self._factor_cache: tuple[Any, Any] | None = None  # the last decode step's stacked factors
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
        # seconds of the scheduler loop's busy iterations by phase: prefill passes, decode forwards, sampling
        # (on a GPU: where the step's device-to-host copy waits for the device), and host work between them
        # (admission, emitting tokens, retiring rows): the share of "host" is what sits on the critical path
        self.phase_s = {"prefill": 0.0, "decode": 0.0, "sample": 0.0, "host": 0.0}
        self.prefill_tokens = max(prefill_tokens, self.max_len)
        # prompt tokens prefilled per loop iteration, between two decode steps (0: every admitted prompt at
        # once; None: 256 on a CPU, 2048 on a GPU); a longer prompt is prefilled in pieces over several
        # iterations. On this project's 2-CPU machine under arrivals with long prompts (bench/RESULTS.md,
        # issue 23) the inter-token p99 was 3.1 s whole, 0.98 s at 512 and 0.29 s at 128, same throughput
        if prefill_chunk is None:
            prefill_chunk = 2048 if self.device.type == "cuda" else 256
        self.prefill_chunk = prefill_chunk or None
        self._prefilling: list[_Request] = []  # admitted, holding a cache row, prompt not all in the cache
        self.prefills = 0  # prefill forward passes
        self.prefill_pieces = 0  # of which pieces of a prompt (chunked prefill)
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
        # how a decode step adds its LoRA rows' updates: None picks per distinct adapter of the step
        # (``_factors``) on unbucketed shapes and the per-row gather on static (bucketed) ones, which CUDA
        # graphs capture; "row" always gathers per row; "grouped" runs two grouped matmuls over the whole
        # bank per module (``_Segments``: each adapter read once, nothing gathered, graph-capturable on a
        # bf16 Hopper/Blackwell GPU; not yet the default there: unmeasured against the gather)
        if lora_kernel not in (None, "row", "grouped"):
            raise AdapterfabError(f"lora_kernel must be 'row' or 'grouped', not {lora_kernel!r}")
        self.lora_kernel = ""
        self.use_lora_kernel(lora_kernel)
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

    # -- set-up -----------------------------------------------------------------------------------
    @staticmethod
    def _fuse(modules: list[Any]) -> tuple[Any, Any, list[int]]:
        """(weight, bias or None, output sizes) of ``modules`` stacked; each module's weight (and bias)
        becomes a view into the stacked one."""
        import torch

        weight = torch.cat([m.weight.data for m in modules])
        bias = torch.cat([m.bias.data for m in modules]) if modules[0].bias is not None else None
        sizes, at = [m.weight.shape[0] for m in modules], 0
        for m, n in zip(modules, sizes):
            m.weight = torch.nn.Parameter(weight[at:at + n], requires_grad=False)
            if bias is not None:
                m.bias = torch.nn.Parameter(bias[at:at + n], requires_grad=False)
            at += n
        return weight, bias, sizes

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

    def prompt_token_limit(self) -> int:
        return self.max_len - 1

    def submit(self, prompt_ids: list[int], adapter: str | None, params: SamplingParams) -> _Request:
        import torch

        self.check_token_ids(prompt_ids)  # before the shared prefill, where a bad id fails every row
        self.check_params(params)
        if len(prompt_ids) >= self.max_len:
            raise PromptTooLong(f"the prompt has {len(prompt_ids)} tokens; this engine takes at most "
                                f"{self.max_len - 1}")
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed_of(params))
        req = _Request(list(prompt_ids), adapter, params, queue.Queue(), gen,
                       state=self.row_state(prompt_ids, params))
        req.budget = params.budget(len(prompt_ids), self.max_len)
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
        if req.params.ends(token, self.eos_ids) or req.produced >= req.budget or req.cancelled:
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
                while not self._stop and not self._waiting and not self._running and not self._prefilling:
                    self._wake.wait()
                if self._stop:
                    return
                dropped = self._drop_cancelled_waiting()
                admit = self._admit()
            for req in dropped:  # cancelled while queued: never admitted, its pin released now
                self._retire(req)
            t0 = time.perf_counter()
            try:
                with torch.inference_mode():
                    self._prefilling.extend(admit)
                    t1 = time.perf_counter()
                    self._prefill_step()
                    t2 = time.perf_counter()
                    self.phase_s["prefill"] += t2 - t1
                    running = []
                    for r in self._running:  # one read of ``cancelled`` each: a cancel landing between two
                        if r.cancelled:  # reads retired a row still decoded (its cache row -1: another's)
                            self._retire(r)
                        elif not r.retired:
                            running.append(r)
                    if not running:
                        self._running = []
                        self.phase_s["host"] += time.perf_counter() - t0 - (t2 - t1)
                        continue
                    rows = [q.cache_row for q in running]
                    t3 = time.perf_counter()
                    logits = self._decode(running, rows)
                    t4 = time.perf_counter()
                    tokens = self._sample_rows(logits, running, rows)
                    t5 = time.perf_counter()
                    self.phase_s["decode"] += t4 - t3
                    self.phase_s["sample"] += t5 - t4
                    self.steps += 1
                    self.batch_rows_total += len(running)
                    still = []
                    for r, token in zip(running, tokens):
                        r.pos += 1
                        if isinstance(token, Exception):
                            self._fail(r, token)
                        elif self._emit(r, token):
                            self._retire(r)
                        else:
                            still.append(r)
                    self._running = still
                    self.phase_s["host"] += time.perf_counter() - t0 - (t2 - t1) - (t5 - t3)
            except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep the engine alive
                log.exception("engine step failed")
                for r in {id(r): r for r in [*admit, *self._prefilling, *self._running]}.values():  # unhashable
                    self._fail(r, e)
                self._running, self._prefilling = [], []

    def _drop_cancelled_waiting(self) -> list[_Request]:
        """Waiting requests whose client went away leave the queue (caller holds the lock)."""
        dropped: list[_Request] = []
        kept: collections.deque[_Request] = collections.deque()
        for r in self._waiting:  # one read each: one cancelled between two passes left unretired (pinned)
            (dropped if r.cancelled else kept).append(r)
        if dropped:
            self._waiting = kept
        return dropped

    def _admit(self) -> list[_Request]:
        """Waiting requests for the free rows (caller holds the lock): round-robin over tenants, the one
        holding the fewest rows first (ties: the longest waiting), none beyond ``tenant_max_rows``; within
        a tenant, first come first served. One tenant's flood cannot hold every row or starve another."""
        if not self._waiting or not self._free_rows:
            return []
        # rows held: decoding and still prefilling (a prompt longer than prefill_chunk holds its row for
        # several iterations before it decodes; counting only the running let one tenant take every row)
        holding = {id(r): r for r in (*self._running, *self._prefilling) if not r.retired}
        held: collections.Counter[str | None] = collections.Counter(r.params.tenant for r in holding.values())
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
        """Each request's next token from its logits row (``rows[k]`` for request k, default k), with one
        device-to-host copy for the whole step: a batch of plain greedy requests by one argmax; any other
        batch by one batched sampling pass (``sampling.sample_rows``: each row's own settings, generator and
        state). A row whose sampling fails gets its exception instead of a token: that request fails alone."""
        import torch

        rows = rows if rows is not None else list(range(len(reqs)))
        if all(is_plain_greedy(r.params) for r in reqs):
            best = torch.argmax(logits, dim=-1).tolist()
            return [best[row] for row in rows]
        out = sample_rows(logits, rows, [r.params for r in reqs], [r.gen for r in reqs], [r.state for r in reqs])
        for e in out:
            if isinstance(e, Exception):
                log.warning("sampling failed for one request (%s: %s)", type(e).__name__, e)
        return out

    def _prefill_step(self) -> None:
        """This iteration's prefill: prompts in admission order up to ``prefill_chunk`` prompt tokens in all.
        Whole prompts are prefilled together (``_prefill_chunks``); a prompt that does not fit what is left
        of the budget, or is already under way, advances by a piece (``_prefill_piece``); the first in line
        always advances. So the running rows wait at most one budget's prefill for their next token (the
        issue-23 bench's inter-token p99), and a long prompt no longer stalls them for all its length."""
        for r in [r for r in self._prefilling if r.cancelled]:
            self._retire(r)
        self._prefilling = [r for r in self._prefilling if not r.retired]
        budget = self.prefill_chunk or sum(len(r.prompt) for r in self._prefilling)
        whole: list[_Request] = []
        pieces: list[tuple[_Request, int]] = []
        for req in self._prefilling:
            left = len(req.prompt) - req.pos
            take = min(left, budget)
            if take <= 0:
                break
            if req.pos == 0 and take == left:
                whole.append(req)
            else:
                pieces.append((req, take))
            budget -= take
        for chunk in self._prefill_chunks(whole):
            try:
                self._prefill(chunk)
            except Exception as e:  # noqa: BLE001 - this chunk's requests fail, the running rows go on
                log.exception("prefill failed")
                for r in chunk:  # one request's fault must not fail those admitted with it: each alone
                    if len(chunk) == 1 or r.pos:  # (pos set: its prompt went through; only its first token failed)
                        self._fail(r, e)
                        continue
                    try:
                        self._prefill([r])
                    except Exception as alone:  # noqa: BLE001 - this request's own failure
                        self._fail(r, alone)
        for req, take in pieces:
            try:
                self._prefill_piece(req, take)
            except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                log.exception("prefill failed")
                self._fail(req, e)
        self._prefilling = [r for r in self._prefilling if not r.retired and r.pos < len(r.prompt)]

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
        t = max(len(r.prompt) for r in reqs)
        logits = self._prefill_pass(reqs, [r.prompt + [0] * (t - len(r.prompt)) for r in reqs],
                                    [len(r.prompt) - 1 for r in reqs])
        for req in reqs:
            req.pos = len(req.prompt)
        self._first_tokens(reqs, logits)

    def _prefill_piece(self, req: _Request, take: int) -> None:
        """The next ``take`` prompt tokens of ``req`` into its cache row (attending to the prompt before
        them in the cache); with its last prompt token, its first generated token."""
        start = req.pos
        final = start + take == len(req.prompt)
        logits = self._prefill_pass([req], [req.prompt[start:start + take]], [take - 1] if final else None, start)
        self.prefill_pieces += 1
        req.pos = start + take
        if final:
            self._first_tokens([req], logits)

    def _prefill_pass(self, reqs: list[_Request], ids: list[list[int]], last: list[int] | None,
                      start: int = 0) -> Any:
        """One prefill forward pass of token rows ``ids`` (row k for ``reqs[k]``, from position ``start``)
        with each request's adapter; the logits at each row's position ``last[k]`` (None: none)."""
        import torch

        as_t = lambda v: torch.tensor(v, device=self.device)  # noqa: E731
        lora, rank, xs = self._adapter_table(reqs, list(range(len(reqs))), len(reqs))
        logits = self._prefill_forward(as_t(ids), as_t([r.cache_row for r in reqs]),
                                       (as_t(lora), rank) if rank else None, {b: as_t(v) for b, v in xs.items()},
                                       None if last is None else as_t(last), start=start)
        self.prefills += 1
        return logits

    def _first_tokens(self, reqs: list[_Request], logits: Any) -> None:
        """Each prefilled request's first token (from its row of ``logits``); it then decodes or ends."""
        self.prefill_rows_total += len(reqs)
        for req, token in zip(reqs, self._sample_rows(logits, reqs)):
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
                "prefill_pieces": self.prefill_pieces, "prefilling": len(self._prefilling),
                "adapters": len(self._slot_of), "running": len(self._running), "waiting": len(self._waiting),
                "free_rows": len(self._free_rows), "in_use": sum(self._in_use.values()),
                "phase_s": {k: round(v, 4) for k, v in self.phase_s.items()}, "time": time.time()}
