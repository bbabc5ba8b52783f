"""What a plugin registers: a :class:`Method`, and :class:`LayerSupport` entries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from torch import nn

    from peftcore.config import PeftConfig


def strip_adapter_name(key: str, adapter_name: str, tensor_prefixes: tuple[str, ...]) -> str | None:
    """PEFT's on-disk name for an in-memory parameter name, or None if not this adapter's.

    ``a.q.lora_A.default.weight`` -> ``a.q.lora_A.weight``: the adapter segment is
    dropped right after the sub-module that holds the method's tensors.
    """
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.startswith(tensor_prefixes) and parts[i + 1] == adapter_name:
            return ".".join(parts[: i + 1] + parts[i + 2 :])
    return None


@dataclass(frozen=True)
class Method:
    """One PEFT method as the core sees it.

    ``peft_type`` is the value in ``adapter_config.json`` ("LORA"); ``name`` is
    what users type (``peftcore apply lora``). ``tensor_prefixes`` are the
    attribute names of the per-adapter sub-modules ("lora_A", "lora_B", ... all
    start with "lora_"); ``disk_key`` may replace the default naming rule.
    ``kind`` is "layer" for methods that wrap modules, "model" for methods that
    edit the inputs (prompt and prefix tuning). ``builds_on`` names the methods
    (``peft_type``) whose adapters this method's adapters work with: a model holds
    adapters of one method, or of methods one of which builds on the other (a fusion
    adapter beside the LoRA adapters it attends over), and a layer of a method it
    builds on may be wrapped by this method's layers. ``tuner_class`` is the class of
    ``PeftModel.base_model`` for the method's adapters (PEFT's ``LoraModel``, ...): a
    subclass of :class:`peftcore.LayerTuner` that adds nothing or the method's own model-wide
    operations; None means ``LayerTuner`` itself.
    """

    peft_type: str
    config_class: type[PeftConfig]
    tensor_prefixes: tuple[str, ...] = ()
    name: str = ""
    kind: str = "layer"
    task_types: tuple[str, ...] = ()  # empty: every task type
    disk_key: Callable[[str, str, PeftConfig], str | None] | None = None
    description: str = ""
    builds_on: tuple[str, ...] = ()
    tuner_class: type | None = None

    def __post_init__(self):
        if not self.name:
            object.__setattr__(self, "name", self.peft_type.lower())
        if self.kind not in ("layer", "model"):
            raise ValueError(f"Method {self.peft_type}: kind must be 'layer' or 'model', got {self.kind!r}")

    def can_share_a_model_with(self, other: Method) -> bool:
        """Whether adapters of ``self`` and ``other`` may live in one model (one method, or one builds on the other)."""
        same = self.peft_type == other.peft_type
        return same or other.peft_type in self.builds_on or self.peft_type in other.builds_on

    def to_disk_key(self, key: str, adapter_name: str, config: PeftConfig) -> str | None:
        if self.disk_key is not None:
            return self.disk_key(key, adapter_name, config)
        return strip_adapter_name(key, adapter_name, self.tensor_prefixes)


@dataclass(frozen=True)
class LayerSupport:
    """``factory(target, adapter_name, config, module_name)`` wraps modules of ``base_type``.

    ``accepts(target, config)`` can narrow the match (e.g. only 2-D convolutions).
    """

    peft_type: str
    base_type: type[nn.Module]
    factory: Callable[..., nn.Module]
    priority: int = 0
    accepts: Callable[[nn.Module, PeftConfig], bool] | None = field(default=None, compare=False)

    def distance(self, module: nn.Module) -> int | None:
        """How many steps up ``module``'s class hierarchy ``base_type`` sits (None: unrelated)."""
        mro = type(module).__mro__
        if self.base_type not in mro:
            return None
        return mro.index(self.base_type)
