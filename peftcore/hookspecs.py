"""The plugin contract: every seam between the core and a method, as pluggy hooks.

Read top to bottom, this is the architecture. A method plugin is a module (or a
class) with functions named like the specs below, decorated with
``peftcore.hookimpl`` and advertised under the entry-point group ``peftcore``.
The core's own defaults (PEFT's matching rules, its tensor naming, dispatching
merges to the layer) are registered the same way, as the last resort
(``trylast``), so a plugin overrides them simply by answering first.

``firstresult`` hooks stop at the first implementation that returns something
other than ``None``: returning ``None`` means "not mine, ask the next one". The
others call every implementation: check that the config or model is your
method's and return quickly otherwise.

Versioned by ``peftcore.HOOKSPEC_VERSION`` (see :mod:`peftcore.version`). A
function decorated with ``hookimpl`` whose name is not a hook below (a typo)
makes the plugin fail to load, listed by ``peftcore list`` with the reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    from torch import Tensor, nn

    from peftcore.config import PeftConfig
    from peftcore.method import LayerSupport, Method

hookspec = pluggy.HookspecMarker("peftcore")

# 1. Discovery -----------------------------------------------------------------


@hookspec
def register_methods(register: Callable[[Method], None]) -> None:
    """Announce methods: call ``register(Method(...))`` once per method.

    A :class:`~peftcore.method.Method` names the ``peft_type`` written to
    ``adapter_config.json``, its config class, and which sub-modules hold its
    tensors (for the default on-disk naming).
    """


@hookspec
def register_layer_support(register: Callable[[LayerSupport], None]) -> None:
    """Announce which module types a method can wrap, and with what.

    Call ``register(LayerSupport(peft_type, base_type, factory))``. Any plugin may
    add a layer type to any method (e.g. LoRA for ``bnb.nn.Linear4bit``). When
    several entries fit a module, the most specific wins: the one whose
    ``base_type`` is closest in the module's class hierarchy, then the higher
    ``priority``; on a full tie the later registration.
    """


# 2. Configs and matching --------------------------------------------------------


@hookspec
def prepare_config(config: PeftConfig, model: nn.Module) -> None:
    """Complete ``config`` for ``model`` in place, before anything is wrapped.

    Called for every new adapter, every implementation in turn; the core's runs
    last and resolves ``target_modules`` (None: ``default_target_modules``; the
    string "all-linear": every linear layer but the output head). A method fills
    what it derives from the model here (IA3: ``feedforward_modules``).
    """


@hookspec(firstresult=True)
def default_target_modules(config: PeftConfig, model_type: str | None) -> list[str] | None:
    """Target module names for ``model_type`` when ``config.target_modules`` is None.

    Answer for your own config class only. The core has no table of its own: a
    config no plugin answers for fails with a clear error asking for ``target_modules``.
    """


@hookspec(firstresult=True)
def is_target_module(config: PeftConfig, module_name: str, module: nn.Module, model: nn.Module) -> bool | None:
    """Whether ``config`` targets the module at dotted path ``module_name``.

    The core answers last with PEFT's rules (names, regex, "all-linear",
    ``exclude_modules``, ``layers_to_transform``); a method answers first only to
    change them.
    """


# 3. Injection -----------------------------------------------------------------


@hookspec(firstresult=True)
def create_model_adapter(model: nn.Module, config: PeftConfig, adapter_name: str) -> nn.Module | None:
    """For methods that do not wrap layers (prompt, prefix tuning): the adapter.

    Return an :class:`~peftcore.input_adapter.InputAdapter` that edits the model's
    inputs before each forward and ``generate``. Layer-wrapping methods return None.
    """


@hookspec
def adapter_injected(model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
    """Called once the core has wrapped every target of a new adapter.

    The place for whole-model follow-ups: which extra parameters train (LoRA's
    ``bias``), or per-model state such as AdaLoRA's rank allocator. ``model`` is
    the :class:`~peftcore.layer_tuner.LayerTuner`.
    """


@hookspec
def process_model_output(model: nn.Module, output: Any) -> None:
    """Adjust, in place, what one forward pass of an adapted model returns.

    Called after every forward of a layer method's model (``PeftModel.forward``
    runs the :class:`~peftcore.layer_tuner.LayerTuner`, which calls this), with
    ``model`` the ``LayerTuner`` and ``output`` what the wrapped model returned
    (usually a transformers ``ModelOutput``). Edit ``output`` in place, e.g. add a
    regulariser to ``output["loss"]`` while ``model.training`` (AdaLoRA's
    orthogonality term).
    """


# 4. Training --------------------------------------------------------------------


@hookspec
def on_optimizer_step(model: nn.Module, step: int) -> None:
    """Called after each optimizer step, while the gradients still exist.

    ``model`` is the :class:`~peftcore.peft_model.PeftModel`; ``step`` counts the
    steps completed before this one (0, 1, ...). Training loops call
    ``peftcore.loop_hooks.optimizer_step_done(model, step)``: ``peftcore apply``'s loop
    does, and so does the Trainer integration (``PeftTrainerMixin``, or
    ``PeftcoreCallback`` on a stock ``Trainer``). AdaLoRA allocates ranks here.
    A config field whose value is the number of optimizer steps of the whole run
    says so with ``field(metadata={"run_length": True})``; the CLI fills it in.
    """


# 5. Merging -------------------------------------------------------------------


@hookspec(firstresult=True)
def merge_layer(layer: nn.Module, adapter_names: list[str], safe_merge: bool) -> bool | None:
    """Fold the adapters into ``layer``'s base weights; return True when done.

    The core's default calls ``layer.merge(...)``; answer first to merge a layer
    type differently (e.g. dequantise, call ``layer.merged_params(...)``,
    re-quantise and report the error). ``merge_adapter`` calls every layer's
    ``check_merge`` before the first ``merge_layer``, so such a layer type also
    overrides ``check_merge`` with its own dry run.
    """


@hookspec(firstresult=True)
def unmerge_layer(layer: nn.Module) -> bool | None:
    """Undo :func:`merge_layer` on ``layer``; return True when done."""


@hookspec(firstresult=True)
def dequantize_module(module: nn.Module, dtype: Any) -> nn.Module | None:
    """A plain full-precision module computing what the quantised ``module`` computes, or None if not yours.

    ``dtype`` is the wanted float dtype, or None for the layer's compute dtype.
    ``merge_and_unload(dequantize=True)`` replaces every module of a quantisation
    library (see :mod:`peftcore.quantized`) with the answer before an exact merge;
    peftcore-bnb answers for ``bnb.nn.Linear4bit`` / ``Linear8bitLt`` (an ``nn.Linear``).
    """


@hookspec(firstresult=True)
def describe_quantization(module: nn.Module) -> str | None:
    """How ``module``'s weights are quantised, in words ("4-bit nf4, double quant, blocksize 64"), or None."""


@hookspec(firstresult=True)
def combine_adapters(
    model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str,
    options: dict[str, Any],
) -> bool | None:
    """Build adapter ``adapter_name`` out of several existing ones (``add_weighted_adapter``).

    ``model`` is the :class:`~peftcore.layer_tuner.LayerTuner`; the core has checked
    the names and that there is one weight per adapter. ``combination_type`` is
    PEFT's ("svd", "cat", "ties", ...) or None for the adapters' default;
    ``options`` are PEFT's keyword arguments (``density``, ``svd_rank``, ...).
    The implementation creates the adapter (``model.inject_adapter(new_config,
    adapter_name)``) and fills its tensors; return True when handled, None to
    leave it to another plugin (none answering is an error naming peftcore-fusion,
    which answers for every layer method).

    What a method exposes to be combined (the combining contract, read through
    public methods only): on its layers ``low_rank_delta(name)`` /
    ``set_low_rank_delta(name, up, down)`` (low-rank methods: the change as
    ``scale · up @ down``) or ``scaling_vector(name)`` / ``set_scaling_vector(name,
    vector)`` (:class:`~peftcore.layer.ScalingAdapterLayer` methods), and on its
    config ``combined_config(sources, rank)`` (the new adapter's config). See
    :mod:`peftcore.layer`.
    """


# 6. Files ---------------------------------------------------------------------


@hookspec(firstresult=True)
def config_from_dict(data: dict[str, Any]) -> PeftConfig | None:
    """Build a config from ``adapter_config.json``. The core resolves ``peft_type``."""


@hookspec(firstresult=True)
def config_to_dict(config: PeftConfig) -> dict[str, Any] | None:
    """The JSON-ready dict written as ``adapter_config.json``."""


@hookspec(firstresult=True)
def adapter_state_dict(model: nn.Module, config: PeftConfig, adapter_name: str) -> dict[str, Tensor] | None:
    """The tensors of one adapter under their on-disk names (PEFT's names).

    ``model`` is the :class:`~peftcore.peft_model.PeftModel`. The core's default
    renames parameters with ``Method.disk_key``; a method answers first when its
    files do not mirror its parameters (prompt tuning stores the encoder output).
    """


@hookspec(firstresult=True)
def load_adapter_state_dict(
    model: nn.Module, config: PeftConfig, adapter_name: str, state_dict: dict[str, Tensor]
) -> tuple[list[str], list[str]] | None:
    """Copy on-disk tensors into adapter ``adapter_name``; return (missing, unexpected) keys."""


@hookspec
def check_adapter_files(config: PeftConfig, tensors: dict[str, Tensor]) -> list[str] | None:
    """Problems in a saved adapter (``peftcore info``): one line each, naming the tensor or module.

    ``tensors`` are the file's, under their on-disk names; ``config`` is read from the
    same folder. Check what only your method knows (LoRA: A and B agree with ``r``);
    the core checks what every method shares (names, targets, finite values).
    Return None (or an empty list) for configs of other methods.
    """
