"""The artifact store: one interface, a local folder backend (the embedded default) and S3 (boto3).

Keys are ``/``-separated and relative to the store's root; an object's full URI is
``<root>/<key>``. Uploads are verified: every file's sha256 goes into a ``MANIFEST.json`` written last,
and ``download_dir`` checks each file against it, so a half-written or corrupted adapter is never
loaded. Each object is also checked right after its upload (``stored_matches``: S3's size and MD5 ETag,
or the bytes read back) and uploaded again when it differs; the manifest is only written once every
file is verified, so a corrupt or partial upload leaves no manifest, fails the job before registration,
and can never be registered or served. Layout of keys: see ``AdapterId.artifact_prefix``
(``adapters/<tenant>/<persona>/<job_id>/``).

S3 settings come from the environment or a profile, never from batch files: ``AWS_ENDPOINT_URL``
(or ``ADAPTERFAB_S3_ENDPOINT_URL``), ``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_PROFILE``, and the
usual credential variables.

Every S3 request is retried with boto3's "standard" retry mode on 500/502/503/504, throttling
(``SlowDown``), dropped connections and timeouts, with exponential backoff and full jitter: a random
wait of up to ``scale * 2**(attempt-1)`` seconds, at most 20 s, where scale is 1 s for throttling and
0.05 s for other errors (botocore 1.44); the transfer layer also re-reads a download whose body stalls.
Settings, from the environment:

- ``ADAPTERFAB_S3_MAX_ATTEMPTS`` (default 6): attempts per request, the first one included; 1 = no retry.
- ``ADAPTERFAB_S3_CONNECT_TIMEOUT_S`` (default 5): seconds to open a connection.
- ``ADAPTERFAB_S3_READ_TIMEOUT_S`` (default 30): seconds without a byte from the server before the
  attempt is abandoned (and retried).

They are read when a store first talks to S3 (``s3_client()``; adapterfab/env.py parses them); a bad
value is a SettingError naming the variable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from urllib.parse import urlparse

from adapterfab.env import env
from adapterfab.errors import StorageError
from adapterfab.settings import private_dir

MANIFEST = "MANIFEST.json"
UPLOAD_ATTEMPTS = 3  # an object whose stored bytes differ from the local file is uploaded again this often


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_of(local_dir: Path) -> dict[str, dict]:
    files = {}
    for p in sorted(local_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(local_dir).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return files


class ArtifactStore(ABC):
    root: str

    def uri(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{key.lstrip('/')}"

    def key_of(self, uri: str) -> str:
        root = self.root.rstrip("/") + "/"
        if uri.rstrip("/") == self.root.rstrip("/"):
            return ""
        if not uri.startswith(root):
            raise StorageError(f"{uri} is outside the artifact store {self.root}")
        return uri[len(root):]

    def folder_key(self, uri: str) -> str:
        """The key prefix of the folder at ``uri`` (``a/b/``; empty for a store rooted at that folder)."""
        key = self.key_of(uri).strip("/")
        return f"{key}/" if key else ""

    @abstractmethod
    def put_file(self, local: Path, key: str) -> None: ...

    @abstractmethod
    def get_file(self, key: str, local: Path) -> None: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None: ...

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]:
        """Every object's key under the folder ``prefix`` (``a/b/``), sorted."""

    def stored_matches(self, key: str, local: Path, sha256: str) -> bool:
        """Whether the object at ``key`` has exactly ``local``'s bytes (here: read back, sha256)."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="verify-") as tmp:
            got = Path(tmp) / "object"
            self.get_file(key, got)
            return sha256_file(got) == sha256

    def _put_verified(self, local: Path, key: str, sha256: str) -> None:
        for _ in range(UPLOAD_ATTEMPTS):
            self.put_file(local, key)
            if self.stored_matches(key, local, sha256):
                return
        raise StorageError(f"upload of {self.uri(key)}: the stored object differed from the local file after "
                           f"{UPLOAD_ATTEMPTS} attempts (corrupted in transit); the adapter gets no manifest "
                           "and is never registered")

    def upload_dir(self, local_dir: str | Path, prefix: str) -> str:
        """Upload every file under ``local_dir`` to ``prefix``, each verified once stored (re-uploaded
        when it differs); the manifest goes last, only after every file checked out. Returns the URI."""
        local_dir = Path(local_dir)
        manifest = _manifest_of(local_dir)
        if not manifest:
            raise StorageError(f"nothing to upload in {local_dir}")
        prefix = prefix.rstrip("/") + "/"
        for rel, meta in manifest.items():
            self._put_verified(local_dir / rel, prefix + rel, meta["sha256"])
        tmp = local_dir / MANIFEST
        tmp.write_text(json.dumps({"files": manifest}, indent=1))
        try:
            self._put_verified(tmp, prefix + MANIFEST, sha256_file(tmp))
        finally:
            tmp.unlink(missing_ok=True)
        return self.uri(prefix)

    def download_dir(self, uri: str, local_dir: str | Path) -> Path:
        """Download what ``upload_dir`` wrote under ``uri``, verifying every checksum."""
        prefix = self.folder_key(uri)
        local_dir = Path(local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        mpath = local_dir / MANIFEST
        if not self.exists(prefix + MANIFEST):
            raise StorageError(f"{uri} has no {MANIFEST}: the upload is missing or incomplete")
        self.get_file(prefix + MANIFEST, mpath)
        files = json.loads(mpath.read_text())["files"]
        for rel, meta in files.items():
            dest = local_dir / rel
            if ".." in Path(rel).parts or Path(rel).is_absolute():
                raise StorageError(f"refusing manifest entry {rel!r} outside the folder")
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.get_file(prefix + rel, dest)
            if sha256_file(dest) != meta["sha256"]:
                dest.unlink(missing_ok=True)
                raise StorageError(f"checksum mismatch for {uri.rstrip('/')}/{rel}: the stored file is corrupt")
        return local_dir


def _folder(prefix: str) -> str:
    """``prefix`` as a folder (``a/b/``): deleting ``adapters/acme`` must not take ``adapters/acme-2``,
    and an empty prefix (the whole store) is refused."""
    folder = prefix.strip("/")
    if not folder:
        raise StorageError("refusing to delete the whole artifact store (an empty prefix)")
    return folder + "/"


def download_base(store: ArtifactStore, uri: str, local_dir: Path) -> Path:
    """A base model's folder at ``uri``: the files its ``MANIFEST.json`` lists, checksums verified, when
    adapterfab uploaded it; otherwise every object under it as another tool stored it (S3 checked each
    upload; there is no manifest to check them against). It must hold a ``config.json``."""
    prefix = store.folder_key(uri)
    if store.exists(prefix + MANIFEST):
        return store.download_dir(uri, local_dir)
    keys = [k for k in store.list_keys(prefix) if k and not k.endswith("/")]  # "folder" markers skipped
    if prefix + "config.json" not in keys:
        raise StorageError(f"{uri} holds no config.json: not a model folder")
    for k in keys:
        rel = k[len(prefix):]
        if ".." in Path(rel).parts or Path(rel).is_absolute():  # "m//etc/x": Path(dir) / "/etc/x" is /etc/x
            raise StorageError(f"refusing object {k!r} outside the folder")
        dest = Path(local_dir) / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        store.get_file(k, dest)
    return Path(local_dir)


def fsync_path(path: Path) -> None:
    """Flush a file's bytes, or a folder's entries (a rename in it), to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore(ArtifactStore):
    def __init__(self, root: str | Path):
        self.path = Path(str(root).removeprefix("file://")).expanduser().resolve()
        self.root = str(self.path)

    def _p(self, key: str) -> Path:
        p = (self.path / key).resolve()
        if p != self.path and self.path not in p.parents:
            raise StorageError(f"key {key!r} escapes the artifact store")
        return p

    def put_file(self, local: Path, key: str) -> None:
        """Copied beside, flushed to disk, then renamed into place and the folder flushed: a file (and
        the manifest, written last) that exists after a crash or power loss is whole, so a version is
        never registered over bytes the disk had not kept."""
        dest = self._p(key)
        if not self.path.is_dir():  # a store made here is owner-only: tenants' adapters (settings.private_dir)
            private_dir(self.path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + f".part{os.getpid()}")
        shutil.copyfile(local, tmp)
        fsync_path(tmp)
        os.replace(tmp, dest)
        fsync_path(dest.parent)

    def get_file(self, key: str, local: Path) -> None:
        src = self._p(key)
        if not src.exists():
            raise StorageError(f"{self.uri(key)} does not exist")
        shutil.copyfile(src, local)

    def exists(self, key: str) -> bool:
        return self._p(key).exists()

    def stored_matches(self, key: str, local: Path, sha256: str) -> bool:
        p = self._p(key)
        return p.exists() and sha256_file(p) == sha256

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._p(_folder(prefix)), ignore_errors=True)

    def list_keys(self, prefix: str) -> list[str]:
        folder = self._p(prefix)
        return sorted(p.relative_to(self.path).as_posix() for p in folder.rglob("*") if p.is_file())


class S3Store(ArtifactStore):
    """S3 through boto3, with retries (standard mode, backoff with jitter) on 5xx and timeouts."""

    def __init__(self, root: str):
        u = urlparse(root)
        if u.scheme != "s3" or not u.netloc:
            raise StorageError(f"not an s3:// URI: {root}")
        self.bucket = u.netloc
        self.base = u.path.strip("/")
        self.root = f"s3://{self.bucket}" + (f"/{self.base}" if self.base else "")
        self._client = None

    @property
    def client(self):  # noqa: ANN201
        if self._client is None:
            self._client = s3_client()
        return self._client

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (idempotent)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError:
            pass  # absent (404) or not ours (403: create_bucket says which)
        except Exception as e:  # noqa: BLE001 - unreachable endpoint, bad configuration
            raise StorageError(f"cannot reach the bucket s3://{self.bucket}: {e}") from e
        kwargs: dict = {"Bucket": self.bucket}
        region = self.client.meta.region_name
        if region and region != "us-east-1":  # AWS wants the region named, except for us-east-1
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self.client.create_bucket(**kwargs)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou",):
                raise StorageError(f"cannot create the bucket s3://{self.bucket}: {e}") from e
        except Exception as e:  # noqa: BLE001 - unreachable endpoint, bad credentials
            raise StorageError(f"cannot create the bucket s3://{self.bucket}: {e}") from e

    def _k(self, key: str) -> str:
        return f"{self.base}/{key}" if self.base else key

    def put_file(self, local: Path, key: str) -> None:
        try:
            self.client.upload_file(str(local), self.bucket, self._k(key))
        except Exception as e:  # noqa: BLE001
            raise StorageError(f"upload to {self.uri(key)} failed: {e}") from e

    def get_file(self, key: str, local: Path) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.download_file(self.bucket, self._k(key), str(local))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise StorageError(f"{self.uri(key)} does not exist") from e
            raise StorageError(f"download of {self.uri(key)} failed: {e}") from e
        except Exception as e:  # noqa: BLE001
            raise StorageError(f"download of {self.uri(key)} failed: {e}") from e

    def stored_matches(self, key: str, local: Path, sha256: str) -> bool:
        """S3's own record of the object: its size, and its ETag, which is the MD5 of the bytes for a
        single-part upload stored unencrypted or with SSE-S3. It is not for a multipart upload, nor under
        SSE-KMS or SSE-C (a bucket's default encryption included): then the object is read back."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._k(key))
        except Exception as e:  # noqa: BLE001
            raise StorageError(f"cannot check the upload of {self.uri(key)}: {e}") from e
        if int(head.get("ContentLength", -1)) != local.stat().st_size:
            return False
        etag = str(head.get("ETag", "")).strip('"')
        md5_etag = (etag and "-" not in etag and head.get("ServerSideEncryption") in (None, "AES256")
                    and not head.get("SSECustomerAlgorithm"))
        if md5_etag:
            md5 = hashlib.md5(usedforsecurity=False)
            with local.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    md5.update(chunk)
            return md5.hexdigest() == etag
        return super().stored_matches(key, local, sha256)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._k(key))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(f"cannot check {self.uri(key)}: {e}") from e
        except Exception as e:  # noqa: BLE001 - unreachable endpoint, bad endpoint URL, credentials
            raise StorageError(f"cannot check {self.uri(key)}: {e}") from e

    def list_keys(self, prefix: str) -> list[str]:
        start = len(self._k(""))
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._k(prefix))
            return sorted(o["Key"][start:] for page in pages for o in page.get("Contents", []))
        except Exception as e:  # noqa: BLE001 - missing bucket, no permission, unreachable endpoint
            raise StorageError(f"cannot list {self.uri(prefix)}: {e}") from e

    def stamps(self, prefix: str) -> dict[str, str]:
        """What S3 says of every object under the folder ``prefix`` without reading it, by key relative
        to the prefix: ``"<size> <ETag>"`` (a listing: one request per 1000 objects). A replaced object
        gets another ETag, so two listings differ when any object changed, came or went."""
        start = len(self._k(prefix))
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._k(prefix))
            return {o["Key"][start:]: f"{o.get('Size')} {o.get('ETag')}" for page in pages
                    for o in page.get("Contents", [])}
        except Exception as e:  # noqa: BLE001 - missing bucket, no permission, unreachable endpoint
            raise StorageError(f"cannot list {self.uri(prefix)}: {e}") from e

    def delete_prefix(self, prefix: str) -> None:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._k(_folder(prefix))):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})


# botocore's DEBUG records carry credentials: the session token (botocore.auth, the canonical request)
# and the access key id (botocore.endpoint, the signed headers). They never reach a log, at any root level.
_CREDENTIAL_LOGGERS = ("botocore.auth", "botocore.endpoint")


def s3_client():  # noqa: ANN201
    import boto3
    from botocore.config import Config

    for name in _CREDENTIAL_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(max(logging.INFO, logger.level))
    e = env()
    session = boto3.session.Session(profile_name=os.environ.get("AWS_PROFILE") or None)
    return session.client(
        "s3",
        endpoint_url=e.s3_endpoint_url,
        # total_max_attempts counts the first attempt (botocore's "max_attempts" would not)
        config=Config(retries={"total_max_attempts": e.s3_max_attempts, "mode": "standard"},
                      connect_timeout=e.s3_connect_timeout_s, read_timeout=e.s3_read_timeout_s),
    )


def open_store(root: str) -> ArtifactStore:
    """The store for a root URI: ``s3://bucket/prefix`` or a local folder (``file://`` optional).
    A full object URI also works: the store is rooted at its bucket. Any other scheme (``gs://``,
    ``https://``, ``S3://``, a mistyped ``s3:/``) is refused rather than taken for a local folder."""
    if root.startswith("s3://"):
        return S3Store(root)
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:/", root) and not root.startswith("file://"):
        raise StorageError(f"unsupported artifact store {root!r}: use s3://bucket/prefix or a local folder")
    return LocalStore(root)


def s3_object_error(uri: str) -> str | None:
    """For ``validate``: None if ``uri`` names a readable S3 object, else a message."""
    u = urlparse(uri)
    try:
        s3_client().head_object(Bucket=u.netloc, Key=u.path.lstrip("/"))
        return None
    except Exception as e:  # noqa: BLE001
        return f"cannot read {uri}: {e}"
