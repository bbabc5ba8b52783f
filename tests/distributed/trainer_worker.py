"""One rank of a 2-rank ``PeftTrainer`` run (DDP, or DeepSpeed through ``TrainingArguments(deepspeed=...)``).

Trains 4 steps with checkpoints at steps 2 and 4, saves the final adapter, then resumes a fresh
model from checkpoint 2 and trains to step 4 again. Writes what every rank actually held after
training (gathered independently of peftcore: DeepSpeed's GatheredParameters, or the plain tensors).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers as t

STEPS, SAVE_EVERY, PER_DEVICE = 4, 2, 2


def model():
    from peftcore import LoraConfig, get_peft_model
    from peftcore.testing import tiny_model

    base, _ = tiny_model("llama")
    torch.manual_seed(1)
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return get_peft_model(base, config)


def rows(n: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 64, (n, 8), generator=g)]


def trainer(out: Path, deepspeed: str | None):
    from peftcore.integrations.trainer import PeftTrainer

    args = t.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=PER_DEVICE, learning_rate=1e-2, max_steps=STEPS,
        save_strategy="steps", save_steps=SAVE_EVERY, logging_strategy="no", report_to=[], use_cpu=deepspeed is None,
        seed=0, data_seed=0, disable_tqdm=True, deepspeed=deepspeed, ddp_backend="gloo" if deepspeed is None else None,
    )
    return PeftTrainer(model=model(), args=args, train_dataset=rows())


def trained_tensors(trainer_) -> dict[str, torch.Tensor]:
    """The trainable tensors as the engine holds them after training, made whole without peftcore's helpers."""
    peft_model = trainer_.accelerator.unwrap_model(trainer_.model)
    named = {k: p for k, p in peft_model.named_parameters() if p.requires_grad}
    if any(hasattr(p, "ds_id") for p in named.values()):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(named.values())):
            return {k: p.data.detach().clone() for k, p in named.items()}
    return {k: p.detach().clone() for k, p in named.items()}


def main() -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config (ZeRO-2 or 3)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    first = trainer(args.out / "run", args.deepspeed)
    first.train()
    first.save_model(str(args.out / "final"))
    held = trained_tensors(first)
    if dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in held.items()}, args.out / "trained.safetensors")

    second = trainer(args.out / "resumed-run", args.deepspeed)
    second.train(resume_from_checkpoint=str(args.out / "run" / f"checkpoint-{SAVE_EVERY}"))
    second.save_model(str(args.out / "resumed"))


if __name__ == "__main__":
    main()
