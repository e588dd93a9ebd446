"""The batched engine's adapter bank: reading an adapter folder and checking it against the base
(``read_adapter``), and the device slots every loaded adapter's factors sit in, one per adapter, in
the layout its method declares (LOW_RANK: A and B per module; SHARED_BASIS: R per module over a basis
bank shared by its adapters). A mixin of ``serve/batched.py``'s ``BatchedEngine``, whose lock, slot
tables and device tensors it uses; plain torch."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterfab.errors import AdapterfabError
from adapterfab.methods import LOW_RANK, SHARED_BASIS, method_of_adapter
from adapterfab.serve.engine import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterRejected
from adapterfab.threads import on_one_torch_thread

# PEFT LoRA options the batched engine's banks (one A, B and scale per slot) cannot express: an adapter
# that sets one is refused with its name, never served as if it had not
UNSERVED_LORA_FIELDS = {"alpha_pattern": "a per-module alpha", "rank_pattern": "a per-module rank",
                        "use_dora": "DoRA", "lora_bias": "a bias on lora_B", "modules_to_save": "whole modules trained"}

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


class AdapterBank:
    """``BatchedEngine``'s adapters: read, placed into and freed from device slots."""

    def _take_slot(self) -> int:
        if not self._free_slots:
            raise EngineFull(f"all {self.max_adapters} adapter slots are loaded; unload one first")
        return self._free_slots.pop()

    @on_one_torch_thread  # called from a server's threads, beside the decode loop (adapterfab/threads.py)
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

    @on_one_torch_thread  # called from a server's threads, beside the decode loop (adapterfab/threads.py)
    def place(self, name: str, parsed: ParsedAdapter) -> None:
        """Put a read adapter into a free device slot under ``name`` (a no-op if it is there)."""
        with self._lock:
            if name in self._slot_of:
                return
            slot = self._take_slot()
            try:
                if parsed.kind == LOW_RANK:
                    self._place_lora(slot, parsed.tensors, parsed.cfg)
                    self._slot_of[name] = (LOW_RANK, slot, None)
                else:
                    bank = self._xs_bank(parsed.basis)
                    for key, r in parsed.tensors.items():
                        bank.rr[key][slot] = r.to(self.device, self.dtype)
                    self.xs_scale[slot] = parsed.cfg["scale"]
                    self._slot_of[name] = (SHARED_BASIS, slot, parsed.basis.id)
            except BaseException:
                # e.g. out of device memory for a bank allocated here on first use: the slot goes back,
                # cleared of whatever was written, or every failed try would leak one (and the basis' bank
                # when no adapter is on it)
                self._clear_slot(slot)
                self._free_slots.append(slot)
                if parsed.kind == SHARED_BASIS:
                    self._free_xs_bank(parsed.basis.id)
                raise
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

    @on_one_torch_thread  # called from a server's threads, beside the decode loop (adapterfab/threads.py)
    def unload_adapter(self, name: str) -> None:
        """Free an adapter's slot; refused while a running request uses it; a no-op if not loaded."""
        with self._lock:
            entry = self._slot_of.get(name)
            if entry is None:
                return
            if self._in_use[name]:
                raise AdapterfabError(f"adapter {name} is in use by {self._in_use[name]} request(s)")
            kind, slot, bid = self._slot_of.pop(name)
            self._clear_slot(slot, kind, bid)
            self._free_slots.append(slot)
            if kind == SHARED_BASIS:
                self._free_xs_bank(bid)  # type: ignore[arg-type]

    def _clear_slot(self, slot: int, kind: str | None = None, bid: str | None = None) -> None:
        """Zero a slot's factors and scale (caller holds the lock): those of ``kind`` (and LoRA-XS basis
        ``bid``), or of every bank when a failed place may have written any."""
        if kind in (None, LOW_RANK):
            for t in (*self.lora_a.values(), *self.lora_b.values()):
                t[slot].zero_()
            self.lora_scale[slot] = 0
            self.lora_scale_host[slot] = 0.0
            self._lora_version += 1
            self.lora_rank[slot] = 0
        if kind in (None, SHARED_BASIS):
            for bank in ([self.xs[bid]] if bid is not None else list(self.xs.values())):  # type: ignore[index]
                for t in bank.rr.values():
                    t[slot].zero_()
            self.xs_scale[slot] = 0

    def _free_xs_bank(self, bid: str) -> None:
        """Take LoRA-XS basis ``bid``'s bank off the device once no adapter is on it (caller holds the lock),
        or a replica serving many tenants' bases would hold every basis it ever served. No step uses it: a
        request pins its adapter (``_in_use``) from ``submit`` until it retires, and ``unload_adapter``
        refuses a pinned one, so no adapter on the basis is in a step. Graphs captured over the bank are
        dropped before the next replay (``_banks_version``): they hold its tensors' addresses, and a bank
        made again for the basis has others."""
        if bid not in self.xs or any(entry[2] == bid for entry in self._slot_of.values()):
            return
        del self.xs[bid]
        self._banks_version += 1
        log.info("freed LoRA-XS basis %s from the device (no adapter on it)", bid)

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
        for option, what in UNSERVED_LORA_FIELDS.items():  # else served wrong without a word (review, 2026-12-07)
            if cfg.get(option):
                raise AdapterRejected(f"{local_dir}: {option} ({what}) is not served by the batched engine")
        r = int(cfg.get("r", 0))
        if not 0 < r <= self.max_rank:
            raise AdapterRejected(f"rank {r} is outside 1..{self.max_rank} (the engine's max_rank)")
        pairs: dict[tuple[int, str], list[Any]] = {}
        for k, v in state.items():
            for part, idx in ((".lora_A.weight", 0), (".lora_B.weight", 1)):  # (a lora_B.bias is refused)
                if k.endswith(part):
                    key = self._key(k[:-len(part)])
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
        self.lora_scale_host[slot] = scale
        self._lora_version += 1
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
