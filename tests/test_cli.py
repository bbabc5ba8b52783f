"""The ``peftcore`` command: every sub-command, its output and its error paths, on tiny model folders."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from peftcore import LoraConfig, Method, PeftModel, get_peft_model, hookimpl, register_plugin, unregister_plugin
from peftcore.cli import config_options, main
from peftcore.testing import labelled_csv

LM_WORDS = ("say yes if the review is good : great awful fine terrible lovely boring film plot acting music was very "
            "yes no").split()


# -- tiny model folders --------------------------------------------------------------------------------


def _bert_folder(root: Path, hidden: int, name: str) -> Path:
    import transformers as t

    from peftcore.cli import assets

    torch.manual_seed(0)
    config = t.BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=32, max_position_embeddings=128)
    folder = root / name
    t.BertForSequenceClassification(config).save_pretrained(folder)
    t.AutoTokenizer.from_pretrained(assets.minilm_dir()).save_pretrained(folder)  # the real WordPiece vocabulary
    return folder


def _word_tokenizer():
    """A word-level tokenizer over LM_WORDS: tiny, and needs no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + sorted(set(LM_WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return _bert_folder(tmp_path_factory.mktemp("models"), 16, "bert")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    import transformers as t

    tokenizer = _word_tokenizer()
    torch.manual_seed(0)
    config = t.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("models") / "llama"
    t.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _spam_csv(path: Path, n: int = 48) -> Path:
    return labelled_csv(path, n)


def _review_jsonl(path: Path, n: int = 48) -> Path:
    good, bad, subjects = (
        ["great", "fine", "lovely"],
        ["awful", "terrible", "boring"],
        ["film", "plot", "acting", "music"],
    )
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            word = (good if i % 2 == 0 else bad)[i % 3]
            row = {"instruction": f"say yes if the review is good : the {subjects[i % 4]} was very {word}",
                   "response": "yes" if i % 2 == 0 else "no"}
            fh.write(json.dumps(row) + "\n")
    return path


def run(*args: str):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def assert_user_error(result, *fragments: str) -> None:
    """Exit 1, an ``Error:`` line naming the problem, a hint, and no traceback."""
    assert result.exit_code == 1, result.output
    assert "Error: " in result.output and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


# -- list ------------------------------------------------------------------------------------------------


def test_list_shows_lora_with_its_distribution_version_and_hooks():
    result = run("list", "--json")
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    lora = next(m for m in listing["methods"] if m["name"] == "lora")
    assert lora["peft_type"] == "LORA" and lora["kind"] == "layer" and lora["config_class"] == "LoraConfig"
    assert lora["distribution"] == "peftcore-lora"
    assert lora["version"] == importlib.metadata.version("peftcore-lora")
    assert {"register_methods", "register_layer_support"} <= set(lora["hooks"])
    assert lora["task_types"] == ["all"]
    table = run("list").stdout
    assert "lora" in table and "peftcore-lora" in table and "register_layer_support" in table


def test_list_shows_a_plugin_registered_in_process():
    @dataclass
    class ToyConfig(LoraConfig):
        toy_gain: float = field(default=1.0, metadata={"help": "a field only this plugin has"})

    class Toy:
        @hookimpl
        def register_methods(self, register):
            register(Method(peft_type="TOYLORA", name="toylora", config_class=ToyConfig, tensor_prefixes=("lora_",),
                            task_types=("SEQ_CLS",)))

    plugin = Toy()
    register_plugin(plugin, name="toy")
    try:
        listing = json.loads(run("list", "--json").stdout)
        toy = next(m for m in listing["methods"] if m["name"] == "toylora")
        assert toy["distribution"] == "(registered in-process)" and toy["task_types"] == ["SEQ_CLS"]
        assert toy["hooks"] == ["register_methods"]
        # the plugin's own config field is an option of `apply toylora`, with no core change
        help_text = run("apply", "toylora", "--help").output
        assert "--toy-gain" in help_text and "a field only this plugin has" in help_text
    finally:
        unregister_plugin(plugin)


def _subprocess_cli(args: list[str], env_extra: dict[str, str], pythonpath: str | None = None):
    env = {**os.environ, **env_extra}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "peftcore.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_list_without_any_plugin_says_so_plainly():
    proc = _subprocess_cli(["list"], {"PEFTCORE_DISABLE_PLUGINS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "No peftcore method plugin is installed" in proc.stdout
    proc = _subprocess_cli(["apply", "lora"], {"PEFTCORE_DISABLE_PLUGINS": "1"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "Unknown PEFT method 'lora'" in proc.stderr and "No peftcore method plugin is installed" in proc.stderr


def test_list_reports_a_broken_plugin_instead_of_crashing(tmp_path):
    dist = tmp_path / "peftcore_broken-9.9.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: peftcore-broken\nVersion: 9.9\n")
    (dist / "entry_points.txt").write_text("[peftcore]\nbroken = peftcore_module_that_does_not_exist\n")
    proc = _subprocess_cli(["list", "--json"], {}, pythonpath=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    listing = json.loads(proc.stdout)
    broken = [b for b in listing["broken_plugins"] if b["plugin"] == "broken"]
    assert broken == [{"plugin": "broken", "distribution": "peftcore-broken", "version": "9.9",
                       "error": "ModuleNotFoundError: No module named 'peftcore_module_that_does_not_exist'"}]
    assert any(m["name"] == "lora" for m in listing["methods"])  # the good plugins still load
    text = _subprocess_cli(["list"], {}, pythonpath=str(tmp_path)).stdout
    assert "failed to load" in text and "peftcore_module_that_does_not_exist" in text


# -- options generated from the config class --------------------------------------------------------------


@pytest.mark.parametrize("field_name, text, expected", [
    ("target_modules", "query,value", ["query", "value"]),
    ("target_modules", "query", ["query"]),
    ("target_modules", "all-linear", "all-linear"),
    ("target_modules", r".*\.(query|value)", r".*\.(query|value)"),
    ("layers_to_transform", "0,1", [0, 1]),
    ("layers_to_transform", "3", 3),
    ("init_lora_weights", "gaussian", "gaussian"),
    ("init_lora_weights", "false", False),
    ("rank_pattern", '{"query": 4}', {"query": 4}),
    ("r", "16", 16),
    ("lora_dropout", "0.1", 0.1),
])
def test_option_values_parse_into_config_types(field_name, text, expected):
    import typing

    annotation = typing.get_type_hints(LoraConfig)[field_name]
    assert config_options.parse_value(annotation, text) == expected


def test_options_carry_peft_names_and_short_aliases():
    options, to_field = config_options.build_options(LoraConfig, reserved={"model", "out"})
    names = {opt: o for o in options for opt in o.opts}
    assert {"--r", "--lora-alpha", "--target-modules", "--lora-dropout", "--use-dora"} <= set(names)
    assert names["--alpha"] is names["--lora-alpha"] and names["--target"] is names["--target-modules"]
    assert names["--dropout"] is names["--lora-dropout"]
    assert "--peft-type" not in names and "--inference-mode" not in names  # written by the core, not the user
    assert to_field[names["--r"].name] == "r"


def test_config_field_clashing_with_an_apply_option_is_renamed():
    @dataclass
    class Clash(LoraConfig):
        seed: int = field(default=0, metadata={"help": "a config field called seed"})

    options, to_field = config_options.build_options(Clash, reserved={"seed"})
    renamed = next(o for o in options if to_field[o.name] == "seed")
    assert renamed.opts == ["--config-seed"]


# -- apply ----------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # raised inside peft
def test_apply_trains_a_classifier_from_csv_and_saves_a_peft_adapter(bert, tmp_path):
    import peft
    from transformers import AutoModelForSequenceClassification

    data = _spam_csv(tmp_path / "spam.csv")
    out = tmp_path / "adapter"
    result = run("apply", "lora", "--model", bert, "--dataset", data, "--out", out, "--r", "4", "--alpha", "8",
                 "--target", "query", "--epochs", "1", "--n-test", "8", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n_train"] == 40 and report["n_test"] == 8 and report["labels"] == ["ham", "spam"]
    assert set(report["accuracy"]) == {"before", "after"}
    assert report["reload_max_abs_diff"] <= 1e-6
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["target_modules"]) == (
        "LORA",
        4,
        8,
        ["query"],
    )
    assert config["task_type"] == "SEQ_CLS"
    tensors = load_file(out / "adapter_model.safetensors")
    a = tensors["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"]
    assert a.shape == (4, 16)
    # 2 layers x query x (A: 4x16 + B: 16x4) + the classifier head (2x16 + 2), counted by hand
    assert sum(t.numel() for t in tensors.values()) == report["trainable_params"] == 2 * (64 + 64) + 34
    # PEFT itself reads the folder and computes the same outputs as peftcore
    inputs = {"input_ids": torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])}
    theirs = peft.PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(bert, num_labels=2), out
    ).eval()
    ours = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(bert, num_labels=2), out)
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, atol=1e-6, rtol=0)


def test_apply_adalora_is_told_the_run_length_and_allocates_ranks(bert, tmp_path):
    data = _spam_csv(tmp_path / "spam.csv")
    out = tmp_path / "adalora"
    result = run(
        "apply",
        "adalora",
        "--model",
        bert,
        "--dataset",
        data,
        "--out",
        out,
        "--init-r",
        "6",
        "--target-r",
        "2",
        "--tinit",
        "1",
        "--tfinal",
        "1",
        "--deltaT",
        "1",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--n-test",
        "8",
        "--lr",
        "1e-2",
        "--json",
    )
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["total_step"] == 2 * 40 // 8  # two epochs of 40 training rows in batches of 8
    ranks = [sum(v) if isinstance(v, list) else v for v in config["rank_pattern"].values()]
    assert len(ranks) == 2 * 2 and sum(ranks) == 2 * len(ranks)  # query+value in 2 layers, target_r each on average


def test_apply_without_dataset_attaches_and_saves_untrained(bert, tmp_path):
    result = run("apply", "lora", "--model", bert, "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert "without training" in result.stdout and "reload check" in result.stdout
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b_weights = [t for k, t in tensors.items() if "lora_B" in k]
    assert b_weights and all(torch.count_nonzero(t) == 0 for t in b_weights)  # LoRA's B starts at zero


def test_apply_causal_lm_on_instruction_jsonl_lowers_held_out_loss(llama, tmp_path):
    data = _review_jsonl(tmp_path / "reviews.jsonl")
    result = run("apply", "lora", "--model", llama, "--dataset", data, "--out", tmp_path / "lm", "--epochs", "4",
                 "--lr", "1e-2", "--n-test", "8", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["task_type"] == "CAUSAL_LM" and report["n_train"] == 40
    loss = report["eval_loss"]
    assert loss["after"] < loss["before"]
    assert set(report["generation"]) == {"before", "after", "expected"}
    assert report["reload_max_abs_diff"] <= 1e-6
    config = json.loads((tmp_path / "lm" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and sorted(config["target_modules"]) == ["q_proj", "v_proj"]


def test_apply_max_length_is_checked_against_the_model(llama, tmp_path):
    data = _review_jsonl(tmp_path / "reviews.jsonl")
    assert_user_error(run("apply", "lora", "--model", llama, "--dataset", data, "--max-length", "129"),
                      "--max-length 129 is more than the model's 128 positions", "hint: use --max-length 128")


def test_apply_offload_needs_checkpointing(llama):
    assert_user_error(run("apply", "lora", "--model", llama, "--offload-activations"),
                      "--offload-activations needs --gradient-checkpointing")


def test_apply_unknown_method():
    assert_user_error(
        run("apply", "nosuchmethod"), "Unknown PEFT method 'nosuchmethod'", "hint: installed methods:", "lora"
    )


def test_apply_missing_model_path(tmp_path):
    assert_user_error(run("apply", "lora", "--model", tmp_path / "nowhere"), "no such model folder", "hint:")
    (tmp_path / "empty").mkdir()
    assert_user_error(run("apply", "lora", "--model", tmp_path / "empty"), "has no config.json")


def test_apply_missing_dataset_file(bert, tmp_path):
    assert_user_error(run("apply", "lora", "--model", bert, "--dataset", tmp_path / "none.csv"),
                      "no such dataset file", "sms-spam")


def test_apply_dataset_without_usable_columns(bert, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\nhello,1\nbye,0\n")
    assert_user_error(
        run("apply", "lora", "--model", bert, "--dataset", bad), "no text column", "['a', 'b']", "--text-column"
    )
    assert_user_error(
        run("apply", "lora", "--model", bert, "--dataset", bad, "--text-column", "a", "--label-column", "zzz"),
        "no column 'zzz'",
    )


def test_apply_dataset_with_a_broken_line(bert, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": 1}\n{"text": "oops", "label": \n')
    assert_user_error(run("apply", "lora", "--model", bert, "--dataset", bad), "bad.jsonl:2", "not valid JSON")
    empty_label = tmp_path / "empty.csv"
    empty_label.write_text("text,label\nhello,1\nbye,\n")
    assert_user_error(run("apply", "lora", "--model", bert, "--dataset", empty_label), "empty.csv:3", "empty 'label'")
    one_class = tmp_path / "one.csv"
    one_class.write_text("text,label\nhello,1\nbye,1\n")
    assert_user_error(run("apply", "lora", "--model", bert, "--dataset", one_class), "single value")
    other = tmp_path / "data.parquet"
    other.write_text("x")
    assert_user_error(run("apply", "lora", "--model", bert, "--dataset", other), "unsupported file type '.parquet'")


def test_apply_rejects_bad_method_options(bert, tmp_path):
    assert_user_error(run("apply", "lora", "--model", bert, "--r", "0", "--out", tmp_path / "x"),
                      "r must be a positive integer", "peftcore apply lora --help")
    usage = run("apply", "lora", "--model", bert, "--r", "abc")
    assert usage.exit_code == 2 and "Invalid value for '--r'" in usage.output
    assert_user_error(run("apply", "lora", "--model", bert, "--target", "nomatch", "--out", tmp_path / "y"),
                      "matched no module")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# -- info -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(bert, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapters") / "lora"
    result = run("apply", "lora", "--model", bert, "--out", out, "--r", "4")
    assert result.exit_code == 0, result.output
    return out


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_info_describes_the_adapter(adapter, bert):
    result = run("info", adapter, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["peft_type"] == "LORA" and report["task_type"] == "SEQ_CLS"
    assert report["base_model"] == str(bert) and sorted(report["target_modules"]) == ["query", "value"]
    assert report["settings"]["r"] == 4 and report["adapted_modules"] == 4  # 2 layers x query, value
    assert report["parameters"] == 4 * (4 * 16 + 16 * 4) + 34
    assert report["file_bytes"] == (adapter / "adapter_model.safetensors").stat().st_size
    assert report["consistent"] is True and report["problems"] == []
    text = run("info", adapter).stdout
    assert "consistent" in text and "yes" in text and "query, value" in text


def test_info_on_folder_without_weights(adapter, tmp_path):
    folder = _copy(adapter, tmp_path / "noweights")
    (folder / "adapter_model.safetensors").unlink()
    assert_user_error(run("info", folder), "no adapter_model.safetensors", "hint:")
    assert_user_error(run("info", tmp_path / "absent"), "no such folder")
    assert_user_error(run("info", tmp_path), "no adapter_config.json")


def test_info_on_corrupt_safetensors(adapter, tmp_path):
    folder = _copy(adapter, tmp_path / "corrupt")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert_user_error(run("info", folder), "cannot read safetensors file", "hint:")


def test_info_finds_rank_mismatch_between_config_and_tensors(adapter, tmp_path):
    folder = _copy(adapter, tmp_path / "rank")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["r"] = 8
    (folder / "adapter_config.json").write_text(json.dumps(config))
    result = run("info", folder)
    assert_user_error(result, "inconsistent")
    assert "lora_A.weight has 4 rows and lora_B.weight 4 columns; config says r=8" in result.stdout


def test_info_finds_tensors_outside_the_targets(adapter, tmp_path):
    folder = _copy(adapter, tmp_path / "targets")
    tensors = load_file(folder / "adapter_model.safetensors")
    key = "base_model.model.bert.encoder.layer.0.attention.output.dense.lora_A.weight"
    tensors[key] = torch.zeros(4, 16)
    tensors[key.replace("lora_A", "lora_B")] = torch.zeros(16, 4)
    del tensors["base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight"]
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    result = run("info", folder, "--json")
    assert result.exit_code == 1
    problems = json.loads(result.stdout)["problems"]
    assert any("attention.output.dense: has adapter tensors but does not match target_modules" in p for p in problems)
    assert any("layer.1.attention.self.value: has lora_A.weight but not its partner" in p for p in problems)


def test_info_reads_a_pickle_file_only_when_allowed(adapter, tmp_path, monkeypatch):
    folder = _copy(adapter, tmp_path / "pickled")
    weights = folder / "adapter_model.safetensors"
    torch.save(load_file(weights), folder / "adapter_model.bin")
    weights.unlink()
    unpickled = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: unpickled.append(a[0]) or real_load(*a, **k))
    assert_user_error(run("info", folder), "adapter_model.bin, a pickle file", "hint: pass --allow-pickle")
    assert unpickled == []  # refused without opening the file
    result = run("info", folder, "--allow-pickle", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["consistent"] is True and unpickled == [str(folder / "adapter_model.bin")]


# -- merge ----------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # raised inside peft
def test_merge_an_adapter_without_task_type_uses_the_base_models_own_class(llama, tmp_path):
    """PEFT's default task_type is null; the model class then comes from the checkpoint's ``architectures``."""
    import peft
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(llama),
                                 peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["task_type"] is None
    result = run("merge", tmp_path / "peft", "--model", llama, "--out", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, theirs.eval()(ids).logits, atol=1e-5, rtol=1e-5)
    wrong = _bert_folder(tmp_path, 16, "other-bert")
    assert_user_error(run("merge", tmp_path / "peft", "--model", wrong, "--out", tmp_path / "m2"),
                      "target modules ['q_proj', 'v_proj'] matched no module of BertForSequenceClassification")



def test_merge_writes_a_plain_model_with_the_adapter_folded_in(bert, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = _spam_csv(tmp_path / "spam.csv", 24)
    trained = tmp_path / "trained"
    assert run("apply", "lora", "--model", bert, "--dataset", data, "--out", trained, "--epochs", "1", "--lr", "5e-2",
               "--n-test", "4").exit_code == 0
    merged_dir = tmp_path / "merged"
    result = run("merge", trained, "--model", bert, "--out", merged_dir)
    assert result.exit_code == 0, result.output
    assert "merge check" in result.stdout
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    reference = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(bert, num_labels=2), trained
    )
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    inputs = tokenizer(["win a free phone now", "see you at lunch"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, reference(**inputs).logits, atol=1e-5, rtol=1e-5)
    # the base model folder is not touched
    assert not any("lora" in k for k in load_file(bert / "model.safetensors"))


def test_merge_defaults_to_the_base_model_named_in_the_config(adapter, tmp_path):
    result = run("merge", adapter, "--out", tmp_path / "m")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "config.json").is_file()


def test_merge_with_a_mismatched_base(adapter, tmp_path):
    wider = _bert_folder(tmp_path, 32, "wider")
    assert_user_error(
        run("merge", adapter, "--model", wider, "--out", tmp_path / "m"), "has shape", "hint: pass the base model"
    )
    assert not (tmp_path / "m").exists()


def test_merge_refuses_to_write_into_the_adapter_folder(adapter):
    assert_user_error(run("merge", adapter, "--out", adapter), "--out is the adapter folder")


def test_merge_on_a_folder_that_is_not_an_adapter(tmp_path):
    assert_user_error(run("merge", tmp_path, "--out", tmp_path / "m"), "no adapter_config.json")


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # raised inside peft
def test_info_and_merge_read_an_adapter_saved_by_peft(bert, tmp_path):
    import peft
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(3)
    theirs = peft.get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(bert, num_labels=2),
        peft.LoraConfig(
            task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "key"], init_lora_weights="gaussian"
        ),
    )
    theirs.save_pretrained(tmp_path / "peft")
    report = json.loads(run("info", tmp_path / "peft", "--json").stdout)
    assert report["consistent"] is True and report["settings"]["r"] == 2 and report["adapted_modules"] == 4
    assert run("merge", tmp_path / "peft", "--model", bert, "--out", tmp_path / "merged").exit_code == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    inputs = {"input_ids": torch.tensor([[101, 7592, 2088, 102]])}
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, theirs(**inputs).logits, atol=1e-5, rtol=1e-5)


# -- the data and training helpers behind apply ---------------------------------------------------------------


def test_data_files_in_every_supported_format(tmp_path):
    from peftcore.cli import datasets as data

    rows = [
        {"sentence": "good film", "label": 10},
        {"sentence": "bad film", "label": 9},
        {"sentence": "fine", "label": 10},
    ]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "d.tsv").write_text("sentence\tlabel\n" + "".join(f"{r['sentence']}\t{r['label']}\n" for r in rows))
    for name in ("d.json", "d.jsonl", "d.tsv"):
        loaded = data.load_classification(str(tmp_path / name))
        assert loaded.texts == ["good film", "bad film", "fine"]
        assert loaded.label_names == ["9", "10"] and loaded.labels == [1, 0, 1]  # numeric order, not "10" < "9"
    as_lm = data.load_prompt_completions(str(tmp_path / "d.json"))
    assert as_lm.prompts[0] == "Text: good film\nLabel:" and as_lm.completions[0] == " 10"
    (tmp_path / "alpaca.jsonl").write_text(json.dumps({"instruction": "Sum", "input": "2 2", "output": "4"}) + "\n")
    alpaca = data.load_prompt_completions(str(tmp_path / "alpaca.jsonl"))
    assert (alpaca.prompts, alpaca.completions) == (["Sum\n\n2 2\n"], ["4"])
    (tmp_path / "plain.jsonl").write_text(json.dumps({"text": "once upon a time"}) + "\n")
    plain = data.load_prompt_completions(str(tmp_path / "plain.jsonl"))
    assert (plain.prompts, plain.completions) == ([""], ["once upon a time"])
    with pytest.raises(data.DataError, match="prompt/response columns"):
        data.load_classification(str(tmp_path / "alpaca.jsonl"))


def test_prompt_completion_examples_mask_the_prompt_and_end_with_eos():
    from peftcore.cli import datasets as data
    from peftcore.cli import training_loop as train

    tokenizer = _word_tokenizer()
    pairs = data.PromptCompletions(["say yes if the review is good :"], [" yes"], "t", "t")
    (example,) = train.prompt_completion_examples(tokenizer, pairs, max_length=64)
    prompt_ids = tokenizer("say yes if the review is good :")["input_ids"]
    answer = tokenizer(" yes", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert example["input_ids"] == prompt_ids + answer
    assert example["labels"] == [train.IGNORE_INDEX] * len(prompt_ids) + answer
    (short,) = train.prompt_completion_examples(tokenizer, pairs, max_length=4)  # the prompt's start is cut first
    assert short["input_ids"] == prompt_ids[-2:] + answer and short["labels"][-2:] == answer


def test_completion_nll_agrees_with_the_models_own_loss(llama):
    from transformers import AutoModelForCausalLM

    from peftcore.cli import datasets as data
    from peftcore.cli import training_loop as train

    tokenizer = _word_tokenizer()
    config = LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"], init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama), config).eval()  # what apply evaluates
    pairs = data.PromptCompletions(["say yes if the review is good : the film was very great", "the plot"],
                                   [" yes", " was very boring"], "t", "t")
    examples = train.prompt_completion_examples(tokenizer, pairs, max_length=64)
    nll = train.completion_nll(model, examples, batch_size=2, pad_token_id=tokenizer.pad_token_id)
    for i, example in enumerate(examples):
        with torch.no_grad():  # transformers' loss on the full logits: mean over the shifted non-ignored labels
            loss = model(input_ids=torch.tensor([example["input_ids"]]), labels=torch.tensor([example["labels"]]),
                         skip_logits=False).loss
        n_tokens = sum(1 for t in example["labels"][1:] if t != train.IGNORE_INDEX)
        torch.testing.assert_close(nll[i] / n_tokens, loss, atol=1e-5, rtol=1e-5)


def test_apply_rejects_an_unusable_device(bert):
    assert_user_error(run("apply", "lora", "--model", bert, "--device", "nonsense"), "is not a torch device")
    if not torch.cuda.is_available():
        assert_user_error(run("apply", "lora", "--model", bert, "--device", "cuda"), "no cuda device is available")


def test_a_checkpoint_head_of_another_size_is_replaced_for_apply_and_merge(bert, tmp_path):
    from transformers import AutoModelForSequenceClassification

    three = tmp_path / "three.csv"
    three.write_text("text,label\n" + "".join(f"message number {i},{['a', 'b', 'c'][i % 3]}\n" for i in range(30)))
    result = run(
        "apply", "lora", "--model", bert, "--dataset", three, "--out", tmp_path / "a", "--epochs", "1", "--json"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["labels"] == ["a", "b", "c"]
    assert load_file(tmp_path / "a" / "adapter_model.safetensors")["base_model.model.classifier.weight"].shape == (
        3,
        16,
    )
    assert run("merge", tmp_path / "a", "--out", tmp_path / "m").exit_code == 0
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").config.num_labels == 3
