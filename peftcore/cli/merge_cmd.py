"""``peftcore merge DIR --model BASE --out DIR2``: fold an adapter into its base and save a plain model."""

from __future__ import annotations

import re
from pathlib import Path

import click
import torch

from peftcore.cli import models
from peftcore.cli.errors import CliError, user_errors
from peftcore.cli.render import human_bytes, status, table

# A classification head saved through modules_to_save; its smallest 2-D weight gives num_labels
# (RoBERTa's head is dense + out_proj: out_proj has num_labels rows).
HEAD_WEIGHT = re.compile(r"^base_model\.model\.(?:.*\.)?(?:classifier|score)(?:\..*)?\.weight$")


def num_labels_of_head(weights: dict[str, torch.Tensor]) -> int | None:
    rows = [t.shape[0] for k, t in weights.items() if HEAD_WEIGHT.match(k) and t.dim() == 2]
    return min(rows) if rows else None


def load_adapter_strict(base, folder: str):
    """``PeftModel.from_pretrained``, but every tensor must land and none may be missing.

    Merging half an adapter would write garbage into the base weights.
    """
    from peftcore.config import read_config
    from peftcore.peft_model import TASK_MODELS, PeftModel
    from peftcore.plugins import hooks
    from peftcore.serialization import load_weights

    config = read_config(folder)
    config.inference_mode = True
    weights = load_weights(folder)
    model = TASK_MODELS.get(str(config.task_type), PeftModel)(base, config)
    missing, unexpected = hooks.load_adapter_state_dict(
        model=model, config=config, adapter_name="default", state_dict=weights
    )
    if missing or unexpected:
        detail = f"{len(unexpected)} file tensors fit no module (e.g. {unexpected[:1]})" if unexpected else \
                 f"{len(missing)} adapter tensors missing from the file (e.g. {missing[:1]})"
        raise CliError(f"the adapter in {folder} does not fit this base model: {detail}",
                       f"pass the model it was trained on (its config says {config.base_model_name_or_path!r})")
    return model.eval(), config


def probe_inputs(model) -> dict[str, torch.Tensor]:
    vocab = getattr(model.config, "vocab_size", None) or 100
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids[:, :6]
    return inputs


@torch.no_grad()
def first_output(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    value = out.logits if hasattr(out, "logits") else out[0]
    return value.float()


@click.command("merge")
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option(
    "--model",
    "-m",
    "model_spec",
    default=None,
    metavar="NAME_OR_PATH",
    help="the base model the adapter was trained on [default: base_model_name_or_path from the adapter config]",
)
@click.option(
    "--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path), help="folder for the merged model"
)
@click.option("--num-labels", type=click.IntRange(min=1), default=None,
              help="classifier size for SEQ_CLS/TOKEN_CLS adapters [default: read from the saved head]")
def merge(adapter: Path, model_spec: str | None, out: Path, num_labels: int | None) -> None:
    """Merge the adapter in ADAPTER into its base model and save a plain transformers model (+ tokenizer)."""
    from peftcore.config import read_config
    from peftcore.member_adapters import member_names
    from peftcore.plugins import get_method
    from peftcore.serialization import load_weights

    models.quiet_transformers()
    with user_errors(hint="check the adapter folder with `peftcore info`"):
        config = read_config(adapter)
        weights = load_weights(adapter)
    if out.resolve() == adapter.resolve():
        raise CliError("--out is the adapter folder; the merged model needs a folder of its own", "pass another --out")
    members = member_names(config)
    if members:
        raise CliError(f"{adapter} holds a {config.peft_type} adapter built on adapters {members}; its output depends "
                       "on theirs and on the input, so it has no weight change to fold into the base model",
                       "merge one of its member adapters, or combine them with `peftcore fuse`")
    if get_method(config.peft_type).kind != "layer":
        raise CliError(f"{config.peft_type} adapters edit the model's inputs and have no weights to merge",
                       "load them with PeftModel.from_pretrained instead")
    spec = model_spec or config.base_model_name_or_path
    if not spec:
        raise CliError("the adapter config names no base model", "pass it with --model NAME_OR_PATH")
    path = models.resolve(spec)
    task = str(config.task_type) if config.task_type else None
    kwargs = {}
    if task in ("SEQ_CLS", "TOKEN_CLS"):
        kwargs["num_labels"] = num_labels or num_labels_of_head(weights) or 2
        kwargs["ignore_mismatched_sizes"] = True  # the base's own head is replaced by the adapter's (modules_to_save)
    status(f"loading {path}")
    base = models.load_model(path, task, **kwargs)
    with user_errors(hint=f"pass the base model the adapter was trained on ({config.base_model_name_or_path!r})"):
        peft_model, _ = load_adapter_strict(base, str(adapter))
    inputs = probe_inputs(base)
    expected = first_output(peft_model, inputs)
    adapted = len(peft_model.base_model.adapter_layers())
    merged = peft_model.merge_and_unload()
    diff = (first_output(merged, inputs) - expected).abs().max().item()
    with user_errors():
        merged.save_pretrained(out)
        tokenizer = models.load_tokenizer(str(adapter), required=False) or models.load_tokenizer(path, required=False)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    click.echo(
        table(
            [
                ["adapter", f"{config.peft_type} from {adapter}"],
                ["base model", path],
                ["merged layers", str(adapted)],
                ["merge check", f"max |diff| {diff:.2g} (adapter vs merged outputs on a probe batch)"],
                [
                    "saved to",
                    f"{out} ({human_bytes(size)} of "
                    f"weights{', tokenizer' if tokenizer is not None else ', no tokenizer found'})",
                ],
            ]
        )
    )
