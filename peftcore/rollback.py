"""Putting a model's adapter bookkeeping back after a failed operation or at the end of ``disable_adapter()``.

Operations that can fail part-way are ordered so that nothing but their own new
adapter changes before the last step that can fail (``load_adapter`` fills the new
adapter before a merged model is unmerged; ``merge_adapter`` checks every layer
before it writes one). What they still touch on the way — which parameters train,
which adapter each wrapper has active, train/eval modes — is recorded here first
and put back on failure. :class:`MergedWeights` keeps the merged weights themselves
(references, not copies) for ``disable_adapter()``, which unmerges by design.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from peftcore.layer import AdapterLayer
from peftcore.walking import walk_modules

# Attributes that say which adapters are active or switched off (AdapterLayer, ModulesToSaveWrapper,
# LayerTuner, PeftModel).
_STATE_ATTRIBUTES = ("_active_adapter", "_disable_adapters", "_prompt_active", "_prompt_disabled")
_ABSENT = object()


class Trainability:
    """Which parameters train, recorded at a cost that stays the same with 2 or 16 adapters.

    The walk skips the per-adapter holders of adapter layers and records the parameters of
    their *active* adapters only. Inactive adapters are frozen by construction (every path
    that deactivates one freezes it, and no operation unfreezes one without making it
    active), so there is nothing to put back there.
    """

    def __init__(self, model: nn.Module, modules: list[nn.Module] | None = None):
        modules = [module for _, module in walk_modules(model)] if modules is None else modules
        self.trains = [(p, p.requires_grad) for p in _recorded_parameters(modules)]

    def restore(self) -> None:
        for param, trains in self.trains:
            param.requires_grad_(trains)


class Bookkeeping:
    """Trainability, which adapters are active or disabled, and train/eval modes, as they are now."""

    def __init__(self, model: nn.Module):
        modules = [module for _, module in walk_modules(model)]
        self.trainability = Trainability(model, modules)
        self.modes = [(m, m.training) for m in modules]
        self.attributes = [
            (m, name, list(value) if isinstance(value, list) else value)
            for m in modules for name in _STATE_ATTRIBUTES if (value := m.__dict__.get(name, _ABSENT)) is not _ABSENT
        ]

    def restore(self) -> None:
        self.trainability.restore()
        for module, training in self.modes:
            module.training = training
        for module, name, value in self.attributes:
            setattr(module, name, list(value) if isinstance(value, list) else value)


def _recorded_parameters(modules: list[nn.Module]) -> list[nn.Parameter]:
    found = []
    for module in modules:
        found += [p for p in module._parameters.values() if p is not None]
        if not isinstance(module, AdapterLayer):
            continue
        for attr in module.adapter_layer_names:  # runs for every adapter layer: read the dicts directly
            holder = module._modules.get(attr)
            if holder is None:
                continue
            entries = holder._parameters if isinstance(holder, nn.ParameterDict) else holder._modules
            for name in module._active_adapter:
                item = entries.get(name)
                if isinstance(item, nn.Parameter):
                    found.append(item)
                elif item is not None:
                    found += list(item.parameters()) if item._modules else list(item._parameters.values())
    return [p for p in found if p is not None]


@contextmanager
def unchanged_on_failure(model: nn.Module):
    """Run the block; if it raises, put ``model``'s bookkeeping (see :class:`Bookkeeping`) back, then re-raise."""
    before = Bookkeeping(model)
    try:
        yield
    except BaseException:
        before.restore()
        raise


class MergedWeights:
    """The merged layers' state (their weight tensors, by reference) so that unmerging can be undone exactly."""

    def __init__(self, model: nn.Module):
        self.snapshots = [(m, list(m.merged_adapters), m.merge_snapshot()) for m in model.modules()
                          if isinstance(m, AdapterLayer) and m.merged]

    def restore(self) -> None:
        """Merge back, exactly, the layers that were unmerged since and still hold those adapters."""
        for layer, names, snapshot in self.snapshots:
            if not layer.merged and all(name in layer.adapter_names for name in names):
                layer.restore_merge(snapshot)
