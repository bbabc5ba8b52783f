"""PEFT's QLoRA workflow on the real SmolLM2-135M (4-bit NF4, 8-bit) on CPU: train, save, reload, peft interop."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

import peftcore
from peftcore.cli.datasets import split
from peftcore.testing import wheel_assets

LABEL_WORDS = (" ham", " spam")
QUANT = {
    "4bit": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=torch.float32),
    "8bit": lambda: BitsAndBytesConfig(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def assets():
    path, data = wheel_assets("sms-spam")
    return path, AutoTokenizer.from_pretrained(path), data


def load(path, kind):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=QUANT[kind]())


def label_loss(model, tokenizer, texts, labels, label_ids):
    tokenizer.padding_side = "left"
    batch = tokenizer([f"SMS: {t[:80]}\nLabel:" for t in texts], return_tensors="pt", padding=True,
                      add_special_tokens=False)
    logits = model(**batch).logits[:, -1]
    return torch.nn.functional.cross_entropy(logits, label_ids[torch.tensor(labels)])


def lora(lib):
    return lib.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                          task_type="CAUSAL_LM")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_qlora_training_lowers_held_out_loss_and_reloads_identically(assets, kind, tmp_path):
    path, tokenizer, data = assets
    train, test = split(data, n_train=24, n_test=16, seed=0, balanced=True)
    label_ids = torch.tensor([tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in LABEL_WORDS])
    base = peftcore.prepare_model_for_kbit_training(load(path, kind), use_gradient_checkpointing=False)
    torch.manual_seed(0)
    model = peftcore.get_peft_model(base, lora(peftcore))
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj).__name__.startswith("Linear")
    model.eval()
    with torch.no_grad():
        before = label_loss(model, tokenizer, test.texts, test.labels, label_ids).item()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for step in range(3):
        rows = slice(8 * step, 8 * step + 8)
        label_loss(model, tokenizer, train.texts[rows], train.labels[rows], label_ids).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        after = label_loss(model, tokenizer, test.texts, test.labels, label_ids).item()
    print(f"{kind} QLoRA held-out label loss {before:.3f} -> {after:.3f}")
    assert after < before - 0.1
    batch = tokenizer(test.texts[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        trained = model(**batch).logits
    model.save_pretrained(tmp_path)
    with torch.no_grad():  # saving leaves the model as it was (bitsandbytes' own save path would not)
        assert torch.equal(model(**batch).logits, trained)
    fresh = peftcore.prepare_model_for_kbit_training(load(path, kind), use_gradient_checkpointing=False)
    reloaded = peftcore.PeftModel.from_pretrained(fresh, str(tmp_path)).eval()
    real = batch["attention_mask"].bool()  # pad positions attend to nothing: their logits carry no meaning
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits[real], model(**batch).logits[real], rtol=0, atol=0)


@pytest.mark.slow
def test_peft_and_peftcore_adapters_swap_on_the_4bit_smollm2(assets, tmp_path):
    import peft

    path, tokenizer, data = assets
    batch = tokenizer(["Free entry in a weekly competition!", "See you at lunch"], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(load(path, "4bit"), lora(peft))
    with torch.no_grad():  # a trained-looking adapter: B is zero at init
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    theirs.save_pretrained(tmp_path / "peft")
    ours = peftcore.PeftModel.from_pretrained(load(path, "4bit"), str(tmp_path / "peft"))
    theirs.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=1e-4, atol=1e-4)
    ours.save_pretrained(tmp_path / "peftcore")
    back = peft.PeftModel.from_pretrained(load(path, "4bit"), str(tmp_path / "peftcore")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, theirs(**batch).logits, rtol=1e-4, atol=1e-4)
