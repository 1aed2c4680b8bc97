"""The one error type metadit raises for bad input, so callers (and the CLI) can catch it."""


class MetaditError(Exception):
    """A problem with the user's input, files or configuration, described in one clear line."""


class BaseModelMismatchError(MetaditError):
    """A diff or bank made for one base model was used with another."""
