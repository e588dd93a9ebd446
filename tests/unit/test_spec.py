"""Batch spec validation: schema errors name the field and the fix; semantics checked with no compute."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from adapterfab.errors import SpecError
from adapterfab.spec import load_spec, parse_spec
from adapterfab.spec_checks import check_semantics

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


# -- checks a reviewer found missing (2026-12-07): each was accepted, crashed, or printed a secret -----
def test_a_key_given_twice_is_refused_not_silently_dropped() -> None:
    """Plain YAML keeps the last of two `tenants:` keys, so every job of the first would vanish."""
    text = ("version: 1\nname: t\ntenants: [{tenant: acme, persona: pirate, dataset: d.jsonl}]\n"
            "tenants: [{tenant: globex, persona: robot, dataset: d.jsonl}]\n")
    with pytest.raises(SpecError, match=r"key 'tenants' appears twice in one mapping \(lines 3 and 4\)"):
        parse_spec(text)
    with pytest.raises(SpecError, match="key 'persona' appears twice"):
        parse_spec("version: 1\nname: t\ntenants: [{tenant: a, persona: b, persona: c, dataset: d.jsonl}]\n")
    # a YAML merge key is not a duplicate: the keys beside it override it, as YAML says
    _, jobs = parse_spec("version: 1\nname: t\ntenants: [{tenant: a, persona: b, dataset: d.jsonl, "
                         "<<: {train: {steps: 3}}, train: {steps: 5}}]\n")
    assert jobs[0].train.steps == 5
    # an anchored mapping merged into another before its own anchor is built (PyYAML then holds the
    # merged keys in the anchor's node): its keys as written are each given once
    _, jobs = parse_spec("version: 1\nname: t\ntenants:\n"
                         "  - {tenant: a, persona: b, dataset: d.jsonl, train: &short {steps: 20, batch_size: 2}}\n"
                         "  - {tenant: a, persona: c, dataset: d.jsonl, train: &long {<<: *short, steps: 50}}\n"
                         "defaults:\n  train: {<<: *long}\n")
    assert [j.train.steps for j in jobs] == [20, 50]


def test_non_finite_numbers_and_out_of_range_seeds_are_refused() -> None:
    with pytest.raises(SpecError) as e:
        parse_spec(_spec(resources={"cpus_per_job": float("inf")},
                         defaults={"method": {"name": "lora", "alpha": float("inf")}}))
    assert {"resources.cpus_per_job", "defaults.method.alpha"} <= set(_fields(e.value))
    assert "finite" in str(e.value)
    for train in ({"weight_decay": float("inf")}, {"seed": 2**32}):
        with pytest.raises(SpecError) as e:
            parse_spec(_spec(defaults={"train": train}))
        assert _fields(e.value) == [f"defaults.train.{next(iter(train))}"], e.value.problems
    assert parse_spec(_spec(defaults={"train": {"seed": 2**32 - 1}}))[1][0].train.seed == 2**32 - 1


def test_settings_that_would_make_a_job_pointless_are_refused_once_where_they_come_from() -> None:
    two = [{"tenant": "acme", "persona": p, "dataset": "d.jsonl"} for p in ("pirate", "butler")]
    with pytest.raises(SpecError) as e:  # inherited by both entries: said once, at defaults
        parse_spec(_spec(defaults={"train": {"steps": 30, "warmup_steps": 100}}, tenants=two))
    assert e.value.problems == [("defaults.train.warmup_steps", "warmup_steps (100) must be below steps (30): "
                                 "the learning rate would never reach train.learning_rate")]
    with pytest.raises(SpecError) as e:  # an entry's own setting: said at the entry
        parse_spec(_spec(tenants=[{**two[0], "train": {"warmup_steps": 50, "steps": 50}}]))
    assert _fields(e.value) == ["tenants[0].train.warmup_steps"]
    with pytest.raises(SpecError, match="promote: auto gates on the held-out eval") as e:
        parse_spec(_spec(promote="auto", defaults={"train": {"eval_fraction": 0}}))
    assert _fields(e.value) == ["defaults.train.eval_fraction"]
    assert parse_spec(_spec(promote="none", defaults={"train": {"eval_fraction": 0}}))  # no gate: fine


def test_an_empty_or_repeated_target_list_is_refused_and_a_bad_default_is_said_once() -> None:
    two = [{"tenant": "acme", "persona": p, "dataset": "d.jsonl"} for p in ("pirate", "butler")]
    for targets, words in (([], "target_modules is empty"), (["q_proj", "q_proj"], "names a module twice")):
        for name in ("lora", "qlora"):
            with pytest.raises(SpecError, match=words) as e:
                parse_spec(_spec(defaults={"method": {"name": name, "target_modules": targets}}, tenants=two))
            assert _fields(e.value) == ["defaults.method"], e.value.problems


def test_target_modules_and_lora_xs_rank_are_checked_against_the_bases_weights(smollm2_path: str) -> None:
    """A typo in target_modules used to crash `validate` (KeyError in the planner) or, for LoRA-XS, pass
    and fail at training; LoRA-XS's r above a layer's rank failed in its SVD."""
    from adapterfab.spec_checks import semantic_problems

    two = [{"tenant": "acme", "persona": p, "dataset": "d.jsonl"} for p in ("pirate", "butler")]
    for name in ("lora", "qlora", "lora_xs"):
        spec, jobs = parse_spec(_spec(base_model=smollm2_path, tenants=two,
                                      defaults={"method": {"name": name, "target_modules": ["q_proj", "foo"]}}))
        got = [p for p in semantic_problems(spec, jobs, data_roots=()) if p[0] != "tenants[0].dataset"
               and p[0] != "tenants[1].dataset"]
        assert got == [("defaults.method.target_modules", "the base has no Linear layer named 'foo' in its "
                        "blocks; it has: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj")], got
    spec, jobs = parse_spec(_spec(base_model=smollm2_path, tenants=[
        {**two[0], "method": {"name": "lora_xs", "r": 193}}, {**two[1], "method": {"name": "lora_xs", "r": 192}}]))
    got = [p for p in semantic_problems(spec, jobs, data_roots=()) if not p[0].endswith(".dataset")]
    assert got == [("tenants[0].method.r", "LoRA-XS's r (193) exceeds the smallest adapted layer's rank (192, "
                                           "of v_proj); give r ≤ 192")], got


def test_base_model_form_is_checked_and_a_relative_folder_is_found_beside_the_spec(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as e:
        parse_spec(_spec(base_model="s3://AKIAX:topsecret@bucket/model"))
    assert _fields(e.value) == ["base_model"] and "topsecret" not in str(e.value) and "credentials" in str(e.value)
    with pytest.raises(SpecError, match="scheme 'http' is not supported"):
        parse_spec(_spec(base_model="http://example.com/model"))
    (tmp_path / "models" / "mine").mkdir(parents=True)
    (tmp_path / "models" / "mine" / "config.json").write_text("{}")
    for given in ("./models/mine", "models/mine"):
        spec, _ = parse_spec(_spec(base_model=given), root=tmp_path)
        assert spec.base_model == str(tmp_path / "models" / "mine"), given
    assert parse_spec(_spec(base_model="org/name"), root=tmp_path)[0].base_model == "org/name"  # an HF id


def test_yaml_values_that_are_not_strings_say_to_quote_them() -> None:
    with pytest.raises(SpecError) as e:
        parse_spec("version: 1\nname: 2024-01-01\ntenants: [{tenant: no, persona: 007, dataset: d.jsonl}]\n")
    msgs = dict(e.value.problems)
    assert "YAML read this as the date 2024-01-01: put it in quotes" in msgs["name"]
    assert "YAML read this as the bool False: put it in quotes" in msgs["tenants.0.tenant"]
    assert "YAML read this as the int 7: put it in quotes" in msgs["tenants.0.persona"]


def test_a_repeated_persona_is_reported_at_its_entry() -> None:
    t = {"tenant": "acme", "persona": "pirate", "dataset": "d.jsonl"}
    with pytest.raises(SpecError) as e:
        parse_spec(_spec(tenants=[t, t]))
    assert e.value.problems == [("tenants[1]", "acme/pirate appears twice; one entry per persona")]


def test_the_cli_prints_names_holding_rich_markup_as_they_are(tmp_path: Path) -> None:
    """`validate` and `plan` crashed with rich's MarkupError on a name holding "[/bold]"."""
    from typer.testing import CliRunner

    from adapterfab.cli import app

    (tmp_path / "d.jsonl").write_text('{"instruction": "hi", "output": "yo"}\n')
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(_spec(name="support [/bold] v2 [red]x")))
    for cmd in ("validate", "plan"):
        r = CliRunner().invoke(app, [cmd, str(tmp_path / "b.yaml")])
        assert r.exit_code == 0, r.output
        assert "support [/bold] v2 [red]x" in r.output
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_spec(base_model="/nope/[/bold]")))
    r = CliRunner().invoke(app, ["validate", str(tmp_path / "c.yaml")])
    assert r.exit_code == 2 and "/nope/[/bold] has no config.json" in r.output


# -- checks a second review found missing (2026-12-07) ----------------------------------------------
def _entries(*extra: dict) -> list[dict]:
    return [{"tenant": "acme", "persona": f"p{i}", "dataset": "d.jsonl", **e} for i, e in enumerate(extra)]


def test_a_key_yaml_reads_as_a_bool_or_a_number_is_a_problem_not_a_crash() -> None:
    """`yes: 1` in a method block is the key True: checking that block crashed parse_spec with
    TypeError "keywords must be strings"."""
    text = ("version: 1\nname: n\ndefaults:\n  method: {name: lorax, yes: 1}\n  train: {3: 1, steps: 0}\n"
            "tenants:\n  - {tenant: acme, persona: p0, dataset: d.jsonl, method: {on: 2, r: -1}}\n")
    with pytest.raises(SpecError) as e:
        parse_spec(text)
    msgs = dict(e.value.problems)
    assert msgs["defaults.method"] == ("a key must be a string (YAML read this as the bool True: put it in "
                                       "quotes)")
    assert "YAML read this as the int 3" in msgs["defaults.train"]
    assert "YAML read this as the bool True" in msgs["tenants.0.method"]
    # the block's other keys are still checked, in the same run
    assert {"defaults.method.name", "defaults.train.steps"} <= set(msgs), e.value.problems


def test_a_schema_error_does_not_hide_the_method_and_train_problems() -> None:
    """A bad tenant id made parse_spec stop at the schema, so a bad learning rate or rank was only
    reported on the next try."""
    tenants = _entries({"tenant": "Bad"}, {"train": {"learning_rate": -1}, "method": {"r": -2}},
                       {"train": {"warmup_steps": 50, "steps": 50}}, {"method": "lora"})
    with pytest.raises(SpecError) as e:
        parse_spec(_spec(defaults={"train": {"steps": 0}}, tenants=tenants))
    assert _fields(e.value) == ["tenants.0.tenant", "tenants.3.method", "defaults.train.steps", "tenants[1].method.r",
                                "tenants[1].train.learning_rate", "tenants[2].train.warmup_steps"]
    with pytest.raises(SpecError) as e:  # a bad default is said once, at defaults, as without a schema error
        parse_spec(_spec(defaults={"method": {"name": "lora", "alpha": -1}}, tenants=tenants))
    assert _fields(e.value) == ["tenants.0.tenant", "tenants.3.method", "defaults.method.alpha",
                                "tenants[1].method.r", "tenants[1].train.learning_rate"]
    with pytest.raises(SpecError) as e:  # defaults that are no mapping: the entries are not judged against a guess
        parse_spec(_spec(defaults="lora", tenants=_entries({"tenant": "Bad", "train": {"steps": 0}})))
    assert _fields(e.value) == ["defaults", "tenants.0.tenant"]


def test_a_bad_default_method_value_is_said_once_not_at_entries_that_set_other_keys() -> None:
    """An entry whose method block set an unrelated key was told of the defaults' bad value again."""
    for defaults, field in (({"name": "lorax"}, "defaults.method.name"),
                            ({"name": "lora", "r": -3}, "defaults.method.r")):
        with pytest.raises(SpecError) as e:
            parse_spec(_spec(defaults={"method": defaults}, tenants=_entries({"method": {"alpha": 4}}, {})))
        assert _fields(e.value) == [field], e.value.problems
    with pytest.raises(SpecError) as e:  # what an entry sets itself is said at the entry, as before
        parse_spec(_spec(defaults={"method": {"name": "lora", "r": -3}},
                         tenants=_entries({"method": {"r": -3, "alpha": -1}}, {"method": {"name": "qlora"}})))
    assert _fields(e.value) == ["defaults.method.r", "tenants[0].method.r", "tenants[0].method.alpha"]


def test_a_warmup_that_only_some_methods_default_steps_are_too_few_for_is_said_at_those_entries() -> None:
    """warmup_steps 25 from defaults.train is below lora's default 30 steps but not qlora's 20: it was
    reported at defaults.train, naming no tenant."""
    tenants = _entries({}, {"method": {"name": "qlora"}}, {"method": {"name": "qlora"}, "train": {"steps": 40}})
    with pytest.raises(SpecError) as e:
        parse_spec(_spec(defaults={"train": {"warmup_steps": 25}}, tenants=tenants))
    ((field, msg),) = e.value.problems
    assert field == "tenants[1].train.warmup_steps" and "warmup_steps (25) must be below steps (20)" in msg
    assert "qlora method's defaults" in msg
    with pytest.raises(SpecError) as e:  # every entry that inherits both has it: said once, at defaults
        parse_spec(_spec(defaults={"train": {"warmup_steps": 25}}, tenants=tenants[1:]))
    assert _fields(e.value) == ["defaults.train.warmup_steps"]
    assert parse_spec(_spec(defaults={"train": {"warmup_steps": 25}}, tenants=[tenants[0], tenants[2]]))
