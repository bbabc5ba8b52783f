"""The README.md model card save_pretrained writes: PEFT's fields, compared with what peft itself writes."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers as t
from huggingface_hub import ModelCard

import peftcore
from peftcore.config import PEFT_FORMAT_VERSION
from peftcore.version import __version__

BASE_ID = "someone/tiny-base"


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        model = t.LlamaForCausalLM(t.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    else:
        model = t.BertForSequenceClassification(t.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                                             num_attention_heads=2, intermediate_size=32))
    model.config._name_or_path = model.name_or_path = BASE_ID  # what from_pretrained("someone/tiny-base") sets
    return model


CASES = [("llama", "CAUSAL_LM", "LoraConfig", ["q_proj"]), ("bert", "SEQ_CLS", "LoraConfig", ["query"]),
         ("llama", "CAUSAL_LM", "IA3Config", ["q_proj", "down_proj"])]


def card_of(folder) -> ModelCard:
    return ModelCard.load(folder / "README.md")


@pytest.mark.parametrize("kind,task,config_name,targets", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_card_matches_peft_except_the_framework_line(tmp_path, kind, task, config_name, targets):
    extra = {"feedforward_modules": ["down_proj"]} if config_name == "IA3Config" else {}
    ours = peftcore.get_peft_model(tiny(kind), getattr(peftcore, config_name)(
        task_type=task, target_modules=targets, **extra))
    theirs = peft.get_peft_model(tiny(kind), getattr(peft, config_name)(
        task_type=task, target_modules=targets, **extra))
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    our_card, peft_card = card_of(tmp_path / "ours"), card_of(tmp_path / "peft")
    assert our_card.data.to_dict() == peft_card.data.to_dict()
    assert our_card.data.library_name == "peft" and our_card.data.base_model == BASE_ID
    assert f"base_model:adapter:{BASE_ID}" in our_card.data.tags
    assert our_card.data.pipeline_tag == ("text-generation" if task == "CAUSAL_LM" else None)
    # the only text difference: which software wrote the files
    peft_text = peft_card.text.replace(f"- PEFT {peft.__version__}",
                                       f"- peftcore {__version__}\n- PEFT {PEFT_FORMAT_VERSION} (file format)")
    assert our_card.text == peft_text


def test_user_readme_keeps_its_text_and_metadata_and_saving_twice_adds_nothing(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    user = ("---\nlicense: apache-2.0\ntags:\n- my-tag\n---\n\n# Spam filter adapter\n\nMy notes.\n\n"
            "### Framework versions\n\n- Transformers 5.24\n")
    (folder / "README.md").write_text(user)
    config = peftcore.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"])
    model = peftcore.get_peft_model(tiny("llama"), config)
    model.save_pretrained(folder)
    card = card_of(folder)
    assert card.data.license == "apache-2.0" and card.data.library_name == "peft"
    assert card.text.startswith("\n# Spam filter adapter\n\nMy notes.\n")
    lines = card.text.splitlines()
    at = lines.index("### Framework versions")
    assert lines[at + 1:at + 5] == ["", f"- peftcore {__version__}", f"- PEFT {PEFT_FORMAT_VERSION} (file format)",
                                    "- Transformers 5.24"]
    first = (folder / "README.md").read_text()
    model.save_pretrained(folder)
    assert (folder / "README.md").read_text() == first


def test_quantization_config_of_the_base_is_written(tmp_path):
    base = tiny("llama")
    base.config.quantization_config = t.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    model = peftcore.get_peft_model(base, peftcore.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    lines = card_of(tmp_path).text.splitlines()
    at = lines.index("## Training procedure")
    assert "The following `bitsandbytes` quantization config was used during training:" in lines[at:]
    assert "- load_in_4bit: True" in lines[at:] and "- bnb_4bit_quant_type: nf4" in lines[at:]
    assert "- load_in_8bit: False" in lines[at:]


def test_model_without_a_hub_id_gets_no_empty_base_model(tmp_path):
    torch.manual_seed(0)
    base = t.LlamaForCausalLM(t.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=2))
    peftcore.get_peft_model(base, peftcore.LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    data = card_of(tmp_path).data.to_dict()
    assert "base_model" not in data
    assert data["tags"] == ["lora", "transformers"]
    assert "pipeline_tag" not in data  # no task type: PEFT's PeftModel sets none either


def test_unreadable_user_card_stops_the_save_before_any_file_is_written(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: [mit\n---\n\nnotes\n")
    model = peftcore.get_peft_model(tiny("llama"), peftcore.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="README.md: the model card's YAML metadata cannot be read"):
        model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
