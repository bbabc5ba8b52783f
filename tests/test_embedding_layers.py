"""save_embedding_layers: the base model's embedding weights beside the adapter, as PEFT writes and reads them."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftcore
from peftcore.testing import tiny_model


def _saved_keys(lib, model, folder, setting):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(folder, save_embedding_layers=setting)
    keys = set(load_file(folder / "adapter_model.safetensors"))
    return keys, [str(w.message) for w in caught if "save_embedding_layers" in str(w.message)]


@pytest.mark.parametrize("setting", ["auto", True, False])
def test_targeted_embeddings_are_saved_as_peft_saves_them(tmp_path, setting):
    saved = {}
    for lib in (peftcore, peft):
        torch.manual_seed(0)
        model = lib.get_peft_model(tiny_model("llama")[0], lib.LoraConfig(target_modules=["embed_tokens", "q_proj"]))
        saved[lib] = _saved_keys(lib, model, tmp_path / lib.__name__, setting)
    assert saved[peftcore][0] == saved[peft][0]
    assert ("base_model.model.model.embed_tokens.base_layer.weight" in saved[peftcore][0]) == (setting is not False)
    assert bool(saved[peftcore][1]) == bool(saved[peft][1]) == (setting == "auto")


def test_a_resized_vocabulary_is_saved_and_restored(tmp_path):
    base, inputs = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    vocab = base.config.vocab_size

    def resized():
        model = type(base).from_pretrained(tmp_path / "base")
        model.resize_token_embeddings(vocab + 3)
        return model

    torch.manual_seed(0)
    model = peftcore.get_peft_model(resized(), peftcore.LoraConfig(target_modules=["q_proj"]))
    with torch.no_grad():
        model.get_base_model().get_input_embeddings().weight[vocab:] = torch.randn(3, base.config.hidden_size)
    keys, messages = _saved_keys(peftcore, model, tmp_path / "adapter", "auto")
    assert any("resized" in m for m in messages)
    assert "base_model.model.model.embed_tokens.weight" in keys and "base_model.model.lm_head.weight" in keys
    ids = torch.tensor([[1, 2, vocab + 1, vocab + 2]])
    expected = model.eval()(input_ids=ids).logits
    for lib in (peftcore, peft):  # a fresh resized base gets the trained rows back, in either library
        loaded = lib.PeftModel.from_pretrained(resized(), tmp_path / "adapter").eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
    with pytest.raises(ValueError, match=r"size mismatch for base_model\.model\..*weight.*\(67, 16\).*\(64, 16\)"):
        peftcore.PeftModel.from_pretrained(type(base).from_pretrained(tmp_path / "base"), tmp_path / "adapter")


class WithSibling(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens, self.embed_tokens_extra = nn.Embedding(10, 4), nn.Embedding(10, 4)
        self.lin0 = nn.Linear(4, 4)

    def get_input_embeddings(self):
        return self.embed_tokens

    def get_output_embeddings(self):
        return None

    def forward(self, ids):
        return self.lin0(self.embed_tokens(ids) + self.embed_tokens_extra(ids))


def test_only_the_embedding_modules_are_written_and_read(tmp_path):
    model = peftcore.get_peft_model(WithSibling(), peftcore.LoraConfig(target_modules=["lin0"]))
    keys, _ = _saved_keys(peftcore, model, tmp_path, True)
    assert "base_model.model.embed_tokens.weight" in keys and not any("extra" in k for k in keys)
    fresh = WithSibling()
    with torch.no_grad():
        fresh.embed_tokens_extra.weight.fill_(123.0)
    loaded = peftcore.PeftModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(loaded.get_base_model().embed_tokens.weight, model.get_base_model().embed_tokens.weight)
    assert (loaded.get_base_model().embed_tokens_extra.weight == 123.0).all()


def test_a_model_without_embedding_accessors_warns_as_peft_does(tmp_path):
    model = peftcore.get_peft_model(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4)),
                                    peftcore.LoraConfig(target_modules=["1"]))
    with pytest.warns(UserWarning, match="Could not identify embedding layer"):
        model.save_pretrained(tmp_path, save_embedding_layers=True)
    with pytest.raises(ValueError, match="save_embedding_layers must be"):
        model.save_pretrained(tmp_path, save_embedding_layers="yes")
