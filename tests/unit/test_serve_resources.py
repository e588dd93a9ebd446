"""A serving replica's resources stay bounded over a long life of many tenants:

- the batched engine frees a LoRA-XS basis from the device (its ``_XSBank``) when the last adapter on it
  leaves, never while a request still uses one, and a basis loaded again serves the same tokens;
- the disk cache of downloaded adapters (``adapter_cache_dir``) keeps within its byte bound by removing
  the least recently used version folders that no engine holds, without breaking a concurrent reader."""

from __future__ import annotations

import gc
import os
import time
import weakref
from pathlib import Path

import pytest
import torch

from adapterfab.errors import AdapterfabError
from adapterfab.serve.batched import BatchedEngine, ParsedAdapter
from adapterfab.serve.engine import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def two_bases(tiny_model_path: str, mixed_adapters: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """LoRA-XS adapters on two bases: ``xs-one`` and ``xs-two`` on the r=4 basis of ``mixed_adapters``,
    ``xs-r2`` on an r=2 basis of the same base (another basis id)."""
    from transformers import AutoModelForCausalLM

    from adapterfab.methods.lora_xs import LoraXSConfig, compute_basis, write_adapter

    cfg = LoraXSConfig(r=2, alpha=2)
    basis2 = compute_basis(AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32), cfg, "tiny")
    gen = torch.Generator().manual_seed(11)
    rs = {m: torch.randn(2, 2, generator=gen) * 30.0 for m in basis2.factors}
    folder = write_adapter(tmp_path_factory.mktemp("xs-r2") / "xs-r2", cfg, basis2.id, basis2.digest,
                           basis2.base_fingerprint, cfg.resolved_targets(), rs)
    basis1 = mixed_adapters["basis"]
    assert basis1.id != basis2.id
    return {"xs-one": (mixed_adapters["xs"]["xs-one"], basis1), "xs-two": (mixed_adapters["xs"]["xs-two"], basis1),
            "xs-r2": (folder, basis2)}


def _greedy(eng: BatchedEngine, adapter: str | None) -> list[int]:
    return list(eng.generate_token_ids(PROMPT, adapter, GREEDY))


@pytest.mark.parametrize("buckets", [False, True])
def test_a_basis_leaves_the_device_with_its_last_adapter(tiny_model_path: str, two_bases: dict,
                                                         buckets: bool) -> None:
    eng = BatchedEngine(tiny_model_path, dtype="float32", max_batch=4, max_len=128, max_adapters=4, max_rank=8,
                        buckets=buckets)
    try:
        for name, (folder, basis) in two_bases.items():
            eng.load_adapter(name, folder, basis)
        before = {name: _greedy(eng, name) for name in (*two_bases, None)}
        assert len({tuple(v) for v in before.values()}) == 4  # each adapter changes the tokens
        b1, b2 = two_bases["xs-one"][1].id, two_bases["xs-r2"][1].id
        assert set(eng.xs) == {b1, b2}
        # the R slots the engine allocated (on a CPU in fp32 its A and B are the basis' own tensors)
        gone = [weakref.ref(t) for bank in eng.xs.values() for t in bank.rr.values()]

        # a request in flight pins its adapter, and so its basis: neither leaves
        req = eng.submit(PROMPT, "xs-r2", SamplingParams(max_tokens=2, temperature=0.0))
        with pytest.raises(AdapterfabError, match="in use"):
            eng.unload_adapter("xs-r2")
        assert b2 in eng.xs
        while req.out.get(timeout=60) is not None:
            pass
        deadline = time.monotonic() + 30
        while eng.in_use("xs-r2") and time.monotonic() < deadline:
            time.sleep(0.01)

        version = eng._banks_version
        eng.unload_adapter("xs-one")
        assert set(eng.xs) == {b1, b2}  # xs-two is still on the r=4 basis
        assert _greedy(eng, "xs-two") == before["xs-two"]
        eng.unload_adapter("xs-two")
        eng.unload_adapter("xs-r2")
        assert eng.xs == {}
        assert eng._banks_version > version  # graphs captured over the freed banks are not replayed
        gc.collect()
        assert all(ref() is None for ref in gone), "a freed basis' device tensors are still referenced"
        assert eng.free_slots == 4

        for name, (folder, basis) in two_bases.items():  # loaded again: the same tokens as before
            eng.load_adapter(name, folder, basis)
        assert {name: _greedy(eng, name) for name in (*two_bases, None)} == before
    finally:
        eng.close()


def test_a_failed_place_frees_the_basis_it_created(tiny_model_path: str, two_bases: dict) -> None:
    """A place that fails after allocating its basis' bank (out of device memory writing R, here an R of
    the wrong shape) leaves no bank behind with no adapter on it."""
    eng = BatchedEngine(tiny_model_path, dtype="float32", max_batch=2, max_len=64, max_adapters=2, max_rank=8)
    try:
        folder, basis = two_bases["xs-r2"]
        good = eng.read_adapter(folder, basis)
        bad = ParsedAdapter(good.kind, good.cfg, {k: torch.zeros(3, 3) for k in good.tensors}, basis)
        with pytest.raises(RuntimeError):
            eng.place("broken", bad)
        assert eng.xs == {} and eng.free_slots == 2
        eng.place("xs-r2", good)
        assert set(eng.xs) == {basis.id}
    finally:
        eng.close()


# -- the disk cache of adapter versions -------------------------------------------------------------------
class _Registry:
    """The registry at its edge: versions whose real adapter files sit in a real artifact store
    (``Registry.download`` reads such a version from the store the same way)."""

    def __init__(self, root: Path, files: Path, versions: int) -> None:
        from adapterfab.ids import AdapterId
        from adapterfab.registry import AdapterVersion
        from adapterfab.storage import LocalStore

        self.store, self.downloads = LocalStore(root), 0
        self.versions = {}
        for n in range(1, versions + 1):
            aid = AdapterId("acme", "pirate", n)
            uri = self.store.upload_dir(files, aid.artifact_prefix(f"b{n}.acme.pirate"))
            self.versions[str(aid)] = AdapterVersion(aid, uri, f"run-{n}", {"adapterfab.artifact_uri": uri,
                                                                            "adapterfab.artifact_root": str(root)},
                                                     (), 0.0)

    def get(self, aid: object) -> object:
        return self.versions[str(aid)]

    def download(self, version: object, dest: Path) -> Path:
        self.downloads += 1
        return self.store.download_dir(version.artifact_uri, dest)  # type: ignore[attr-defined]


@pytest.fixture()
def registry(tiny_model_path: str, make_lora_adapter, tmp_path: Path) -> _Registry:  # noqa: ANN001
    return _Registry(tmp_path / "store", make_lora_adapter(tiny_model_path, tmp_path / "files", 1), 5)


def _fetch(registry: _Registry, n: int, cache: Path, disk: object) -> tuple[Path, bool]:
    from adapterfab.serve.backend import download_native

    key = f"acme/pirate@{n}"
    folder, _, from_store = download_native(registry, key, cache, registry.versions[key], disk=disk)
    return folder, from_store


def _used_ago(folder: Path, seconds: float) -> None:
    """Mark a cached version last used ``seconds`` ago (as the fetch that used it did then)."""
    from adapterfab.serve.backend import SOURCE_FILE

    t = time.time() - seconds
    os.utime(folder / SOURCE_FILE, (t, t))


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_the_adapter_cache_keeps_within_its_bound(registry: _Registry, tiny_model_path: str, tmp_path: Path) -> None:
    """Past the bound the least recently used version folders go, but never one the engine holds, one
    used within ``recent_s`` or a download under way; a version removed is downloaded again when asked for,
    and serves."""
    from adapterfab.serve.backend import DiskCache

    cache = tmp_path / "cache"
    held = {"acme/pirate@1"}  # in the engine's tiers
    folders = {n: _fetch(registry, n, cache, None)[0] for n in (1, 2, 3)}
    size = _folder_bytes(folders[1])
    for n, ago in ((1, 4000), (2, 3000), (3, 2000)):  # 1 is the least recently used, then 2, then 3
        _used_ago(folders[n], ago)
    downloading = cache / "native" / "acme" / "pirate" / ".5.tmp-1-abcd"  # another replica's download
    downloading.mkdir()
    (downloading / "adapter_model.safetensors").write_bytes(b"x" * 10)
    orphan = cache / "native" / "acme" / "pirate" / ".6.tmp-2-dead"  # a download by a process that died
    orphan.mkdir()
    os.utime(orphan, (time.time() - 2 * 86400,) * 2)
    disk = DiskCache(cache, max_bytes=int(3.5 * size), keep=lambda: held, recent_s=600)

    folder4, from_store = _fetch(registry, 4, cache, disk)  # 4 versions: one must go
    assert from_store and folder4.is_dir()
    assert folders[1].is_dir(), "a version the engine holds was removed"
    assert not folders[2].exists() and folders[3].is_dir()  # the least recently used one not held
    assert downloading.is_dir() and not orphan.exists()
    assert not [p for p in folders[2].parent.iterdir() if ".evict-" in p.name]  # nothing left half removed
    assert sum(_folder_bytes(f) for f in folders[2].parent.iterdir() if not f.name.startswith(".")) <= 3.5 * size

    # the bound is exceeded rather than remove a folder just used (a load between its fetch and its read)
    _used_ago(folders[3], 10)
    held.clear()
    _fetch(registry, 5, cache, disk)
    assert folders[3].is_dir() and not folders[1].exists()  # 1 was older and no longer held

    # a removed version is fetched again, whole, and the engine reads it
    downloads = registry.downloads
    folder2, from_store = _fetch(registry, 2, cache, disk)
    assert from_store and registry.downloads == downloads + 1 and folder2 == folders[2]
    eng_files = sorted(p.name for p in folder2.iterdir())
    assert "adapter_model.safetensors" in eng_files and "adapter_config.json" in eng_files
    from adapterfab.serve.engine import Engine

    Engine(tiny_model_path, torch_threads=1).read_adapter(folder2)  # a whole adapter that fits the base
    assert disk.removed == 2


def test_a_folder_removed_under_a_reader_is_fetched_again_or_stays(registry: _Registry, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Replicas share the cache folder. A folder another replica removes between this fetch's check and
    its mark is downloaded again; a folder a reader marked used between a remover's look and its rename
    is put back."""
    from adapterfab.serve import backend
    from adapterfab.serve.backend import SOURCE_FILE, DiskCache

    cache = tmp_path / "cache"
    folder, _ = _fetch(registry, 1, cache, None)
    _used_ago(folder, 4000)
    peer = DiskCache(cache, max_bytes=0, recent_s=600)  # the other replica's cache, over its bound
    cached = backend._cached

    def removed_by_the_peer_meanwhile(*args: object) -> object:
        out = cached(*args)
        if folder.exists():
            assert peer.trim() == [folder]
        return out

    monkeypatch.setattr(backend, "_cached", removed_by_the_peer_meanwhile)
    got, from_store = _fetch(registry, 1, cache, DiskCache(cache, recent_s=600))
    assert got == folder and from_store and (folder / "adapter_config.json").is_file()
    monkeypatch.setattr(backend, "_cached", cached)

    # a remover's look saw it unused; a reader marks it before the rename: the remover gives it back
    _used_ago(folder, 4000)
    looked = (folder / SOURCE_FILE).stat().st_mtime_ns
    assert DiskCache.touch(folder)
    assert not DiskCache._remove(folder, looked)
    assert (folder / "adapter_config.json").is_file()
    assert not [p for p in folder.parent.iterdir() if ".evict-" in p.name]


def test_replicas_trimming_one_folder_at_once_never_fail_a_fetch(registry: _Registry, tmp_path: Path) -> None:
    """Two replicas (two caches on one folder) fetch and trim at the same time, every folder old enough to
    go: every fetch returns a whole folder, and nothing is left half removed."""
    import threading

    from adapterfab.serve.backend import DiskCache

    cache = tmp_path / "cache"
    errors: list[BaseException] = []

    def replica(seed: int) -> None:
        disk = DiskCache(cache, max_bytes=0, recent_s=0)  # everything may go at once
        try:
            for i in range(12):
                n = 1 + (seed + i) % 5
                folder, _ = _fetch(registry, n, cache, disk)
                assert folder.name == str(n)
                disk.trim()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=replica, args=(s,)) for s in (0, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert not [p for p in (cache / "native" / "acme" / "pirate").iterdir() if p.name.startswith(".")]


def test_the_adapter_cache_bound_is_an_app_arg(tiny_model_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from adapterfab.serve import app as serve_app
    from adapterfab.serve.backend import ADAPTER_CACHE_BYTES

    built: list = []
    monkeypatch.setattr(serve_app, "build_app", built.append)
    ok = {"base_model": tiny_model_path, "mlflow_uri": "http://127.0.0.1:9", "state_url": "sqlite://"}
    with pytest.raises(ValueError, match="adapter_cache_mb must be at least 1"):
        serve_app.app_builder({**ok, "adapter_cache_mb": 0})
    serve_app.app_builder({**ok, "adapter_cache_mb": 512})
    serve_app.app_builder(ok)
    assert built[0].adapter_cache_mb == 512 and built[1].adapter_cache_mb == ADAPTER_CACHE_BYTES >> 20 >= 1024
