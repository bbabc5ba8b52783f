"""One check for every config field, run when a config is made and when it is read from a file.

A config dataclass declares what each field takes, and this module enforces it; no
method writes these checks again:

- the **annotation** is the type: ``int`` (not ``bool``), ``float`` (any finite
  number, ints included; NaN and infinities are refused), ``bool`` (only ``True`` or
  ``False``: the JSON string ``"false"`` is refused, not taken as true), ``str``,
  ``Literal[...]`` (one of the listed values), ``list[X]`` (a list, tuple or set
  of X, never a bare string), ``dict[K, V]``, ``Optional``/``Union`` of these;
- ``field(metadata={"range": Range(...)})`` bounds every number in the value (the
  value itself, the items of a list, the values of a dict); ``POSITIVE``,
  ``NON_NEGATIVE`` and ``DROPOUT`` cover most fields;
- ``field(metadata={"required": True})`` refuses None for a field whose default is None.

:class:`peftcore.config.PeftConfig` calls :func:`check_fields` first thing in its
``__post_init__``, before any conversion, so every subclass is checked from its own
annotations; checks that relate two fields stay in the subclass's ``__post_init__``.
:func:`peftcore.config.read_config` puts the file's path in front of the message.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, Union

from peftcore.errors import PeftError


class ConfigError(PeftError, ValueError):
    """A config field whose value cannot be used; the message names the config class, the field and the value."""

    def __init__(self, message: str, field: str | None = None, value: Any = None):
        super().__init__(message)
        self.field = field
        self.value = value


@dataclass(frozen=True)
class Range:
    """Bounds for the numbers of a field: ``low``/``high`` (None: unbounded), each closed unless marked open.

    ``word`` names the range in messages ("positive": "must be a positive integer").
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    word: str | None = None

    def __contains__(self, number: float) -> bool:
        if self.low is not None and (number <= self.low if self.low_open else number < self.low):
            return False
        if self.high is not None and (number >= self.high if self.high_open else number > self.high):
            return False
        return True

    def describe(self, noun: str = "number") -> str:
        if self.word:
            return f"a {self.word} {noun}"
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"any {noun}"


POSITIVE = Range(low=0, low_open=True, word="positive")
NON_NEGATIVE = Range(low=0, word="non-negative")
DROPOUT = Range(low=0, high=1, high_open=True)  # a probability that leaves something to train


@cache
def _field_specs(config_class: type) -> tuple[tuple[str, Any, Range | None, bool], ...]:
    """(name, annotation, range, required) per init field, resolved once per class."""
    hints = typing.get_type_hints(config_class)
    return tuple(
        (f.name, hints.get(f.name, Any), f.metadata.get("range"), bool(f.metadata.get("required")))
        for f in dataclasses.fields(config_class)
        if f.init
    )


def check_fields(config: Any) -> None:
    """Raise :class:`ConfigError` for the first field of ``config`` whose value its declaration refuses."""
    owner = type(config).__name__
    for name, annotation, bounds, required in _field_specs(type(config)):
        value = getattr(config, name)
        if value is None and required:
            raise ConfigError(f"{owner}: {name} is required (got None)", name, value)
        if not conforms(value, annotation):
            raise ConfigError(
                f"{owner}: {name} must be {describe(annotation)}, got {value!r} ({type(value).__name__})", name, value
            )
        if bounds is not None:
            for number in numbers_in(value):
                if number not in bounds:
                    noun = "integer" if isinstance(number, int) else "number"
                    if number is value:
                        problem = f"{name} must be {bounds.describe(noun)}, got {value!r}"
                    else:
                        problem = f"each number in {name} must be {bounds.describe(noun)}, got {value!r} ({number!r})"
                    raise ConfigError(f"{owner}: {problem}", name, value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


_SEQUENCES = (list, tuple, set, frozenset)


def conforms(value: Any, annotation: Any) -> bool:
    """Whether ``value`` is of the type ``annotation`` declares (the rules in the module docstring)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any or annotation is object:
        return True
    if annotation is type(None) or annotation is None:
        return value is None
    if origin is Union:
        return any(conforms(value, arg) for arg in args)
    if origin is Literal:
        return any(type(value) is type(arg) and value == arg for arg in args)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return _is_int(value)
    if annotation is float:
        return _is_number(value)
    if annotation is str:
        return isinstance(value, str)
    if annotation is list or origin is list:
        item = args[0] if args else Any
        return isinstance(value, _SEQUENCES) and all(conforms(v, item) for v in value)
    if annotation is dict or origin is dict:
        key, item = args if len(args) == 2 else (Any, Any)
        return isinstance(value, dict) and all(conforms(k, key) and conforms(v, item) for k, v in value.items())
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return isinstance(value, annotation)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # an annotation this module does not model (Callable, a TypeVar...): not checked


def describe(annotation: Any) -> str:
    """``annotation`` in words, for messages: "an integer", "None or a list of strings", ..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None) or annotation is None:
        return "None"
    if origin is Union:
        shown = [a for a in args if a is not type(None) and not (a is int and float in args)]  # floats take ints
        parts = [describe(a) for a in shown]
        return " or ".join((["None"] if type(None) in args else []) + parts)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    words = {bool: "true or false (a boolean)", int: "an integer", float: "a finite number", str: "a string"}
    if annotation in words:
        return words[annotation]
    if annotation is list or origin is list:
        return f"a list of {_plural(args[0])}" if args else "a list"
    if annotation is dict or origin is dict:
        return f"a dict of {_plural(args[1])}" if len(args) == 2 else "a dict (JSON object)"
    return getattr(annotation, "__name__", str(annotation))


def _plural(annotation: Any) -> str:
    plurals = {bool: "booleans", int: "integers", float: "finite numbers", str: "strings"}
    if typing.get_origin(annotation) is Union and set(typing.get_args(annotation)) == {int, float}:
        return plurals[float]
    return plurals.get(annotation, f"({describe(annotation)})")


def numbers_in(value: Any) -> list[float]:
    """The numbers a range applies to: the value, the items of a list, the values of a dict (not booleans)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, _SEQUENCES):
        return [n for v in value for n in numbers_in(v)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers_in(v)]
    return []


def check_regex(config: Any, name: str, pattern: str, what: str = "") -> None:
    """Refuse a string of ``config``'s field ``name`` that is used as a regular expression but does not compile."""
    try:
        re.compile(pattern)
    except re.error as exc:
        inside = f" ({what} {pattern!r})" if what else ""
        raise ConfigError(
            f"{type(config).__name__}: {name}={getattr(config, name)!r}{inside} is not a valid regular expression "
            f"({exc})", name, getattr(config, name),
        ) from None


def check_left_off(config: Any, names: tuple[str, ...], who: str) -> None:
    """Refuse fields ``who`` does not implement unless they are at their "off" value (None, {}, [], False).

    PEFT writes these keys in every file, so they must load; a value that asks for the
    feature is refused rather than silently ignored.
    """
    for name in names:
        value = getattr(config, name)
        if value not in (None, {}, [], False):
            raise ConfigError(f"{type(config).__name__}: {name}={value!r} is not supported by {who}", name, value)
