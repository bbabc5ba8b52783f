"""The ``README.md`` model card ``save_pretrained`` writes, with the fields PEFT writes.

PEFT's ``create_or_update_model_card`` (0.21.2) sets, in the YAML front matter: ``library_name: peft``;
``tags`` (the base model's ``model_tags``, ``transformers`` for a transformers base, ``lora`` for
LoRA, ``base_model:adapter:<base id>``); ``pipeline_tag: text-generation`` for causal LMs (the one
task where it is certain); ``base_model`` (the base config's ``_name_or_path``). In the text: a
"### Framework versions" block and, for a quantized base, the quantization config under
"## Training procedure". An existing README (the user's) is updated, never replaced: its text and
other metadata stay, lines already there are not added twice. A new card starts from
huggingface_hub's default model card template, as PEFT's does.

Where peftcore differs, on purpose:
- the framework line names what wrote the files: ``- peftcore <version>`` and
  ``- PEFT <format version> (file format)`` instead of ``- PEFT <version>``;
- an empty base id (a model built from a config) gives no ``base_model`` and no
  ``base_model:adapter:`` tag (PEFT writes ``base_model: ''`` and a tag with nothing after the colon);
- the quantization config is written when the base model's config has one (PEFT 0.21.2 looks for it on a
  dict, so never writes it).
"""

from __future__ import annotations

import os

import yaml

from peftcore.adapter_folder import write_text
from peftcore.config import PEFT_FORMAT_VERSION
from peftcore.files import README_NAME, AdapterFileError
from peftcore.version import __version__

FRAMEWORK_HEADING = "### Framework versions"
TRAINING_HEADING = "## Training procedure"
QUANTIZATION_PREFIX = "The following `bitsandbytes` quantization config was used during training:"
# PEFT picks a pipeline tag only where the task makes it certain
PIPELINE_TAGS = {"CAUSAL_LM": "text-generation"}


def framework_lines() -> list[str]:
    return [f"- peftcore {__version__}", f"- PEFT {PEFT_FORMAT_VERSION} (file format)"]


def base_model_id(base_model) -> str | None:
    """The base model's Hub id or path (its config's ``_name_or_path``); None when it has none."""
    config = getattr(base_model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(base_model, "name_or_path", None)
    return str(name) if name else None


def card_tags(base_model, peft_type: str) -> list[str]:
    tags = set(getattr(base_model, "model_tags", None) or ())
    try:
        from transformers import PreTrainedModel
    except ImportError:  # transformers is optional for peftcore's core
        PreTrainedModel = ()
    if isinstance(base_model, PreTrainedModel):
        tags.add("transformers")
    if str(peft_type) == "LORA":
        tags.add("lora")
    base_id = base_model_id(base_model)
    if base_id:
        tags.add(f"base_model:adapter:{base_id}")
    return sorted(tags)


def quantization_dict(base_model) -> dict | None:
    quantization = getattr(getattr(base_model, "config", None), "quantization_config", None)
    if quantization is None:
        return None
    return quantization.to_dict() if hasattr(quantization, "to_dict") else dict(quantization)


def _insert_after_heading(lines: list[str], heading: str, text: str) -> None:
    """PEFT's placement: two lines below an existing heading, else a new section at the end."""
    if heading in lines:
        lines.insert(lines.index(heading) + 2, text)
    else:
        lines.append(f"{heading}\n{text}")


def updated_card(existing: str | None, *, base_model, peft_type: str, task_type: str | None) -> str:
    """The README text: ``existing`` (or the default template) with PEFT's fields set."""
    from huggingface_hub import ModelCard, ModelCardData

    card = ModelCard(existing) if existing is not None else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    tags = card_tags(base_model, peft_type)
    if tags:
        card.data["tags"] = tags
    pipeline_tag = PIPELINE_TAGS.get(str(task_type)) if task_type is not None else None
    if not card.data.pipeline_tag and pipeline_tag:
        card.data.pipeline_tag = pipeline_tag
    base_id = base_model_id(base_model)
    if base_id:
        card.data["base_model"] = base_id

    lines = card.text.splitlines()
    quantization = quantization_dict(base_model)
    if quantization and QUANTIZATION_PREFIX not in lines:
        settings = "\n".join(f"- {name}: {value}" for name, value in quantization.items())
        _insert_after_heading(lines, TRAINING_HEADING, f"\n{QUANTIZATION_PREFIX}\n{settings}\n")
    missing = [line for line in framework_lines() if line not in lines]
    if missing and FRAMEWORK_HEADING in lines:
        at = lines.index(FRAMEWORK_HEADING) + 2  # past the heading's blank line, as PEFT places its line
        lines[at:at] = missing
    elif missing:
        lines += [FRAMEWORK_HEADING, "", *missing]
    card.text = "\n".join(lines)
    return card.content


def model_card_text(save_directory: str | os.PathLike, *, base_model, peft_type: str, task_type) -> str:
    """What ``save_directory/README.md`` will hold: the existing card updated, or a new one.

    Computed before any file of a save is written, so an unreadable card stops the save up front.
    """
    path = os.path.join(save_directory, README_NAME)
    existing = None
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            existing = f.read()
    try:
        return updated_card(existing, base_model=base_model, peft_type=str(peft_type), task_type=task_type)
    except (ValueError, yaml.YAMLError) as exc:
        raise AdapterFileError(
            f"{path}: the model card's YAML metadata cannot be read ({str(exc).splitlines()[0]}); "
            "fix it or remove the file"
        ) from None


def write_model_card(save_directory: str | os.PathLike, text: str) -> None:
    write_text(save_directory, README_NAME, text)


def card_quantization(card: str) -> dict[str, str] | None:
    """The ``- name: value`` settings under the card's quantization line (None: the base was not quantized)."""
    lines = card.splitlines()
    if QUANTIZATION_PREFIX not in lines:
        return None
    settings = {}
    for line in lines[lines.index(QUANTIZATION_PREFIX) + 1:]:
        if not line.startswith("- ") or ": " not in line:
            break
        name, value = line[2:].split(": ", 1)
        settings[name] = value
    return settings


def quantization_summary(settings: dict[str, str] | None) -> str:
    """``4-bit nf4, double quantization, compute float32`` / ``8-bit (LLM.int8)`` / ``none``."""
    if settings is None:
        return "none"
    if settings.get("_load_in_4bit") == "True" or settings.get("load_in_4bit") == "True":
        double = ", double quantization" if settings.get("bnb_4bit_use_double_quant") == "True" else ""
        compute = settings.get("bnb_4bit_compute_dtype")
        return f"4-bit {settings.get('bnb_4bit_quant_type', '?')}{double}" + (f", compute {compute}" if compute else "")
    if settings.get("_load_in_8bit") == "True" or settings.get("load_in_8bit") == "True":
        return "8-bit (LLM.int8)"
    return settings.get("quant_method", "quantized")
