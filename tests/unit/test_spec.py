"""Batch spec validation: schema errors name the field and the fix; semantics checked with no compute."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from adapterfab.errors import SpecError
from adapterfab.spec import check_semantics, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[2]


def _spec(**over):  # noqa: ANN003, ANN202
    d = {"version": 1, "name": "t", "tenants": [{"tenant": "acme", "persona": "pirate", "dataset": "d.jsonl"}]}
    d.update(over)
    return d


def _fields(e: SpecError) -> list[str]:
    return [f for f, _ in e.problems]


def test_example_spec_is_valid_and_resolves_jobs() -> None:
    spec, jobs, _ = load_spec(REPO / "examples" / "personas.yaml")
    check_semantics(spec, jobs)
    assert {(j.tenant, j.persona) for j in jobs} == {("acme", "pirate"), ("acme", "butler"), ("globex", "robot")}
    assert all(Path(j.dataset).is_absolute() and Path(j.dataset).exists() for j in jobs)
    assert [j.method.name for j in jobs] == ["lora", "lora_xs", "qlora"] and jobs[0].method.r == 8


def test_unknown_top_level_key_is_named() -> None:
    with pytest.raises(SpecError) as e:
        parse_spec(_spec(tenantz=[]))
    assert "tenantz" in _fields(e.value)
    assert "unknown key" in str(e.value)


def test_unknown_key_in_tenant_entry() -> None:
    d = _spec()
    d["tenants"][0]["datset"] = "x.jsonl"
    with pytest.raises(SpecError) as e:
        parse_spec(d)
    assert "tenants.0.datset" in _fields(e.value)


@pytest.mark.parametrize("bad", ["Acme", "../x", "/abs", "a/b", "", "x" * 64, "acmé", "a b", "-lead"])
def test_bad_tenant_ids(bad: str) -> None:
    d = _spec()
    d["tenants"][0]["tenant"] = bad
    with pytest.raises(SpecError) as e:
        parse_spec(d)
    assert "tenants.0.tenant" in _fields(e.value)
    assert "lowercase" in str(e.value)


def test_unknown_method_lists_known_ones() -> None:
    with pytest.raises(SpecError) as e:
        parse_spec(_spec(defaults={"method": {"name": "lorax"}}))
    assert "defaults.method.name" in _fields(e.value)
    assert "lora" in str(e.value)


def test_bad_hyperparameter_named() -> None:
    d = _spec()
    d["tenants"][0]["train"] = {"learning_rate": -1}
    with pytest.raises(SpecError) as e:
        parse_spec(d)
    assert "tenants[0].train.learning_rate" in _fields(e.value)


def test_method_override_merges_with_defaults() -> None:
    d = _spec(defaults={"method": {"name": "lora", "r": 4, "alpha": 8}})
    d["tenants"][0]["method"] = {"r": 16}
    _, jobs = parse_spec(d)
    assert jobs[0].method.r == 16 and jobs[0].method.alpha == 8


def test_duplicate_persona_refused() -> None:
    d = _spec()
    d["tenants"].append(dict(d["tenants"][0]))
    with pytest.raises(SpecError, match="appears twice"):
        parse_spec(d)


def test_wrong_version_and_not_a_mapping() -> None:
    with pytest.raises(SpecError):
        parse_spec(_spec(version=2))
    with pytest.raises(SpecError, match="mapping"):
        parse_spec("- just a list")
    with pytest.raises(SpecError, match="YAML"):
        parse_spec("version: [1")


def test_missing_and_empty_datasets(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    d = _spec()
    d["tenants"] = [{"tenant": "acme", "persona": "a", "dataset": "nope.jsonl"},
                    {"tenant": "acme", "persona": "b", "dataset": "empty.jsonl"}]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(d))
    spec, jobs, _ = load_spec(tmp_path / "s.yaml")
    with pytest.raises(SpecError) as e:
        check_semantics(spec, jobs)
    msgs = dict(e.value.problems)
    assert "does not exist" in msgs["tenants[0].dataset"]
    assert "empty" in msgs["tenants[1].dataset"]


def test_dataset_suffix_and_unknown_base_model(tmp_path: Path) -> None:
    d = _spec()
    d["tenants"][0]["dataset"] = "data.csv"
    with pytest.raises(SpecError, match="jsonl"):
        parse_spec(d)
    (tmp_path / "d.jsonl").write_text("{}\n")
    spec, jobs = parse_spec(_spec(base_model="no-such-model"), root=tmp_path)
    with pytest.raises(SpecError) as e:
        check_semantics(spec, jobs)
    assert "base_model" in _fields(e.value)


def test_missing_spec_file() -> None:
    with pytest.raises(SpecError, match="does not exist"):
        load_spec("/nonexistent/spec.yaml")


def test_method_training_defaults_apply_unless_the_spec_sets_them() -> None:
    d = _spec()
    d["tenants"] = [{"tenant": "acme", "persona": "a", "dataset": "a.jsonl", "method": {"name": "lora_xs"}},
                    {"tenant": "acme", "persona": "b", "dataset": "b.jsonl", "method": {"name": "qlora"},
                     "train": {"learning_rate": 1e-4}},
                    {"tenant": "acme", "persona": "c", "dataset": "c.jsonl"}]
    _, jobs = parse_spec(d)
    by = {j.persona: j for j in jobs}
    assert by["a"].train.learning_rate == 5e-3 and by["a"].train.steps == 40
    assert by["b"].train.learning_rate == 1e-4 and by["b"].train.steps == 20  # tenant override wins
    assert by["c"].method.name == "lora" and by["c"].train.learning_rate == 1e-3
    assert (by["a"].train.replay_weight, by["b"].train.replay_weight, by["c"].train.replay_weight) == (2.0, 2.0, 5.0)
    d["defaults"] = {"train": {"steps": 5, "replay_weight": 0}}
    _, jobs = parse_spec(d)
    assert all(j.train.steps == 5 and j.train.replay_weight == 0 for j in jobs)  # batch defaults beat method defaults
    d["defaults"] = {"train": {"replay_weight": -1, "replay_per_step": 0}}
    with pytest.raises(SpecError) as e:
        parse_spec(d)
    assert {"defaults.train.replay_weight", "defaults.train.replay_per_step"} <= set(_fields(e.value))


def test_auto_dtype_is_resolved_by_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import adapterfab.dtypes as dtypes

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\nflags : fpu sse2 avx2 avx512f\n")
    assert dtypes.cpu_computes_bf16.__wrapped__(str(cpuinfo)) is False
    cpuinfo.write_text("processor : 0\nflags : fpu avx512f avx512_bf16 amx_tile\n")
    assert dtypes.cpu_computes_bf16.__wrapped__(str(cpuinfo)) is True
    assert dtypes.cpu_computes_bf16.__wrapped__(str(tmp_path / "absent")) is False

    def jobs(resources: dict, train: dict | None = None, method: dict | None = None) -> list:
        return parse_spec({"version": 1, "name": "n", "resources": resources,
                           "defaults": {"method": method or {"name": "lora"}, "train": train or {}},
                           "tenants": [{"tenant": "a", "persona": "p", "dataset": "x.jsonl"}]})[1]

    for native in (False, True):
        monkeypatch.setattr(dtypes, "cpu_computes_bf16", lambda native=native: native)
        cpu = jobs({})[0]
        assert cpu.train.dtype == ("bfloat16" if native else "float32")
        assert jobs({"gpus_per_job": 0.5})[0].train.dtype == "bfloat16"
        assert jobs({}, {"dtype": "bfloat16"})[0].train.dtype == "bfloat16"  # said, not overridden
        assert jobs({}, {"dtype": "float32"}, )[0].train.dtype == "float32"
        q = jobs({}, method={"name": "qlora"})[0].method
        assert q.compute_dtype == ("bfloat16" if native else "float32")
        assert jobs({"gpus_per_job": 1}, method={"name": "qlora"})[0].method.compute_dtype == "bfloat16"
