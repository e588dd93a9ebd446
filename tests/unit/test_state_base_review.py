"""Local state files and cached bases (review, 2026-12), with real files and a real S3 API (moto's server):

- the state database (with its -wal and -shm files and its folder), the home, the MLflow stack's
  SQLite database and folders, and a local artifact store are created owner-only; existing folders and
  files keep the mode they have (an existing world-readable database is warned about);
- an ``s3://`` base replaced in S3 is downloaded again into a folder of its own, the old one left whole;
- two serving replicas loading one LoRA-XS basis into one cache at once both get it whole (7deb8c7).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import stat
import threading
from pathlib import Path

import pytest

from adapterfab.errors import StorageError
from adapterfab.settings import Settings, private_dir
from adapterfab.state import StateStore
from adapterfab.storage import LocalStore, open_store
from tests.unit.test_s3_store import s3_server  # noqa: F401 - the module's moto server, started here too


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


# owner-only state files ------------------------------------------------------------------------------
def test_a_new_state_database_its_wal_and_its_folder_are_owner_only(tmp_path: Path) -> None:
    home = tmp_path / "new" / "home"
    store = StateStore(f"sqlite:///{home / 'state.db'}")
    store.add_key("k1", "acme", "0" * 64)  # a write: the -wal and -shm files exist
    StateStore(f"sqlite:///{home / 'state.db'}").list_keys()  # a second opener changes nothing
    files = {p.name: _mode(p) for p in home.iterdir()}
    assert files == {"state.db": 0o600, "state.db-wal": 0o600, "state.db-shm": 0o600}
    assert _mode(home) == _mode(tmp_path / "new") == 0o700
    assert len(store.list_keys(tenant="acme")) == 1


def test_an_existing_folder_and_database_keep_their_modes(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A folder the user made (a group's, say) is not tightened; nor is a database file that exists
    (made by an older adapterfab, or shared on purpose): adapterfab cannot tell, and warns when every local
    user may read it."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    StateStore(f"sqlite:///{shared / 'state.db'}").add_key("k1", "acme", "0" * 64)
    assert _mode(shared) == 0o755 and _mode(shared / "state.db") == 0o600

    old = tmp_path / "old.db"
    sqlite3.connect(old).close()  # an older adapterfab's database: the umask's mode
    old.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="adapterfab.settings"):
        StateStore(f"sqlite:///{old}").add_key("k2", "acme", "1" * 64)
    assert _mode(old) == 0o644
    assert f"chmod 600 {old}" in caplog.text and "readable by every local user" in caplog.text


def test_the_stacks_home_and_mlflow_stores_are_owner_only(tmp_path: Path) -> None:
    """What ``adapterfab up`` makes before its MLflow server starts: the home and its logs, MLflow's folder,
    SQLite database (and the journal SQLite writes beside it) and artifact folder; a given artifact folder
    that exists keeps its mode."""
    from sqlalchemy import create_engine, text

    from adapterfab.procs import mlflow_stores
    from adapterfab.stack import private_mlflow_stores

    home = tmp_path / "afhome"
    settings = Settings(home=home, cache=tmp_path / "cache", state_url="", artifacts="")
    settings.ensure_dirs()
    assert {_mode(p) for p in (home, settings.logs, settings.cache)} == {0o700}
    mlflow_home = home / "mlflow"
    artifacts, backend = mlflow_stores(mlflow_home)
    private_mlflow_stores(mlflow_home, artifacts, backend)
    engine = create_engine(backend)  # as MLflow's server opens it: a new database in that empty file
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE runs (id TEXT)"))
        conn.execute(text("INSERT INTO runs VALUES ('r1')"))
        journal = {p.name: _mode(p) for p in mlflow_home.iterdir() if p.name.startswith("mlflow.db-")}
    engine.dispose()
    assert (_mode(mlflow_home), _mode(Path(artifacts)), _mode(mlflow_home / "mlflow.db")) == (0o700, 0o700, 0o600)
    assert journal and set(journal.values()) == {0o600}

    given = tmp_path / "given-artifacts"
    given.mkdir(mode=0o750)
    private_mlflow_stores(tmp_path / "ml2", str(given), f"sqlite:///{tmp_path / 'ml2' / 'mlflow.db'}")
    assert _mode(given) == 0o750 and _mode(tmp_path / "ml2" / "mlflow.db") == 0o600


def test_a_local_artifact_store_made_here_is_owner_only(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    LocalStore(tmp_path / "new" / "artifacts").upload_dir(adapter, "adapters/acme/p/j1/")
    assert _mode(tmp_path / "new") == _mode(tmp_path / "new" / "artifacts") == 0o700
    existing = private_dir(tmp_path / "existing")
    existing.chmod(0o755)
    LocalStore(existing).upload_dir(adapter, "adapters/acme/p/j1/")
    assert _mode(existing) == 0o755


# s3:// bases are refreshed -----------------------------------------------------------------------------


def _put(bucket: str, key: str, body: bytes) -> None:
    open_store(f"s3://{bucket}").client.put_object(Bucket=bucket, Key=key, Body=body)


def _sha(*weights: tuple[str, bytes]) -> str:
    """``basemodel.fingerprint`` of a folder holding these weight files."""
    h = hashlib.sha256()
    for name, body in sorted(weights):
        h.update(name.encode() + body)
    return h.hexdigest()


def test_a_replaced_s3_base_is_downloaded_again_and_the_old_folder_stays_whole(
        s3_server: str, tmp_path: Path) -> None:  # noqa: F811
    from adapterfab.basemodel import local_folder, resolve_base_model

    open_store("s3://rebase").ensure_bucket()
    _put("rebase", "m/config.json", b'{"v": 1}')
    _put("rebase", "m/model.safetensors", b"old weights")
    cache, name = tmp_path / "cache", "s3://rebase/m"
    first = resolve_base_model(name, cache)
    assert first.fingerprint == _sha(("model.safetensors", b"old weights"))
    assert resolve_base_model(name, cache).path == first.path  # unchanged: the same folder, no download

    _put("rebase", "m/model.safetensors", b"retrained weights")  # the base replaced under its prefix
    _put("rebase", "m/config.json", b'{"v": 2}')
    second = resolve_base_model(name, cache)
    assert second.path != first.path
    assert second.fingerprint == _sha(("model.safetensors", b"retrained weights"))
    assert (Path(second.path) / "config.json").read_bytes() == b'{"v": 2}'
    # a job that resolved the old base before reads it whole, as it was
    assert (Path(first.path) / "model.safetensors").read_bytes() == b"old weights"
    assert (Path(first.path) / "config.json").read_bytes() == b'{"v": 1}'
    assert local_folder(name, cache) == second.path

    _put("rebase", "m/model-2.safetensors", b"another shard")  # an object added counts too
    third = resolve_base_model(name, cache)
    assert third.fingerprint == _sha(("model.safetensors", b"retrained weights"),
                                     ("model-2.safetensors", b"another shard"))
    assert not [p for p in (cache / "models").iterdir() if ".tmp" in p.name]


def test_a_base_changed_during_its_download_is_not_kept_under_the_old_listing(
        s3_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """Another tool uploading the new base while it is downloaded: the download is refused, nothing stays
    in the cache, and the next resolve downloads the new base whole."""
    import adapterfab.storage
    from adapterfab.basemodel import resolve_base_model

    open_store("s3://midway").ensure_bucket()
    _put("midway", "m/config.json", b"{}")
    _put("midway", "m/model.safetensors", b"v1")
    real = adapterfab.storage.download_base

    def racing(store, uri, local_dir):  # noqa: ANN001, ANN202
        got = real(store, uri, local_dir)
        _put("midway", "m/model.safetensors", b"v2")
        return got

    monkeypatch.setattr(adapterfab.storage, "download_base", racing)
    cache = tmp_path / "cache"
    with pytest.raises(StorageError, match="changed while they were downloaded"):
        resolve_base_model("s3://midway/m", cache)
    assert not [p for p in (cache / "models").iterdir() if not p.name.endswith(".lock")]
    monkeypatch.setattr(adapterfab.storage, "download_base", real)
    assert resolve_base_model("s3://midway/m", cache).fingerprint == _sha(("model.safetensors", b"v2"))


def test_a_base_s3_cannot_list_is_used_as_last_downloaded(s3_server: str, tmp_path: Path,  # noqa: F811
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The listing fails (here: the bucket is gone; an outage alike): the folder downloaded last is used,
    with a warning; with none downloaded, the error."""
    from adapterfab.basemodel import resolve_base_model

    store = open_store("s3://gone")
    store.ensure_bucket()
    _put("gone", "m/config.json", b"{}")
    _put("gone", "m/model.safetensors", b"w")
    cache = tmp_path / "cache"
    first = resolve_base_model("s3://gone/m", cache)
    store.delete_prefix("m")
    store.client.delete_bucket(Bucket="gone")
    with caplog.at_level(logging.WARNING, logger="adapterfab.basemodel"):
        assert resolve_base_model("s3://gone/m", cache).path == first.path
    assert "downloaded last" in caplog.text
    with pytest.raises(StorageError, match="cannot list"):
        resolve_base_model("s3://gone/m", tmp_path / "empty-cache")


# a LoRA-XS basis loaded by two replicas at once (7deb8c7) ---------------------------------------------
def test_two_replicas_fetching_one_basis_into_one_cache_both_get_it_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two serving replicas (each its own BasisCache) load adapters on one LoRA-XS basis into one cache
    folder at once. The store's transfer is slowed at the edge so that the second replica's download of
    basis.safetensors starts while the first one's is half done: into one shared folder, the second
    truncated the file the first was writing and checking (its checksum failed, it removed the file, and
    the second one's download failed in turn). Each into a folder of its own, both end with the whole
    basis, and no temporary folder stays in the cache."""
    import time

    import torch

    from adapterfab.ids import AdapterId
    from adapterfab.methods.lora_xs import BASIS_WEIGHTS, _make_basis, save_basis
    from adapterfab.registry import AdapterVersion, Registry
    from adapterfab.serve.backend import download_native

    gen = torch.Generator().manual_seed(0)
    basis = _make_basis("sha256:test", ("q_proj",), 4, {
        f"model.layers.{i}.self_attn.q_proj": (torch.randn(64, 4, generator=gen), torch.randn(4, 64, generator=gen))
        for i in range(4)})
    store = LocalStore(tmp_path / "store")
    basis_uri = store.upload_dir(save_basis(basis, tmp_path / "basis"), "bases/xs/")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA_XS", "r": 4}))
    (adapter / "adapter_model.safetensors").write_bytes(b"R matrices")
    adapter_uri = store.upload_dir(adapter, "adapters/acme/p/j1/")
    version = AdapterVersion(AdapterId("acme", "p", 1), adapter_uri, "run1",
                             {"adapterfab.artifact_uri": adapter_uri, "adapterfab.artifact_root": store.root,
                              "adapterfab.basis_uri": basis_uri}, (), 0.0)
    registry = Registry("http://127.0.0.1:9")  # downloads from the artifact store: MLflow is never asked

    real_get, arrivals, lock = LocalStore.get_file, [], threading.Lock()
    first_half, second_opened = threading.Event(), threading.Event()
    finished, index = [threading.Event(), threading.Event()], {}  # by replica; replica by thread

    def slow_get(self: LocalStore, key: str, local: Path) -> None:
        if not key.endswith(BASIS_WEIGHTS):
            return real_get(self, key, local)
        data = self._p(key).read_bytes()
        with lock:
            arrivals.append(threading.get_ident())
            first = len(arrivals) == 1
        if first:  # half the bytes, then the other replica starts its download
            with open(local, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                first_half.set()
                second_opened.wait(10)
                f.write(data[len(data) // 2:])
            return None
        first_half.wait(10)
        with open(local, "wb") as f:
            second_opened.set()
            finished[index[arrivals[0]]].wait(10)  # a slow link: the first replica is done before this one
            f.write(data)
        return None

    monkeypatch.setattr(LocalStore, "get_file", slow_get)
    cache = tmp_path / "cache"
    results: dict[int, object] = {}

    def replica(i: int) -> None:
        index[threading.get_ident()] = i
        try:
            results[i] = download_native(registry, "acme/p@1", cache, known=version)[1]
        except Exception as e:  # noqa: BLE001
            results[i] = e
        finally:
            finished[i].set()

    threads = [threading.Thread(target=replica, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    for t in threads:
        t.join(30)
    assert len(arrivals) == 2 and time.monotonic() - t0 < 20  # both downloaded it, overlapping
    assert all(getattr(b, "digest", b) == basis.digest for b in results.values()), results
    assert [p.name for p in (cache / "bases").iterdir()] == []
