"""Errors adapterfab raises. Third-party errors are turned into these at the boundary, with a message
that names the fix."""


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
    pass


class StorageError(AdapterfabError):
    pass


class BaseModelError(AdapterfabError):
    pass


class StackError(AdapterfabError):
    pass


class StateError(AdapterfabError):
    pass


class BaseMismatch(AdapterfabError):
    """An adapter was trained on other base weights than the ones being served."""


class ReplicaUnavailable(AdapterfabError):
    """The serving replica handling a request died (or none could take it) before it finished."""


class ApiKeyError(AdapterfabError):
    """A key id that names no key, a key that has ended, or a bad lifetime."""
