"""push_to_hub through huggingface_hub's commit API (transport faked: tests/fake_hub.py); loading from a Hub cache."""

from __future__ import annotations

import json
import os

import fake_hub
import pytest
import torch
import transformers as t
from huggingface_hub import ModelCard
from safetensors.torch import load as load_safetensors

from peftcore import LoraConfig, PeftConfig, PeftModel, get_peft_model

REPO = "someone/tiny-lora"
TOKEN = "hf_not_a_real_token"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    fake = fake_hub.install(monkeypatch, tmp_path / "hub-cache")
    yield fake
    fake_hub.uninstall()


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = t.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2)
    return t.LlamaForCausalLM(config)


def lora_model() -> PeftModel:
    model = get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    with torch.no_grad():  # non-zero B so the uploaded weights are not all zeros
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model


def test_model_push_sends_one_commit_with_the_saved_files(hub, tmp_path):
    model = lora_model()
    info = model.push_to_hub(REPO, private=True, token=TOKEN, revision="v1", commit_message="first adapter")
    local = tmp_path / "local"
    model.save_pretrained(local)

    assert hub.created_repos == [{"name": "tiny-lora", "organization": "someone", "visibility": "private"}]
    assert hub.branches == [(REPO, "v1")]
    assert hub.authorizations == {f"Bearer {TOKEN}"}
    (commit,) = hub.commits
    assert commit["repo_id"] == REPO and commit["revision"] == "v1"
    assert commit["header"]["summary"] == "first adapter"
    assert sorted(commit["files"]) == sorted(os.listdir(local)) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]
    sent = load_safetensors(commit["files"]["adapter_model.safetensors"])
    for name, tensor in sent.items():
        assert "lora_" in name
    expected = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(sent) == len(expected) == 2
    lora_b = next(v for k, v in sent.items() if "lora_B" in k)
    torch.testing.assert_close(lora_b, next(p for n, p in expected.items() if "lora_B" in n).detach())
    assert json.loads(commit["files"]["adapter_config.json"]) == json.loads((local / "adapter_config.json").read_text())
    assert ModelCard(commit["files"]["README.md"].decode()).data.library_name == "peft"
    assert commit["files"]["README.md"] == (local / "README.md").read_bytes()
    assert hub.validated_metadata[0]["library_name"] == "peft"  # the front matter parses as YAML
    assert info.oid == fake_hub.COMMIT_SHA


def test_default_message_main_branch_and_other_adapters(hub):
    model = lora_model()
    model.add_adapter("second", LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["v_proj"]))
    model.push_to_hub(REPO, token=TOKEN)
    (commit,) = hub.commits
    assert "visibility" not in hub.created_repos[0]  # private=None: the Hub's default
    assert hub.branches == []  # no revision: the default branch, which exists
    assert commit["header"]["summary"] == "Upload model"  # transformers' PushToHubMixin default
    assert commit["revision"] == "main"
    assert sorted(commit["files"]) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                       "second/adapter_config.json", "second/adapter_model.safetensors"]


def test_existing_remote_readme_is_updated_not_replaced(hub):
    user_card = "---\nlicense: mit\ntags:\n- my-tag\n---\n\n# My adapter\n\nTrained on my data.\n"
    hub.remote_files[(REPO, "README.md")] = user_card.encode()
    lora_model().push_to_hub(REPO, token=TOKEN, tags=["pushed"])
    card = ModelCard(hub.commits[0]["files"]["README.md"].decode())
    assert "# My adapter\n\nTrained on my data." in card.text
    assert card.data.license == "mit"
    assert card.data.library_name == "peft"
    assert "pushed" in card.data.tags and "lora" in card.data.tags


def test_config_push(hub):
    config = LoraConfig(r=4, target_modules=["q_proj"], base_model_name_or_path="someone/base")
    config.push_to_hub(REPO, token=TOKEN, commit_message="config only", revision="cfg")
    (commit,) = hub.commits
    assert sorted(commit["files"]) == ["adapter_config.json"]
    assert commit["header"]["summary"] == "config only" and commit["revision"] == "cfg"
    sent = json.loads(commit["files"]["adapter_config.json"])
    assert sent["r"] == 4 and sent["base_model_name_or_path"] == "someone/base" and sent["peft_type"] == "LORA"


def test_config_push_default_message(hub):
    LoraConfig(target_modules=["q_proj"]).push_to_hub(REPO, token=TOKEN)
    assert hub.commits[0]["header"]["summary"] == "Upload config"


def test_bad_repo_id_is_refused_before_any_request(hub):
    with pytest.raises(ValueError, match="repo_id"):
        lora_model().push_to_hub("", token=TOKEN)
    assert hub.created_repos == [] and hub.commits == []


# -- loading from the Hub cache (snapshot layout), offline -----------------------------------------------------


def put_in_cache(cache: str, repo_id: str, source_folder, revisions: dict[str, str]) -> None:
    """Lay ``source_folder`` out as huggingface_hub's cache: refs/<branch> -> snapshots/<sha>/files."""
    repo_dir = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    for branch, sha in revisions.items():
        snapshot = os.path.join(repo_dir, "snapshots", sha)
        os.makedirs(snapshot, exist_ok=True)
        for name in os.listdir(source_folder[branch]):
            with open(os.path.join(source_folder[branch], name), "rb") as src:
                data = src.read()
            with open(os.path.join(snapshot, name), "wb") as dst:
                dst.write(data)
        os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
        with open(os.path.join(repo_dir, "refs", branch), "w") as f:
            f.write(sha)


def test_from_pretrained_resolves_a_repo_id_through_the_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    main_model, v2_model = lora_model(), lora_model()
    with torch.no_grad():
        for name, p in v2_model.named_parameters():
            if "lora_B" in name:
                p.add_(1.0)
    main_model.save_pretrained(tmp_path / "main")
    v2_model.save_pretrained(tmp_path / "v2")
    put_in_cache(str(tmp_path / "cache"), REPO, {"main": tmp_path / "main", "v2": tmp_path / "v2"},
                 {"main": "1" * 40, "v2": "2" * 40})

    x = torch.tensor([[1, 2, 3, 4]])
    for revision, reference in ((None, main_model), ("v2", v2_model)):
        kwargs = {} if revision is None else {"revision": revision}
        loaded = PeftModel.from_pretrained(tiny_llama(), REPO, **kwargs)
        torch.testing.assert_close(loaded(input_ids=x).logits, reference.eval()(input_ids=x).logits)
    assert PeftConfig.from_pretrained(REPO, revision="v2").r == 2
    with pytest.raises(ValueError, match="not found"):
        PeftModel.from_pretrained(tiny_llama(), REPO, revision="v3")


def test_create_pr_and_description_reach_the_commit(hub):
    info = lora_model().push_to_hub(REPO, token=TOKEN, create_pr=True, commit_description="why this adapter")
    (commit,) = hub.commits
    assert commit["create_pr"] == "1"
    assert commit["header"]["description"] == "why this adapter"
    assert info.pr_url.endswith("/discussions/1")
