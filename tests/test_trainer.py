"""transformers' Trainer with peftcore models: training, adapter-only saving, resuming, gradient checkpointing."""

from __future__ import annotations

import os

import pytest
import torch
import transformers as t
from safetensors.torch import load_file

from peftcore import LoraConfig, PeftModel, get_peft_model
from peftcore.files import AdapterFileError
from peftcore.integrations.trainer import PeftTrainer

SIGNAL_TOKEN = 7  # label 1 iff this token occurs: learnable by a tiny model


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    config = t.BertConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return t.BertForSequenceClassification(config)


def lora_model(init_seed: int = 0, **overrides) -> PeftModel:
    """The same frozen base every time; ``init_seed`` changes only the head and LoRA initialisation."""
    base = tiny_bert()
    torch.manual_seed(init_seed)
    if init_seed:
        base.classifier.reset_parameters()
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], **overrides)
    return get_peft_model(base, config)


def dataset(n: int = 32, extra_columns: bool = False) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(8, 32, (8,), generator=g)
        if i % 2:
            ids[i % 8] = SIGNAL_TOKEN
        row = {"input_ids": ids, "attention_mask": torch.ones(8, dtype=torch.long), "labels": torch.tensor(i % 2)}
        if extra_columns:
            row["token_type_ids"] = torch.zeros(8, dtype=torch.long)
            row["notes"] = torch.zeros(1)  # not a forward argument of anything: must be dropped
        rows.append(row)
    return rows


def args(tmp_path, **overrides) -> t.TrainingArguments:
    defaults = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, learning_rate=1e-2, max_steps=4,
                    logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
                    disable_tqdm=True)
    return t.TrainingArguments(**{**defaults, **overrides})


def lora_state(model: PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def test_stock_trainer_trains_only_the_adapter(tmp_path):
    model = lora_model()
    frozen_before = {k: v.detach().clone() for k, v in model.named_parameters() if not v.requires_grad}
    trainable_before = lora_state(model)
    t.Trainer(model=model, args=args(tmp_path), train_dataset=dataset()).train()
    assert all(torch.equal(v, dict(model.named_parameters())[k]) for k, v in frozen_before.items())
    changed = [k for k, v in lora_state(model).items() if not torch.equal(v, trainable_before[k])]
    assert any("lora_B" in k for k in changed) and any("classifier" in k for k in changed)


def test_stock_trainer_save_model_writes_the_full_state_dict(tmp_path):
    """Why PeftTrainer exists: transformers saves a non-PreTrainedModel, non-peft module in full."""
    trainer = t.Trainer(model=lora_model(), args=args(tmp_path), train_dataset=dataset())
    trainer.save_model(str(tmp_path / "stock"))
    assert (tmp_path / "stock" / "model.safetensors").is_file()
    assert not (tmp_path / "stock" / "adapter_model.safetensors").exists()


def test_save_model_writes_only_the_adapter_in_peft_format(tmp_path):
    model = lora_model()
    trainer = PeftTrainer(model=model, args=args(tmp_path), train_dataset=dataset())
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    files = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert files <= {"adapter_config.json", "adapter_model.safetensors", "README.md", "training_args.bin"}
    tensors = load_file(out / "adapter_model.safetensors")
    # 2 layers x (query, value) x (A 4x16 + B 16x4) + classifier (2x16 + 2); no base weight
    assert sum(v.numel() for v in tensors.values()) == 4 * 128 + 34
    assert all(".lora_" in k or ".classifier." in k for k in tensors)
    base = tiny_bert()
    base.classifier.reset_parameters()  # a different head: the saved one must replace it
    reloaded = PeftModel.from_pretrained(base, str(out))
    batch = {k: torch.stack([row[k] for row in dataset(4)]) for k in ("input_ids", "attention_mask")}
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, atol=1e-6, rtol=0)


def test_resume_from_checkpoint_restores_adapter_weights_and_continues_identically(tmp_path):
    straight = lora_model()
    PeftTrainer(model=straight, args=args(tmp_path / "a"), train_dataset=dataset()).train()

    first = lora_model()
    PeftTrainer(model=first, args=args(tmp_path / "b", save_strategy="steps", save_steps=2),
                train_dataset=dataset()).train()
    checkpoint = tmp_path / "b" / "run" / "checkpoint-2"
    assert not (checkpoint / "model.safetensors").exists() and (checkpoint / "adapter_model.safetensors").is_file()
    saved = load_file(checkpoint / "adapter_model.safetensors")

    resumed = lora_model(init_seed=5)  # different init: everything must come from the checkpoint
    trainer = PeftTrainer(model=resumed, args=args(tmp_path / "b"), train_dataset=dataset())
    trainer._load_from_checkpoint(str(checkpoint))
    on_disk = {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
               .replace("classifier.", "classifier.modules_to_save.default."): v for k, v in saved.items()}
    assert lora_state(resumed).keys() == on_disk.keys()
    assert all(torch.equal(lora_state(resumed)[k], v) for k, v in on_disk.items())

    resumed = lora_model(init_seed=5)
    PeftTrainer(model=resumed, args=args(tmp_path / "b"), train_dataset=dataset()).train(
        resume_from_checkpoint=str(checkpoint)
    )
    for name, value in lora_state(straight).items():
        torch.testing.assert_close(lora_state(resumed)[name], value, atol=1e-6, rtol=0)


def test_resume_from_a_checkpoint_without_adapter_files_fails_clearly(tmp_path):
    stock_dir = tmp_path / "stock"
    t.Trainer(model=lora_model(), args=args(tmp_path), train_dataset=dataset()).save_model(str(stock_dir))
    trainer = PeftTrainer(model=lora_model(), args=args(tmp_path), train_dataset=dataset())
    with pytest.raises(AdapterFileError, match="no adapter_model.safetensors for adapter 'default'"):
        trainer._load_from_checkpoint(str(stock_dir))


def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path):
    model = lora_model()
    trainer = PeftTrainer(model=model, train_dataset=dataset(), eval_dataset=dataset(8),
                          args=args(tmp_path, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                                    load_best_model_at_end=True, metric_for_best_model="loss"))
    trainer.train()
    best = load_file(os.path.join(trainer.state.best_model_checkpoint, "adapter_model.safetensors"))
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"
    assert torch.equal(
        model.base_model.model.bert.encoder.layer[0].attention.self.query.lora_B["default"].weight, best[key]
    )


def test_peft_trainer_keeps_the_base_models_forward_arguments(tmp_path):
    model = lora_model()
    batch = next(iter(PeftTrainer(model=model, args=args(tmp_path), train_dataset=dataset(8, extra_columns=True))
                      .get_train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    # the stock Trainer sees the task wrapper's signature, which names token_type_ids too
    stock = next(iter(t.Trainer(model=model, args=args(tmp_path), train_dataset=dataset(8, extra_columns=True))
                      .get_train_dataloader()))
    assert set(stock) == {"input_ids", "attention_mask", "token_type_ids", "labels"}


def test_save_uses_a_gathered_state_dict_when_the_trainer_passes_one(tmp_path):
    """DeepSpeed/FSDP hand ``_save`` a gathered state dict; the adapter must be written from it."""
    model = lora_model()
    trainer = PeftTrainer(model=model, args=args(tmp_path), train_dataset=dataset())
    gathered = {k: v + 1.0 if "lora_" in k else v for k, v in model.state_dict().items()}
    trainer._save(str(tmp_path / "gathered"), state_dict=gathered)
    tensors = load_file(tmp_path / "gathered" / "adapter_model.safetensors")
    key = "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight"
    assert torch.equal(tensors[key], torch.ones(16, 4))  # B starts at zero; the gathered copy is zero + 1


# `gradient_checkpointing` is what users write; transformers 5 calls it a deprecated alias
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing:FutureWarning")
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_with_the_stock_trainer(tmp_path, use_reentrant):
    model = lora_model()
    before = lora_state(model)
    trainer = t.Trainer(model=model, train_dataset=dataset(),
                        args=args(tmp_path, gradient_checkpointing=True,
                                  gradient_checkpointing_kwargs={"use_reentrant": use_reentrant}))
    trainer.train()
    assert model.get_base_model().is_activation_checkpointing
    # every layer's adapter moved: gradients reached the adapters inside the checkpointed blocks
    for layer in (0, 1):
        key = f"base_model.model.bert.encoder.layer.{layer}.attention.self.value.lora_B.default.weight"
        assert not torch.equal(lora_state(model)[key], before[key]), key


def tiny_vit_lora() -> PeftModel:
    """An image model: transformers itself does not make its inputs require grad under checkpointing."""
    torch.manual_seed(0)
    config = t.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=32, num_labels=2)
    return get_peft_model(t.ViTForImageClassification(config),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]))


def lora_b_grads(model: PeftModel) -> dict[str, torch.Tensor | None]:
    return {k: p.grad for k, p in model.named_parameters() if "lora_B" in k}


def test_gradient_checkpointing_enable_gives_adapters_in_checkpointed_blocks_gradients():
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
    plain = tiny_vit_lora()  # what goes wrong without PeftModel's handling: the base's own switch only
    plain.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    plain.train()
    with pytest.warns(UserWarning, match="requires_grad"):
        plain(pixel_values=images, labels=labels).loss.backward()
    assert all(g is None for g in lora_b_grads(plain).values())

    model = tiny_vit_lora()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    model(pixel_values=images, labels=labels).loss.backward()
    grads = lora_b_grads(model)
    assert len(grads) == 4 and all(g is not None and torch.count_nonzero(g) > 0 for g in grads.values())
    model.gradient_checkpointing_enable()  # again: still exactly one input-grad hook
    assert len(model.get_base_model()._require_grads_hooks) == 1


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing:FutureWarning")
def test_stock_trainer_with_gradient_checkpointing_trains_an_image_model(tmp_path):
    model = tiny_vit_lora()
    g = torch.Generator().manual_seed(0)
    images = [{"pixel_values": torch.randn(3, 8, 8, generator=g), "labels": torch.tensor(i % 2)} for i in range(16)]
    before = lora_state(model)
    t.Trainer(model=model, train_dataset=images,
              args=args(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True},
                        remove_unused_columns=False)).train()
    after = lora_state(model)
    moved = [k for k in after if "lora_B" in k and not torch.equal(after[k], before[k])]
    assert len(moved) == 4, moved


def test_checkpointing_switched_on_before_the_adapter_is_attached():
    base = tiny_bert()
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    base.disable_input_require_grads()  # as transformers < 5 leaves it: no hook on the embeddings
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"]))
    model.train()
    batch = {k: torch.stack([row[k] for row in dataset(4)]) for k in ("input_ids", "attention_mask", "labels")}
    model(**batch).loss.backward()
    assert all(p.grad is not None for k, p in model.named_parameters() if "lora_B" in k)


def test_checkpoints_of_several_adapters_use_peft_sub_folders_and_restore_each(tmp_path):
    model = lora_model()
    model.add_adapter("second", LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["value"]))
    trainer = PeftTrainer(model=model, args=args(tmp_path), train_dataset=dataset())
    trainer.train()  # trains "default", the active adapter
    with torch.no_grad():  # give "second" recognisable weights
        for name, param in model.named_parameters():
            if ".second." in name:
                param.fill_(0.5)
    trainer.save_model(str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "ckpt" / "second" / "adapter_model.safetensors").is_file()

    fresh = lora_model(init_seed=7)
    fresh.add_adapter("second", LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["value"]))
    PeftTrainer(model=fresh, args=args(tmp_path), train_dataset=dataset())._load_from_checkpoint(str(tmp_path / "ckpt"))
    expected = dict(model.named_parameters())
    for name, param in fresh.named_parameters():
        if ".lora_" in name or ".modules_to_save." in name:
            assert torch.equal(param, expected[name]), name
