"""The method test matrix on the tiny model: every registered method x
(forward equals the base at init; gradients reach only the trainable parameters; save -> load round
trip gives identical outputs; trainable-parameter count equals the closed form).
Adding a method = one module + one row in CONFIGS."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from adapterfab.methods import get_method, known_methods

CONFIGS = {
    "lora": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
    "qlora": {"name": "qlora", "r": 4, "alpha": 8, "dropout": 0.0, "compute_dtype": "float32"},
    "lora_xs": {"name": "lora_xs", "r": 4, "alpha": 4, "target_modules": "all-linear"},
}


def test_every_method_has_a_matrix_row() -> None:
    assert set(known_methods()) <= set(CONFIGS), "add a CONFIGS row for each new method"


def _setup(name: str, tiny_model_path: str):  # noqa: ANN202
    from transformers import AutoConfig, AutoModelForCausalLM

    if name not in known_methods():
        pytest.skip(f"method {name} is not registered in this build")
    method = get_method(name)
    cfg = method.config_cls(**CONFIGS[name])

    def fresh_base():  # noqa: ANN202
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32,
                                                    **method.base_load_kwargs(cfg))

    basis = None
    if method.compute_basis is not None:
        full = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
        basis = method.compute_basis(full, cfg)
    return method, cfg, fresh_base, basis, AutoConfig.from_pretrained(tiny_model_path)


def _batch() -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_method_matrix(name: str, tiny_model_path: str, tmp_path: Path) -> None:
    method, cfg, fresh_base, basis, model_cfg = _setup(name, tiny_model_path)
    b = _batch()
    model = method.apply(fresh_base(), cfg, basis)

    # 1. at init the adapter is the identity function of the base (same kernels: adapter disabled)
    model.eval()
    with torch.no_grad():
        init_logits = model(input_ids=b["input_ids"]).logits
        with model.disable_adapter():
            base_logits = model(input_ids=b["input_ids"]).logits.clone()
    torch.testing.assert_close(init_logits, base_logits, rtol=0, atol=1e-5)
    if not method.base_load_kwargs(cfg):  # unquantized: also the untouched base model itself
        with torch.no_grad():
            torch.testing.assert_close(fresh_base()(input_ids=b["input_ids"]).logits, base_logits,
                                       rtol=0, atol=1e-5)

    # 2. gradients reach only the trainable parameters, and their count is the closed form
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora" in n.lower()) for n in trainable), sorted(trainable)[:5]
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_trainable == method.trainable_params(model_cfg, cfg)
    opt = method.make_optimizer([p for p in model.parameters() if p.requires_grad], 5e-2, 0.0)
    for _ in range(3):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(**b).loss.backward()
        # the eval above must not have switched 4-bit layers to a layout with no backward (methods/qlora.py)
        assert not [w for w in caught if "autograd kernel was not registered" in str(w.message)]
        for n, p in model.named_parameters():
            if not p.requires_grad:
                assert p.grad is None, n
        assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)

    # 3. save -> load into a fresh base gives identical outputs (and differs from the base now)
    model.eval()
    with torch.no_grad():
        trained_logits = model(input_ids=b["input_ids"]).logits
        with model.disable_adapter():
            off_logits = model(input_ids=b["input_ids"]).logits
    assert not torch.allclose(trained_logits, base_logits, atol=1e-4)
    torch.testing.assert_close(off_logits, base_logits, rtol=0, atol=1e-5)
    method.save(model, cfg, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    loaded = method.load(fresh_base(), tmp_path / "adapter", basis)
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=b["input_ids"]).logits, trained_logits, rtol=0, atol=1e-5)


def test_qlora_optimizer_pages_only_large_state_and_matches_bitsandbytes() -> None:
    """QLoRA's paged AdamW: with every trainable tensor under bitsandbytes' paging threshold (nothing
    would be paged) it is torch's multi-tensor AdamW, and that makes the same updates as
    bitsandbytes' PagedAdamW; a tensor at the threshold gets PagedAdamW itself."""
    bnb = pytest.importorskip("bitsandbytes")
    from adapterfab.methods.qlora import PAGED_MIN_NUMEL

    make = get_method("qlora").make_optimizer
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(16, 64, generator=gen), torch.randn(64, 16, generator=gen)]  # LoRA A and B
    grads = [[torch.randn(t.shape, generator=gen) for t in start] for _ in range(5)]
    runs = []
    for build in (lambda ps: make(ps, 1e-2, 0.01),
                  lambda ps: bnb.optim.PagedAdamW(ps, lr=1e-2, weight_decay=0.01)):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = build(params)
        for g in grads:
            for p, gp in zip(params, g):
                p.grad = gp.clone()
            opt.step()
        runs.append((type(opt), [p.detach() for p in params]))
    (ours, mine), (_, theirs) = runs
    assert ours is torch.optim.AdamW
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(mine[0], start[0])  # it did step
    big = torch.nn.Parameter(torch.zeros(PAGED_MIN_NUMEL))
    assert isinstance(make([big], 1e-2, 0.0), bnb.optim.PagedAdamW)
