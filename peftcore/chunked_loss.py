"""The chunked LM loss inside a causal LM's own forward: when it applies, how it runs, and its fallback.

A peftcore causal-LM model called with ``labels`` in training mode runs the
transformers model's forward *without* the labels, with two hooks for that one
call:

- a forward pre-hook on the output head stashes the final hidden states and
  hands the head only the last position, so the model computes (and
  post-processes: soft-capping, scaling) one logit row per sequence instead of
  all of them;
- a forward hook on the model compares those rows with what peftcore computes
  from the stashed hidden states (head weight, bias, the logit transform it
  knows for this model), then replaces the output with one whose ``loss`` is
  :func:`peftcore.lm_loss.causal_lm_loss` and whose ``logits`` is None.

The hook runs before the adapter framework's ``process_model_output`` (AdaLoRA's
orthogonality term is added to this loss as to the model's own). Everything
the chunked path cannot reproduce exactly falls back to the model's own loss,
with a warning naming the reason, once per model: a head that is not a plain
``nn.Linear`` (an adapter on it, a quantised head, hooks, sharded weights),
an unknown loss function, a mixture-of-experts auxiliary loss,
``logits_to_keep``, ``return_dict=False``, or logits that differ from the
transform peftcore knows. The last is only seen after a forward, which then
runs again on the model's own path (that one time).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from peftcore import lm_loss
from peftcore.layer import AdapterLayer
from peftcore.modules_to_save import ModulesToSaveWrapper

ENV_SWITCH = "PEFTCORE_CHUNKED_LOSS"  # "0" turns the chunked loss off in every model of the process
LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")  # what ForCausalLMLoss reads besides labels


@dataclass(frozen=True)
class ChunkedLossSettings:
    """``enabled``: use the chunked loss where it is exact; ``chunk_tokens``: tokens per chunk (None: automatic)."""

    enabled: bool = True
    chunk_tokens: int | None = None


class NotExact(Exception):
    """The model's logits or loss are not what the chunked path computes; its own loss must be used."""


# -- what the model's head and loss are ---------------------------------------------------------


def _softcap(cap: float) -> lm_loss.LogitTransform:
    def transform(logits):  # the operations of Gemma2/3's forward, in their order
        return torch.tanh(logits / cap) * cap

    return transform


def _scale(factor: float) -> lm_loss.LogitTransform:
    return lambda logits: logits * factor  # Cohere's logit_scale


def _divide(divisor: float) -> lm_loss.LogitTransform:
    return lambda logits: logits / divisor  # Granite's logits_scaling


def logit_transform(model: nn.Module) -> lm_loss.LogitTransform | None:
    """What the model's forward does to the head output before the loss, for the configs peftcore knows.

    Checked against the model's own output on every chunked call, so a model doing
    something else is caught (and falls back) rather than trained on another loss.
    """
    config = getattr(model, "config", None)
    get_text_config = getattr(config, "get_text_config", None)
    text_config = get_text_config() if callable(get_text_config) else config
    steps = []
    cap = getattr(text_config, "final_logit_softcapping", None)
    if cap is not None:
        steps.append(_softcap(float(cap)))
    scale = getattr(text_config, "logit_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        steps.append(_scale(float(scale)))
    scaling = getattr(text_config, "logits_scaling", None)
    if isinstance(scaling, (int, float)) and not isinstance(scaling, bool):
        steps.append(_divide(float(scaling)))
    if not steps:
        return None
    if len(steps) == 1:
        return steps[0]

    def chained(logits):
        for step in steps:
            logits = step(logits)
        return logits

    return chained


def _plain_tensor(t) -> bool:
    return t is None or type(t) in (torch.Tensor, nn.Parameter)


def head_linear(model: nn.Module, mixed_batch: bool) -> tuple[nn.Module, nn.Linear] | str:
    """(the module the model calls, the ``nn.Linear`` whose weight computes it), or why there is none."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        return f"{type(model).__name__} has no output head (get_output_embeddings() is None)"
    linear = head
    if isinstance(head, ModulesToSaveWrapper):
        if mixed_batch:
            return "the head is in modules_to_save and the batch mixes adapters (a head per row)"
        linear = head.active_module
    if isinstance(linear, AdapterLayer):
        return f"the head carries a {linear.peft_type} adapter (it is not a plain nn.Linear)"
    if type(linear) is not nn.Linear:
        return f"the head is a {type(linear).__module__}.{type(linear).__name__}, not a plain torch.nn.Linear"
    for module in {head, linear}:
        if module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"):
            return "the head has forward hooks (device placement, sharding or another library)"
    if not (_plain_tensor(linear.weight) and _plain_tensor(linear.bias)):
        return f"the head's weight is a {type(linear.weight).__name__} (sharded or quantised), not a plain tensor"
    return head, linear


def static_reason(model: nn.Module, kwargs: dict[str, Any], mixed_batch: bool) -> str | None:
    """Why the chunked loss cannot run for this call, known before running it; None when it can."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"{ENV_SWITCH}=0"
    if kwargs.get("logits_to_keep") not in (None, 0):
        return "logits_to_keep was given"
    config = getattr(model, "config", None)
    if kwargs.get("return_dict", getattr(config, "return_dict", True)) is False:
        return "return_dict=False"
    if kwargs.get("output_router_logits", getattr(config, "output_router_logits", False)):
        return "the model adds a router auxiliary loss (output_router_logits)"
    loss_function = getattr(model, "loss_function", None)
    if loss_function is None:
        return f"{type(model).__name__} has no loss_function, so its loss cannot be told apart from others"
    from transformers.loss.loss_utils import ForCausalLMLoss

    if loss_function is not ForCausalLMLoss:
        return f"the model's loss_function is {getattr(loss_function, '__name__', loss_function)}, not ForCausalLMLoss"
    found = head_linear(model, mixed_batch)
    return found if isinstance(found, str) else None


# -- one chunked call --------------------------------------------------------------------------------


class _HeadCapture:
    """Forward pre-hook on the head: keep its input, let it compute the last position only."""

    def __init__(self):
        self.hidden: torch.Tensor | None = None
        self.problem: str | None = None

    def __call__(self, module, args, kwargs):
        if self.hidden is not None or self.problem is not None:
            self.problem = "the model calls its head more than once"
            return None
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor) or args[0].dim() < 2:
            self.problem = "the model calls its head with other arguments than the hidden states"
            return None
        self.hidden = args[0]
        return (args[0][..., -1:, :],), kwargs


def _check_last_logits(output, hidden, linear: nn.Linear, transform) -> None:
    """The model's last-position logits must be what peftcore computes from the same hidden states."""
    theirs = getattr(output, "logits", None)
    if not isinstance(theirs, torch.Tensor):
        raise NotExact("the model's output has no logits to check")
    with torch.no_grad():
        raw = F.linear(hidden[..., -1:, :], linear.weight, linear.bias)
        ours = raw if transform is None else transform(raw)
        if theirs.shape != ours.shape:
            raise NotExact(f"the model's logits have shape {tuple(theirs.shape)}, expected {tuple(ours.shape)}")
        theirs_f, ours_f = theirs.detach().float(), ours.float()
        # the same operations on the same inputs agree to rounding; another transform does not
        tolerance = 16 * torch.finfo(theirs.dtype).eps * (1 + theirs_f.abs().max())
        if not (theirs_f - ours_f).abs().max() <= tolerance:
            raise NotExact("the model changes its logits in a way peftcore does not reproduce (not a known transform)")


def _replace_output(output, loss: torch.Tensor):
    fields = {k: v for k, v in output.items() if k not in ("loss", "logits")}
    try:
        return type(output)(loss=loss, **fields)
    except TypeError as exc:
        raise NotExact(f"the model's output type {type(output).__name__} has no loss field") from exc


def run_chunked(
    call: Callable[[dict[str, Any]], Any],
    model: nn.Module,
    kwargs: dict[str, Any],
    settings: ChunkedLossSettings,
    mixed_batch: bool,
    per_token: bool = False,
):
    """``call(kwargs)`` runs the forward; here without the labels, with the loss computed chunk by chunk.

    ``per_token``: ``output.loss`` is :func:`peftcore.lm_loss.token_nll` ``(batch, seq)``
    instead of the reduced loss (evaluation, no gradient). Raises :class:`NotExact`
    when the output shows the model does something the chunked path does not (the
    caller then runs the model's own path).
    """
    kwargs = dict(kwargs)
    labels = kwargs.pop("labels", None)
    loss_kwargs = {k: kwargs.pop(k) for k in LOSS_KWARGS if k in kwargs}
    if labels is None:
        raise ValueError("the chunked loss needs labels")
    found = head_linear(model, mixed_batch)
    if isinstance(found, str):
        raise NotExact(found)
    head, linear = found
    transform = logit_transform(model)
    capture = _HeadCapture()

    def compute_loss(module, args, hook_kwargs, output):
        if capture.problem is not None or capture.hidden is None:
            raise NotExact(capture.problem or "the model's forward does not call its head")
        if getattr(output, "aux_loss", None) is not None:
            raise NotExact("the model returns an auxiliary loss that its own loss would include")
        _check_last_logits(output, capture.hidden, linear, transform)
        if per_token:
            loss = lm_loss.token_nll(capture.hidden, linear.weight, linear.bias, labels, transform=transform,
                                     chunk_tokens=settings.chunk_tokens,
                                     ignore_index=loss_kwargs.get("ignore_index", lm_loss.IGNORE_INDEX))
        else:
            loss = lm_loss.causal_lm_loss(capture.hidden, linear.weight, linear.bias, labels, transform=transform,
                                          chunk_tokens=settings.chunk_tokens, **loss_kwargs)
        capture.hidden = None
        return _replace_output(output, loss)

    handles = [
        head.register_forward_pre_hook(capture, with_kwargs=True),
        model.register_forward_hook(compute_loss, with_kwargs=True),
    ]
    try:
        return call(kwargs)
    finally:
        for handle in handles:
            handle.remove()


def warn_fallback(model_name: str, reason: str) -> None:
    warnings.warn(
        f"peftcore: the chunked LM loss is off for {model_name} ({reason}); it computes its own loss on the full "
        "logits",
        stacklevel=4,
    )


def token_nll_from_logits(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = lm_loss.IGNORE_INDEX):
    """:func:`peftcore.lm_loss.token_nll` from full logits (the fallback); labels are padded in front to match
    positions a prompt method added."""
    if logits.shape[1] > labels.shape[1]:
        labels = F.pad(labels, (logits.shape[1] - labels.shape[1], 0), value=ignore_index)
    targets = lm_loss.shifted_targets(labels, None, ignore_index)
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets.clamp(min=0), reduction="none")
    return nll.masked_fill(targets == ignore_index, 0.0)
