"""What a second review of API keys found (2026-12): offboarding a tenant meant revoking each of its keys by
hand (now ``keys revoke --tenant T``, ``KeyStore.revoke_tenant``: every active key in one transaction);
rotating a key that expires gave a successor that never expired unless ``--expires`` was given again (now
the successor keeps the old key's lifetime, counted from the rotation).

The real ``KeyStore`` on a SQLite state database; the CLI as a subprocess, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from adapterfab.errors import ApiKeyError, InvalidId
from adapterfab.keys import KeyStore
from adapterfab.state import StateStore

CLI = str(Path(sys.executable).parent / "adapterfab")
DAY = 86400.0


def _store(tmp_path: Path, clock=time.time) -> KeyStore:  # noqa: ANN001
    return KeyStore(StateStore(f"sqlite:///{tmp_path / 'state.db'}"), clock=clock)


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "ADAPTERFAB_HOME": str(home), "HF_HUB_OFFLINE": "1"})


def _id(key: str) -> str:
    return key.split("_")[1]


# --- offboarding: every active key of a tenant at once ------------------------------------------------


def test_revoke_tenant_ends_every_active_key_of_that_tenant_and_nothing_else(tmp_path: Path) -> None:
    now = [1000.0]
    ks = _store(tmp_path, clock=lambda: now[0])
    forever, short, gone = ks.create("acme"), ks.create("acme", ttl_s=DAY), ks.create("acme", ttl_s=10)
    revoked = ks.create("acme")
    ks.revoke(revoked)
    graced = ks.create("acme")
    successor, _ = ks.rotate(graced, grace_s=3600)  # both live while clients switch over
    other, op = ks.create("globex"), ks.create_operator()
    now[0] = 1100.0  # `gone` has expired by itself

    ended = ks.revoke_tenant("acme")

    assert sorted(k.key_id for k in ended) == sorted(_id(k) for k in (forever, short, graced, successor))
    assert all(k.status(now[0]) == "revoked" and k.revoked_s == 1100.0 for k in ended)
    for key in (forever, short, gone, revoked, graced, successor):
        assert ks.verify(key) is None
    listed = {k.key_id: k for k in ks.list("acme")}
    assert listed[_id(gone)].status(now[0]) == "expired" and listed[_id(gone)].revoked_s is None  # left as it was
    assert listed[_id(revoked)].revoked_s == 1000.0  # its own revocation time kept
    assert ks.verify(other) == "globex" and ks.identify(op).operator  # another tenant's, and operator keys, live
    assert ks.revoke_tenant("acme") == []  # nothing active left: nothing to do, no error
    with pytest.raises(InvalidId):
        ks.revoke_tenant("../acme")


def test_offboarding_while_the_tenants_keys_rotate_leaves_no_key_of_it_active(tmp_path: Path) -> None:
    """Rotations of the tenant's keys in other processes at the same moment: each either made its new key
    before the offboarding read (and that key ended too) or was refused after it."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    keys = [KeyStore(StateStore(url)).create("acme") for _ in range(4)]
    stores = [KeyStore(StateStore(url)) for _ in range(len(keys) + 1)]
    start = threading.Barrier(len(stores))

    def rotate(store: KeyStore, key: str) -> None:
        start.wait()
        try:
            store.rotate(key, grace_s=3600)
        except ApiKeyError:
            pass  # the offboarding ended it first

    def offboard() -> None:
        start.wait()
        stores[-1].revoke_tenant("acme")

    threads = [threading.Thread(target=rotate, args=(s, k)) for s, k in zip(stores, keys)]
    threads.append(threading.Thread(target=offboard))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    listed = stores[0].list("acme")
    assert not [k.key_id for k in listed if k.status(time.time()) == "active"], listed
    assert all(stores[0].verify(k) is None for k in keys)


def test_keys_revoke_tenant_from_the_cli(tmp_path: Path) -> None:
    ks = _store(tmp_path)
    acme = [ks.create("acme"), ks.create("acme", ttl_s=DAY)]
    other = ks.create("globex")

    both = _cli("keys", "revoke", acme[0], "--tenant", "acme", home=tmp_path)
    assert both.returncode == 2 and "not both" in both.stderr, both.stderr
    neither = _cli("keys", "revoke", home=tmp_path)
    assert neither.returncode == 2 and "--tenant" in neither.stderr, neither.stderr
    bad = _cli("keys", "revoke", "--tenant", "Acme/x", home=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert all(ks.verify(k) == "acme" for k in acme)  # a refused command ended nothing

    r = _cli("keys", "revoke", "--tenant", "acme", home=tmp_path)
    assert r.returncode == 0 and "revoked 2 active keys of tenant acme" in r.stdout, (r.stdout, r.stderr)
    assert all(ks.verify(k) is None for k in acme) and ks.verify(other) == "globex"
    again = _cli("keys", "revoke", "--tenant", "acme", "--json", home=tmp_path)
    assert again.returncode == 0 and json.loads(again.stdout) == {"tenant": "acme", "revoked": 0, "keys": []}
    made = _cli("keys", "revoke", "--tenant", "globex", "--json", home=tmp_path)
    out = json.loads(made.stdout)
    assert out["revoked"] == 1 and out["keys"][0]["key_id"] == _id(other) and out["keys"][0]["status"] == "revoked"


# --- rotation keeps a key's lifetime ------------------------------------------------------------------


def test_a_rotated_key_keeps_the_old_keys_lifetime_from_the_rotation(tmp_path: Path) -> None:
    later = [0.0]  # the store's clock runs this far ahead of the time a key's row is stamped with
    ks = _store(tmp_path, clock=lambda: time.time() + later[0])
    month, forever, season = ks.create("acme", ttl_s=30 * DAY), ks.create("acme"), ks.create("acme", ttl_s=60 * DAY)
    expires = lambda key: {k.key_id: k.expires_s for k in ks.list("acme")}[_id(key)]  # noqa: E731
    later[0] = 10 * DAY

    new, old = ks.rotate(month)
    assert old.expires_s == pytest.approx(old.created_s + 30 * DAY, abs=1)
    assert expires(new) == pytest.approx(ks.clock() + 30 * DAY, abs=1)  # 30 days from the rotation
    later[0] += DAY
    newer, _ = ks.rotate(new, grace_s=3600)  # and again, with a grace period: still 30 days
    assert expires(newer) == pytest.approx(ks.clock() + 30 * DAY, abs=1)
    assert expires(new) == pytest.approx(ks.clock() + 3600, abs=1)  # the grace, as before

    chosen, _ = ks.rotate(newer, ttl_s=3600)  # --expires still decides when given
    assert expires(chosen) == pytest.approx(ks.clock() + 3600, abs=1)
    still_forever, _ = ks.rotate(forever)
    assert expires(still_forever) is None  # a key that never expires gives one that never does
    season, _ = ks.rotate(season)  # the successor ends by itself, 60 days after the rotation
    later[0] += 60 * DAY - 60
    assert ks.verify(season) == "acme" and ks.verify(chosen) is None
    later[0] += 120
    assert ks.verify(season) is None and ks.verify(still_forever) == "acme"


def test_keys_rotate_from_the_cli_keeps_the_lifetime_unless_expires_is_given(tmp_path: Path) -> None:
    ks = _store(tmp_path)
    key = ks.create("acme", ttl_s=30 * DAY)
    before = time.time()
    r = _cli("keys", "rotate", key, "--json", home=tmp_path)
    assert r.returncode == 0, r.stderr
    new = json.loads(r.stdout)
    assert new["expires"] is not None and before + 30 * DAY - 1 <= new["expires"] <= time.time() + 30 * DAY
    assert new["expires"] == pytest.approx(new["created"] + 30 * DAY)
    text = _cli("keys", "rotate", new["key"], "--expires", "1h", home=tmp_path)
    assert text.returncode == 0 and "expires at" in text.stdout, text.stdout
    last = ks.list("acme")[-1]
    assert last.expires_s == pytest.approx(last.created_s + 3600)
