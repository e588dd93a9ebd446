"""Turn any registered adapter into a standard PEFT LoRA folder (what vLLM, LoRAX and plain
``PeftModel.from_pretrained`` load). LoRA and QLoRA adapters already are one; LoRA-XS adapters are
rebuilt from their R matrices and the shared basis recorded on the version (A' = A·R, B' = B)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from adapterfab.errors import AdapterfabError, RegistryError
from adapterfab.methods import Method, get_method
from adapterfab.registry import AdapterVersion, Registry
from adapterfab.storage import open_store

FORMATS = ("peft-lora",)


def fetch_basis(method: Method, basis_uri: str, dest: str | Path) -> Any:
    """Download a stored shared basis (checksums verified) and load it with the method's loader."""
    if method.load_basis is None:
        raise RegistryError(f"method {method.name} has no shared basis to load")
    return method.load_basis(open_store(basis_uri).download_dir(basis_uri, dest))


def to_peft_lora(registry: Registry, v: AdapterVersion, work_dir: str | Path) -> Path:
    """Download version ``v`` under ``work_dir`` and return a folder holding it as a PEFT LoRA."""
    work = Path(work_dir)
    local = Path(registry.download(v, work / "raw"))
    impl = get_method(v.tags.get("adapterfab.method", "lora"))
    if impl.export_peft_lora is None:
        return local
    basis_uri = v.tags.get("adapterfab.basis_uri")
    if not basis_uri:
        raise RegistryError(f"{v.id} is a {impl.name} adapter but its version records no basis_uri")
    basis = fetch_basis(impl, basis_uri, work / "basis")
    return Path(impl.export_peft_lora(local, basis, work / "peft"))


def export_adapter(registry: Registry, v: AdapterVersion, out_dir: str | Path, fmt: str = "peft-lora") -> Path:
    if fmt not in FORMATS:
        raise RegistryError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    import tempfile

    out = Path(out_dir)
    try:  # before the download: a bad folder is said at once
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AdapterfabError(f"cannot write the export to {out}: {e.strerror or e}") from None
    with tempfile.TemporaryDirectory() as tmp:
        folder = to_peft_lora(registry, v, tmp)
        _put_whole(sorted(f for f in folder.iterdir() if f.is_file() and f.name != "MANIFEST.json"), out)
    return out


def _put_whole(files: list[Path], out: Path) -> None:
    """``files`` into ``out``, all or none: copied beside them first (a hidden folder in ``out``, the same
    disk), then each renamed into place, the config last. A copy that fails (a full disk) leaves ``out`` as
    it was: never one adapter's config beside another's weights, an earlier export of the same folder."""
    import os
    import tempfile

    try:
        staged = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
        try:
            for f in files:
                shutil.copy2(f, staged / f.name)
            for f in sorted(files, key=lambda f: f.name == "adapter_config.json"):
                os.replace(staged / f.name, out / f.name)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    except OSError as e:
        raise AdapterfabError(f"cannot write the export to {out}: {e.strerror or e}") from None
