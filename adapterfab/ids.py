"""The one id type. Every string form of an adapter id (registry model name, artifact key prefix,
serving model id) is produced here; nobody formats ids by hand.

Tenant and persona ids: 1-63 characters of ``a-z``, ``0-9`` and ``-``, starting with a letter or
digit. That keeps them safe as path segments, S3 keys, MLflow names and URL parts (no ``/``, ``..``,
upper case look-alikes, unicode or control characters).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapterfab.errors import InvalidId

ID_PATTERN = r"[a-z0-9][a-z0-9-]{0,62}"
_ID_RE = re.compile(ID_PATTERN)  # all patterns here are used with fullmatch: "$" would take "x\n"
_ALIAS_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
# MLflow reserves "latest" and aliases that look like versions ("v1"), so ours are words.
RESERVED_ALIASES = frozenset({"latest"})
CANDIDATE = "candidate"
PRODUCTION = "production"
REGISTRY_PREFIX = "af"


def is_decimal(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also takes "²" and other Unicode digits, which ``int`` refuses."""
    return bool(re.fullmatch(r"[0-9]+", text))


def check_id(value: str, kind: str = "tenant") -> str:
    """Return ``value`` if it is a valid tenant/persona id, else raise InvalidId naming the rule."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        shown = repr(value) if isinstance(value, str) and len(value) <= 80 else repr(str(value)[:80]) + "..."
        raise InvalidId(
            f"invalid {kind} id {shown}: use 1-63 characters of lowercase a-z, 0-9 and '-', "
            "starting with a letter or digit (e.g. 'acme' or 'pirate-captain')"
        )
    return value


def check_alias(value: str) -> str:
    if not isinstance(value, str) or not _ALIAS_RE.fullmatch(value) or value in RESERVED_ALIASES \
            or re.fullmatch(r"v[0-9]+", value):
        raise InvalidId(f"invalid alias {value!r}: use a lowercase word like 'production' or 'candidate'")
    return value


# MLflow keeps a model version in a 32-bit integer column; a larger one made its server answer 500 to
# every retry (a minute per request, and the registry's back-off for every tenant, 2026-12-07)
MAX_VERSION = 2**31 - 1


def version_number(ref: str) -> int | None:
    """``ref`` as a version number when it is written as one (ASCII digits, no more of them than
    ``MAX_VERSION`` has: ``int()`` refuses over 4,300 digits, leading zeros included), else None."""
    return int(ref) if is_decimal(ref) and len(ref) <= len(str(MAX_VERSION)) else None


def _bad_version(shown: str) -> InvalidId:
    return InvalidId(f"invalid version {shown if len(shown) <= 30 else shown[:30] + '...'}: versions are "
                     f"integers from 1 to {MAX_VERSION}")


@dataclass(frozen=True, order=True)
class AdapterId:
    """``tenant/persona`` plus, optionally, a registry version or an alias (not both)."""

    tenant: str
    persona: str
    version: int | None = None
    alias: str | None = None

    def __post_init__(self) -> None:
        check_id(self.tenant, "tenant")
        check_id(self.persona, "persona")
        if self.version is not None and self.alias is not None:
            raise InvalidId("an adapter id names a version or an alias, not both")
        if self.version is not None and (not isinstance(self.version, int) or not 1 <= self.version <= MAX_VERSION):
            raise _bad_version(repr(self.version))
        if self.alias is not None:
            check_alias(self.alias)

    @classmethod
    def parse(cls, text: str) -> AdapterId:
        """Parse ``tenant/persona``, ``tenant/persona@alias`` or ``tenant/persona@7``."""
        if not isinstance(text, str) or text.count("/") != 1:
            raise InvalidId(f"invalid adapter id {text!r}: expected TENANT/PERSONA[@ALIAS|@VERSION]")
        tenant, rest = text.split("/", 1)
        persona, _, ref = rest.partition("@")
        if not ref:
            if "@" in rest:
                raise InvalidId(f"invalid adapter id {text!r}: nothing after '@'")
            return cls(tenant, persona)
        if is_decimal(ref):
            number = version_number(ref)
            if number is None:
                raise _bad_version(repr(ref))
            return cls(tenant, persona, version=number)
        return cls(tenant, persona, alias=ref)

    @classmethod
    def from_registry_name(cls, name: str) -> AdapterId:
        prefix, _, rest = name.partition(".")
        tenant, _, persona = rest.partition(".")
        if prefix != REGISTRY_PREFIX:
            raise InvalidId(f"{name!r} is not an adapterfab registered model")
        return cls(tenant, persona)

    @property
    def key(self) -> str:
        """``tenant/persona`` without version or alias."""
        return f"{self.tenant}/{self.persona}"

    @property
    def registry_name(self) -> str:
        """MLflow registered model name: ``af.<tenant>.<persona>`` ('.' cannot occur in ids)."""
        return f"{REGISTRY_PREFIX}.{self.tenant}.{self.persona}"

    def with_version(self, version: int) -> AdapterId:
        return AdapterId(self.tenant, self.persona, version=version)

    def with_alias(self, alias: str) -> AdapterId:
        return AdapterId(self.tenant, self.persona, alias=alias)

    def unversioned(self) -> AdapterId:
        return AdapterId(self.tenant, self.persona)

    def artifact_prefix(self, job_id: str) -> str:
        """Key prefix of an adapter's files in the artifact store:
        ``adapters/<tenant>/<persona>/<job_id>/``. Versions are assigned by the registry after upload,
        so the store is keyed by the job that produced the files."""
        check_job_id(job_id)
        return f"adapters/{self.tenant}/{self.persona}/{job_id}/"

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.key}@{self.version}"
        if self.alias is not None:
            return f"{self.key}@{self.alias}"
        return self.key


def basis_prefix(basis_id: str) -> str:
    """Key prefix of a shared LoRA-XS basis in the artifact store: ``bases/<basis_id>/``."""
    if not isinstance(basis_id, str) or not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,80}", basis_id):
        raise InvalidId(f"invalid basis id {basis_id!r}")
    return f"bases/{basis_id}/"


BASIS_REGISTRY_PREFIX = "afbasis"


def basis_registry_name(basis_id: str) -> str:
    """Registered model holding a shared basis: ``afbasis.<basis_id>`` (not under ``af.``)."""
    basis_prefix(basis_id)
    return f"{BASIS_REGISTRY_PREFIX}.{basis_id}"


_JOB_RE = re.compile(r"[a-z0-9][a-z0-9.-]{0,200}")


def check_job_id(value: str) -> str:
    if not isinstance(value, str) or not _JOB_RE.fullmatch(value) or ".." in value:
        raise InvalidId(f"invalid job id {value!r}")
    return value


def job_id(batch_id: str, tenant: str, persona: str) -> str:
    """Job ids are ``<batch_id>.<tenant>.<persona>``; a batch holds one job per tenant/persona."""
    return check_job_id(f"{batch_id}.{tenant}.{persona}")
