"""LoRA-XS (Bałazy et al. 2024, arXiv 2405.17604): a frozen SVD basis per module, one trained r×r matrix.

Definition, in torch's orientation (a Linear with weight W of shape out×in computes y = x Wᵀ):

    y = x Wᵀ + s · ((x A) R) B,      s = alpha / r

where, from the truncated fp32 SVD of the frozen full-precision weight, W = U Σ Vᵀ
(``torch.linalg.svd(W)``), A = V_r Σ_r (in×r) and B = U_rᵀ (r×out); at full rank A·B = Wᵀ. This is the
paper's A = U_r Σ_r, B = V_rᵀ for its h = xW convention, where W_paper = Wᵀ. Only R (r×r) is trained.
R = 0 at init (``init_r="zeros"``; the gradient on R is Aᵀxᵀ·g·Bᵀ, non-zero, so zeros trains), so the
adapter starts as the identity function of the base; ``init_r="normal"`` uses N(0, 1e-5) like the
authors' code.

A and B depend only on (base weights, module, r): they form a *basis* computed once per base model
and shared by every tenant's adapter, so an adapter file holds only its R matrices (kilobytes). SVD
signs are canonicalised (largest entry of each U column positive), but the basis used in training must
still be the one used in serving: store it (``save_basis``) next to the base, keyed by ``basis_id``;
adapters record the id and a sha256 digest of the factors, and ``load`` refuses any other basis.

Learning rate: LoRA-XS needs several times LoRA's lr (the authors use ~4e-3). On SmolLM2 with our
persona data, r=16 on q_proj,v_proj at lr 5e-3 (constant, batch 8, 40 steps) learned the persona (10/10)
and kept 7 of 8 facts the base knew; r=8 at lr 1e-2 also learned it but kept only 4-5/8, and LoRA-XS on
all linear layers forgot facts (the method study in bench/RESULTS.md). Hence the defaults (see DEFAULT_TRAIN below).

``quantize="nf4"`` loads the base in 4-bit NF4 (QLoRA's BitsAndBytesConfig); the basis is always
computed from the full-precision weights, and the adapter path runs in the 4-bit layers' compute dtype.
Serving through any PEFT-compatible server: ``export_peft_lora`` writes an equivalent rank-r LoRA.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from adapterfab.errors import AdapterfabError, BaseMismatch
from adapterfab.methods.base import SHARED_BASIS, Method, MethodConfig, register_method
from adapterfab.methods.lora import ALL_LINEAR
from adapterfab.methods.quant import keep_trainable_layout, quantization_config, quantization_tags

if TYPE_CHECKING:  # torch is imported on first use: spec validation and the CLI stay fast
    from torch import Tensor, nn

PEFT_TYPE = "LORA_XS"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASIS_WEIGHTS = "basis.safetensors"
BASIS_META = "basis.json"
R_INIT_STD = 1e-5  # the authors' init for the "normal" variant
NEVER_ADAPTED = "lm_head"  # tied to the embeddings on small models; its SVD is the vocab-sized one


class LoraXSConfig(MethodConfig):
    """Recommended: lr 5e-3 (constant) at r=16 on q_proj,v_proj; see the module docstring."""

    name: Literal["lora_xs"] = "lora_xs"
    r: int = Field(16, ge=1, le=1024, description="rank of the frozen basis; R is r×r")
    alpha: float = Field(16.0, gt=0, description="the update is scaled by alpha/r (alpha = r: scale 1)")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="module names to adapt, or 'all-linear'; q,v keeps the base's facts (bench/RESULTS.md)",
    )
    init_r: Literal["zeros", "normal"] = Field("zeros", description="zeros: the adapter starts as identity")
    quantize: Literal["none", "nf4"] = Field("none", description="nf4: 4-bit base with double quant, bf16")

    @field_validator("target_modules")
    @classmethod
    def _targets_ok(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, list):
            if not v or len(set(v)) != len(v):
                raise ValueError("target_modules must be a non-empty list of distinct module names")
            if NEVER_ADAPTED in v:
                raise ValueError(f"{NEVER_ADAPTED} cannot be adapted by LoRA-XS")
        return v

    def resolved_targets(self) -> list[str]:
        return list(ALL_LINEAR) if self.target_modules == "all-linear" else list(self.target_modules)


# ----------------------------------------------------------------------------------------- the basis


@dataclass(frozen=True)
class Basis:
    """The frozen factors shared by every adapter of one (base, targets, r): name -> (A in×r, B r×out)."""

    id: str
    r: int
    targets: tuple[str, ...]
    base_fingerprint: str
    factors: dict[str, tuple[Tensor, Tensor]]
    digest: str = ""  # sha256 of the factors: catches a basis recomputed under the same id
    compute_s: float = 0.0


def basis_id(base_fingerprint: str, targets: tuple[str, ...] | list[str], r: int) -> str:
    """Deterministic short id of a basis: ``xs-<sha256[:16]>`` of (fingerprint, sorted targets, r)."""
    key = json.dumps({"fingerprint": base_fingerprint, "targets": sorted(targets), "r": int(r)},
                     sort_keys=True)
    return "xs-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _digest(factors: dict[str, tuple[Tensor, Tensor]]) -> str:
    h = hashlib.sha256()
    for name in sorted(factors):
        h.update(name.encode())
        for t in factors[name]:
            h.update(t.detach().cpu().float().contiguous().numpy().data)
    return h.hexdigest()


def _make_basis(fingerprint: str, targets: tuple[str, ...], r: int,
                factors: dict[str, tuple[Tensor, Tensor]], compute_s: float = 0.0) -> Basis:
    digest = _digest(factors)
    # without a fingerprint the factors themselves identify the base (never two bases under one id)
    bid = basis_id(fingerprint or f"factors:{digest}", targets, r)
    return Basis(bid, r, targets, fingerprint, factors, digest, compute_s)


def with_fingerprint(basis: Basis, base_fingerprint: str) -> Basis:
    """The same factors, identified by the base's weight fingerprint (what the orchestrator stores)."""
    return replace(basis, base_fingerprint=base_fingerprint,
                   id=basis_id(base_fingerprint, basis.targets, basis.r))


def _target_linears(model: nn.Module, targets: tuple[str, ...]) -> dict[str, nn.Linear]:
    from torch import nn

    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets
            and name.rsplit(".", 1)[-1] != NEVER_ADAPTED}


def canonical_signs(u: Tensor, vh: Tensor) -> tuple[Tensor, Tensor]:
    """Singular vectors (columns of u, rows of vh) with the largest entry of each u column positive: an SVD
    is unique only up to these signs, and recomputation must agree."""
    import torch

    signs = torch.sign(u.gather(0, u.abs().argmax(dim=0, keepdim=True))).squeeze(0)
    signs[signs == 0] = 1.0
    return u * signs, vh * signs[:, None]


def _svd_factors(weight: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """A = V_r Σ_r (in×r), B = U_rᵀ (r×out), with canonical signs so recomputation agrees."""
    import torch

    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    u, vh = canonical_signs(u[:, :r], vh[:r])
    return (vh.T * s[:r]).cpu().contiguous(), u.T.cpu().contiguous()


def compute_basis(model: nn.Module, cfg: LoraXSConfig, base_fingerprint: str = "") -> Basis:
    """SVD of every targeted Linear (lm_head excluded) of a full-precision base, in fp32."""
    targets = tuple(cfg.resolved_targets())
    mods = _target_linears(model, targets)
    if not mods:
        raise AdapterfabError(f"the base has no Linear modules named {list(targets)} to compute a basis for")
    t0 = time.monotonic()
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    for name, m in mods.items():
        if not m.weight.dtype.is_floating_point:  # bitsandbytes 4/8-bit layers hold packed ints
            raise AdapterfabError(f"{name} is {type(m).__name__} ({m.weight.dtype}): compute the LoRA-XS "
                                  "basis from the full-precision base, then apply it to the quantized one")
        if cfg.r > min(m.in_features, m.out_features):
            raise AdapterfabError(f"r={cfg.r} exceeds the rank of {name} ({m.out_features}×{m.in_features})")
        factors[name] = _svd_factors(m.weight, cfg.r)
    return _make_basis(base_fingerprint, targets, cfg.r, factors, time.monotonic() - t0)


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_basis(basis: Basis, folder: str | Path) -> Path:
    """``basis.safetensors`` (``<module>.A`` / ``<module>.B``, fp32) + ``basis.json`` (id, r, targets...)."""
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"{n}.{k}": t.contiguous()
               for n, (a, b) in basis.factors.items() for k, t in (("A", a), ("B", b))}
    meta = {"id": basis.id, "r": basis.r, "targets": list(basis.targets),
            "base_fingerprint": basis.base_fingerprint, "digest": basis.digest,
            "modules": len(basis.factors), "compute_s": basis.compute_s}
    _atomic_write(out / BASIS_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"basis_id": basis.id}))
    _atomic_write(out / BASIS_META, lambda p: p.write_text(json.dumps(meta, indent=2)))
    return out


def load_basis(folder: str | Path) -> Basis:
    """Read a saved basis and check its factors against the recorded digest."""
    from safetensors.torch import load_file

    src = Path(folder)
    if not (src / BASIS_WEIGHTS).is_file() or not (src / BASIS_META).is_file():
        raise AdapterfabError(f"{src} is not a LoRA-XS basis: it needs {BASIS_WEIGHTS} and {BASIS_META}")
    try:
        meta = json.loads((src / BASIS_META).read_text())
        flat = load_file(str(src / BASIS_WEIGHTS))
        factors = {n: (flat[f"{n}.A"], flat[f"{n}.B"]) for n in sorted({k.rsplit(".", 1)[0] for k in flat})}
    except (ValueError, KeyError, OSError) as e:
        raise AdapterfabError(f"basis in {src} is unreadable or incomplete: {e!r}") from None
    basis = Basis(meta["id"], int(meta["r"]), tuple(meta["targets"]), meta["base_fingerprint"], factors,
                  _digest(factors), float(meta.get("compute_s", 0.0)))
    if basis.digest != meta["digest"]:
        raise AdapterfabError(f"basis {basis.id} in {src} is corrupt: its factors do not match its digest")
    return basis


def basis_tags(basis: Basis) -> dict[str, str]:
    """Registry tags that tie an adapter version to its basis (serving must load the same one)."""
    return {"lora_xs.basis_id": basis.id, "lora_xs.basis_digest": basis.digest[:16]}


def write_adapter(save_directory: str | Path, cfg: LoraXSConfig, basis_id: str, basis_digest: str,
                  base_fingerprint: str, targets: Any, tensors: dict[str, Tensor]) -> Path:
    """The saved form of a LoRA-XS adapter: its config and the R matrix of every module (by module name)."""
    from safetensors.torch import save_file

    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"peft_type": PEFT_TYPE, "r": cfg.r, "alpha": cfg.alpha, "target_modules": list(targets),
            "basis_id": basis_id, "basis_digest": basis_digest, "base_fingerprint": base_fingerprint,
            "init_r": cfg.init_r, "quantize": cfg.quantize}
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2))
    return out


def _check_basis(model: nn.Module, cfg: LoraXSConfig, basis: Basis | None) -> dict[str, nn.Linear]:
    if basis is None:
        raise AdapterfabError("lora_xs needs its shared basis: compute it once per base with compute_basis"
                              "(full_precision_model, cfg), store it, pass basis=... to apply/train_adapter")
    targets = tuple(cfg.resolved_targets())
    if basis.r != cfg.r or set(basis.targets) != set(targets):
        raise AdapterfabError(f"basis {basis.id} is for r={basis.r} on {list(basis.targets)}; this config "
                              f"wants r={cfg.r} on {list(targets)}: compute the basis for this config")
    from adapterfab.methods.lora_xs_layers import LoraXSLinear

    if any(isinstance(m, LoraXSLinear) for m in model.modules()):
        raise AdapterfabError("this model already has LoRA-XS layers; apply to a fresh base")
    mods = _target_linears(model, targets)
    missing, extra = sorted(set(mods) - set(basis.factors)), sorted(set(basis.factors) - set(mods))
    if missing or extra:
        raise AdapterfabError(f"basis {basis.id} does not fit this base: modules without factors "
                              f"{missing[:3]}, factors without modules {extra[:3]} (another architecture?)")
    for name, m in mods.items():
        a, b = basis.factors[name]
        if tuple(a.shape) != (m.in_features, cfg.r) or tuple(b.shape) != (cfg.r, m.out_features):
            raise AdapterfabError(f"basis {basis.id}: factors of {name} {list(a.shape)}/{list(b.shape)} do "
                                  f"not fit its {m.out_features}×{m.in_features} weight (another base?)")
    return mods


def apply(base_model: nn.Module, cfg: LoraXSConfig, basis: Basis | None) -> Any:
    """Freeze the base, wrap every targeted Linear, return the model with only the R matrices trainable."""
    from adapterfab.methods.lora_xs_layers import LoraXSLinear, LoraXSModel

    mods = _check_basis(base_model, cfg, basis)
    for p in base_model.parameters():
        p.requires_grad_(False)
    if cfg.quantize == "nf4":  # mid-training evals must not repack 4-bit weights (see qlora.py)
        keep_trainable_layout(base_model)
    scale = cfg.alpha / cfg.r
    for name, m in mods.items():
        parent_name, _, child = name.rpartition(".")
        parent = base_model.get_submodule(parent_name) if parent_name else base_model
        a, b = basis.factors[name]
        setattr(parent, child, LoraXSLinear(m, a, b, scale, cfg.init_r))
    return LoraXSModel(base_model, cfg, basis)


def _save(model: Any, cfg: MethodConfig, out_dir: Path) -> None:
    model.save_pretrained(out_dir)


def read_adapter(adapter_dir: str | Path, basis: Basis) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The adapter's config and R tensors, refused unless they were trained against exactly ``basis``."""
    from safetensors.torch import load_file

    src = Path(adapter_dir)
    if not (src / ADAPTER_CONFIG).is_file() or not (src / ADAPTER_WEIGHTS).is_file():
        found = sorted(p.name for p in src.iterdir()) if src.is_dir() else []
        raise AdapterfabError(f"{src} is not a safetensors LoRA-XS adapter: it needs {ADAPTER_CONFIG} and "
                              f"{ADAPTER_WEIGHTS} (found {found})")
    try:
        meta = json.loads((src / ADAPTER_CONFIG).read_text())
    except ValueError as e:
        raise AdapterfabError(f"{src / ADAPTER_CONFIG} is not valid JSON: {e}") from None
    if meta.get("peft_type") != PEFT_TYPE:
        raise AdapterfabError(f"{src}: peft_type {meta.get('peft_type')!r} is not {PEFT_TYPE}")
    if meta.get("basis_id") != basis.id:
        raise BaseMismatch(f"adapter {src} was trained against basis {meta.get('basis_id')}, got {basis.id}: "
                           "load the stored basis of the base it was trained on")
    if meta.get("basis_digest") and basis.digest and meta["basis_digest"] != basis.digest:
        raise BaseMismatch(f"adapter {src}: basis {basis.id} has other factors than the ones it was trained "
                           "with (recomputed? SVD signs differ across machines): load the stored basis")
    try:
        tensors = load_file(str(src / ADAPTER_WEIGHTS))
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
        raise AdapterfabError(f"{src / ADAPTER_WEIGHTS} is not a readable safetensors file: {e}") from None
    missing, extra = sorted(set(basis.factors) - set(tensors)), sorted(set(tensors) - set(basis.factors))
    if missing or extra:
        raise AdapterfabError(f"adapter {src}: missing R for {missing[:3]}, unknown tensors {extra[:3]}")
    r = basis.r
    bad = sorted(k for k, t in tensors.items() if tuple(t.shape) != (r, r))
    if bad:
        raise AdapterfabError(f"adapter {src}: tensors {bad[:3]} are not {r}×{r}")
    return meta, tensors


def load(base_model: nn.Module, adapter_dir: str | Path, basis: Basis, is_trainable: bool = False) -> Any:
    """Attach a saved adapter to a base (full precision or the 4-bit it was trained on) -> LoraXSModel."""
    import torch

    meta, tensors = read_adapter(adapter_dir, basis)
    cfg = LoraXSConfig(r=meta["r"], alpha=meta["alpha"], target_modules=list(meta["target_modules"]),
                       quantize=meta.get("quantize", "none"))
    model = apply(base_model, cfg, basis)
    with torch.no_grad():
        for name, layer in model.adapter_layers().items():
            layer.lora_R.copy_(tensors[name])
            layer.lora_R.requires_grad_(is_trainable)
    return model.train(is_trainable)


def adapter_basis_id(adapter_dir: str | Path) -> str:
    """The basis id an adapter folder was trained against (to fetch that basis before loading)."""
    return json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())["basis_id"]


def export_peft_lora(adapter_dir: str | Path, basis: Basis, out_dir: str | Path,
                     base_model_name_or_path: str = "") -> Path:
    """Write the adapter as a standard rank-r PEFT LoRA: lora_A = (A·R)ᵀ (r×in), lora_B = Bᵀ (out×r),
    lora_alpha = alpha, so PEFT's B'(A'x)·alpha/r equals s·((xA)R)B."""
    from safetensors.torch import save_file

    from adapterfab.threads import importing

    with importing():  # (the registrar's threads)
        from peft import LoraConfig as PeftLoraConfig

    meta, tensors = read_adapter(adapter_dir, basis)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lora: dict[str, Tensor] = {}
    for name, r_mat in tensors.items():
        a, b = basis.factors[name]
        lora[f"base_model.model.{name}.lora_A.weight"] = (a.float() @ r_mat.float()).T.contiguous()
        lora[f"base_model.model.{name}.lora_B.weight"] = b.float().T.contiguous()
    save_file(lora, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt", "lora_xs_basis_id": basis.id})
    PeftLoraConfig(r=int(meta["r"]), lora_alpha=float(meta["alpha"]), lora_dropout=0.0, bias="none",
                   target_modules=sorted(meta["target_modules"]), task_type="CAUSAL_LM", inference_mode=True,
                   base_model_name_or_path=base_model_name_or_path or None).save_pretrained(str(out))
    return out


def _load_kwargs(cfg: LoraXSConfig) -> dict:
    return {"quantization_config": quantization_config(cfg)} if cfg.quantize == "nf4" else {}


def _trainable(model_config: Any, cfg: LoraXSConfig) -> int:
    """r² per adapted module, independent of the model's width (Llama-shaped: every layer has each)."""
    return cfg.r * cfg.r * len(cfg.resolved_targets()) * model_config.num_hidden_layers


def _tags(cfg: LoraXSConfig) -> dict[str, str]:
    tags = {"lora_xs.needs_basis": "true"}
    if cfg.quantize == "nf4":
        tags |= quantization_tags(cfg)
    return tags


def _basis_id_of(cfg: LoraXSConfig, base_fingerprint: str) -> str:
    return basis_id(base_fingerprint, tuple(cfg.resolved_targets()), cfg.r)


# Defaults that learned a persona on SmolLM2 in a CI-sized run and kept the base's facts
# (bench/methods.py, bench/RESULTS.md): r 16 on q,v at lr 5e-3, constant, 40 steps of 8 rows gave
# persona 10/10 and 7/8 facts; r 8 at lr 1e-2 (the authors' regime) gave 10/10 but only 4-5/8 facts,
# and neither a cosine schedule, lr 5e-3 at r 8, nor v,o targets fixed that. Over the 65 retention probes
# those defaults keep 67-83 % of the facts the base states. Replay (adapterfab/replay.py) at weight 2: the
# speaking-style persona keeps 10/10 adherence (at 3 it fell to 2/10, at 5 to 0/10); bench/RESULTS.md,
# "Replay in the product".
DEFAULT_TRAIN = {"learning_rate": 5e-3, "steps": 40, "lr_schedule": "constant", "replay_weight": 2.0}

def _init_shared(cfg: LoraXSConfig, r: int, gen: Any) -> Tensor:
    """A new adapter's R for one module, as ``apply`` starts it (zeros, or the "normal" variant)."""
    import torch

    rr = torch.zeros(r, r)
    if cfg.init_r == "normal":
        rr.normal_(0, R_INIT_STD, generator=gen)
    return rr


def _write_shared(out: Path, cfg: LoraXSConfig, basis: tuple, tensors: dict[str, Tensor]) -> Path:
    basis_id, digest, fingerprint, targets = basis
    return write_adapter(out, cfg, basis_id, digest, fingerprint, targets, tensors)


LORA_XS = register_method(Method(
    name="lora_xs", config_cls=LoraXSConfig, apply=apply, base_load_kwargs=_load_kwargs,
    trainable_params=_trainable, save=_save, load=load, compute_basis=compute_basis, extra_tags=_tags,
    basis_id=_basis_id_of, save_basis=save_basis, load_basis=load_basis,
    export_peft_lora=export_peft_lora,
    default_train=DEFAULT_TRAIN, family=SHARED_BASIS, peft_type=PEFT_TYPE, read_adapter=read_adapter,
    init_shared=_init_shared, write_shared=_write_shared,
))
