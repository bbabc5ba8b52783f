"""One rank of a 2-rank training run on a tiny Llama; also imported by the tests for the 1-process reference.

Every run trains over the same global batches: ``GLOBAL_BATCH`` rows per step, rank ``r`` of
``W`` taking rows ``r*GLOBAL_BATCH/W ...``. All rows have the same length and every token
is a label, so each rank's mean loss over its equal share averages (DDP, FSDP and DeepSpeed
all average gradients) to the global batch's mean loss: the trained adapter must equal
the 1-process one up to float rounding.

Run as ``torchrun --nproc-per-node 2 train_worker.py --engine ddp|fsdp2 ...`` or
``accelerate launch --config_file configs/accelerate/<engine>.yaml train_worker.py --engine accelerate ...``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

STEPS = 6
GLOBAL_BATCH = 4
SEQ_LEN = 8
LR = 1e-2
METHODS = ("lora", "ia3", "prompt_tuning", "adalora")


def build(method: str, init_seed: int = 1):
    """A frozen tiny Llama (always the same weights) with a fresh ``method`` adapter (init from ``init_seed``)."""
    from peftcore import get_peft_model
    from peftcore.testing import tiny_model

    base, _ = tiny_model("llama")
    torch.manual_seed(init_seed)
    return get_peft_model(base, config(method))


def config(method: str):
    from peftcore import AdaLoraConfig, IA3Config, LoraConfig, PromptTuningConfig

    if method == "lora":
        return LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    if method == "ia3":
        return IA3Config(task_type="CAUSAL_LM")
    if method == "prompt_tuning":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    if method == "adalora":  # masks at steps 2, 3, 4; fixed from step 4 on
        return AdaLoraConfig(task_type="CAUSAL_LM", init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1,
                             total_step=STEPS, target_modules=["q_proj", "v_proj"])
    raise ValueError(method)


def global_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 64, (GLOBAL_BATCH, SEQ_LEN), generator=g) for _ in range(STEPS)]


def local_rows(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    share = GLOBAL_BATCH // world
    return batch[rank * share:(rank + 1) * share]


def train(model, optimizer, backward, rank: int = 0, world: int = 1, peft_model=None) -> list[float]:
    """Plain loop; ``backward(loss)`` is the engine's; the on_optimizer_step hook runs after each step."""
    from peftcore.loop_hooks import optimizer_step_done

    losses = []
    model.train()
    for step, batch in enumerate(global_batches()):
        ids = local_rows(batch, rank, world).to(next(model.parameters()).device)
        loss = model(input_ids=ids, labels=ids).loss
        backward(loss)
        optimizer.step()
        optimizer_step_done(peft_model if peft_model is not None else model, step)
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def single_process_adapter(method: str, out: Path) -> None:
    """The reference: one process over the same global batches."""
    model = build(method)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    train(model, optimizer, lambda loss: loss.backward())
    model.save_pretrained(out)


def _fsdp2(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for layer in model.get_base_model().model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def run(engine: str, method: str, out: Path, peftcore_policy: bool = True) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    accelerator = None
    if engine == "accelerate":
        from accelerate import Accelerator

        # DeepSpeed brings its own CPU accelerator (DS_ACCELERATOR=cpu); DDP is told to use the CPU. FSDP needs a
        # GPU (torch 2.13's FSDP1 refuses the CPU; accelerate 1.15 runs an FSDP config on CPU undistributed)
        on_cpu = not torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") != "true"
        accelerator = Accelerator(cpu=on_cpu)
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    peft_model = build(method)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    if engine == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(peft_model)
        optimizer = torch.optim.AdamW(params, lr=LR)
        backward = torch.Tensor.backward
    elif engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh

        model = _fsdp2(peft_model, init_device_mesh("cpu", (world,)))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        backward = torch.Tensor.backward
    else:
        from peftcore import fsdp_auto_wrap_policy

        fsdp_plugin = getattr(accelerator.state, "fsdp_plugin", None)
        if fsdp_plugin is not None and fsdp_plugin.fsdp_version == 1 and peftcore_policy:
            fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(peft_model)
        optimizer = torch.optim.AdamW(params, lr=LR)
        model, optimizer = accelerator.prepare(peft_model, optimizer)
        backward = accelerator.backward
    losses = train(model, optimizer, backward, rank, world, peft_model)
    target = accelerator.unwrap_model(model) if accelerator is not None else peft_model
    facts = {"losses": losses, "world": world, "sharded_adapter_tensors": _sharded_here(target),
             "fsdp1_units": sum(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules())}
    # every rank calls save_pretrained (shards are gathered collectively), each with its own folder:
    # only rank 0's may appear
    target.save_pretrained(out / f"adapter_rank{rank}", is_main_process=rank == 0)
    facts["rank_pattern"] = _rank_pattern(target)
    (out / f"rank{rank}.json").write_text(json.dumps(facts))
    if engine == "fsdp2" and method == "lora":
        dist.barrier()  # rank 0 has written the files
        _reload_into_sharded(out, rank, world)
    dist.barrier()
    dist.destroy_process_group()


def _sharded_here(model) -> int:
    """How many trainable tensors this rank holds only part of (checks the engine really sharded them)."""
    from peftcore.distributed import is_dtensor, is_zero3_param

    count = 0
    for param in model.parameters():
        if is_dtensor(param):
            count += param.to_local().numel() < param.numel()
        elif is_zero3_param(param):
            count += param.data.numel() < param.ds_numel
    return count


def _rank_pattern(model):
    config = model.peft_config["default"]
    pattern = getattr(config, "rank_pattern", None)
    return {k: [bool(v) for v in mask] for k, mask in pattern.items()} if pattern else None


def _reload_into_sharded(out: Path, rank: int, world: int) -> None:
    """Load the saved adapter into a fresh, already sharded model; write back what it holds and computes."""
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh

    from peftcore import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

    fresh = _fsdp2(build("lora", init_seed=5), init_device_mesh("cpu", (world,)))
    result = set_peft_model_state_dict(fresh, load_peft_weights(out / "adapter_rank0"))
    assert not result.missing_keys and not result.unexpected_keys, result
    held = get_peft_model_state_dict(fresh)  # gathered again: every rank
    ids = global_batches()[0]
    with torch.no_grad():
        logits = fresh(input_ids=local_rows(ids, rank, world)).logits
    save_file({"logits": logits.contiguous()}, out / f"reloaded_logits_rank{rank}.safetensors")
    if rank == 0:
        save_file({k: v.contiguous() for k, v in held.items()}, out / "reloaded_adapter.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=["ddp", "fsdp2", "accelerate"], required=True)
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fsdp1-policy", choices=["peftcore", "accelerate"], default="peftcore",
                        help="FSDP1 units: peftcore's fsdp_auto_wrap_policy, or the accelerate config's policy alone")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    run(args.engine, args.method, args.out, peftcore_policy=args.fsdp1_policy == "peftcore")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
