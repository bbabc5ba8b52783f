"""User errors: one line saying what is wrong, one line saying what to do, a non-zero exit."""

from __future__ import annotations

from contextlib import contextmanager

import click


class CliError(click.ClickException):
    """A user error; click prints ``Error: <message>`` and exits with status 1 (no traceback)."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def format_message(self) -> str:
        return self.message if not self.hint else f"{self.message}\nhint: {self.hint}"


@contextmanager
def user_errors(hint: str | None = None):
    """Turn the library's "bad input" exceptions into :class:`CliError` (bugs keep their traceback)."""
    from peftcore.cli.assets import AssetError
    from peftcore.cli.datasets import DataError
    from peftcore.files import AdapterFileError

    try:
        yield
    except click.ClickException:
        raise
    except (AdapterFileError, AssetError, DataError) as exc:
        raise CliError(_one_line(exc), hint) from None
    except (ValueError, OSError, FloatingPointError) as exc:
        raise CliError(_one_line(exc), hint) from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    first, _, rest = text.partition("\n")
    return first if not rest.strip() else f"{first} ..."
