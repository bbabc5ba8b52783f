"""Click options generated from a method's config dataclass, so a plugin's new field is an option at once.

Each field ``foo_bar`` becomes ``--foo-bar`` (PEFT's names), typed from its
annotation: numbers and strings as such, ``bool`` as ``--x/--no-x``, ``Literal``
as a choice, lists as comma-separated values, dicts as JSON. ``--alpha``,
``--dropout``, ``--target`` and ``--exclude`` are short aliases where exactly one
field fits. Fields with a ``metadata={"help": ...}`` text are listed in
``--help``; the others are accepted but hidden, to keep the help readable.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import typing
from typing import Any, Literal, Union

import click

from peftcore.config import TaskType

# Written by the core or by ``apply`` itself, never by the user.
NOT_OPTIONS = {"peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode"}
CORE_HELP = {
    "task_type": "what the model is trained for "
                 "(default: from the model: SEQ_CLS for encoders, CAUSAL_LM for decoders)",
    "target_modules": "modules to adapt: comma-separated names/suffixes, a regex, or all-linear "
                      "(default: per architecture)",
    "exclude_modules": "modules never to adapt: comma-separated names or a regex",
    "modules_to_save": "extra modules trained in full and saved (comma-separated; SEQ_CLS adds the classifier)",
    "layers_to_transform": "only these layer indices (comma-separated)",
    "layers_pattern": "name of the layer list that layers_to_transform indexes (e.g. layers)",
}
ALIASES = {"alpha": "_alpha", "dropout": "_dropout"}  # short name -> field-name suffix
FIXED_ALIASES = {"target": "target_modules", "exclude": "exclude_modules"}
REGEX_CHARS = re.compile(r"[\\^$*+?()\[\]{}|]")


class FieldType(click.ParamType):
    """Parses one option value into what the config field expects."""

    def __init__(self, annotation: Any):
        self.annotation = annotation
        self.name = _describe(annotation)

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        try:
            return parse_value(self.annotation, value)
        except (ValueError, json.JSONDecodeError) as exc:
            self.fail(f"{value!r} is not a valid {self.name} ({exc})", param, ctx)


class LiteralChoice(click.Choice):
    """A choice among a ``Literal``'s values that gives back the value itself (``1``, not ``"1"``)."""

    def __init__(self, values: tuple):
        self.by_text = {str(v): v for v in values}
        super().__init__(list(self.by_text))

    def convert(self, value, param, ctx):
        return self.by_text[super().convert(value, param, ctx)]


def _strip_optional(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Union and len(args) == 1:
        return args[0]
    return annotation


def _describe(annotation: Any) -> str:
    annotation = _strip_optional(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in (int, float, str, bool):
        return annotation.__name__
    if origin is list or list in args or any(typing.get_origin(a) is list for a in args):
        return "list"
    if annotation is dict or origin is dict or dict in args:
        return "JSON"
    return "value"


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def parse_value(annotation: Any, value: str) -> Any:
    """The Python value for ``value`` typed by ``annotation`` (see the module docstring)."""
    annotation = _strip_optional(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if value.lower() in ("none", "null") and type(None) in args:
        return None
    if annotation is int:
        return int(value)
    if annotation is float:
        return float(value)
    if annotation is str:
        return value
    if annotation is bool:
        return _parse_bool(value)
    list_args = [a for a in args if typing.get_origin(a) is list] + ([annotation] if origin is list else [])
    if list_args:
        item = (typing.get_args(list_args[0]) or (str,))[0]
        if str in args and (value.lower() == "all-linear" or REGEX_CHARS.search(value)):
            return value  # a regex or the all-linear keyword stays a string, as in PEFT
        if int in args and "," not in value:
            return int(value)
        items = _split(value)
        return [int(i) for i in items] if item is int else items
    if annotation is dict or origin is dict or dict in args:
        parsed = json.loads(value)
        if not isinstance(parsed, dict):
            raise ValueError("expected a JSON object")
        return parsed
    if bool in args and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return _parse_bool(value)
    literals = {str(v): v for a in args if typing.get_origin(a) is Literal for v in typing.get_args(a)}
    if value in literals:
        return literals[value]
    if str in args:
        return value
    return json.loads(value)


def _parse_bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("true", "yes", "1"):
        return True
    if lowered in ("false", "no", "0"):
        return False
    raise ValueError("expected true or false")


def _type_hints(config_class: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(config_class)
    except Exception:  # an annotation that cannot be resolved: fall back to free-form values
        return {}


def config_fields(config_class: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config_class) if f.init and f.name not in NOT_OPTIONS]


def build_options(config_class: type, reserved: set[str]) -> tuple[list[click.Option], dict[str, str]]:
    """Click options for ``config_class`` and a map from click parameter name to field name."""
    hints = _type_hints(config_class)
    fields = config_fields(config_class)
    field_names = {f.name for f in fields}
    taken = set(reserved) | {f.name.replace("_", "-") for f in fields}
    options, to_field = [], {}
    for f in fields:
        flag = f.name.replace("_", "-")
        if f.name in reserved or flag in reserved:
            flag = f"config-{flag}"  # a field named like one of apply's own options
        names = [f"--{flag}"] + [f"--{a}" for a in _aliases(f.name, field_names, taken)]
        param = f"cfg_{f.name}"
        annotation = hints.get(f.name, str)
        help_text = f.metadata.get("help") or CORE_HELP.get(f.name)
        default = _default_of(f)
        shown = f"{help_text} [default: {default}]" if help_text and default is not None else help_text
        if f.name == "task_type":
            option = click.Option(names + [param], type=click.Choice([t.value for t in TaskType], case_sensitive=False),
                                  default=None, help=shown)
        elif _strip_optional(annotation) is bool:
            option = click.Option(
                [f"{names[0]}/--no-{flag}"] + names[1:] + [param], default=None, help=shown, hidden=not help_text
            )
        elif typing.get_origin(_strip_optional(annotation)) is Literal:
            option = click.Option(
                names + [param], type=LiteralChoice(typing.get_args(_strip_optional(annotation))), default=None,
                help=shown, hidden=not help_text,
            )
        else:
            option = click.Option(
                names + [param], type=FieldType(annotation), default=None, help=shown, hidden=not help_text
            )
        options.append(option)
        to_field[param] = f.name
    return options, to_field


def _aliases(name: str, field_names: set[str], taken: set[str]) -> list[str]:
    out = [short for short, target in FIXED_ALIASES.items() if target == name and short not in taken]
    for short, suffix in ALIASES.items():
        fits = [n for n in field_names if n.endswith(suffix) or n == short]
        if fits == [name] and short not in taken:
            out.append(short)
    taken.update(out)
    return out


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return None
    if isinstance(value, enum.Enum):
        return value.value
    return value if value not in ({}, []) else None


def config_kwargs(params: dict[str, Any], to_field: dict[str, str]) -> dict[str, Any]:
    """The config fields the user set (unset options are None and keep the config's default)."""
    return {to_field[k]: v for k, v in params.items() if k in to_field and v is not None}
