"""The seam for methods that do not wrap layers (prompt tuning, prefix tuning, p-tuning).

Such a method answers ``create_model_adapter`` with an :class:`InputAdapter`; the
:class:`~peftcore.peft_model.PeftModel` keeps it in ``prompt_encoder[adapter_name]``
(PEFT's attribute) and lets it rewrite the keyword arguments of every forward and
``generate`` call of the active adapter. Modules named in the config's
``modules_to_save`` (a classifier head) are trained as per-adapter copies, as with
layer methods. The prompt-learning building blocks live in :mod:`peftcore.prompt_learning`.
"""

from __future__ import annotations

from typing import Any

from torch import nn


class InputAdapter(nn.Module):
    """Edits a model's inputs instead of its layers."""

    def prepare_forward(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Return the keyword arguments for ``model(**kwargs)`` with the adapter applied."""
        raise NotImplementedError

    def prepare_generate(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Same for ``model.generate(**kwargs)``; defaults to :meth:`prepare_forward`."""
        return self.prepare_forward(model, kwargs)
