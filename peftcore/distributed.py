"""Adapters on sharded models: whole tensors for saving, shards for loading, and PEFT's FSDP wrap policy.

peftcore has no distribution layer of its own: DDP, FSDP (``fully_shard`` and FSDP1) and
DeepSpeed do the training. What they leave to the adapter library is the files:

- FSDP2 (``fully_shard``) turns every parameter into a ``DTensor`` holding one rank's shard;
- DeepSpeed ZeRO-3 replaces each parameter's data by an empty placeholder (its real shape in
  ``ds_shape``) and keeps this rank's partition elsewhere;
- FSDP1 renames and flattens parameters, but its ``state_dict()`` hooks already hand out whole
  tensors, so what ``model.state_dict()`` gives needs no further work.

:func:`full_tensors` turns the first two into whole, plain CPU tensors. Gathering is a collective:
every rank must call it (``save_pretrained(..., is_main_process=rank == 0)`` on every rank, as PEFT
asks), and only the main process writes. :func:`copy_into` is the reverse for loading: every rank
reads the same file and keeps its own shard, without communication where the engine allows.
"""

from __future__ import annotations

import functools
import os
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from peftcore.walking import walk_modules


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support has no sharded tensors
        return None
    return DTensor


def is_dtensor(tensor) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def is_zero3_param(tensor) -> bool:
    """A DeepSpeed ZeRO-3 parameter: its ``.data`` is a placeholder and the values live in partitions."""
    return hasattr(tensor, "ds_id") and hasattr(tensor, "ds_shape")


def is_sharded(tensor) -> bool:
    return is_dtensor(tensor) or is_zero3_param(tensor)


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same dict with every sharded value replaced by the whole tensor, detached, on the CPU.

    Plain tensors are only detached (no copy, device kept). ZeRO-3 values must be the
    parameters themselves (``state_dict(keep_vars=True)``): a detached copy has lost the
    ``ds_*`` attributes that say where its partitions are. Collective when anything is sharded.
    """
    zero3 = [t for t in tensors.values() if is_zero3_param(t)]
    with _gathered_zero3(zero3):
        out = {}
        for key, tensor in tensors.items():
            if is_dtensor(tensor):
                out[key] = tensor.detach().full_tensor().cpu()
            elif is_zero3_param(tensor):
                out[key] = tensor.data.detach().cpu().clone()  # the gathered data is freed on exit
            else:
                out[key] = tensor.detach()
    return out


@contextmanager
def _gathered_zero3(params: list, modifier_rank: int | None = None):
    """DeepSpeed's ``GatheredParameters`` over ``params`` (one collective for all of them)."""
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def copy_into(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``target.copy_(whole)`` for each pair, where a target may be a shard.

    A ``DTensor`` target keeps its own shard of ``whole`` (every rank holds the same file, so
    no data moves between ranks); ZeRO-3 targets are gathered, written on rank 0 and
    re-partitioned by DeepSpeed (collective: every rank must load). Shapes are the caller's
    to check (``target.shape`` of a DTensor is the whole shape; ZeRO-3's is in ``ds_shape``).
    """
    zero3 = [target for target, _ in pairs if is_zero3_param(target)]
    with torch.no_grad(), ExitStack() as stack:
        if zero3:
            stack.enter_context(_gathered_zero3(zero3, modifier_rank=0))
        for target, whole in pairs:
            if is_dtensor(target):
                from torch.distributed.tensor import distribute_tensor

                source = whole.to(device=target.device, dtype=target.dtype)
                target.copy_(distribute_tensor(source, target.device_mesh, target.placements, src_data_rank=None))
            else:
                target.copy_(whole)


def whole_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The unsharded shape (a DTensor's ``shape`` is already whole; ZeRO-3 keeps it in ``ds_shape``)."""
    return tuple(tensor.ds_shape) if is_zero3_param(tensor) else tuple(tensor.shape)


def any_sharded(module: nn.Module) -> bool:
    return any(is_sharded(p) for p in module.parameters())


def refuse_fsdp1_load(model: nn.Module) -> None:
    """FSDP1 hands out copies from ``state_dict()``: writing into them would silently load nothing."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return
    # the root and the blocks are wrapped wherever FSDP1 is used: a walk that skips the per-adapter
    # holders finds them, and keeps loading flat in the number of adapters the model holds
    if any(isinstance(m, FullyShardedDataParallel) for _, m in walk_modules(model)):
        raise RuntimeError(
            "cannot load adapter weights into a model wrapped by FSDP1 (FullyShardedDataParallel): load them before "
            "wrapping (PeftModel.from_pretrained / load_adapter, then accelerator.prepare), or shard with FSDP2 "
            "(fully_shard), whose shards peftcore loads in place"
        )


# -- FSDP1: PEFT's auto wrap policy ---------------------------------------------------------------


def fsdp_auto_wrap_policy(model: nn.Module):
    """PEFT's FSDP1 ``auto_wrap_policy``: transformer blocks as units, trainable leaves on their own.

    FSDP1 flattens each unit's parameters into one tensor, which must have a single
    ``requires_grad`` ("Must flatten tensors with uniform requires_grad", peft #1702): a
    frozen base with trainable adapters therefore needs each leaf module whose ``weight``
    trains (``lora_A``/``lora_B`` Linears, a prompt embedding) in its own unit, inside the
    blocks that hold the frozen weights. The blocks are the model's ``_no_split_modules``
    (override with ``FSDP_TRANSFORMER_CLS_TO_WRAP=Cls1,Cls2``, as in PEFT and accelerate);
    peftcore's input adapters (prompt encoders) are units too. Use it as
    ``accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)``
    before ``accelerator.prepare``, or ``FullyShardedDataParallel(model, auto_wrap_policy=...)``.
    """
    from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy, transformer_auto_wrap_policy

    from peftcore.input_adapter import InputAdapter

    from_env = "FSDP_TRANSFORMER_CLS_TO_WRAP" in os.environ
    names = os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"].split(",") if from_env else _no_split_modules(model)
    block_classes: set[type] = {InputAdapter}
    for name in filter(None, (n.strip() for n in names)):
        found = _module_class_named(model, name)
        if found is None:
            where = "FSDP_TRANSFORMER_CLS_TO_WRAP" if from_env else "the model's _no_split_modules"
            raise TypeError(f"fsdp_auto_wrap_policy: no module of class {name!r} (named in {where}) in the model")
        block_classes.add(found)

    def trainable_leaf(module: nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        return next(module.children(), None) is None and weight is not None and weight.requires_grad

    return functools.partial(
        _or_policy,
        policies=[
            functools.partial(lambda_auto_wrap_policy, lambda_fn=trainable_leaf),
            functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=block_classes),
        ],
    )


def _no_split_modules(model: nn.Module) -> list[str]:
    """The block class names transformers' models declare (``_no_split_modules``), searched through wrappers."""
    for module in model.modules():
        names = getattr(type(module), "_no_split_modules", None) or getattr(module, "_no_split_modules", None)
        if isinstance(names, (list, tuple, set)) and names:
            return sorted(names)
    return []


def _module_class_named(model: nn.Module, name: str) -> type | None:
    return next((type(m) for m in model.modules() if type(m).__name__ == name), None)
