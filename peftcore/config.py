"""Config base classes and ``adapter_config.json`` in PEFT's layout."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from peftcore.adapter_folder import write_text
from peftcore.files import CONFIG_NAME, AdapterFileError, resolve_file
from peftcore.plugins import get_method, hooks, methods, no_methods_hint
from peftcore.validation import NON_NEGATIVE, ConfigError, check_fields, check_regex
from peftcore.version import __version__

# The PEFT release whose file format peftcore writes; PEFT reads the part before "@".
PEFT_FORMAT_VERSION = "0.21.2"


class TaskType(str, enum.Enum):
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


class PeftType(str, enum.Enum):
    """PEFT's method names, for scripts that compare against them.

    Open-ended on purpose: a plugin's ``peft_type`` need not be listed here.
    """

    LORA = "LORA"
    ADALORA = "ADALORA"
    IA3 = "IA3"
    PROMPT_TUNING = "PROMPT_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    P_TUNING = "P_TUNING"

    def __str__(self) -> str:
        return self.value


def _producer_version() -> str:
    return f"{PEFT_FORMAT_VERSION}@peftcore-{__version__}"


@dataclass
class PeftConfig:
    """Fields shared by every method (PEFT's ``PeftConfigMixin`` + ``PeftConfig``)."""

    task_type: Optional[Union[str, TaskType]] = field(default=None)
    peft_type: Optional[str] = field(default=None)
    auto_mapping: Optional[dict] = field(default=None)
    peft_version: Optional[str] = field(default=None)
    base_model_name_or_path: Optional[str] = field(default=None)
    revision: Optional[str] = field(default=None)
    inference_mode: bool = field(default=False)

    def __post_init__(self):
        check_fields(self)  # every field of the subclass, from its annotations (peftcore.validation)
        if self.task_type is not None:
            try:
                self.task_type = TaskType(str(self.task_type))
            except ValueError:
                raise ConfigError(
                    f"{type(self).__name__}: Invalid task type: '{self.task_type}'. Must be one of the following task "
                    f"types: {', '.join(t.value for t in TaskType)} (task_type may also be None).",
                    "task_type", self.task_type,
                ) from None
        if isinstance(self.peft_type, str) and self.peft_type in PeftType._value2member_map_:
            self.peft_type = PeftType(self.peft_type)  # PEFT's enum (``.value``); a plugin's own type stays a str
        if self.peft_version is None:
            self.peft_version = _producer_version()

    @property
    def is_prompt_learning(self) -> bool:
        return False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PeftConfig":
        """Build from a dict, dropping (with a warning) keys this class does not know."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(
                f"Unexpected keyword arguments {unknown} for class {cls.__name__}, these are ignored. This probably "
                "means that the config was written by a newer PEFT or peftcore; upgrading is recommended.",
                stacklevel=2,
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write ``adapter_config.json`` as the config is (``PeftModel.save_pretrained`` writes inference mode)."""
        write_config(self, save_directory, inference_mode=self.inference_mode)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                    private: bool | None = None, token: bool | str | None = None, revision: str | None = None,
                    create_pr: bool = False, **kwargs):
        """Upload ``adapter_config.json`` as one commit (PEFT's ``PeftConfig.push_to_hub``; see ``peftcore.hub``)."""
        from peftcore.hub import push_folder_to_hub  # peftcore.hub reads this module's constants

        return push_folder_to_hub(
            self.save_pretrained, repo_id, default_message="Upload config", commit_message=commit_message,
            commit_description=commit_description, private=private, token=token, revision=revision,
            create_pr=create_pr, keep_readme=False,
        )

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs
    ) -> "PeftConfig":
        return read_config(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    @classmethod
    def from_json_file(cls, path: str) -> dict[str, Any]:
        return _without_runtime_config(read_config_json(path), path)


@dataclass
class LayerConfig(PeftConfig):
    """Fields of methods that wrap layers: which modules, which layers, what else to train."""

    target_modules: Optional[Union[list[str], str]] = field(default=None)
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"range": NON_NEGATIVE})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)

    def __post_init__(self):
        super().__post_init__()
        # PEFT keeps list-valued targets as sets in memory; order carries no meaning.
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple, set)):
            self.exclude_modules = set(self.exclude_modules)
        for name in ("target_modules", "exclude_modules"):  # a string is a regex, a list holds names
            if isinstance(getattr(self, name), str):
                check_regex(self, name, getattr(self, name))
        patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern or ()
        for pattern in patterns:
            check_regex(self, "layers_pattern", pattern)
        owner = type(self).__name__
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("`layers_to_transform` cannot be used when `target_modules` is a str. "
                              f"({owner}: layers_to_transform cannot be used when target_modules is a regex string)",
                              "layers_to_transform", self.layers_to_transform)
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ConfigError("`layers_pattern` cannot be used when `target_modules` is a str. "
                              f"({owner}: layers_pattern cannot be used when target_modules is a regex string)",
                              "layers_pattern", self.layers_pattern)
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ConfigError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. "
                              f"({owner}: layers_pattern only makes sense together with layers_to_transform)",
                              "layers_pattern", self.layers_pattern)

    def combined_config(self, sources: list[LayerConfig], rank: int | None) -> LayerConfig:
        """The config of a new adapter built from the adapters of ``sources`` (``self`` is ``sources[0]``).

        What ``add_weighted_adapter`` asks a method for (part of the combining contract, with
        ``AdapterLayer.low_rank_delta``): this config's settings, targets united over
        ``sources`` (:func:`united`), every module at ``rank`` (low-rank methods; None
        for others), an initialisation that touches no base weight, and nothing trained
        beyond the adapter itself. A method without one cannot have its adapters combined.
        """
        raise NotImplementedError(f"{type(self).__name__} defines no combined_config: its adapters cannot be combined")


def united(values: list, what: str):
    """PEFT's rule for the targets of a combined adapter: sets united, regex strings joined into one alternation."""
    kinds = {type(v) for v in values if v is not None}
    if len(kinds) > 1:
        raise ValueError(f"Cannot combine adapters whose {what} mix a regex string and a list of names: {values}")
    present = [v for v in values if v is not None]
    if not present:
        return None
    if isinstance(present[0], str):
        return present[0] if len(set(present)) == 1 else "|".join(f"({v})" for v in present)
    return set().union(*present)


def json_ready(value: Any) -> Any:
    """Sets become sorted lists and enums their values, as in PEFT's files."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(json_ready(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    return value


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


# -- adapter_config.json ---------------------------------------------------------


def config_as_dict(config: PeftConfig) -> dict:
    return json_ready(hooks.config_to_dict(config=config))


def config_json(config: PeftConfig, inference_mode: bool = True, extra: dict | None = None) -> str:
    """``adapter_config.json``'s text for ``config``, as PEFT writes it (sorted keys, ``inference_mode`` set,
    ``extra`` fields such as ``auto_mapping`` added)."""
    data = config_as_dict(config)
    data["inference_mode"] = inference_mode
    data.update(json_ready(extra or {}))
    return json.dumps(data, indent=2, sort_keys=True)


def write_config(config: PeftConfig, save_directory: str | os.PathLike, inference_mode: bool = True) -> None:
    write_text(save_directory, CONFIG_NAME, config_json(config, inference_mode))


def config_from_dict(data: dict) -> PeftConfig:
    """The config ``data`` describes (``adapter_config.json``'s layout), checked like one made in Python."""
    if not isinstance(data, dict):
        raise AdapterFileError(f"an adapter config is a JSON object (dict), got {type(data).__name__}")
    if "peft_type" not in data:
        raise AdapterFileError(f"adapter config has no 'peft_type' (keys: {sorted(data)})")
    data = _without_runtime_config(data, "adapter config")
    if not methods():
        raise AdapterFileError(f"adapter config has peft_type {data['peft_type']!r}. {no_methods_hint()}")
    try:
        get_method(data["peft_type"])
    except ValueError as exc:
        raise AdapterFileError(str(exc)) from None
    return hooks.config_from_dict(data=dict(data))


def _without_runtime_config(data: dict, where: str) -> dict:
    """PEFT never writes ``runtime_config`` (it describes one process); a file that has one is read without it."""
    if isinstance(data, dict) and "runtime_config" in data:
        warnings.warn(f"{where}: the config file contains a `runtime_config` key. This is ignored. Runtime "
                      "configurations are only valid at runtime.", stacklevel=3)
        data = {k: v for k, v in data.items() if k != "runtime_config"}
    return data


def get_peft_config(config_dict: dict) -> PeftConfig:
    """PEFT's name for building a config from a dict like ``adapter_config.json`` (validated)."""
    return config_from_dict(config_dict)


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        twice = sorted({key for key, _ in pairs if key in seen or seen.add(key)})
        raise ValueError(f"keys given twice: {twice} (which one is meant?)")
    return data


def read_config_json(path: str | os.PathLike) -> dict:
    """The JSON object in ``path``; every way of failing to get one is an AdapterFileError naming the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.loads(fh.read(), object_pairs_hook=_refuse_duplicate_keys)
    except OSError as exc:
        raise AdapterFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise AdapterFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise AdapterFileError(f"{path}: JSON nested too deeply to be an adapter config") from None
    except ValueError as exc:  # json.JSONDecodeError, duplicate keys, integers too long to convert
        raise AdapterFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def config_from_file(path: str | os.PathLike) -> PeftConfig:
    """``config_from_dict`` on the file at ``path``; its errors and warnings name the file."""
    data = read_config_json(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            config = config_from_dict(data)
        except (ValueError, TypeError) as exc:  # ConfigError, AdapterFileError, a plugin's own checks
            raise AdapterFileError(f"{path}: {exc}") from None
    for warning in caught:  # PEFT's sentence stays first (scripts match on it), the file follows
        warnings.warn(f"{warning.message} (in {path})", warning.category, stacklevel=3)
    return config


def config_path(model_id: str | os.PathLike, subfolder: str | None = None, **hub_kwargs) -> str:
    """Where the adapter's ``adapter_config.json`` is (a local file, or the Hub cache's copy)."""
    path = resolve_file(model_id, CONFIG_NAME, subfolder, required=True, **hub_kwargs)
    if path is None:
        where = os.path.join(str(model_id), subfolder or "")
        raise AdapterFileError(f"{where}: no {CONFIG_NAME} (is this a PEFT adapter folder?)")
    return path


def read_config(model_id: str | os.PathLike, subfolder: str | None = None, **hub_kwargs) -> PeftConfig:
    return config_from_file(config_path(model_id, subfolder, **hub_kwargs))
