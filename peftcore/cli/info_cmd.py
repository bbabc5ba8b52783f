"""``peftcore info DIR``: what an adapter folder holds, and whether its files agree with each other."""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from peftcore.cli.errors import CliError
from peftcore.cli.render import human_bytes, table
from peftcore.files import (
    CONFIG_NAME,
    PICKLE_WEIGHTS_NAME,
    README_NAME,
    SAFETENSORS_WEIGHTS_NAME,
    AdapterFileError,
    committed_file,
)
from peftcore.model_card import card_quantization, quantization_summary
from peftcore.serialization import LAYER_PREFIX, tensors_by_module

PREFIX = LAYER_PREFIX
SHOWN_FIELDS = (
    "r",
    "lora_alpha",
    "use_rslora",
    "use_dora",
    "init_r",
    "target_r",
    "num_virtual_tokens",
    "feedforward_modules",
)
FOLDER_HINT = f"an adapter folder holds {CONFIG_NAME} and {SAFETENSORS_WEIGHTS_NAME}, as written by save_pretrained"


def _read_files(folder: Path, allow_pickle: bool = False) -> tuple[dict, dict[str, torch.Tensor], int]:
    """The raw config and the tensors; unreadable or missing files are errors, not report lines."""
    from peftcore.config import read_config_json
    from peftcore.serialization import find_weights, read_weights

    if not folder.is_dir():
        raise CliError(f"{folder}: no such folder", FOLDER_HINT)
    try:
        config_path = committed_file(folder, CONFIG_NAME)
        if config_path is None:
            raise CliError(f"{folder}: no {CONFIG_NAME}, so this is not an adapter folder", FOLDER_HINT)
        raw = read_config_json(config_path)
    except AdapterFileError as exc:
        raise CliError(str(exc), "the file is damaged; save the adapter again") from None
    pickle_only = committed_file(folder, SAFETENSORS_WEIGHTS_NAME) is None and committed_file(
        folder, PICKLE_WEIGHTS_NAME
    ) is not None
    if pickle_only and not allow_pickle:
        raise CliError(
            f"{folder}: the weights are only in {PICKLE_WEIGHTS_NAME}, a pickle file, which can run arbitrary code "
            "when read", "pass --allow-pickle if you trust where the folder comes from",
        )
    try:
        weights_path = find_weights(folder, allow_pickle=allow_pickle)
        tensors = read_weights(weights_path)
    except AdapterFileError as exc:
        raise CliError(str(exc), "the weights file is missing or damaged; save the adapter again") from None
    return raw, tensors, Path(weights_path).stat().st_size


def _parse_config(raw: dict, problems: list[str]):
    from peftcore.config import config_from_dict

    data = {k: v for k, v in raw.items() if k != "runtime_config"}
    try:
        return config_from_dict(data)
    except (ValueError, TypeError) as exc:  # AdapterFileError, ConfigError, a plugin's own checks
        problems.append(f"config does not parse: {exc}")
        return None


def check(raw: dict, tensors: dict[str, torch.Tensor]) -> tuple[list[str], set[str]]:
    """Problems found, and the adapted module paths: the core's checks, then each method's own."""
    from peftcore.matching import matches_target
    from peftcore.plugins import get_method, hooks

    problems: list[str] = []
    config = _parse_config(raw, problems)
    try:
        method = get_method(raw.get("peft_type", ""))
    except ValueError:
        method = None
    prefixes = method.tensor_prefixes if method else ()
    if not tensors:
        problems.append("the weights file holds no tensors")
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            problems.append(f"{key}: holds NaN or infinite values")
        if ".default." in key:
            problems.append(f"{key}: carries the adapter name 'default' (in-memory name); PEFT's files drop it")
    layer_kind = method is None or method.kind == "layer"
    if layer_kind:
        for key in tensors:
            if not key.startswith(PREFIX):
                problems.append(f"{key}: does not start with {PREFIX!r} (PEFT's layout)")
    by_module = tensors_by_module(tensors, prefixes)
    modules = {m for m in by_module if m}
    targets = raw.get("target_modules")
    if config is not None and layer_kind and targets not in (None, "all-linear"):
        for module in sorted(modules):
            if not matches_target(config, module):
                problems.append(f"{module}: has adapter tensors but does not match target_modules {targets!r}")
    saved = raw.get("modules_to_save") or []
    in_modules = {f"{PREFIX}{m}.{rest}" for m, parts in by_module.items() for rest in parts}
    for key in tensors:
        if layer_kind and prefixes and key not in in_modules:
            owner = key[len(PREFIX):].rsplit(".", 1)[0]
            is_bias = key.endswith(".bias") and raw.get("bias", "none") != "none"
            if not is_bias and not any(owner == s or owner.endswith(f".{s}") for s in saved):
                problems.append(f"{key}: belongs neither to an adapted module nor to modules_to_save {saved}")
    if config is not None:
        for found in hooks.check_adapter_files(config=config, tensors=tensors):
            problems += found or []
    return problems, modules


def describe(folder: Path, allow_pickle: bool = False) -> dict:
    raw, tensors, size = _read_files(folder, allow_pickle)
    problems, modules = check(raw, tensors)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
    card = folder / README_NAME  # PEFT writes the base's quantization config into the model card
    quantization = card_quantization(card.read_text(encoding="utf-8", errors="replace")) if card.is_file() else None
    return {
        "folder": str(folder), "peft_type": raw.get("peft_type"), "task_type": raw.get("task_type"),
        "base_model": raw.get("base_model_name_or_path"), "target_modules": raw.get("target_modules"),
        "modules_to_save": raw.get("modules_to_save"),
        "settings": {k: raw[k] for k in SHOWN_FIELDS if k in raw},
        "adapted_modules": len(modules), "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values()), "dtypes": dtypes, "file_bytes": size,
        "consistent": not problems, "problems": problems, "quantization": quantization,
    }


@click.command("info")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--allow-pickle", is_flag=True,
              help=f"read {PICKLE_WEIGHTS_NAME} when there is no safetensors file (pickle can run code: trusted "
                   "files only)")
def info(folder: Path, as_json: bool, allow_pickle: bool) -> None:
    """Show what the adapter in FOLDER is and check that its files agree (exit 1 if not)."""
    report = describe(folder, allow_pickle)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        targets = report["target_modules"]
        rows = [
            ["method", str(report["peft_type"])],
            ["task type", str(report["task_type"])],
            ["base model", str(report["base_model"])],
            ["base quantization", quantization_summary(report["quantization"])],
            ["targets", ", ".join(targets) if isinstance(targets, list) else str(targets)],
            *[[k, json.dumps(v)] for k, v in report["settings"].items()],
            ["modules to save", ", ".join(report["modules_to_save"] or []) or "-"],
            ["adapted modules", str(report["adapted_modules"])],
            [
                "trainable params",
                f"{report['parameters']:,} in {report['tensors']} tensors ({', '.join(report['dtypes'])})",
            ],
            ["file size", human_bytes(report["file_bytes"])],
            ["consistent", "yes" if report["consistent"] else f"NO ({len(report['problems'])} problems)"],
        ]
        click.echo(table(rows))
        for problem in report["problems"]:
            click.echo(f"  - {problem}")
    if report["problems"]:
        raise CliError(f"{folder}: the adapter files are inconsistent ({report['problems'][0]})",
                       "re-save the adapter, or check that config and weights come from the same run")
