"""A real task: prompt tuning alone (no other trainable weight) teaches SmolLM2-135M to label SMS spam."""

import time

import pytest
import torch

from peftcore import PromptTuningConfig, get_peft_model
from peftcore.cli.datasets import split
from peftcore.testing import wheel_assets

LABEL_WORDS = (" ham", " spam")


@pytest.fixture(scope="module")
def smollm2():
    path, data = wheel_assets("sms-spam")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        AutoTokenizer.from_pretrained(path),
        path,
        data,
    )


def encode(tokenizer, texts):
    prompts = [f"SMS: {text[:80]}\nLabel:" for text in texts]
    tokenizer.padding_side = "left"
    return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)


def label_loss_and_accuracy(model, tokenizer, texts, labels, label_ids):
    """Cross-entropy of the label word at the position after "Label:", and how often it beats the other label."""
    batch = encode(tokenizer, texts)
    logits = model(**batch, logits_to_keep=1).logits[:, -1]
    targets = label_ids[torch.tensor(labels)]
    loss = torch.nn.functional.cross_entropy(logits, targets)
    accuracy = (logits[:, label_ids].argmax(-1) == torch.tensor(labels)).float().mean().item()
    return loss, accuracy


@pytest.mark.slow
def test_text_initialised_prompt_learns_sms_spam_labels(smollm2):
    base, tokenizer, path, data = smollm2
    train, test = split(data, n_train=24, n_test=24, seed=0, balanced=True)
    label_ids = torch.tensor([tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in LABEL_WORDS])
    torch.manual_seed(0)
    config = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=8,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="Label the SMS message as ham or spam.",
        tokenizer_name_or_path=str(path),
    )
    model = get_peft_model(base, config)
    assert model.get_nb_trainable_parameters()[0] == 8 * base.config.hidden_size
    start = time.perf_counter()
    model.eval()  # no dropout in SmolLM2; eval keeps the comparison deterministic
    with torch.no_grad():
        loss_before, accuracy_before = label_loss_and_accuracy(model, tokenizer, test.texts, test.labels, label_ids)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(3):
        rows = slice(8 * step, 8 * step + 8)
        loss, _ = label_loss_and_accuracy(model, tokenizer, train.texts[rows], train.labels[rows], label_ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        loss_after, accuracy_after = label_loss_and_accuracy(model, tokenizer, test.texts, test.labels, label_ids)
    print(
        f"held-out label loss {loss_before:.3f} -> {loss_after:.3f}, accuracy {accuracy_before:.3f} -> "
        f"{accuracy_after:.3f} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    assert loss_after < 0.5 * loss_before
