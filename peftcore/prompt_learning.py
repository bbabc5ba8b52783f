"""What the prompt-learning methods share (prompt tuning, p-tuning, prefix tuning).

- :class:`PromptLearningConfig`: PEFT's fields, filled from the model config as PEFT does.
- :class:`PromptLearningAdapter`: a prompt encoder kept in ``PeftModel.prompt_encoder[name]``
  with PEFT's parameter names (``embedding``, then the method's heads). On disk PEFT keeps a
  single tensor, ``prompt_embeddings`` = the encoder's output for the virtual tokens; an adapter
  loaded from it is *baked*: ``embedding`` holds that output and the heads are gone.
- :class:`VirtualTokenAdapter`: virtual tokens prepended to ``inputs_embeds`` (prompt tuning,
  p-tuning), with the attention mask, labels, token type and position ids stretched to match.
- The on-disk naming: :func:`prompt_learning_state_dict` / :func:`load_prompt_learning_state_dict`.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
from torch import nn

from peftcore import distributed
from peftcore.config import PeftConfig, TaskType
from peftcore.files import AdapterFileError, check_tensor_kind
from peftcore.input_adapter import InputAdapter
from peftcore.modules_to_save import ModulesToSaveWrapper
from peftcore.serialization import handed_over_state_dict
from peftcore.validation import POSITIVE, ConfigError

PROMPT_EMBEDDINGS_KEY = "prompt_embeddings"
IGNORE_INDEX = -100  # labels of virtual tokens: ignored by transformers' losses


@dataclass
class PromptLearningConfig(PeftConfig):
    """PEFT's ``PromptLearningConfig``; the model-shape fields left as None are read from the model."""

    # None is accepted here, as in PEFT (a config may be completed later), and refused when applied to a model
    num_virtual_tokens: Optional[int] = field(default=None, metadata={
        "help": "Number of virtual tokens (required to apply the adapter)", "range": POSITIVE})
    token_dim: Optional[int] = field(default=None, metadata={
        "help": "Hidden embedding dimension of the base model (read from the model if unset)", "range": POSITIVE})
    num_transformer_submodules: Optional[Literal[1, 2]] = field(
        default=None,
        metadata={
            "help": "Number of transformer stacks: 2 for encoder-decoder (SEQ_2_SEQ_LM), else 1 "
                    "(set from task_type if unset)"
        },
    )
    num_attention_heads: Optional[int] = field(default=None, metadata={
        "help": "Number of attention heads (read from the model if unset)", "range": POSITIVE})
    num_layers: Optional[int] = field(default=None, metadata={
        "help": "Number of transformer layers (read from the model if unset)", "range": POSITIVE})
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Modules trained in full and saved with the adapter (classification heads are added for SEQ_CLS)"
        },
    )

    def __post_init__(self):
        super().__post_init__()  # types and ranges of every field (peftcore.validation)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    @property
    def is_prompt_learning(self) -> bool:
        return True

    def fill_from_model_config(self, model_config: Any) -> None:
        """Fill the unset shape fields from a transformers config (PEFT's ``_prepare_prompt_learning_config``)."""
        if self.num_virtual_tokens is None:
            raise ConfigError(f"{type(self).__name__}: num_virtual_tokens is required to apply the adapter to a model "
                              "(got None)", "num_virtual_tokens", None)
        config = _text_config_dict(model_config)
        if self.num_layers is None:
            self.num_layers = _first_key(config, ("num_hidden_layers", "num_layers", "n_layer"), "num_layers",
                                         getattr(model_config, "num_hidden_layers", None))
        if self.token_dim is None:
            self.token_dim = _first_key(config, ("hidden_size", "n_embd", "d_model"), "token_dim")
        if self.num_attention_heads is None:
            self.num_attention_heads = _first_key(
                config, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"), "num_attention_heads"
            )
        if self.num_transformer_submodules is None:
            self.num_transformer_submodules = 2 if self.task_type == TaskType.SEQ_2_SEQ_LM else 1
        self.adjust_to_model_config(config)
        if hasattr(self, "encoder_hidden_size") and getattr(self, "encoder_hidden_size") is None:
            self.encoder_hidden_size = self.token_dim

    def adjust_to_model_config(self, config: dict) -> None:
        """A method's own reading of the (text) model config, after the shared fields are set."""

    @property
    def total_virtual_tokens(self) -> int:
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)


def _text_config_dict(model_config: Any) -> dict:
    config = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config or {})
    # vision-language models: the prompt goes to the language model
    return config.get("text_config") or config


def _first_key(config: dict, keys: tuple[str, ...], field_name: str, preset: Any = None) -> int:
    if preset is not None:
        return preset
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    raise ValueError(
        f"Cannot read {field_name} from the model config (looked for {', '.join(keys)}); set {field_name} in the config"
    )


# -- the model's side -----------------------------------------------------------------------


def word_embeddings(model: nn.Module) -> nn.Module:
    """The token embedding of ``model`` (the module PEFT calls ``word_embeddings``)."""
    getter = getattr(model, "get_input_embeddings", None)
    if getter is not None:
        try:
            module = getter()
        except NotImplementedError:
            module = None
        if module is not None:
            return module
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.num_embeddings == vocab_size:
            return module
    raise ValueError(
        f"Cannot find the token embedding of {type(model).__name__} (no get_input_embeddings, no Embedding of "
        "vocab_size rows)"
    )


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def extend_attention_mask(attention_mask: torch.Tensor | None, num_tokens: int, batch_size: int, seq_len: int,
                          device: torch.device) -> torch.Tensor:
    """A 2-D padding mask with ``num_tokens`` always-visible positions in front (built if absent)."""
    if attention_mask is None:
        attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long, device=device)
    if attention_mask.dim() != 2:
        raise ValueError(
            f"prompt-learning methods need a 2-D attention_mask (batch, seq_len) to prepend {num_tokens} virtual "
            f"tokens; got shape {tuple(attention_mask.shape)}"
        )
    prefix = torch.ones(attention_mask.shape[0], num_tokens, dtype=attention_mask.dtype, device=attention_mask.device)
    return torch.cat([prefix, attention_mask], dim=1)


def generation_expand_size(model: nn.Module, kwargs: dict[str, Any]) -> int:
    """How many rows ``generate`` makes of each input row (beams, returned sequences), as transformers does."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    num_beams = kwargs.get("num_beams", getattr(config, "num_beams", None)) or 1
    num_return = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", None)) or 1
    return max(int(num_beams), int(num_return))


def batch_and_length(kwargs: dict[str, Any]) -> tuple[int, int, torch.device]:
    """Batch size, sequence length and device of the (encoder) input."""
    for key in ("input_ids", "inputs_embeds"):
        value = kwargs.get(key)
        if value is not None:
            return value.shape[0], value.shape[1], value.device
    raise ValueError("prompt-learning methods need input_ids or inputs_embeds (as keyword arguments)")


# -- the adapter ----------------------------------------------------------------------------


class PromptLearningAdapter(InputAdapter):
    """A prompt encoder with PEFT's layout: ``embedding`` over the virtual tokens, then the method's heads.

    Subclasses build ``self.embedding`` and their heads (named in ``head_names``), and implement
    :meth:`forward` ``(indices [batch, tokens]) -> [batch, tokens, dim]`` as PEFT's encoders do.
    """

    head_names: tuple[str, ...] = ()

    def __init__(self, config: PromptLearningConfig):
        super().__init__()
        if config.token_dim is None or config.num_transformer_submodules is None:
            raise ValueError(
                f"{type(config).__name__}: call config.fill_from_model_config(model.config) before building the encoder"
            )
        self.num_virtual_tokens = config.num_virtual_tokens
        self.total_virtual_tokens = config.total_virtual_tokens
        # Built from PEFT's files: ``embedding`` holds the encoder output itself.
        self.baked = bool(config.inference_mode)

    @property
    def saved_tokens(self) -> int:
        """How many virtual tokens' outputs PEFT stores in ``prompt_embeddings``."""
        return self.total_virtual_tokens

    def prompt_table(self) -> torch.Tensor:
        """The encoder output for the saved virtual tokens, ``[saved_tokens, dim]`` (differentiable)."""
        if self.baked:
            return self.embedding.weight
        indices = torch.arange(self.saved_tokens, device=self.embedding.weight.device).unsqueeze(0)
        return self(indices)[0]

    def get_prompt(self, batch_size: int) -> torch.Tensor:
        table = self.prompt_table()
        return table.unsqueeze(0).expand(batch_size, *table.shape)

    def prompt_embeddings_to_save(self, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The prompt table on the CPU; ``params`` (whole tensors by parameter name) stand in for the
        module's own, e.g. when those are shards or an engine handed over gathered copies."""
        # no_grad: the same kernels as inference (an LSTM differs by ~1e-6 between the two modes)
        with torch.no_grad():
            if params is None:
                return self.prompt_table().detach().cpu()
            if self.baked:
                return params["embedding.weight"].detach().cpu()
            device = self.embedding.weight.device
            indices = torch.arange(self.saved_tokens, device=device).unsqueeze(0)
            params = {k: v.to(device) for k, v in params.items()}
            return torch.func.functional_call(self, params, (indices,))[0].detach().cpu()

    def load_prompt_embeddings(self, tensor: torch.Tensor) -> None:
        """Load PEFT's ``prompt_embeddings``; an encoder with heads is baked (the heads cannot be recovered)."""
        with torch.no_grad():
            expected = tuple(self.prompt_table().shape)
        if tuple(tensor.shape) != expected:
            raise AdapterFileError(
                f"tensor {PROMPT_EMBEDDINGS_KEY!r} has shape {tuple(tensor.shape)} but {type(self).__name__} expects "
                f"{expected} (different num_virtual_tokens, token_dim, num_layers or base model?)"
            )
        if not self.baked and any(hasattr(self, name) for name in self.head_names):
            warnings.warn(
                f"{type(self).__name__}: the file holds the encoder's output only; the {'/'.join(self.head_names)} "
                "reparameterisation cannot be recovered, so the loaded prompt table itself is what trains from here",
                stacklevel=3,
            )
            self._bake(tensor.shape)
        self.baked = True
        with torch.no_grad():
            self.embedding.weight.copy_(tensor.to(self.embedding.weight))

    def _bake(self, shape: torch.Size) -> None:
        old = self.embedding.weight
        for name in self.head_names:
            if hasattr(self, name):
                delattr(self, name)
        if tuple(old.shape) != tuple(shape):
            self.embedding = nn.Embedding(*shape, device=old.device, dtype=old.dtype)
        self.embedding.weight.requires_grad_(old.requires_grad)


class VirtualTokenAdapter(PromptLearningAdapter):
    """Prepends ``num_virtual_tokens`` learned embeddings to the (encoder) input.

    Encoder-decoder models get them in front of the encoder input only, as PEFT does.
    """

    def _prepend(self, model: nn.Module, kwargs: dict[str, Any], generating: bool) -> dict[str, Any]:
        kwargs = dict(kwargs)
        batch_size, seq_len, device = batch_and_length(kwargs)
        n = self.num_virtual_tokens
        input_ids = kwargs.get("input_ids")
        inputs_embeds = kwargs.pop("inputs_embeds", None)
        if inputs_embeds is None:
            inputs_embeds = word_embeddings(model)(input_ids)
        prompts = self.get_prompt(batch_size)[:, :n].to(inputs_embeds.dtype)
        kwargs["inputs_embeds"] = torch.cat([prompts, inputs_embeds], dim=1)
        # Decoder-only generate keeps input_ids so the output starts with them; everywhere else
        # transformers takes one of input_ids / inputs_embeds.
        if not (generating and not is_encoder_decoder(model) and input_ids is not None):
            kwargs.pop("input_ids", None)
        kwargs["attention_mask"] = extend_attention_mask(kwargs.get("attention_mask"), n, batch_size, seq_len, device)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = _pad(kwargs["token_type_ids"], n, 0)
        if kwargs.get("position_ids") is not None:
            positions = kwargs["position_ids"]
            kwargs["position_ids"] = torch.cat(
                [torch.arange(n, device=positions.device).expand(positions.shape[0], n), positions + n], 1
            )
        labels = kwargs.get("labels")
        # token-level labels (causal LM, token classification) gain an ignored label per virtual token;
        # sequence labels and seq2seq labels (decoder side) stay as they are
        if labels is not None and not is_encoder_decoder(model) and labels.dim() >= 2 and labels.shape[1] == seq_len:
            kwargs["labels"] = _pad(labels, n, IGNORE_INDEX)
        return kwargs

    def prepare_forward(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        return self._prepend(model, kwargs, generating=False)

    def prepare_generate(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        return self._prepend(model, kwargs, generating=True)


def _pad(tensor: torch.Tensor, num_tokens: int, value: int) -> torch.Tensor:
    prefix = torch.full((tensor.shape[0], num_tokens), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([prefix, tensor], dim=1)


def cache_argument(model: nn.Module) -> str:
    """The name of ``model``'s KV-cache argument: ``cache`` in transformers 5, else ``past_key_values``."""
    seen = set()
    for candidate in (model, getattr(model, "base_model", None)):
        if candidate is None or id(candidate) in seen:
            continue
        seen.add(id(candidate))
        params = inspect.signature(candidate.forward).parameters
        for name in ("cache", "past_key_values"):
            if name in params:
                return name
    raise ValueError(
        f"{type(model).__name__}.forward takes no KV cache (neither `cache` nor `past_key_values`), "
        "which prefix tuning needs"
    )


# -- files ----------------------------------------------------------------------------------


def prompt_learning_state_dict(peft_model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """PEFT's tensors for a prompt-learning adapter: ``prompt_embeddings`` plus its ``modules_to_save`` copies."""
    encoder = peft_model.prompt_encoder[adapter_name]
    out = {PROMPT_EMBEDDINGS_KEY: encoder.prompt_embeddings_to_save(_whole_encoder_params(peft_model, adapter_name))}
    out.update(_saved_module_tensors(peft_model, adapter_name))
    return out


def _whole_encoder_params(peft_model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor] | None:
    """The encoder's parameters from a handed-over state dict, or gathered when sharded; None: use its own."""
    handed = handed_over_state_dict()
    if handed is not None:
        prefix = f"prompt_encoder.{adapter_name}."
        return {k[len(prefix):]: v for k, v in handed.items() if k.startswith(prefix)}
    encoder = peft_model.prompt_encoder[adapter_name]
    return distributed.full_tensors(dict(encoder.named_parameters())) if distributed.any_sharded(encoder) else None


def load_prompt_learning_state_dict(peft_model: nn.Module, adapter_name: str,
                                    state_dict: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Load PEFT's tensors into a prompt-learning adapter; return (missing, unexpected) disk keys."""
    saved = _saved_module_tensors(peft_model, adapter_name, keep_vars=True)
    missing = [k for k in [PROMPT_EMBEDDINGS_KEY, *saved] if k not in state_dict]
    unexpected = [k for k in state_dict if k != PROMPT_EMBEDDINGS_KEY and k not in saved]
    if PROMPT_EMBEDDINGS_KEY in state_dict:
        table = peft_model.prompt_encoder[adapter_name].embedding.weight
        check_tensor_kind(PROMPT_EMBEDDINGS_KEY, state_dict[PROMPT_EMBEDDINGS_KEY], table, "the prompt table")
    for name, target in saved.items():  # check every dtype and shape before touching any weight
        if name in state_dict:
            check_tensor_kind(name, state_dict[name], target, name)
        if name in state_dict and tuple(state_dict[name].shape) != tuple(target.shape):
            raise AdapterFileError(
                f"tensor {name!r} has shape {tuple(state_dict[name].shape)} but the model's has {tuple(target.shape)}"
            )
    if PROMPT_EMBEDDINGS_KEY in state_dict:
        peft_model.prompt_encoder[adapter_name].load_prompt_embeddings(state_dict[PROMPT_EMBEDDINGS_KEY])
    distributed.copy_into([(target, state_dict[name]) for name, target in saved.items() if name in state_dict])
    return missing, unexpected


def check_prompt_embeddings(
    config: PromptLearningConfig, tensors: dict[str, torch.Tensor], width: int | None
) -> list[str]:
    """``prompt_embeddings`` exists with one row per saved virtual token and ``width`` columns (``peftcore info``)."""
    table = tensors.get(PROMPT_EMBEDDINGS_KEY)
    if table is None:
        return [f"no {PROMPT_EMBEDDINGS_KEY!r} tensor (the virtual tokens' embeddings PEFT saves)"]
    expected = (config.total_virtual_tokens, width)
    if table.dim() != 2 or any(want is not None and got != want for got, want in zip(table.shape, expected)):
        shown = tuple("?" if want is None else want for want in expected)
        return [f"{PROMPT_EMBEDDINGS_KEY} has shape {tuple(table.shape)}; the config gives {shown} "
                "(num_virtual_tokens x num_transformer_submodules, embedding width)"]
    return []


def _saved_module_tensors(peft_model: nn.Module, adapter_name: str, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """``base_model.<path>.modules_to_save.<adapter>.<t>`` is stored as ``base_model.<path>.<t>`` (PEFT).

    ``keep_vars=True`` gives the live parameters (to load into); otherwise whole tensors,
    from a handed-over state dict or gathered from shards.
    """
    handed = None if keep_vars else handed_over_state_dict()
    out = {}
    for path, module in peft_model.base_model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            copy_prefix = f"base_model.{path}.modules_to_save.{adapter_name}."
            for key, tensor in module.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                if handed is not None:
                    tensor = handed.get(copy_prefix + key, tensor)
                out[f"base_model.{path}.{key}"] = tensor
    return out if keep_vars else distributed.full_tensors(out)
