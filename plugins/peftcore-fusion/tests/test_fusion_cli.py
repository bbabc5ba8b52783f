"""``peftcore fuse`` and ``peftcore apply fusion`` on a tiny BERT folder (with the real MiniLM vocabulary)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftcore import LoraConfig, PeftModel, get_peft_model
from peftcore.cli import main
from peftcore.testing import labelled_csv, perturb


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    import transformers as t

    from peftcore.cli import assets

    torch.manual_seed(0)
    config = t.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=32, max_position_embeddings=128)
    folder = tmp_path_factory.mktemp("models") / "bert"
    t.BertForSequenceClassification(config).save_pretrained(folder)
    t.AutoTokenizer.from_pretrained(assets.minilm_dir()).save_pretrained(folder)
    return folder


def _adapter(bert: Path, out: Path, num_labels: int, seed: int, **lora) -> Path:
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(bert, num_labels=num_labels,
                                                              ignore_mismatched_sizes=True)
    options = dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS") | lora
    model = get_peft_model(base, LoraConfig(**options))
    perturb(model, seed=seed, scale=0.3)
    model.save_pretrained(out)
    return out


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_user_error(result, *fragments):
    assert result.exit_code == 1, result.output
    assert "Error: " in result.output and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_fuse_writes_the_python_api_result_as_a_peft_folder(bert, tmp_path):
    two, six = _adapter(bert, tmp_path / "spam", 2, 1), _adapter(bert, tmp_path / "topics", 6, 2)  # heads differ
    out = tmp_path / "fused"
    result = run("fuse", two, six, "--type", "ties", "--weights", "0.6,0.8", "--density", "0.5", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["adapters"] == {"spam": 0.6, "topics": 0.8} and report["rank"] == 4
    assert report["heads_left_out"] == ["classifier"] and report["reload_max_abs_diff"] <= 1e-5
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] is None and not config["modules_to_save"]
    # the same merge through the Python API, on the layers alone
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(bert, num_labels=2)
    model = PeftModel(base, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]), "spam")
    model.add_adapter("topics", LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    layer_only = lambda folder: {k: v for k, v in load_file(folder / "adapter_model.safetensors").items()  # noqa: E731
                                 if ".lora_" in k}
    # the files hold the layers under PEFT's names: copy them in by name
    for name, folder in (("spam", two), ("topics", six)):
        params = dict(model.named_parameters())
        for key, tensor in layer_only(folder).items():
            params[key.replace(".weight", f".{name}.weight")].data.copy_(tensor)
    model.add_weighted_adapter(["spam", "topics"], [0.6, 0.8], "mix", combination_type="ties", density=0.5)
    saved = load_file(out / "adapter_model.safetensors")
    params = dict(model.named_parameters())
    assert set(saved) == {k for k in layer_only(two)}
    for key, tensor in saved.items():
        torch.testing.assert_close(tensor, params[key.replace(".weight", ".mix.weight")], atol=1e-6, rtol=0)


def test_fuse_refuses_mismatched_bases_targets_and_ranks_naming_the_adapters(bert, tmp_path):
    a = _adapter(bert, tmp_path / "a", 2, 1)
    other_base = _adapter(bert, tmp_path / "other-base", 2, 2)
    config = json.loads((other_base / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "some/other-model"
    (other_base / "adapter_config.json").write_text(json.dumps(config))
    assert_user_error(run("fuse", a, other_base, "--out", tmp_path / "o1"), "different base models", "some/other-model",
                      "hint: fuse adapters of one base model")
    query_only = _adapter(bert, tmp_path / "query-only", 2, 3, target_modules=["query"])
    assert_user_error(run("fuse", a, query_only, "--out", tmp_path / "o2"), f"{a} and {query_only} adapt different",
                      "--union-targets")
    result = run("fuse", a, query_only, "--union-targets", "--type", "cat", "--out", tmp_path / "o2")
    assert result.exit_code == 0, result.output
    rank2 = _adapter(bert, tmp_path / "rank2", 2, 4, r=2, lora_alpha=2)
    assert_user_error(run("fuse", a, rank2, "--type", "ties", "--density", "0.5", "--out", tmp_path / "o3"),
                      "ranks must be equal", "{'a': 4, 'rank2': 2}", "hint: see `peftcore fuse --help`")
    assert_user_error(run("fuse", a, rank2, "--weights", "1", "--out", tmp_path / "o4"), "1 values for 2 adapters")
    assert_user_error(run("fuse", a, rank2, "--type", "ties", "--density", "2", "--out", tmp_path / "o5"),
                      "density must be in (0, 1]")
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 3, 4, 5))


def test_apply_fusion_trains_over_adapter_folders_and_saves_a_folder_that_reloads(bert, tmp_path):
    two, six = _adapter(bert, tmp_path / "spam", 2, 1), _adapter(bert, tmp_path / "topics", 6, 2)
    out = tmp_path / "fusion"
    result = run("apply", "fusion", "--model", bert, "--adapters", f"{two},{six}", "--dataset",
                 labelled_csv(tmp_path / "spam.csv", 40), "--epochs", "1", "--n-test", "8", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["members"] == {"spam": str(two), "topics": str(six)}
    assert report["reload_max_abs_diff"] <= 1e-4
    # per fused layer (2 layers x query, value; width 16): Q and K with bias, V without; plus the 2-way head
    assert report["trainable_params"] == 4 * (2 * (16 * 16 + 16) + 16 * 16) + (2 * 16 + 2)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "FUSION" and config["adapters"] == ["spam", "topics"]
    assert (out / "spam" / "adapter_config.json").is_file() and (out / "topics" / "adapter_model.safetensors").is_file()
    info = run("info", out, "--json")
    assert info.exit_code == 0, info.output
    assert_user_error(run("merge", out, "--out", tmp_path / "merged"), "built on adapters ['spam', 'topics']",
                      "hint: merge one of its member adapters")


def test_apply_fusion_with_a_missing_folder_is_a_user_error(bert, tmp_path):
    two = _adapter(bert, tmp_path / "spam", 2, 1)
    assert_user_error(run("apply", "fusion", "--model", bert, "--adapters", f"{two},{tmp_path / 'nope'}",
                          "--out", tmp_path / "o"), "nope")
