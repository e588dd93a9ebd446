"""LoRA-XS on the tiny Llama: orientation of the SVD basis, identity at init, gradients only on R,
closed-form parameter count, save/load round trip, refusal of any other basis, export to a plain PEFT
LoRA with equal outputs, the 4-bit (NF4) base, and the train_adapter contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapterfab.errors import AdapterfabError, BaseMismatch
from adapterfab.methods import get_method
from adapterfab.methods.lora import ALL_LINEAR
from adapterfab.methods.lora_xs import (
    LoraXSConfig,
    basis_id,
    compute_basis,
    export_peft_lora,
    load,
    load_basis,
    save_basis,
    with_fingerprint,
)

XS = get_method("lora_xs")
CFG = LoraXSConfig(r=4, alpha=8, target_modules="all-linear")
N_LAYERS = 2


def _base(path: str, **kwargs: object) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=kwargs.pop("dtype", torch.float32), **kwargs)


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_batch()["input_ids"]).logits


def _randomize_r(model: torch.nn.Module, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_R.copy_(torch.randn(layer.lora_R.shape, generator=g) * std)


@pytest.fixture(scope="module")
def basis(tiny_model_path: str):  # noqa: ANN201
    return compute_basis(_base(tiny_model_path), CFG)


def test_config_and_registration() -> None:
    c = LoraXSConfig()
    assert (c.r, c.alpha, c.target_modules) == (16, 16.0, ["q_proj", "v_proj"])
    assert (c.init_r, c.quantize) == ("zeros", "none")
    assert CFG.resolved_targets() == ALL_LINEAR
    for bad in ({"rank": 4}, {"target_modules": ["lm_head"]}, {"target_modules": []}, {"quantize": "int8"}):
        with pytest.raises(ValueError):
            LoraXSConfig(**bad)
    assert XS.config_cls is LoraXSConfig and XS.compute_basis is compute_basis
    assert XS.base_load_kwargs(c) == {}
    q = XS.base_load_kwargs(LoraXSConfig(quantize="nf4"))["quantization_config"]
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant) == (True, "nf4", True)
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    assert XS.extra_tags(LoraXSConfig(quantize="nf4"))["quantization.type"] == "nf4"


def test_orientation(tiny_model_path: str) -> None:
    full = _base(tiny_model_path)
    v = full.model.layers[0].self_attn.v_proj  # 32 out × 64 in
    w = v.weight.detach()
    # at full rank A·B reconstructs Wᵀ (torch's y = x Wᵀ)
    b_full = compute_basis(full, LoraXSConfig(r=32, alpha=32, target_modules=["v_proj"]))
    a, b = b_full.factors["model.layers.0.self_attn.v_proj"]
    assert a.shape == (64, 32) and b.shape == (32, 32)
    torch.testing.assert_close(a @ b, w.T, rtol=0, atol=1e-5)
    # truncated: A = V_r Σ_r, B = U_rᵀ (each column up to one shared sign)
    u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
    basis4 = compute_basis(full, LoraXSConfig(r=4, target_modules=["v_proj"]))
    a4, b4 = basis4.factors["model.layers.0.self_attn.v_proj"]
    signs = torch.sign((b4 * u[:, :4].T).sum(1))
    torch.testing.assert_close(a4, (vh[:4].T * s[:4]) * signs, rtol=0, atol=1e-5)
    torch.testing.assert_close(b4, u[:, :4].T * signs[:, None], rtol=0, atol=1e-5)
    torch.testing.assert_close(a4 @ b4, (u[:, :4] * s[:4] @ vh[:4]).T, rtol=0, atol=1e-5)
    # the layer computes x Wᵀ + s·((x A) R) B with s = alpha / r
    cfg = LoraXSConfig(r=4, alpha=6, target_modules=["v_proj"])
    model = XS.apply(full, cfg, compute_basis(_base(tiny_model_path), cfg))
    _randomize_r(model)
    layer = model.adapter_layers()["model.layers.0.self_attn.v_proj"]
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    explicit = x @ w.T + (6 / 4) * (x @ a4 @ layer.lora_R.detach() @ b4)
    torch.testing.assert_close(layer(x).detach(), explicit, rtol=0, atol=1e-5)


def test_identity_at_init_gradients_only_on_r_and_count(tiny_model_path: str, basis) -> None:  # noqa: ANN001
    base_logits = _logits(_base(tiny_model_path))
    model = XS.apply(_base(tiny_model_path), CFG, basis)
    assert torch.equal(_logits(model), base_logits)  # R = 0: exactly the base
    model.train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".lora_R") for n in trainable)
    n_modules = len(ALL_LINEAR) * N_LAYERS
    assert len(trainable) == n_modules
    n_trainable = sum(p.numel() for p in trainable.values())
    assert n_trainable == XS.trainable_params(model.config, CFG) == 16 * n_modules
    model(**_batch()).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) if p.requires_grad else p.grad is None, n


def test_train_save_load_round_trip(tiny_model_path: str, basis, tmp_path: Path) -> None:  # noqa: ANN001
    base_logits = _logits(_base(tiny_model_path))
    model = XS.apply(_base(tiny_model_path), CFG, basis)
    opt = XS.make_optimizer([p for p in model.parameters() if p.requires_grad], 1e-2, 0.0)
    losses = []
    for _ in range(4):
        loss = model(**_batch()).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    model.eval()
    trained = _logits(model)
    assert not torch.allclose(trained, base_logits, atol=1e-4)
    with model.disable_adapter():
        assert torch.equal(_logits(model), base_logits)
    assert torch.equal(_logits(model), trained)  # re-enabled on exit

    out = tmp_path / "adapter"
    XS.save(model, CFG, out)
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA_XS" and meta["basis_id"] == basis.id and meta["r"] == 4
    assert set(meta) >= {"alpha", "target_modules", "base_fingerprint", "init_r"}
    from safetensors.torch import load_file

    saved = load_file(str(out / "adapter_model.safetensors"))
    assert set(saved) == set(basis.factors) and all(t.shape == (4, 4) for t in saved.values())
    loaded = XS.load(_base(tiny_model_path), out, basis)
    assert torch.equal(_logits(loaded), trained)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_basis_save_load_and_ids(tiny_model_path: str, basis, tmp_path: Path) -> None:  # noqa: ANN001
    assert basis.id.startswith("xs-") and len(basis.id) == 19 and len(basis.factors) == 14
    assert compute_basis(_base(tiny_model_path), CFG).digest == basis.digest  # deterministic
    fp = with_fingerprint(basis, "sha256:abc")
    assert fp.id == basis_id("sha256:abc", tuple(reversed(CFG.resolved_targets())), 4) != basis.id
    back = load_basis(save_basis(fp, tmp_path / "basis"))
    assert (back.id, back.r, back.targets, back.base_fingerprint, back.digest) == (
        fp.id, fp.r, fp.targets, fp.base_fingerprint, fp.digest)
    assert all(torch.equal(back.factors[n][0], a) and torch.equal(back.factors[n][1], b)
               for n, (a, b) in fp.factors.items())
    meta = json.loads((tmp_path / "basis" / "basis.json").read_text())
    (tmp_path / "basis" / "basis.json").write_text(json.dumps(meta | {"digest": "0" * 64}))
    with pytest.raises(AdapterfabError, match="corrupt"):
        load_basis(tmp_path / "basis")


def test_refuses_other_bases_and_bad_folders(tiny_model_path: str, basis, tmp_path: Path) -> None:  # noqa
    with pytest.raises(AdapterfabError, match="needs its shared basis"):
        XS.apply(_base(tiny_model_path), CFG, None)
    r2 = compute_basis(_base(tiny_model_path), CFG.model_copy(update={"r": 2}))
    with pytest.raises(AdapterfabError, match="r=2"):
        XS.apply(_base(tiny_model_path), CFG, r2)
    with pytest.raises(AdapterfabError, match="compute the basis for this config"):
        XS.apply(_base(tiny_model_path), LoraXSConfig(r=4), basis)

    model = XS.apply(_base(tiny_model_path), CFG, basis)
    _randomize_r(model)
    XS.save(model, CFG, tmp_path / "a")
    with pytest.raises(BaseMismatch, match=f"trained against basis {basis.id}, got {r2.id}"):
        load(_base(tiny_model_path), tmp_path / "a", r2)
    perturbed_base = _base(tiny_model_path)
    with torch.no_grad():
        perturbed_base.model.layers[1].mlp.down_proj.weight.mul_(1.01)
    perturbed = compute_basis(perturbed_base, CFG)
    with pytest.raises(BaseMismatch, match="trained against basis"):
        load(_base(tiny_model_path), tmp_path / "a", perturbed)
    # same id (same fingerprint claimed) but other factors: the digest catches it
    XS.save(XS.apply(_base(tiny_model_path), CFG, with_fingerprint(basis, "fp")), CFG, tmp_path / "b")
    with pytest.raises(BaseMismatch, match="other factors"):
        load(_base(tiny_model_path), tmp_path / "b", with_fingerprint(perturbed, "fp"))

    from safetensors.torch import load_file, save_file

    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != name}, str(weights))
    with pytest.raises(AdapterfabError, match="missing R"):
        load(_base(tiny_model_path), tmp_path / "a", basis)
    save_file(tensors | {name: torch.zeros(4, 5)}, str(weights))
    with pytest.raises(AdapterfabError, match="not 4×4"):
        load(_base(tiny_model_path), tmp_path / "a", basis)
    torch.save(tensors, tmp_path / "a" / "adapter_model.bin")
    weights.unlink()
    with pytest.raises(AdapterfabError, match="not a safetensors"):
        load(_base(tiny_model_path), tmp_path / "a", basis)


def test_export_equals_plain_peft_lora(tiny_model_path: str, basis, tmp_path: Path) -> None:  # noqa: ANN001
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file

    model = XS.apply(_base(tiny_model_path), CFG, basis)
    _randomize_r(model)
    model.eval()
    xs_logits = _logits(model)
    XS.save(model, CFG, tmp_path / "xs")
    out = export_peft_lora(tmp_path / "xs", basis, tmp_path / "peft", base_model_name_or_path=tiny_model_path)
    # key names and shapes are exactly what PEFT itself saves for a rank-4 LoRA on the same modules
    real = get_peft_model(_base(tiny_model_path), LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR))
    real.save_pretrained(tmp_path / "real")
    ours = load_file(str(out / "adapter_model.safetensors"))
    theirs = load_file(str(tmp_path / "real" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    peft_model = PeftModel.from_pretrained(_base(tiny_model_path), str(out))
    peft_model.eval()
    torch.testing.assert_close(_logits(peft_model), xs_logits, rtol=0, atol=1e-5)
    assert not torch.allclose(xs_logits, _logits(_base(tiny_model_path)), atol=1e-3)


def test_bf16_base_trains_r_in_fp32(tiny_model_path: str, basis) -> None:  # noqa: ANN001
    model = XS.apply(_base(tiny_model_path, dtype=torch.bfloat16), CFG, basis)
    layer = next(iter(model.adapter_layers().values()))
    assert layer.lora_xs_A.dtype == torch.bfloat16 and layer.lora_R.dtype == torch.float32
    model(**_batch()).loss.backward()
    assert layer.lora_R.grad is not None and layer.lora_R.grad.dtype == torch.float32


def test_nf4_base_forward_backward(tiny_model_path: str) -> None:
    """The 4-bit base (bitsandbytes on CPU). An eval/no-grad forward mid-training would repack the 4-bit
    weights and silently stop gradients (methods/qlora.py); apply() prevents that, and this checks it."""
    cfg = LoraXSConfig(r=4, alpha=4, quantize="nf4")
    q_base = _base(tiny_model_path, **XS.base_load_kwargs(cfg))
    assert type(q_base.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    with pytest.raises(AdapterfabError, match="full-precision"):
        compute_basis(q_base, cfg)
    model = XS.apply(q_base, cfg, compute_basis(_base(tiny_model_path), cfg))
    model.train()
    b = _batch()
    out = model(**b)
    with model.disable_adapter():
        base_out = model(**b)
    assert torch.equal(out.logits, base_out.logits)  # identity at init on the 4-bit base too
    params = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == XS.trainable_params(model.config, cfg) == 16 * 2 * N_LAYERS
    opt = XS.make_optimizer(params, 1e-2, 0.0)
    losses = []
    for step in range(4):
        loss = model(**b).loss
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params), step
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step == 1:  # an intermediate eval, then training goes on
            model.eval()
            _logits(model)
            model.train()
    assert losses[-1] < losses[0]


def test_train_adapter_contract(tiny_model_path: str, basis) -> None:  # noqa: ANN001
    from adapterfab.jobs.train_loop import train_adapter
    from adapterfab.spec import TrainConfig

    train = TrainConfig(steps=3, learning_rate=1e-2, dtype="float32")
    res = train_adapter(tiny_model_path, CFG, train, lambda epoch: [_batch()], lambda: [_batch()],
                        model=_base(tiny_model_path), basis=basis)
    assert res.metrics["trainable_params"] == XS.trainable_params(res.model.config, CFG)
    assert res.metrics["eval_loss"] < res.metrics["base_eval_loss"]
    with pytest.raises(AdapterfabError):
        train_adapter(tiny_model_path, CFG, train, lambda epoch: [_batch()], model=_base(tiny_model_path))


def test_basis_svd_runs_on_one_torch_thread_and_restores_the_count() -> None:
    """The orchestrator computes the basis beside training jobs that may hold every core: on one thread
    (61 s -> 2.6 s for SmolLM2 on 2 busy CPUs), then the old count is back."""
    from adapterfab.jobs.orchestrate import one_torch_thread  # what the orchestrator calls

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_torch_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


_BASIS_RACER = r"""
import contextlib, json, sys, time
from pathlib import Path
from types import SimpleNamespace

from adapterfab.jobs import orchestrate
from adapterfab.methods.lora_xs import LoraXSConfig
from adapterfab.spec import JobSpec, TrainConfig
from adapterfab.state import StateStore

root, batch, base = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
log = root / "calls.log"

@contextlib.contextmanager
def slow_thread():  # the SVD takes 2 s longer: both processes are inside ensure_basis at once
    time.sleep(2)
    yield

def note(what):
    def call(*args, **kwargs):
        with log.open("a") as f:
            f.write(f"{what} {batch}\n")
        return "file:///nowhere" if what == "log_dir" else 1
    return call

orchestrate.one_torch_thread = slow_thread
ctx = SimpleNamespace(
    state=StateStore(f"sqlite:///{root / 'state.db'}"), batch_id=batch, batch_run_id=None,
    settings=SimpleNamespace(artifacts=str(root / "artifacts")), spec=SimpleNamespace(base_model=base),
    base=SimpleNamespace(path=base, fingerprint="f" * 16),
    tracking=SimpleNamespace(log_dir=note("log_dir"), log_metrics=note("log_metrics")),
    registry=SimpleNamespace(register_basis=note("register_basis")))
job = JobSpec(tenant="acme", persona="p", dataset="x.jsonl", train=TrainConfig(),
              method=LoraXSConfig(r=4, alpha=8, target_modules=["q_proj"]))
while not (root / "go").exists():
    time.sleep(0.05)
print(json.dumps(orchestrate.ensure_basis(ctx, job)))
"""


def test_two_orchestrators_compute_a_shared_basis_once(tiny_model_path: str, tmp_path: Path) -> None:
    """Two batches beside each other (two orchestrator processes) need the same LoRA-XS basis: one
    computes, stores and registers it; the other waits for it and reuses it (it computed and
    registered it a second time)."""
    import subprocess
    import sys
    import time

    from adapterfab.state import StateStore

    StateStore(f"sqlite:///{tmp_path / 'state.db'}")  # its tables, made once
    script = tmp_path / "racer.py"
    script.write_text(_BASIS_RACER)
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), b, tiny_model_path],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for b in ("b1", "b2")]
    time.sleep(0.5)
    (tmp_path / "go").write_text("")
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    got = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert got[0] == got[1] and got[0][1].startswith(str(tmp_path / "artifacts"))  # the same basis id and URI
    calls = (tmp_path / "calls.log").read_text().split("\n")
    assert sum(c.startswith("register_basis") for c in calls) == 1, calls
    assert sum(c.startswith("log_dir") for c in calls) == 1, calls
