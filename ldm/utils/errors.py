"""The one exception type for user mistakes: train.py/sample.py print it as one line and exit 2."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class UserError(ValueError):
    """A bad input the user can fix (config value, file path, checkpoint kind). Message is one
    line."""


def root_cause(err: BaseException) -> BaseException:
    """The innermost error of a chain (Hydra wraps a constructor's ValueError in its own)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


@contextmanager
def config_errors(where: str) -> Iterator[None]:
    """Turn a constructor's complaint about its arguments (ValueError, TypeError, also when Hydra's
    instantiate wraps it) into a one-line UserError that says which part of the config it is in."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        cause = root_cause(err)
        if isinstance(cause, UserError):  # already names its setting
            raise cause from err
        if not isinstance(cause, ValueError | TypeError):
            raise
        text = str(cause).strip()
        message = text.splitlines()[0] if text else type(cause).__name__
        raise UserError(f"{where}: {message}") from err
