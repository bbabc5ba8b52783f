"""PeftModel's public API as PEFT users know it (with the LoRA plugin as the method)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers as t

import peftcore
from peftcore import LoraConfig, PeftModel, TaskType, get_peft_model
from peftcore.testing import tiny_model


def test_task_types_pick_peft_wrapper_classes():
    cases = {
        TaskType.SEQ_CLS: (t.BertForSequenceClassification, peftcore.PeftModelForSequenceClassification),
        TaskType.TOKEN_CLS: (t.BertForTokenClassification, peftcore.PeftModelForTokenClassification),
        TaskType.QUESTION_ANS: (t.BertForQuestionAnswering, peftcore.PeftModelForQuestionAnswering),
        TaskType.FEATURE_EXTRACTION: (t.BertModel, peftcore.PeftModelForFeatureExtraction),
    }
    config = t.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    ids = torch.randint(0, 64, (2, 5))
    for task, (model_cls, wrapper_cls) in cases.items():
        torch.manual_seed(0)
        base = model_cls(config).eval()
        with torch.no_grad():
            expected = base(input_ids=ids)
        model = get_peft_model(base, LoraConfig(task_type=task, r=2))
        assert type(model) is wrapper_cls
        with torch.no_grad():
            got = model(input_ids=ids)
        torch.testing.assert_close(got[0], expected[0], atol=0, rtol=0)


def test_question_answering_wrapper_passes_the_answer_positions_to_the_loss():
    config = t.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    torch.manual_seed(0)
    base = t.BertForQuestionAnswering(config).eval()
    ids, starts, ends = torch.randint(0, 64, (2, 5)), torch.tensor([1, 2]), torch.tensor([3, 4])
    with torch.no_grad():
        expected = base(input_ids=ids, start_positions=starts, end_positions=ends).loss
        model = get_peft_model(base, LoraConfig(task_type="QUESTION_ANS", r=2))
        got = model(input_ids=ids, start_positions=starts, end_positions=ends).loss
    assert expected > 0
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_seq_cls_trains_the_head_via_modules_to_save():
    base, inputs = tiny_model("bert")
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=2))
    assert model.peft_config["default"].modules_to_save == ["classifier", "score"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "base_model.model.classifier.modules_to_save.default.weight" in trainable
    assert not any("original_module" in n for n in trainable)
    assert model.modules_to_save == {"classifier", "score"}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_generate_passes_through(arch):
    base, inputs = tiny_model(arch)
    model = get_peft_model(base, LoraConfig(r=2, task_type="SEQ_2_SEQ_LM" if arch == "t5" else "CAUSAL_LM"))
    out = model.generate(input_ids=inputs["input_ids"], max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected_len = (1 if arch == "t5" else inputs["input_ids"].shape[1]) + 4
    assert out.shape == (2, expected_len)


def test_get_peft_model_wraps_the_base_model_in_place():
    base, _ = tiny_model("llama")
    model = get_peft_model(base, LoraConfig(r=2))
    assert model.get_base_model() is base
    assert isinstance(base.model.layers[0].self_attn.q_proj, peftcore.AdapterLayer)


def test_active_adapter_and_set_adapter_control_what_trains():
    base, _ = tiny_model("llama")
    model = get_peft_model(base, LoraConfig(r=2))
    model.add_adapter("other", LoraConfig(r=2))
    assert model.active_adapter == "default" and model.active_adapters == ["default"]
    trains = lambda name: any(p.requires_grad for n, p in model.named_parameters() if f".{name}." in n)  # noqa: E731
    assert trains("default") and not trains("other")
    model.set_adapter("other")
    assert model.active_adapter == "other" and trains("other") and not trains("default")
    with pytest.raises(ValueError, match="not found"):
        model.set_adapter("missing")


def test_print_trainable_parameters_format(capsys):
    base, _ = tiny_model("llama")
    model = get_peft_model(base, LoraConfig(r=2))
    trainable, total = model.get_nb_trainable_parameters()
    model.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    )


def test_mixing_methods_in_one_model_is_refused():
    class Other(LoraConfig):
        pass

    base, _ = tiny_model("llama")
    model = get_peft_model(base, LoraConfig(r=2))
    foreign = copy.copy(LoraConfig(r=2))
    foreign.peft_type = "IA3"
    with pytest.raises(ValueError, match="one PeftModel holds adapters of one method"):
        model.add_adapter("x", foreign)


def test_from_pretrained_is_inference_only_unless_trainable(tmp_path):
    base, inputs = tiny_model("bert")
    model = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="SEQ_CLS", r=2))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert type(loaded) is peftcore.PeftModelForSequenceClassification
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    trainable = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert names == {n for n, p in model.named_parameters() if p.requires_grad}


def test_prepare_model_for_kbit_training_freezes_and_upcasts():
    base, _ = tiny_model("llama")
    base = base.to(torch.bfloat16)
    peftcore.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in base.parameters())


def test_load_adapter_returns_peft_load_result(tmp_path):
    """The same missing/unexpected keys as peft's load_adapter, for a complete file and for one missing a tensor."""
    import peft
    from safetensors.torch import load_file, save_file

    config = dict(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    base, _ = tiny_model("llama")
    get_peft_model(copy.deepcopy(base), LoraConfig(**config)).save_pretrained(tmp_path / "full")
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "adapter_config.json").write_text((tmp_path / "full" / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "full" / "adapter_model.safetensors")
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, tmp_path / "part" / "adapter_model.safetensors")

    results = {}
    for name, lib in (("peft", peft), ("peftcore", peftcore)):
        model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(**config))
        with warnings.catch_warnings():  # peftcore warns about the missing tensor, peft does not
            warnings.simplefilter("ignore")
            part = model.load_adapter(str(tmp_path / "part"), adapter_name="part")
        results[name] = (model.load_adapter(str(tmp_path / "full"), adapter_name="full"), part)
    for full, part in results.values():
        assert list(full.missing_keys) == [] and list(full.unexpected_keys) == []
        assert list(part.unexpected_keys) == []
    # the same tensor: peft names it by its module path with the adapter name, peftcore by its name in the file
    assert len(results["peft"][1].missing_keys) == 1
    assert list(results["peftcore"][1].missing_keys) == [dropped]
    assert results["peft"][1].missing_keys[0] == dropped.replace(".weight", ".part.weight")
