"""Errors adapterfab raises. Third-party errors are turned into these at the boundary, with a message
that names the fix."""

import re

_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s]+@")  # to the last @ (a password may hold one)


def redact_credentials(text: str) -> str:
    """``text`` with the ``user:password@`` of every URI in it replaced by ``***@`` (an MLflow URI with
    basic-auth credentials appears in MLflow's own exception text as well as in ours)."""
    return _USERINFO.sub(r"\1***@", text)


class AdapterfabError(Exception):
    """Base class: the CLI prints these as one clear line, without a traceback."""


class SpecError(AdapterfabError):
    """A batch spec is invalid. ``problems`` lists (field path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        lines = [f"  - {field}: {msg}" for field, msg in problems]
        super().__init__("invalid batch spec:\n" + "\n".join(lines))


class InvalidId(AdapterfabError):
    pass


class DatasetError(AdapterfabError):
    pass


class AdapterNotFound(AdapterfabError):
    pass


class RegistryError(AdapterfabError):
    """Its message never carries a URI's credentials: the CLI, logs and the API's 503s print it."""

    def __init__(self, *args: object):
        super().__init__(*(redact_credentials(a) if isinstance(a, str) else a for a in args))


class StorageError(AdapterfabError):
    pass


class BaseModelError(AdapterfabError):
    pass


class StackError(AdapterfabError):
    pass


class SettingError(AdapterfabError):
    """An ``ADAPTERFAB_*`` variable holds a value of the wrong type or out of bounds (adapterfab/env.py)."""


class StateError(AdapterfabError):
    pass


class BaseMismatch(AdapterfabError):
    """An adapter was trained on other base weights than the ones being served."""


class ReplicaUnavailable(AdapterfabError):
    """The serving replica handling a request died (or none could take it) before it finished."""


class ApiKeyError(AdapterfabError):
    """A key id that names no key, a key that has ended, or a bad lifetime."""


def plain_message(e: BaseException) -> str:
    """What a job records of ``e`` (its tenant reads it): the message a person can act on, never Ray's
    wrapper text, which names the worker's pid, IP, actor id and source paths (logs keep all). An
    adapterfab error is its own message; a Ray task's error is the error its worker raised; a worker
    that failed (died, unreachable, lost) is named as such, without its node."""
    cause = e
    while True:
        inner = getattr(cause, "cause", None)  # RayTaskError(X): the exception the worker raised
        if isinstance(inner, BaseException) and type(cause).__module__.startswith("ray."):
            cause = inner
        elif isinstance(cause, AdapterfabError):
            break
        elif getattr(cause, "__cause__", None) is not None:
            cause = cause.__cause__
        else:
            break
    if type(cause).__module__.startswith("ray."):
        return f"{type(cause).__name__}: a Ray worker failed (the orchestrator's log has the details)"
    if isinstance(cause, AdapterfabError):
        return str(cause)[:4000]
    return f"{type(cause).__name__}: {cause}"[:4000]
