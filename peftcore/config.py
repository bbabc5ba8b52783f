"""Config base classes and ``adapter_config.json`` in PEFT's layout."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

CONFIG_NAME = "adapter_config.json"
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
    from peftcore import __version__

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
        if self.task_type is not None:
            try:
                self.task_type = TaskType(str(self.task_type))
            except ValueError:
                raise ValueError(
                    f"Invalid task_type {self.task_type!r}; expected one of {', '.join(t.value for t in TaskType)}"
                ) from None
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
                f"{cls.__name__}: ignoring unknown config keys {unknown} (probably written by a newer PEFT/peftcore)",
                stacklevel=2,
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        from peftcore.serialization import write_config

        write_config(self, save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs) -> "PeftConfig":
        from peftcore.serialization import read_config

        return read_config(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    @classmethod
    def from_json_file(cls, path: str) -> dict[str, Any]:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)


@dataclass
class LayerConfig(PeftConfig):
    """Fields of methods that wrap layers: which modules, which layers, what else to train."""

    target_modules: Optional[Union[list[str], str]] = field(default=None)
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)

    def __post_init__(self):
        super().__post_init__()
        # PEFT keeps list-valued targets as sets in memory; order carries no meaning.
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple, set)):
            self.exclude_modules = set(self.exclude_modules)
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("layers_pattern only makes sense together with layers_to_transform")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be used when target_modules is a regex string")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("layers_pattern cannot be used when target_modules is a regex string")


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
