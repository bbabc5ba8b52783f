"""``AutoPeftModel*``: load base model and adapter from the adapter alone (PEFT's ``peft.auto``).

The adapter config names the base (``base_model_name_or_path``, ``revision``); the class to
load it with comes from the ``AutoPeftModelFor<Task>`` used, or, for ``AutoPeftModel`` and an
adapter without ``task_type``, from the config's ``auto_mapping`` (written by ``save_pretrained``),
imported only from the packages in ``import_allowlist``.
"""

from __future__ import annotations

import importlib
import os

from peftcore.config import read_config
from peftcore.files import resolve_file
from peftcore.peft_model import (
    TASK_MODELS,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)

DEFAULT_IMPORT_ALLOWLIST = ("diffusers", "lerobot", "megatron-core", "transformers")
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "subfolder")


def _allowed(allowlist, package: str) -> bool:
    return any(package == allowed or package.startswith(f"{allowed}.") for allowed in allowlist)


class _BaseAutoPeftModel:
    _auto_class_name: str | None = None  # the transformers Auto class that loads the base, per task
    _target_peft_class: type[PeftModel] = PeftModel

    def __init__(self, *args, **kwargs):
        name = type(self).__name__
        raise OSError(f"{name} is made by {name}.from_pretrained(pretrained_model_name_or_path), not {name}(...)")

    @classmethod
    def _base_class(cls, config, import_allowlist):
        task_type = config.task_type
        target_class = None
        if cls._auto_class_name is not None:
            import transformers

            target_class = getattr(transformers, cls._auto_class_name)
        if task_type is not None:
            if target_class is None:
                raise ValueError(
                    f"the adapter has task_type {str(task_type)!r}: load it with the AutoPeftModelFor<Task> class for "
                    "it (e.g. AutoPeftModelForCausalLM for 'CAUSAL_LM'), not AutoPeftModel"
                )
            expected = TASK_MODELS.get(str(task_type))
            if expected is not None and expected is not cls._target_peft_class:
                raise ValueError(
                    f"the adapter's task_type {str(task_type)!r} needs {expected.__name__}, but {cls.__name__} makes "
                    f"{cls._target_peft_class.__name__}: use the AutoPeftModel class for that task"
                )
            return target_class
        if target_class is not None:
            return target_class
        mapping = config.auto_mapping
        if not mapping:
            raise ValueError(
                "cannot tell which class loads the base model: the adapter config has neither task_type nor "
                "auto_mapping; use the AutoPeftModelFor<Task> class, or load the base yourself and call "
                "PeftModel.from_pretrained"
            )
        package, class_name = mapping["parent_library"], mapping["base_model_class"]
        if not _allowed(import_allowlist, package):
            raise ValueError(
                f"the adapter's auto_mapping wants to import {package!r}, which is not in import_allowlist "
                f"{list(import_allowlist)}; pass import_allowlist=[{package!r}, ...] if you trust it"
            )
        return getattr(importlib.import_module(package), class_name)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config=None, revision: str | None = None,
                        import_allowlist: list[str] | None = None, **kwargs) -> PeftModel:
        """The base model named in the adapter's config, loaded with ``kwargs`` (``torch_dtype``,
        ``quantization_config``, ...), with the adapter on it; the base's embeddings are resized when the adapter
        folder has a tokenizer with more tokens."""
        hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        if revision is not None:
            hub_kwargs["revision"] = revision
        subfolder = hub_kwargs.pop("subfolder", None)
        peft_config = read_config(pretrained_model_name_or_path, subfolder=subfolder, **hub_kwargs)
        if not peft_config.base_model_name_or_path:
            raise ValueError(f"{pretrained_model_name_or_path}: the adapter config has no base_model_name_or_path, "
                             "so the base model is unknown; load it yourself and call PeftModel.from_pretrained")
        base_class = cls._base_class(peft_config, DEFAULT_IMPORT_ALLOWLIST if import_allowlist is None
                                     else import_allowlist)
        base_kwargs = {k: v for k, v in kwargs.items() if k != "subfolder"}
        base = base_class.from_pretrained(peft_config.base_model_name_or_path, revision=peft_config.revision,
                                          **base_kwargs)
        _resize_to_adapter_tokenizer(base, pretrained_model_name_or_path, subfolder, hub_kwargs, kwargs)
        return cls._target_peft_class.from_pretrained(
            base, pretrained_model_name_or_path, adapter_name=adapter_name, is_trainable=is_trainable, config=config,
            **({"revision": revision} if revision is not None else {}), **kwargs,
        )


def _resize_to_adapter_tokenizer(base, model_id, subfolder, hub_kwargs, kwargs) -> None:
    if not hasattr(base, "get_input_embeddings"):
        return
    if resolve_file(model_id, TOKENIZER_CONFIG_NAME, subfolder, **hub_kwargs) is None:
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        model_id, subfolder=subfolder or "", revision=hub_kwargs.get("revision"), token=hub_kwargs.get("token"),
        trust_remote_code=kwargs.get("trust_remote_code", False),
    )
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))


class AutoPeftModel(_BaseAutoPeftModel):
    """Any adapter without ``task_type``: the base class comes from the config's ``auto_mapping``."""


def _make(name: str, auto_class_name: str, peft_class: type[PeftModel]) -> type:
    doc = f"An adapter for {peft_class.__name__}: the base is loaded with transformers.{auto_class_name}."
    return type(name, (_BaseAutoPeftModel,), {"_auto_class_name": auto_class_name, "_target_peft_class": peft_class,
                                              "__doc__": doc, "__module__": __name__})


AutoPeftModelForCausalLM = _make("AutoPeftModelForCausalLM", "AutoModelForCausalLM", PeftModelForCausalLM)
AutoPeftModelForSeq2SeqLM = _make("AutoPeftModelForSeq2SeqLM", "AutoModelForSeq2SeqLM", PeftModelForSeq2SeqLM)
AutoPeftModelForSequenceClassification = _make(
    "AutoPeftModelForSequenceClassification", "AutoModelForSequenceClassification", PeftModelForSequenceClassification
)
AutoPeftModelForTokenClassification = _make(
    "AutoPeftModelForTokenClassification", "AutoModelForTokenClassification", PeftModelForTokenClassification
)
AutoPeftModelForQuestionAnswering = _make(
    "AutoPeftModelForQuestionAnswering", "AutoModelForQuestionAnswering", PeftModelForQuestionAnswering
)
AutoPeftModelForFeatureExtraction = _make(
    "AutoPeftModelForFeatureExtraction", "AutoModel", PeftModelForFeatureExtraction
)
