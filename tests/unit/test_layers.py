"""The layers' import rules (CONTRIBUTING.md, "Layers"), read from the source: every import statement,
at module level or inside a function. The core (``adapterfab/``) imports no layer, except the entry
points that compose them (the CLI and the demo); serving imports neither training nor data preparation;
the parts that must run without a cluster (the engine, its adapter tiers, the planner, the fused
trainer, the one-job train loop) import no ``ray``; and outside ``methods/`` no code names a method or
its adapter type to branch on it (what a method is, it declares: ``adapterfab.methods.Method``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAYERS = {"jobs": "adapterfab.jobs", "serve": "adapterfab.serve", "pipelines": "adapterfab.pipelines"}
ENTRY_POINTS = {"cli.py", "demo.py"}
NO_RAY = ["serve/batched.py", "serve/batched_bank.py", "serve/batched_forward.py", "serve/tiers.py", "jobs/plan.py",
          "jobs/fused.py", "jobs/fused_bank.py", "jobs/fused_batches.py", "jobs/fused_eval.py", "jobs/train_loop.py"]


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports (``from a.b import c`` counts as ``a.b`` and ``a.b.c``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def under(modules: set[str], package: str) -> list[str]:
    return sorted(m for m in modules if m == package or m.startswith(package + "."))


def files(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def test_the_rules_see_imports_inside_functions(tmp_path: Path) -> None:
    """The reader finds an import however deep it sits, and only real imports."""
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef f():\n    from adapterfab.jobs.plan import plan_batch\n"
                 "    if True:\n        import ray.data\n    s = 'import adapterfab.serve'\n")
    got = imports(f)
    assert {"os", "adapterfab.jobs.plan", "adapterfab.jobs.plan.plan_batch", "ray.data"} <= got
    assert not under(got, "adapterfab.serve")


@pytest.mark.parametrize("path", [p for p in files("adapterfab") if p.name not in ENTRY_POINTS],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_the_core_imports_no_layer(path: Path) -> None:
    got = imports(path)
    assert not [m for pkg in LAYERS.values() for m in under(got, pkg)]


@pytest.mark.parametrize("path", files("serve"), ids=lambda p: str(p.relative_to(REPO)))
def test_serving_imports_neither_training_nor_data_preparation(path: Path) -> None:
    got = imports(path)
    assert not under(got, LAYERS["jobs"]) + under(got, LAYERS["pipelines"])


@pytest.mark.parametrize("name", NO_RAY)
def test_parts_that_run_without_a_cluster_import_no_ray(name: str) -> None:
    assert not under(imports(REPO / name), "ray")


METHOD_NAMES = {"lora", "qlora", "lora_xs", "LORA", "LORA_XS"}


def method_literals(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string constant in ``path`` that is exactly a method's name or adapter type,
    docstrings left out."""
    tree = ast.parse(path.read_text(), str(path))
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in METHOD_NAMES
            and id(n) not in docs]


@pytest.mark.parametrize("path", [p for d in ("jobs", "serve", "pipelines") for p in files(d)],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_no_layer_branches_on_a_method_name(path: Path) -> None:
    assert method_literals(path) == []


@pytest.mark.parametrize("path", [p for d in ("adapterfab", "jobs", "serve", "pipelines") for p in files(d)
                                  if p.parent.name != "methods"], ids=lambda p: str(p.relative_to(REPO)))
def test_only_the_registry_of_methods_is_imported_outside_them(path: Path) -> None:
    """Outside ``methods/`` a method is reached through ``adapterfab.methods`` (get_method, what it
    declares), never by importing its module; ``methods.quant`` (a 4-bit base) belongs to no method."""
    own = {f"adapterfab.methods.{n}" for n in ("lora", "qlora", "lora_xs")}
    assert not [m for m in imports(path) if any(m == o or m.startswith(o + ".") for o in own)]


def test_every_method_declares_its_layout_and_adapter_type() -> None:
    from adapterfab.methods import LOW_RANK, SHARED_BASIS, get_method, known_methods, method_of_adapter

    for name in known_methods():
        m = get_method(name)
        assert m.family in (LOW_RANK, SHARED_BASIS, None), name
        assert method_of_adapter(m.peft_type) is not None and method_of_adapter(m.peft_type).peft_type == m.peft_type
        if m.family == SHARED_BASIS:  # served and fused from its R per module over a basis it can load
            assert None not in (m.read_adapter, m.load_basis, m.init_shared, m.write_shared), name
    assert method_of_adapter("LORA").name == "lora"  # LoRA and QLoRA write the same folders: LoRA's reader
    assert method_of_adapter("IA3") is None


MLFLOW_MODULES = {"adapterfab/mlflow_client.py", "adapterfab/tracking.py", "adapterfab/registry.py"}


@pytest.mark.parametrize("path", [p for d in ("adapterfab", "jobs", "serve", "pipelines") for p in files(d)
                                  if str(p.relative_to(REPO)) not in MLFLOW_MODULES],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_mlflow_is_imported_in_three_modules_only(path: Path) -> None:
    """Everything else reaches MLflow through them (its client is made, imported and retried in one place)."""
    assert not under(imports(path), "mlflow")


@pytest.mark.parametrize("path", [p for d in ("adapterfab", "jobs", "serve", "pipelines") for p in files(d)],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_is_over_600_lines(path: Path) -> None:
    """A file that grows past this holds several concepts: split it by concept (as fused.py and fused_*.py)."""
    assert len(path.read_text().splitlines()) <= 600
