"""PEFT's exception and warning classes (``peft.utils.error`` / ``peft.utils.warning``), under peftcore's names.

Every error peftcore raises on purpose derives from :class:`PeftError` as well as from the
builtin class PEFT's code raises there (``ValueError`` mostly), so ``except ValueError`` in a
PEFT script keeps working and ``except PeftError`` catches all of them.
"""


class PeftError(Exception):
    """Base of the errors peftcore raises on purpose."""


class NoMatchingPeftModuleError(PeftError, ValueError):
    """``target_modules`` (with ``layers_to_transform`` / ``exclude_modules``) matched no module of the model."""


class PeftWarning(UserWarning):
    """Base of the warnings peftcore gives (filter them with ``warnings.simplefilter(..., PeftWarning)``)."""
