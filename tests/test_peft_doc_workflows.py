"""PEFT's documented workflows, run with both ``peft`` and ``peftcore``: a user sees the same thing with either.

Pages covered (Hugging Face PEFT documentation, read for version 0.21):

- Quicktour -- https://huggingface.co/docs/peft/quicktour
- PEFT checkpoint format -- https://huggingface.co/docs/peft/developer_guides/checkpoint
- Model merging -- https://huggingface.co/docs/peft/developer_guides/model_merging
- LoRA (developer guide, incl. "Inference with different LoRA adapters in the same batch")
  -- https://huggingface.co/docs/peft/developer_guides/lora
- Custom models -- https://huggingface.co/docs/peft/developer_guides/custom_models
- Troubleshooting -- https://huggingface.co/docs/peft/developer_guides/troubleshooting

The code here is written from the behaviour those pages document (which calls a user makes, and what they
observe); it is not copied from them. Every workflow runs once per library on the same tiny model and seed
(``for lib in (peftcore, peft)``) and compares what a user observes: the ``print_trainable_parameters`` line,
outputs, saved file names, tensor keys and shapes, config JSON, merged-model outputs, and errors or warnings where
the docs show them. The Hub checkpoints the docs use (Llama-3.2-1B, mt0-large, opt-350m, TinyLlama, Mistral-7B,
flan-t5-small, resnet-18, ...) are replaced by tiny models built from configs, so nothing reaches the network;
each test says which model stands in for which.

Where peftcore behaves differently the test is ``xfail(strict=True)`` with the difference as its reason.
Left out (cannot run offline or on CPU): the diffusers/SDXL half of "Model merging" (DARE on pixel-art-xl & co.),
``push_to_hub``/``notebook_login``, timm itself (not installed; a tiny model with timm's layer names stands in),
the diffusers ``get_layer_status`` example, and DoRA's ``ephemeral_gpu_offload`` speed-up (GPU only; only the
configuration is checked).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import peft
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file
from torch import nn

import peftcore
from peftcore.testing import tiny_generation_model, tiny_model
from peftcore.validation import ConfigError

LIBS = (peftcore, peft)
SET_LIKE = ("target_modules", "feedforward_modules", "modules_to_save", "exclude_modules")


# ---------------------------------------------------------------------------------------------------------------
# helpers for the two-library pattern
# ---------------------------------------------------------------------------------------------------------------


def both(workflow, *args, **kwargs) -> dict:
    """Run ``workflow(lib, ...)`` for peftcore and for peft; return ``{"peftcore": ..., "peft": ...}``."""
    return {lib.__name__: workflow(lib, *args, **kwargs) for lib in LIBS}


def assert_same(observed: dict, path: str = "") -> None:
    """What peftcore gave equals what peft gave (tensors with assert_close, everything else with ==)."""
    _same(observed["peftcore"], observed["peft"], path or "result")


def _same(ours, theirs, path: str) -> None:
    if isinstance(theirs, Raised):
        # same exception type, and peftcore's message starts with PEFT's sentence (what scripts match on);
        # peftcore may add an explanation after it
        assert isinstance(ours, Raised) and ours.type == theirs.type, f"{path}: {ours!r} vs peft's {theirs!r}"
        assert ours.message.startswith(theirs.message.rstrip(".")), (
            f"{path}: peftcore's message {ours.message!r} does not start with peft's {theirs.message!r}")
    elif isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor), f"{path}: {type(ours).__name__} vs a tensor"
        assert ours.dtype == theirs.dtype, f"{path}: dtype {ours.dtype} vs peft's {theirs.dtype}"
        torch.testing.assert_close(ours, theirs, msg=lambda m: f"{path}: {m}")
    elif isinstance(theirs, dict):
        assert isinstance(ours, dict), f"{path}: {type(ours).__name__} vs a dict"
        assert sorted(map(str, ours)) == sorted(map(str, theirs)), (
            f"{path}: keys differ: only peftcore {sorted(set(map(str, ours)) - set(map(str, theirs)))}, "
            f"only peft {sorted(set(map(str, theirs)) - set(map(str, ours)))}")
        for key in theirs:
            _same(ours[key], theirs[key], f"{path}[{key!r}]")
    elif isinstance(theirs, (list, tuple)):
        assert isinstance(ours, (list, tuple)) and len(ours) == len(theirs), f"{path}: {ours!r} vs peft's {theirs!r}"
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _same(a, b, f"{path}[{i}]")
    elif isinstance(theirs, float) and isinstance(ours, float):
        assert math.isclose(ours, theirs, rel_tol=1e-6, abs_tol=1e-9), f"{path}: {ours!r} vs peft's {theirs!r}"
    else:
        assert ours == theirs, f"{path}: peftcore {ours!r} vs peft {theirs!r}"


def printed(fn) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn()
    return out.getvalue().strip()


def trainable_line(model) -> str:
    return printed(model.print_trainable_parameters)


def perturb_by_name(model: nn.Module, seed: int = 1, scale: float = 0.3) -> None:
    """Stand-in for training: give every trainable tensor values drawn from its name (not the parameter order, not
    the init), so both libraries hold the same "trained" adapter. Initialisation itself is compared separately."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                param.copy_(torch.randn(param.shape, generator=g).to(param.dtype) * scale)


def logits(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def adapter_tensors(lib, model, adapter_name: str = "default") -> dict:
    return {k: v.detach().clone() for k, v in lib.get_peft_model_state_dict(model, adapter_name=adapter_name).items()}


def folder(path: Path) -> dict:
    """What ``save_pretrained`` left on disk: file names, tensor keys/shapes/values, config JSON (normalised)."""
    path = Path(path)
    seen: dict = {"files": sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())}
    for f in sorted(path.rglob("*.safetensors")):
        seen[str(f.relative_to(path))] = load_file(f)
    for f in sorted(path.rglob("adapter_config.json")):
        seen[str(f.relative_to(path))] = normalised_config(json.loads(f.read_text()))
    return seen


def normalised_config(config: dict) -> dict:
    """Config JSON with the peft_version value blanked and set-valued fields sorted (a set has no file order)."""
    config = dict(config)
    if "peft_version" in config:
        config["peft_version"] = "<version>"
    if "base_model_name_or_path" in config and config["base_model_name_or_path"]:
        config["base_model_name_or_path"] = Path(config["base_model_name_or_path"]).name
    for key in SET_LIKE:
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    return config


@dataclass(frozen=True)
class Raised:
    """An exception as a user sees it: its type and the first line of its message."""

    type: str
    message: str


def error_of(fn) -> Raised | None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the type and message are what a user sees
        return Raised(type(exc).__name__, str(exc).splitlines()[0])
    return None


def peft_warnings(fn) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message).splitlines()[0] for w in caught if "peft" in (w.filename or "").lower()
                    or "adapter" in str(w.message).lower()]


def tiny_bert_model():
    """Stands in for ``bert-base-uncased`` loaded as ``AutoModel`` (a BertModel without a head)."""
    torch.manual_seed(0)
    return tf.BertModel(tf.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32)).eval()


BERT_IDS = dict(input_ids=torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(5)))


def llama():
    """Stands in for ``meta-llama/Llama-3.2-1B`` / ``mistralai/Mistral-7B-v0.1`` (AutoModelForCausalLM)."""
    return tiny_model("llama")[0]


def saved_base(tmp_path: Path, model) -> Path:
    """A base model on disk, so configs record a base_model_name_or_path that AutoPeftModel can load offline."""
    where = tmp_path / "base-model"
    if not where.exists():
        model.save_pretrained(where)
    return where


GEN_IDS = dict(input_ids=torch.randint(3, 64, (3, 5), generator=torch.Generator().manual_seed(11)),
               attention_mask=torch.ones(3, 5, dtype=torch.long))


def greedy(model, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**GEN_IDS, do_sample=False, **kwargs)


def trained_adapter(lib, tmp_path: Path, name: str, seed: int, *, arch_model=None, **lora) -> Path:
    """Save a LoRA adapter with "trained" (name-seeded) weights for ``tiny_generation_model("llama")``."""
    base = arch_model() if arch_model else tiny_generation_model("llama")
    config = lib.LoraConfig(task_type="CAUSAL_LM", **({"r": 4, "lora_alpha": 8} | lora))
    model = lib.get_peft_model(base, config)
    perturb_by_name(model, seed=seed)
    out = tmp_path / lib.__name__ / name
    model.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Quicktour -- https://huggingface.co/docs/peft/quicktour
# ---------------------------------------------------------------------------------------------------------------


def test_quicktour_config_and_print_trainable_parameters():
    """LoraConfig(target_modules=["q_proj"], task_type=CAUSAL_LM, r=8, lora_alpha=32, lora_dropout=0.1), then
    get_peft_model + print_trainable_parameters. Suffix matching targets every layer's q_proj. (Llama-3.2-1B -> tiny
    Llama.)"""

    def run(lib):
        config = lib.LoraConfig(target_modules=["q_proj"], task_type=lib.TaskType.CAUSAL_LM, inference_mode=False,
                                r=8, lora_alpha=32, lora_dropout=0.1)
        model = lib.get_peft_model(llama(), config)
        return dict(line=trainable_line(model), counts=model.get_nb_trainable_parameters(),
                    targeted=sorted(model.targeted_module_names), peft_type=config.peft_type.value,
                    task_type=config.task_type.value)

    seen = both(run)
    assert_same(seen)
    assert seen["peft"]["targeted"] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_quicktour_seq2seq_config_with_default_targets():
    """The earlier quicktour's LoraConfig(task_type=SEQ_2_SEQ_LM, inference_mode=False, r=8, lora_alpha=32,
    lora_dropout=0.1) on a seq2seq model, no target_modules (the per-architecture default). (mt0-large -> tiny T5.)"""

    def run(lib):
        config = lib.LoraConfig(task_type=lib.TaskType.SEQ_2_SEQ_LM, inference_mode=False, r=8, lora_alpha=32,
                                lora_dropout=0.1)
        model = lib.get_peft_model(tiny_model("t5")[0], config)
        return dict(line=trainable_line(model), targeted=sorted(model.targeted_module_names),
                    target_modules=sorted(model.peft_config["default"].target_modules))

    assert_same(both(run))


def test_quicktour_training_loop():
    """"Now you can train the model with ... any custom PyTorch training loop": a few AdamW steps in train mode
    with lora_dropout=0.1, same seed; losses and trained adapter weights match. (Llama-3.2-1B -> tiny Llama.)"""

    def run(lib):
        model = lib.get_peft_model(llama(), lib.LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM", r=8,
                                                           lora_alpha=32, lora_dropout=0.1))
        perturb_by_name(model)  # same starting adapter: initialisation is compared in test_lora_initialization
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
        ids = tiny_model("llama")[1]["input_ids"]
        torch.manual_seed(123)
        model.train()
        losses = []
        for _ in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        return dict(losses=torch.stack(losses), weights=adapter_tensors(lib, model))

    assert_same(both(run))


def test_quicktour_save_model(tmp_path):
    """peft_model.save_pretrained("output_dir"): only adapter_config.json + adapter_model.safetensors (+ README.md),
    same tensor keys, shapes and values, same config JSON. (Llama-3.2-1B -> tiny Llama.)"""

    def run(lib):
        torch.manual_seed(0)
        model = lib.get_peft_model(llama(), lib.LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM", r=8,
                                                           lora_alpha=32, lora_dropout=0.1))
        perturb_by_name(model)  # "after your model is finished training"
        model.save_pretrained(tmp_path / lib.__name__ / "output_dir")
        return folder(tmp_path / lib.__name__ / "output_dir")

    seen = both(run)
    assert_same(seen)
    assert seen["peft"]["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_quicktour_autopeftmodel_for_causal_lm_generate(tmp_path):
    """AutoPeftModelForCausalLM.from_pretrained(adapter) finds the base model from the adapter's config, then
    model.eval() and generate(max_new_tokens=...). (ybelkada/opt-350m-lora -> a LoRA on a tiny OPT saved here.)"""

    def run(lib):
        torch.manual_seed(0)
        base = tf.OPTForCausalLM(tf.OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                              word_embed_proj_dim=16, max_position_embeddings=64, vocab_size=64))
        base_dir = saved_base(tmp_path, base)
        base = tf.AutoModelForCausalLM.from_pretrained(base_dir)
        model = lib.get_peft_model(base, lib.LoraConfig(task_type="CAUSAL_LM"))
        perturb_by_name(model)
        model.save_pretrained(tmp_path / lib.__name__ / "opt-lora")
        loaded = lib.AutoPeftModelForCausalLM.from_pretrained(tmp_path / lib.__name__ / "opt-lora")
        loaded.eval()
        return dict(cls=type(loaded).__name__, base=type(loaded.get_base_model()).__name__,
                    tokens=greedy(loaded, max_new_tokens=6, pad_token_id=1))

    assert_same(both(run))


def test_quicktour_autopeftmodel_base_class(tmp_path):
    """AutoPeftModel.from_pretrained(adapter) for a task without an AutoPeftModelFor* class: the base class comes
    from the adapter config's auto_mapping. (openai-whisper-large-v2-LORA -> a LoRA on a tiny BertModel.)"""

    def run(lib):
        base_dir = saved_base(tmp_path, tiny_bert_model())
        model = lib.get_peft_model(tf.AutoModel.from_pretrained(base_dir), lib.LoraConfig())
        perturb_by_name(model)
        model.save_pretrained(tmp_path / lib.__name__ / "adapter")
        loaded = lib.AutoPeftModel.from_pretrained(tmp_path / lib.__name__ / "adapter").eval()
        config = json.loads((tmp_path / lib.__name__ / "adapter" / "adapter_config.json").read_text())
        return dict(cls=type(loaded).__name__, base=type(loaded.get_base_model()).__name__,
                    auto_mapping=config["auto_mapping"], out=logits(loaded, **BERT_IDS))

    assert_same(both(run))


def test_quicktour_multiple_adapters():
    """add_adapter(adapter_name="new_adapter", ...) then set_adapter("new_adapter"): the new adapter is active and
    trainable, outputs follow it. (Llama-3.2-1B -> tiny Llama.)"""

    def run(lib):
        config = lib.LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM", r=8, lora_alpha=32)
        model = lib.get_peft_model(llama(), config)
        model.add_adapter(adapter_name="new_adapter", peft_config=lib.LoraConfig(target_modules=["q_proj"],
                                                                                task_type="CAUSAL_LM", r=4))
        before = model.active_adapter
        model.set_adapter("new_adapter")
        perturb_by_name(model)
        model.eval()
        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        return dict(before=before, after=model.active_adapter, adapters=sorted(model.peft_config),
                    line=trainable_line(model), trainable=trainable,
                    out=logits(model, **tiny_model("llama")[1]))

    assert_same(both(run))


# ---------------------------------------------------------------------------------------------------------------
# PEFT checkpoint format -- https://huggingface.co/docs/peft/developer_guides/checkpoint
# ---------------------------------------------------------------------------------------------------------------


def test_checkpoint_ia3_bert_files_and_config(tmp_path):
    """An IA3 adapter with standard settings on BERT: the three files, and adapter_config.json with peft_type IA3,
    target_modules key/value/output.dense, feedforward_modules output.dense, auto_mapping BertModel.
    (bert-base-uncased -> tiny BertModel.)"""

    def run(lib):
        model = lib.get_peft_model(tiny_bert_model(), lib.IA3Config())
        model.save_pretrained(tmp_path / lib.__name__)
        return folder(tmp_path / lib.__name__)

    seen = both(run)
    assert_same(seen)
    config = seen["peft"]["adapter_config.json"]
    assert (config["peft_type"], config["target_modules"], config["feedforward_modules"]) == (
        "IA3", ["key", "output.dense", "value"], ["output.dense"])
    assert config["auto_mapping"] == {"base_model_class": "BertModel",
                                      "parent_library": "transformers.models.bert.modeling_bert"}


def test_checkpoint_lora_bert_state_dict_keys(tmp_path):
    """Default LoRA on BERT: disk keys base_model.model.encoder.layer.N.attention.self.{query,value}.lora_{A,B}.weight
    (no embedding entries); in memory the adapter name sits in between (lora_A.default.weight); the config JSON
    matches. (bert-base-uncased -> tiny BertModel.)"""

    def run(lib):
        model = lib.get_peft_model(tiny_bert_model(), lib.LoraConfig())
        perturb_by_name(model)
        model.save_pretrained(tmp_path / lib.__name__)
        in_memory = sorted(n for n, _ in model.named_parameters() if "lora_" in n)
        return dict(disk=folder(tmp_path / lib.__name__), in_memory=in_memory)

    seen = both(run)
    assert_same(seen)
    keys = sorted(seen["peft"]["disk"]["adapter_model.safetensors"])
    assert keys[:2] == ["base_model.model.encoder.layer.0.attention.self.query.lora_A.weight",
                        "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight"]
    assert "base_model.model.encoder.layer.0.attention.self.query.lora_A.default.weight" in seen["peft"]["in_memory"]


def test_checkpoint_other_adapter_name_in_subfolder(tmp_path):
    """An adapter called "other": in memory lora_A.other.weight; save_pretrained("some/path") writes it to
    some/path/other/, with the name stripped from the keys. (bert-base-uncased -> tiny BertModel.)"""

    def run(lib):
        model = lib.get_peft_model(tiny_bert_model(), lib.LoraConfig(), adapter_name="other")
        perturb_by_name(model)
        model.save_pretrained(tmp_path / lib.__name__ / "some" / "path")
        in_memory = sorted(n for n, _ in model.named_parameters() if "lora_" in n)
        return dict(disk=folder(tmp_path / lib.__name__ / "some" / "path"), in_memory=in_memory)

    seen = both(run)
    assert_same(seen)
    assert seen["peft"]["disk"]["files"] == ["other/README.md", "other/adapter_config.json",
                                             "other/adapter_model.safetensors"] or \
        "other/adapter_model.safetensors" in seen["peft"]["disk"]["files"]


def test_checkpoint_prompt_tuning_key_has_no_prefix(tmp_path):
    """Prompt tuning stores its extra embeddings directly, without the base_model.model. prefix.
    (A tiny Llama stands in for the causal LM.)"""

    def run(lib):
        torch.manual_seed(0)
        model = lib.get_peft_model(llama(), lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
        model.save_pretrained(tmp_path / lib.__name__)
        return folder(tmp_path / lib.__name__)

    seen = both(run)
    assert_same(seen)
    assert list(seen["peft"]["adapter_model.safetensors"]) == ["prompt_embeddings"]


def test_checkpoint_dora_has_magnitude_vector(tmp_path):
    """DoRA is LoRA plus one extra tensor per layer, lora_magnitude_vector. (bert-base-uncased -> tiny BertModel.)"""

    def run(lib):
        torch.manual_seed(0)
        model = lib.get_peft_model(tiny_bert_model(), lib.LoraConfig(use_dora=True))
        perturb_by_name(model)
        model.save_pretrained(tmp_path / lib.__name__)
        return folder(tmp_path / lib.__name__)

    seen = both(run)
    assert_same(seen)
    assert "base_model.model.encoder.layer.0.attention.self.query.lora_magnitude_vector" in \
        seen["peft"]["adapter_model.safetensors"]


def test_checkpoint_convert_to_peft_format_minimal_config(tmp_path):
    """Convert to PEFT format: hand-written adapter_model.safetensors with the documented keys plus the minimal
    adapter_config.json {"target_modules": ["query", "value"], "peft_type": "LORA"} loads with
    PeftModel.from_pretrained; defaults fill the rest. (bert-base-uncased -> tiny BertModel.)"""
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for layer in range(2):
        for module in ("query", "value"):
            key = f"base_model.model.encoder.layer.{layer}.attention.self.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(8, 16, generator=g)
            tensors[f"{key}.lora_B.weight"] = torch.randn(16, 8, generator=g)
    converted = tmp_path / "converted"
    converted.mkdir()
    save_file(tensors, converted / "adapter_model.safetensors", metadata={"format": "pt"})
    (converted / "adapter_config.json").write_text(json.dumps({"target_modules": ["query", "value"],
                                                               "peft_type": "LORA"}))

    def run(lib):
        model = lib.PeftModel.from_pretrained(tiny_bert_model(), converted)
        config = model.peft_config["default"]
        return dict(out=logits(model, **BERT_IDS), r=config.r, alpha=config.lora_alpha,
                    weights=adapter_tensors(lib, model))

    seen = both(run)
    assert_same(seen)
    assert not torch.allclose(seen["peft"]["out"], logits(tiny_bert_model(), **BERT_IDS))


def test_checkpoint_merge_weights_and_save_whole_model(tmp_path):
    """merged_model = model.merge_and_unload(); merged_model.save_pretrained(...): a plain transformers model on disk
    with the base's keys, outputs equal to the adapted model. (A tiny Llama stands in.)"""

    def run(lib):
        model = lib.get_peft_model(llama(), lib.LoraConfig(task_type="CAUSAL_LM"))
        perturb_by_name(model)
        adapted = logits(model, **tiny_model("llama")[1])
        merged = model.merge_and_unload()
        merged.save_pretrained(tmp_path / lib.__name__)
        reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / lib.__name__).eval()
        files = sorted(p.name for p in (tmp_path / lib.__name__).iterdir())
        return dict(type=type(merged).__name__, files=files,
                    weights=load_file(tmp_path / lib.__name__ / "model.safetensors"),
                    out=logits(reloaded, **tiny_model("llama")[1]), adapted=adapted)

    seen = both(run)
    assert_same(seen)
    torch.testing.assert_close(seen["peft"]["out"], seen["peft"]["adapted"], atol=1e-5, rtol=1e-4)


def test_checkpoint_convert_to_transformers_model(tmp_path):
    """The "hacky" conversion: AutoModel*.from_pretrained(<adapter folder>) injects the adapter through transformers'
    PEFT integration; with _hf_peft_config_loaded = False, save_pretrained writes the whole model. An adapter saved by
    peftcore goes through it exactly like one saved by peft. (A tiny Llama saved here stands in for the base.)"""

    def run(lib):
        base_dir = saved_base(tmp_path, llama())
        model = lib.get_peft_model(tf.AutoModelForCausalLM.from_pretrained(base_dir),
                                   lib.LoraConfig(task_type="CAUSAL_LM"))
        perturb_by_name(model)
        temp = tmp_path / lib.__name__ / "temp"
        model.save_pretrained(temp)
        loaded = tf.AutoModelForCausalLM.from_pretrained(temp).eval()
        loaded._hf_peft_config_loaded = False
        loaded.save_pretrained(tmp_path / lib.__name__ / "final")
        final = load_file(tmp_path / lib.__name__ / "final" / "model.safetensors")
        return dict(out=logits(loaded, **tiny_model("llama")[1]), keys=sorted(final))

    assert_same(both(run))


# ---------------------------------------------------------------------------------------------------------------
# Model merging -- https://huggingface.co/docs/peft/developer_guides/model_merging
# ---------------------------------------------------------------------------------------------------------------


def _merge_three(lib, tmp_path, combination_type: str, **kwargs):
    """Load three LoRA adapters by name (from_pretrained + load_adapter), add_weighted_adapter, set_adapter, then
    generate. (TinyLlama + tinyllama_lora_norobots/sql/adcopy -> tiny Llama + three adapters saved here.)"""
    paths = {name: trained_adapter(lib, tmp_path, name, seed) for name, seed in
             (("norobots", 1), ("adcopy", 2), ("sql", 3))}
    model = lib.PeftModel.from_pretrained(tiny_generation_model("llama"), paths["norobots"], adapter_name="norobots")
    model.load_adapter(paths["adcopy"], adapter_name="adcopy")
    model.load_adapter(paths["sql"], adapter_name="sql")
    torch.manual_seed(42)  # DARE drops at random
    model.add_weighted_adapter(["norobots", "adcopy", "sql"], [2.0, 0.3, 0.7], adapter_name="merge",
                               combination_type=combination_type, **kwargs)
    model.set_adapter("merge")
    model.eval()
    return dict(active=model.active_adapter, r=model.peft_config["merge"].r,
                alpha=model.peft_config["merge"].lora_alpha, delta=merged_delta(model, "merge"),
                factors=adapter_tensors(lib, model, "merge"), tokens=greedy(model, max_new_tokens=5))


def merged_delta(model, adapter_name: str) -> dict:
    """Per LoRA layer, the weight change scaling * B @ A of one adapter (what the merged adapter adds)."""
    deltas = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and adapter_name in module.lora_A:
            deltas[name] = (module.lora_B[adapter_name].weight @ module.lora_A[adapter_name].weight).detach() * \
                module.scaling[adapter_name]
    return deltas


def test_merging_ties(tmp_path):
    """TIES: add_weighted_adapter(adapters, weights=[2.0, 0.3, 0.7], adapter_name="merge", combination_type="ties",
    density=0.2) and set_adapter("merge")."""
    assert_same(both(_merge_three, tmp_path, "ties", density=0.2))


DARE_RNG = ("with the same torch seed peftcore's dare_* merges draw different Bernoulli drop masks than PEFT's "
            "(another RNG draw order), so the merged adapter and its outputs differ")


@pytest.mark.xfail(strict=True, reason=DARE_RNG)
def test_merging_dare_ties(tmp_path):
    """DARE: combination_type="dare_ties" with density=0.2 (same seed for the random drop)."""
    assert_same(both(_merge_three, tmp_path, "dare_ties", density=0.2))


@pytest.mark.parametrize("combination_type", [
    "svd", "linear", "cat", "ties_svd", "magnitude_prune", "magnitude_prune_svd",
    *(pytest.param(kind, marks=pytest.mark.xfail(strict=True, reason=DARE_RNG))
      for kind in ("dare_linear", "dare_linear_svd", "dare_ties_svd"))])
def test_merging_other_combination_types(tmp_path, combination_type):
    """The tip: DARE combines with linear, svd, or both (e.g. dare_ties_svd); the other combination types too.
    Compared: the merged weight change per layer, rank/alpha, and generated tokens (the factors: next test)."""
    kwargs = {} if combination_type in ("svd", "linear", "cat") else dict(density=0.5)
    seen = both(_merge_three, tmp_path, combination_type, **kwargs)
    for lib in seen.values():
        del lib["factors"]
    assert_same(seen)


@pytest.mark.parametrize("combination_type", [
    pytest.param("svd", marks=pytest.mark.xfail(strict=True, reason=(
        "combination_type='svd': peftcore's merged lora_A/lora_B differ from PEFT's by singular-vector signs "
        "(a QR-factored SVD instead of PEFT's dense torch.linalg.svd); their product and outputs agree"))),
    "linear", "cat", "ties", "ties_svd", "magnitude_prune"])
def test_merging_saved_factors(tmp_path, combination_type):
    """The merged adapter's own tensors (what save_pretrained of "merge" writes): lora_A / lora_B values."""
    kwargs = {} if combination_type in ("svd", "linear", "cat") else dict(density=0.5)
    seen = both(_merge_three, tmp_path, combination_type, **kwargs)
    assert_same({lib: result["factors"] for lib, result in seen.items()})


# ---------------------------------------------------------------------------------------------------------------
# LoRA developer guide -- https://huggingface.co/docs/peft/developer_guides/lora
# ---------------------------------------------------------------------------------------------------------------


INIT_RNG = ("with the same torch seed peftcore's initial lora_A differs from PEFT's: PEFT builds lora_A as an "
            "nn.Linear (whose constructor draws its default init) and then re-initialises it, peftcore draws once")


@pytest.mark.parametrize("init", [pytest.param(True, marks=pytest.mark.xfail(strict=True, reason=INIT_RNG)),
                                  pytest.param("gaussian", marks=pytest.mark.xfail(strict=True, reason=INIT_RNG)),
                                  False])
def test_lora_initialization(init):
    """init_lora_weights: True (Kaiming-uniform A, zero B: an identity transform), "gaussian" (Gaussian A, zero B),
    False (not an identity; for debugging). Same seed, same weights and outputs. (A tiny Llama stands in.)"""

    def run(lib):
        torch.manual_seed(7)
        model = lib.get_peft_model(llama(), lib.LoraConfig(init_lora_weights=init, task_type="CAUSAL_LM"))
        return dict(weights=adapter_tensors(lib, model), out=logits(model, **tiny_model("llama")[1]))

    seen = both(run)
    assert_same(seen)
    base = logits(llama(), **tiny_model("llama")[1])
    assert torch.allclose(seen["peft"]["out"], base) == (init is not False)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_lora_pissa_and_olora(init):
    """init_lora_weights="pissa" / "olora": SVD / QR of the base weights; both mutate the base weights, outputs
    stay those of the base. (A tiny Llama stands in.)"""

    def run(lib):
        model = lib.get_peft_model(llama(), lib.LoraConfig(init_lora_weights=init, task_type="CAUSAL_LM"))
        base_q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
        return dict(weights=adapter_tensors(lib, model), base_q=base_q, out=logits(model, **tiny_model("llama")[1]))

    assert_same(both(run))


@pytest.mark.xfail(strict=True, raises=ConfigError,
                   reason="peftcore's LoraConfig rejects init_lora_weights='pissa_niter_[n]' (fast SVD "
                   "PiSSA); PEFT accepts it")
def test_lora_pissa_fast_svd():
    """init_lora_weights="pissa_niter_[number of iters]": fast (randomised) SVD, same seed."""

    def run(lib):
        torch.manual_seed(0)
        model = lib.get_peft_model(llama(), lib.LoraConfig(init_lora_weights="pissa_niter_4", task_type="CAUSAL_LM"))
        return dict(weights=adapter_tensors(lib, model), out=logits(model, **tiny_model("llama")[1]))

    assert_same(both(run))


@pytest.mark.xfail(strict=True, raises=AttributeError, reason="peftcore has no CordaConfig / preprocess_corda "
                   "(init_lora_weights='corda' is unsupported)")
def test_lora_corda():
    """CorDA: CordaConfig(corda_method="kpm"), LoraConfig(init_lora_weights="corda", corda_config=...),
    preprocess_corda(model, config, run_model=...) then get_peft_model. (A tiny Llama and two batches stand in.)"""
    pytest.importorskip("attr", reason="peft's CorDA imports attrs, which is not installed")
    import peft.tuners.lora.corda as peft_corda

    def run(lib):
        model = llama()
        corda_config = lib.CordaConfig(corda_method="kpm")
        config = lib.LoraConfig(init_lora_weights="corda", corda_config=corda_config, target_modules=["q_proj"], r=2)

        @torch.no_grad()
        def run_model():
            model.eval()
            for seed in (1, 2):
                model(input_ids=torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(seed)))

        preprocess = peft_corda.preprocess_corda if lib is peft else lib.preprocess_corda
        preprocess(model, config, run_model=run_model)
        peft_model = lib.get_peft_model(model, config)
        return dict(weights=adapter_tensors(lib, peft_model), out=logits(peft_model, **tiny_model("llama")[1]))

    assert_same(both(run))


@pytest.mark.xfail(strict=True, raises=AttributeError, reason="peftcore has no EvaConfig / "
                   "initialize_lora_eva_weights (init_lora_weights='eva' is unsupported)")
def test_lora_eva():
    """EVA: LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(rho=2.0)), get_peft_model(...,
    low_cpu_mem_usage=True), initialize_lora_eva_weights(peft_model, dataloader). (Tiny Llama, two batches.)"""

    def run(lib):
        config = lib.LoraConfig(init_lora_weights="eva", eva_config=lib.EvaConfig(rho=2.0), target_modules=["q_proj"],
                                r=2)
        peft_model = lib.get_peft_model(llama(), config, low_cpu_mem_usage=True)
        loader = [dict(input_ids=torch.randint(3, 60, (4, 7), generator=torch.Generator().manual_seed(s)))
                  for s in (1, 2, 3)]
        torch.manual_seed(0)
        lib.initialize_lora_eva_weights(peft_model, loader)
        return dict(weights=adapter_tensors(lib, peft_model), r=dict(peft_model.peft_config["default"].rank_pattern))

    assert_same(both(run))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="PEFT's replace_lora_weights_loftq runs on CUDA only")
@pytest.mark.xfail(strict=True, raises=AttributeError, reason="peftcore has no replace_lora_weights_loftq")
def test_lora_replace_lora_weights_loftq(tmp_path):
    """The convenient LoftQ: a bitsandbytes 4-bit base from safetensors, LoraConfig(task_type="CAUSAL_LM"),
    get_peft_model, replace_lora_weights_loftq(peft_model). (A tiny Llama with hidden size 64 saved here.)"""

    def run(lib):
        torch.manual_seed(0)
        base = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
        base_dir = saved_base(tmp_path, base)
        quantized = tf.AutoModelForCausalLM.from_pretrained(
            base_dir, quantization_config=tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
            device_map="cpu")
        peft_model = lib.get_peft_model(quantized, lib.LoraConfig(task_type="CAUSAL_LM"))
        lib.replace_lora_weights_loftq(peft_model, model_path=str(base_dir / "model.safetensors"))
        return dict(weights=adapter_tensors(lib, peft_model))

    assert_same(both(run))


def test_lora_rslora():
    """use_rslora=True: the scale is lora_alpha / sqrt(r). (A tiny Llama stands in.)"""

    def run(lib):
        model = lib.get_peft_model(llama(), lib.LoraConfig(use_rslora=True, r=4, lora_alpha=8, task_type="CAUSAL_LM"))
        perturb_by_name(model)
        layer = model.get_base_model().model.layers[0].self_attn.q_proj
        return dict(scaling=float(layer.scaling["default"]), out=logits(model, **tiny_model("llama")[1]))

    seen = both(run)
    assert_same(seen)
    assert seen["peft"]["scaling"] == 8 / math.sqrt(4)


@pytest.mark.xfail(strict=True, raises=ConfigError,
                   reason="peftcore's LoraConfig rejects alora_invocation_tokens (Activated LoRA is "
                   "unsupported)")
def test_lora_activated_lora():
    """aLoRA: LoraConfig(alora_invocation_tokens=[...]) on a causal LM; tokens before the invocation sequence run
    the base weights. (A tiny Llama stands in; the invocation sequence is two token ids.)"""

    def run(lib):
        config = lib.LoraConfig(alora_invocation_tokens=[5, 6], task_type="CAUSAL_LM", r=4)
        model = lib.get_peft_model(llama(), config)
        perturb_by_name(model)
        ids = torch.tensor([[9, 10, 11, 5, 6, 12, 13], [9, 5, 6, 10, 11, 12, 13]])
        return dict(out=logits(model, input_ids=ids))

    assert_same(both(run))


def test_lora_dora_outputs_and_merge():
    """use_dora=True: outputs, and merge_and_unload (recommended for DoRA inference) gives the same outputs.
    (A tiny Llama stands in.)"""

    def run(lib):
        model = lib.get_peft_model(llama(), lib.LoraConfig(use_dora=True, task_type="CAUSAL_LM"))
        perturb_by_name(model)
        model.eval()
        out = logits(model, **tiny_model("llama")[1])
        merged = logits(model.merge_and_unload(), **tiny_model("llama")[1])
        return dict(out=out, merged=merged)

    seen = both(run)
    assert_same(seen)
    torch.testing.assert_close(seen["peft"]["merged"], seen["peft"]["out"], atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="ephemeral_gpu_offload needs a GPU (PEFT moves DoRA "
                    "weights to CUDA)")
def test_lora_dora_runtime_config_ephemeral_gpu_offload(tmp_path):
    """LoraConfig(use_dora=True, runtime_config=LoraRuntimeConfig(ephemeral_gpu_offload=True)) and
    PeftModel.from_pretrained(..., ephemeral_gpu_offload=True): accepted without a GPU, not written to the file,
    outputs unchanged. (A tiny Llama stands in.)"""

    def run(lib):
        config = lib.LoraConfig(use_dora=True, task_type="CAUSAL_LM",
                                runtime_config=lib.LoraRuntimeConfig(ephemeral_gpu_offload=True))
        model = lib.get_peft_model(llama(), config)
        perturb_by_name(model)
        model.save_pretrained(tmp_path / lib.__name__)
        loaded = lib.PeftModel.from_pretrained(llama(), tmp_path / lib.__name__, ephemeral_gpu_offload=True)
        saved = json.loads((tmp_path / lib.__name__ / "adapter_config.json").read_text())
        return dict(in_file="runtime_config" in saved,
                    flag=loaded.peft_config["default"].runtime_config.ephemeral_gpu_offload,
                    out=logits(loaded, **tiny_model("llama")[1]))

    assert_same(both(run))


def test_lora_all_linear():
    """target_modules="all-linear" (QLoRA-style): every linear layer but the output head. (Tiny Llama.)"""

    def run(lib):
        model = lib.get_peft_model(llama(), lib.LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM"))
        return dict(targeted=sorted(model.targeted_module_names), line=trainable_line(model),
                    target_modules=sorted(model.peft_config["default"].target_modules))

    seen = both(run)
    assert_same(seen)
    assert not any("lm_head" in name for name in seen["peft"]["targeted"])


@pytest.mark.xfail(strict=True, raises=ConfigError,
                   reason="peftcore's LoraConfig rejects layer_replication (memory-efficient layer "
                   "replication is unsupported)")
def test_lora_layer_replication():
    """layer_replication=[[0, 4], [2, 5]] on a 5-layer model gives 7 layers [0, 1, 2, 3, 2, 3, 4], each with its own
    LoRA, sharing base weights. (A 5-layer tiny Llama stands in for Mistral-7B.)"""

    def run(lib):
        torch.manual_seed(0)
        base = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=5,
                                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
        model = lib.get_peft_model(base, lib.LoraConfig(layer_replication=[[0, 4], [2, 5]], task_type="CAUSAL_LM"))
        perturb_by_name(model)
        return dict(layers=len(model.get_base_model().model.layers), line=trainable_line(model),
                    out=logits(model, **tiny_model("llama")[1]))

    assert_same(both(run))


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.foo = nn.Linear(8, 8)
        self.barfoo = nn.Linear(8, 8)

    def forward(self, x):
        return self.barfoo(self.foo(x))


class _Middle(nn.Module):
    def __init__(self):
        super().__init__()
        self.foo = nn.Linear(8, 8)
        self.foobar = nn.Linear(8, 8)
        self.module = _Inner()

    def forward(self, x):
        return self.module(self.foobar(self.foo(x)))


class _Outer(nn.Module):
    """The Outer / Middle / Inner model of the rank_pattern section."""

    def __init__(self):
        super().__init__()
        self.foo = nn.Linear(8, 8)
        self.module = _Middle()

    def forward(self, x):
        return self.module(self.foo(x))


@pytest.mark.parametrize("pattern", [{"foo": 42}, {"^foo": 42}, {"^module.foo": 42}, {"module.foo": 42},
                                     {"^foo": 42, "^module.module.foo": 55}])
def test_lora_rank_and_alpha_pattern(pattern):
    """rank_pattern / alpha_pattern keys are regexes ($ implied); unmentioned layers keep r / lora_alpha.
    The five documented examples on the Outer/Middle/Inner model."""

    def run(lib):
        torch.manual_seed(0)
        config = lib.LoraConfig(target_modules=["foo", "foobar", "barfoo"], r=4, lora_alpha=8, rank_pattern=pattern,
                                alpha_pattern={k: v * 2 for k, v in pattern.items()})
        model = lib.get_peft_model(_Outer(), config)
        ranks = {}
        for name, module in model.get_base_model().named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "r", {}):
                ranks[name] = (module.r["default"], float(module.scaling["default"]))
        return ranks

    seen = both(run)
    assert_same(seen)
    expected_42 = {"{'foo': 42}": {"foo", "module.foo", "module.module.foo"}, "{'^foo': 42}": {"foo"},
                   "{'^module.foo': 42}": {"module.foo"}, "{'module.foo': 42}": {"module.foo", "module.module.foo"},
                   "{'^foo': 42, '^module.module.foo': 55}": {"foo"}}[str(pattern)]
    assert {n for n, (r, _) in seen["peft"].items() if r == 42} == expected_42


@pytest.mark.xfail(strict=True, raises=ConfigError,
                   reason="peftcore's LoraConfig rejects target_parameters (LoRA on nn.Parameter is "
                   "unsupported)")
def test_lora_target_parameters():
    """target_parameters=[...] puts LoRA on an nn.Parameter (as for MoE experts); a 3-dim parameter's first axis is
    the expert axis. (A tiny module with a (2, 8, 8) expert weight stands in for Llama4.)"""

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(0)))

        def forward(self, x):
            return torch.einsum("bi,eio->bo", x, self.gate_up_proj)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = Experts()

        def forward(self, x):
            return self.experts(x)

    def run(lib):
        torch.manual_seed(0)
        model = lib.get_peft_model(Block(), lib.LoraConfig(target_parameters=["experts.gate_up_proj"], r=2,
                                                           init_lora_weights=False))
        return dict(line=trainable_line(model), out=model(torch.ones(3, 8)).detach())

    assert_same(both(run))


@pytest.mark.xfail(strict=True, raises=ModuleNotFoundError, reason="peftcore has no optimizers module "
                   "(create_lorafa_optimizer / create_loraplus_optimizer)")
@pytest.mark.parametrize("optimizer", ["lorafa", "loraplus"])
def test_lora_optimizers(optimizer):
    """LoRA-FA (create_lorafa_optimizer(model, r, lora_alpha, lr)) and LoRA+ (create_loraplus_optimizer(model,
    optimizer_cls, lr, loraplus_lr_ratio)): one step gives the same weights. (Tiny Llama; torch Adam, not bnb's.)"""
    import importlib

    def run(lib):
        optimizers = importlib.import_module(f"{lib.__name__}.optimizers")
        model = lib.get_peft_model(llama(), lib.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8))
        perturb_by_name(model)
        if optimizer == "lorafa":
            opt = optimizers.create_lorafa_optimizer(model=model, r=4, lora_alpha=8, lr=1e-2)
        else:
            opt = optimizers.create_loraplus_optimizer(model=model, optimizer_cls=torch.optim.Adam, lr=1e-2,
                                                       loraplus_lr_ratio=16)
        ids = tiny_model("llama")[1]["input_ids"]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        return adapter_tensors(lib, model)

    assert_same(both(run))


@pytest.mark.xfail(strict=True, raises=ConfigError,
                   reason="peftcore's LoraConfig rejects trainable_token_indices (trainable tokens "
                   "alongside LoRA are unsupported)")
def test_lora_trainable_token_indices(tmp_path):
    """New tokens: resize_token_embeddings, then LoraConfig(target_modules="all-linear",
    trainable_token_indices={"embed_tokens": [new ids]}); only those rows train; the token weights are saved with the
    adapter. (Mistral-7B + tokenizer -> tiny Llama; the two "new tokens" are ids 64 and 65.)"""

    def run(lib):
        base = llama()
        base.resize_token_embeddings(66)
        config = lib.LoraConfig(target_modules="all-linear", trainable_token_indices={"embed_tokens": [64, 65]})
        model = lib.get_peft_model(base, config)
        perturb_by_name(model)
        model.save_pretrained(tmp_path / lib.__name__)
        return dict(line=trainable_line(model), disk=folder(tmp_path / lib.__name__),
                    out=logits(model, input_ids=torch.tensor([[3, 64, 65, 7]])))

    assert_same(both(run))


def _two_adapters(lib, tmp_path, **lora):
    """The guide's base model + "sft"/"dpo" (or "adapter_fr"/"adapter_de") LoRA adapters, saved here.
    (Mistral-7B + zephyr-7b-sft-lora / zephyr-7b-dpo-lora -> tiny Llama + two adapters.)"""
    return trained_adapter(lib, tmp_path, "first", 1, **lora), trained_adapter(lib, tmp_path, "second", 2, **lora)


def test_lora_merge_and_unload_from_pretrained(tmp_path):
    """PeftModel.from_pretrained(base, adapter); model.merge_and_unload(): a plain model, same outputs."""

    def run(lib):
        first, _ = _two_adapters(lib, tmp_path)
        model = lib.PeftModel.from_pretrained(tiny_generation_model("llama"), first).eval()
        adapted = logits(model, **GEN_IDS)
        merged = model.merge_and_unload()
        return dict(type=type(merged).__name__, adapted=adapted, merged=logits(merged, **GEN_IDS),
                    lora_left=any("lora" in n for n, _ in merged.named_modules()))

    seen = both(run)
    assert_same(seen)
    torch.testing.assert_close(seen["peft"]["merged"], seen["peft"]["adapted"], atol=1e-5, rtol=1e-4)


def test_lora_merge_adapter_then_unmerge(tmp_path):
    """merge_adapter() keeps a copy so unmerge_adapter() returns the base weights."""

    def run(lib):
        first, _ = _two_adapters(lib, tmp_path)
        base_out = logits(tiny_generation_model("llama"), **GEN_IDS)
        model = lib.PeftModel.from_pretrained(tiny_generation_model("llama"), first).eval()
        adapted = logits(model, **GEN_IDS)
        model.merge_adapter()
        merged = logits(model, **GEN_IDS)
        weight_merged = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
        model.unmerge_adapter()
        with model.disable_adapter():
            base_again = logits(model, **GEN_IDS)
        return dict(adapted=adapted, merged=merged, weight_merged=weight_merged, after=logits(model, **GEN_IDS),
                    base_again=base_again, base=base_out)

    seen = both(run)
    assert_same(seen)
    torch.testing.assert_close(seen["peft"]["merged"], seen["peft"]["adapted"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(seen["peft"]["base_again"], seen["peft"]["base"], atol=1e-5, rtol=1e-4)


def test_lora_add_weighted_adapter_linear_and_generate(tmp_path):
    """from_pretrained(..., adapter_name="sft"), load_adapter(..., adapter_name="dpo"),
    add_weighted_adapter(["sft", "dpo"], [0.7, 0.3], "sft-dpo", combination_type="linear"), set_adapter, then
    generate(max_length=...)."""

    def run(lib):
        sft, dpo = _two_adapters(lib, tmp_path)
        model = lib.PeftModel.from_pretrained(tiny_generation_model("llama"), sft, adapter_name="sft")
        model.load_adapter(dpo, adapter_name="dpo")
        model.add_weighted_adapter(adapters=["sft", "dpo"], weights=[0.7, 0.3], adapter_name="sft-dpo",
                                   combination_type="linear")
        model.set_adapter("sft-dpo")
        return dict(active=model.active_adapter, weights=adapter_tensors(lib, model, "sft-dpo"),
                    tokens=greedy(model, max_length=12))

    assert_same(both(run))


def test_lora_load_adapter_and_set_adapter(tmp_path):
    """load_adapter(other, adapter_name="dpo"); set_adapter("dpo"): outputs follow the active adapter."""

    def run(lib):
        sft, dpo = _two_adapters(lib, tmp_path)
        model = lib.PeftModel.from_pretrained(tiny_generation_model("llama"), sft).eval()
        first = logits(model, **GEN_IDS)
        model.load_adapter(dpo, adapter_name="dpo")
        still_first = logits(model, **GEN_IDS)
        model.set_adapter("dpo")
        return dict(first=first, still_first=still_first, dpo=logits(model, **GEN_IDS),
                    active=model.active_adapter, adapters=sorted(model.peft_config))

    assert_same(both(run))


def test_lora_unload_and_delete_adapter(tmp_path):
    """unload() gives back the base model without LoRA modules; delete_adapter("dpo") removes that adapter."""

    def run(lib):
        sft, dpo = _two_adapters(lib, tmp_path)
        model = lib.PeftModel.from_pretrained(tiny_generation_model("llama"), sft).eval()
        model.load_adapter(dpo, adapter_name="dpo")
        model.set_adapter("dpo")
        model.delete_adapter("dpo")
        after_delete = dict(adapters=sorted(model.peft_config), active=model.active_adapters,
                            out=logits(model, **GEN_IDS))
        unloaded = model.unload()
        return dict(after_delete=after_delete, type=type(unloaded).__name__, out=logits(unloaded, **GEN_IDS),
                    lora_left=any("lora" in n for n, _ in unloaded.named_modules()))

    seen = both(run)
    assert_same(seen)
    torch.testing.assert_close(seen["peft"]["out"], logits(tiny_generation_model("llama"), **GEN_IDS))


def test_lora_mixed_adapter_batch_generate(tmp_path):
    """Mixed batches: from_pretrained(..., adapter_name="adapter_fr"), load_adapter(..., adapter_name="adapter_de"),
    generate(**inputs, adapter_names=[...]) with "__base__" rows, in any order; each row is what that adapter alone
    generates."""
    names = ["__base__", "adapter_fr", "adapter_de", "adapter_fr", "__base__", "adapter_de"]
    ids = torch.randint(3, 64, (6, 5), generator=torch.Generator().manual_seed(13))

    def run(lib):
        fr, de = _two_adapters(lib, tmp_path)
        model = lib.PeftModel.from_pretrained(tiny_generation_model("llama"), fr, adapter_name="adapter_fr")
        model.load_adapter(de, adapter_name="adapter_de")
        model.eval()
        with torch.no_grad():
            mixed = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names,
                                   max_new_tokens=5, do_sample=False)
            alone = {}
            for name in ("adapter_fr", "adapter_de"):
                model.set_adapter(name)
                alone[name] = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                             do_sample=False)
            with model.disable_adapter():
                alone["__base__"] = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                   max_new_tokens=5, do_sample=False)
        return dict(mixed=mixed, alone=alone)

    seen = both(run)
    assert_same(seen)
    for row, name in enumerate(names):
        torch.testing.assert_close(seen["peft"]["mixed"][row], seen["peft"]["alone"][name][row])


def test_lora_mixed_adapter_batch_with_modules_to_save(tmp_path):
    """Mixed batches also work with modules_to_save (a per-adapter classification head).
    (A tiny BERT sequence classifier stands in.)"""
    names = ["a", "__base__", "b", "a"]
    ids = torch.randint(3, 60, (4, 7), generator=torch.Generator().manual_seed(17))

    def run(lib):
        model = lib.get_peft_model(tiny_model("bert")[0], lib.LoraConfig(task_type="SEQ_CLS"), adapter_name="a")
        model.add_adapter("b", lib.LoraConfig(task_type="SEQ_CLS"))
        model.set_adapter("b")
        perturb_by_name(model, seed=4)
        model.set_adapter("a")
        perturb_by_name(model, seed=5)
        model.eval()
        return dict(mixed=logits(model, input_ids=ids, adapter_names=names))

    assert_same(both(run))




@pytest.mark.parametrize("caveat", ["training", "disable_adapter", "merged", "dora"])
def test_lora_mixed_adapter_batch_caveats(tmp_path, caveat):
    """The caveats: inference only; disable_adapter() takes precedence over adapter_names; no adapter_names while an
    adapter is merged; and DoRA. The user sees the same result or the same error."""

    def run(lib):
        first, second = _two_adapters(lib, tmp_path, use_dora=(caveat == "dora"))
        model = lib.PeftModel.from_pretrained(tiny_generation_model("llama"), first, adapter_name="x")
        model.load_adapter(second, adapter_name="y")
        model.eval()
        call = dict(**GEN_IDS, adapter_names=["x", "y", "__base__"])
        if caveat == "training":
            model.train()
            return error_of(lambda: model(**call))
        if caveat == "disable_adapter":
            with model.disable_adapter():
                return logits(model, **call)
        if caveat == "merged":
            model.merge_adapter()
            return error_of(lambda: model(**call))
        return error_of(lambda: model(**call)) or logits(model, **call)

    assert_same(both(run))


# ---------------------------------------------------------------------------------------------------------------
# Custom models -- https://huggingface.co/docs/peft/developer_guides/custom_models
# ---------------------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """The guide's multilayer perceptron (20 -> hidden -> hidden -> 2, log-softmax)."""

    def __init__(self, num_units_hidden=2000):
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(20, num_units_hidden), nn.ReLU(), nn.Linear(num_units_hidden,
                                 num_units_hidden), nn.ReLU(), nn.Linear(num_units_hidden, 2), nn.LogSoftmax(dim=-1))

    def forward(self, X):
        return self.seq(X)


def test_custom_mlp_print_trainable_parameters():
    """LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"]) on the MLP with 2000 hidden units;
    the guide prints trainable params: 56,164 || all params: 4,100,164 || trainable%: 1.3698..."""

    def run(lib):
        torch.manual_seed(0)
        model = lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"]))
        return dict(line=trainable_line(model), counts=model.get_nb_trainable_parameters(),
                    targeted=sorted(model.targeted_module_names))

    seen = both(run)
    assert_same(seen)
    # The page's 56,164 is from an older PEFT that also counted the original seq.4 (4,002 parameters) as
    # trainable; PEFT 0.21 freezes it and trains only the modules_to_save copy.
    assert seen["peft"]["counts"] == (56_164 - 4_002, 4_100_164)


def test_custom_mlp_training_loop_and_reload(tmp_path):
    """"use any training framework ... or write our own fit loop": a few Adam steps on the MLP (small hidden size),
    then save_pretrained and PeftModel.from_pretrained on a fresh MLP give the trained outputs."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(32, 20, generator=g), torch.randint(0, 2, (32,), generator=g)

    def run(lib):
        torch.manual_seed(0)
        config = lib.LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"])
        model = lib.get_peft_model(MLP(64), config)
        perturb_by_name(model, scale=0.1)  # same start (initialisation: test_lora_initialization)
        opt = torch.optim.Adam(model.parameters(), lr=2e-2)
        losses = []
        for _ in range(5):
            loss = nn.functional.nll_loss(model(X), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        model.save_pretrained(tmp_path / lib.__name__)
        torch.manual_seed(0)
        reloaded = lib.PeftModel.from_pretrained(MLP(64), tmp_path / lib.__name__)
        return dict(losses=torch.stack(losses), out=model(X).detach(), reloaded=reloaded(X).detach(),
                    disk=folder(tmp_path / lib.__name__))

    seen = both(run)
    assert_same(seen)
    torch.testing.assert_close(seen["peft"]["reloaded"], seen["peft"]["out"])


class _TimmLike(nn.Module):
    """Stands in for timm's poolformer: Conv2d layers named stages.N.blocks.M.mlp.fc1/fc2 and a head.fc Linear."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stages = nn.Sequential(*[nn.Module() for _ in range(2)])
        for stage in self.stages:
            stage.blocks = nn.Sequential(*[nn.Module() for _ in range(2)])
            for block in stage.blocks:
                block.mlp = nn.Module()
                block.mlp.fc1 = nn.Conv2d(8, 16, 1)
                block.mlp.fc2 = nn.Conv2d(16, 8, 1)
        self.head = nn.Module()
        self.head.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages:
            for block in stage.blocks:
                x = x + block.mlp.fc2(torch.relu(block.mlp.fc1(x)))
        return self.head.fc(x.mean((2, 3)))


def test_custom_timm_conv_regex_and_head():
    """LoraConfig(target_modules=r".*\\.mlp\\.fc\\d", modules_to_save=["head.fc"]) on a conv net: Conv2d LoRA on
    every mlp.fc1/fc2, the head trained fully. (timm/poolformer_m36 -> a tiny model with timm's layer names.)"""

    def run(lib):
        torch.manual_seed(0)
        model = lib.get_peft_model(_TimmLike(), lib.LoraConfig(target_modules=r".*\.mlp\.fc\d",
                                                               modules_to_save=["head.fc"]))
        perturb_by_name(model)
        x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
        return dict(line=trainable_line(model), targeted=sorted(model.targeted_module_names),
                    out=model(x).detach())

    seen = both(run)
    assert_same(seen)
    assert len(seen["peft"]["targeted"]) == 8


def test_custom_new_architecture_target_modules():
    """For an architecture PEFT lacks a default for, pass the names that a similar one uses (mistral: q_proj,
    v_proj); the result equals the built-in default. (A tiny Mistral stands in.)"""

    def run(lib):
        explicit = lib.get_peft_model(tiny_model("mistral")[0], lib.LoraConfig(target_modules=["q_proj", "v_proj"]))
        default = lib.get_peft_model(tiny_model("mistral")[0], lib.LoraConfig())
        return dict(line=trainable_line(explicit), targeted=sorted(explicit.targeted_module_names),
                    default=sorted(default.targeted_module_names))

    seen = both(run)
    assert_same(seen)
    assert seen["peft"]["targeted"] == seen["peft"]["default"]


def test_custom_verify_parameters_and_layers():
    """Verify: print_trainable_parameters, print(peft_model) shows only the intended layers replaced (lora.Linear),
    targeted_module_names lists them. (The MLP, small hidden size.)"""

    def run(lib):
        torch.manual_seed(0)
        model = lib.get_peft_model(MLP(64), lib.LoraConfig(target_modules=["seq.0", "seq.2"]))
        replaced = {n: type(m).__name__ for n, m in model.get_base_model().named_modules() if hasattr(m, "base_layer")}
        return dict(line=trainable_line(model), targeted=sorted(model.targeted_module_names), replaced=replaced)

    assert_same(both(run))


def test_custom_verify_model_repr_names_lora_linear():
    """The guide: 'if LoRA is applied to nn.Linear layers, then you should only see lora.Linear layers being used'
    when printing the model. (The MLP, small hidden size.)"""

    def run(lib):
        torch.manual_seed(0)
        model = lib.get_peft_model(MLP(64), lib.LoraConfig(target_modules=["seq.0", "seq.2"]))
        return [line.strip() for line in repr(model).splitlines() if line.strip().startswith("(0)")
                or line.strip().startswith("(2)")]

    seen = both(run)
    assert_same(seen)
    assert all("lora.Linear" in line for line in seen["peft"])


@pytest.mark.xfail(strict=True, reason="targeting an nn.LSTM: both raise ValueError, but peftcore's message "
                   "('Target module lstm is a torch.nn.modules.rnn.LSTM, which lora cannot wrap; ...') does not start "
                   "with PEFT's ('Target module LSTM(4, 4) is not supported. Currently, only the following modules are "
                   "supported: ...')")
def test_custom_unsupported_module_type():
    """LoRA only works on supported module types: targeting an nn.LSTM raises. Same error for both."""

    class WithLSTM(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 4)
            self.lin = nn.Linear(4, 4)

    def run(lib):
        return error_of(lambda: lib.get_peft_model(WithLSTM(), lib.LoraConfig(target_modules=["lstm"])))

    seen = both(run)
    assert_same(seen)
    assert seen["peft"] is not None


@pytest.mark.xfail(strict=True, raises=AttributeError, reason="peftcore's LoraConfig has no _register_custom_module "
                   "(PEFT's experimental dynamic dispatch of custom LoRA layers); peftcore's extension point is a "
                   "plugin hook instead")
def test_custom_dynamic_dispatch_register_custom_module(tmp_path):
    """config._register_custom_module({nn.Linear: MyLoraLinear}) overrides dispatch (the guide: this also works to
    replace the built-in nn.Linear layer); the custom module must be registered again before loading. Here the
    custom layer is the library's own lora Linear subclassed, so both libraries can run it. (The MLP.)"""

    def custom_linear(lib):
        if lib is peft:
            from peft.tuners.lora.layer import Linear
        else:
            Linear = lib.LoraConfig._register_custom_module  # noqa: N806 - raises: peftcore has no such API

        class MyLoraLinear(Linear):
            pass

        return MyLoraLinear

    def run(lib):
        torch.manual_seed(0)
        config = lib.LoraConfig(target_modules=["seq.0", "seq.2"], init_lora_weights=False)
        config._register_custom_module({nn.Linear: custom_linear(lib)})
        model = lib.get_peft_model(MLP(64), config)
        model.save_pretrained(tmp_path / lib.__name__)
        loaded_config = lib.LoraConfig.from_pretrained(tmp_path / lib.__name__)
        loaded_config._register_custom_module({nn.Linear: custom_linear(lib)})
        torch.manual_seed(0)
        loaded = lib.PeftModel.from_pretrained(MLP(64), tmp_path / lib.__name__, config=loaded_config)
        x = torch.randn(3, 20, generator=torch.Generator().manual_seed(1))
        return dict(types=sorted({type(m).__name__ for m in loaded.modules() if hasattr(m, "base_layer")}),
                    out=model(x).detach(), loaded=loaded(x).detach())

    assert_same(both(run))


# ---------------------------------------------------------------------------------------------------------------
# Troubleshooting -- https://huggingface.co/docs/peft/developer_guides/troubleshooting
# ---------------------------------------------------------------------------------------------------------------


def _dtypes(model) -> dict:
    return {n: str(p.dtype) for n, p in model.named_parameters() if p.requires_grad}


def test_troubleshooting_fp16_upcast_trainable_params():
    """"Attempting to unscale FP16 gradients": after get_peft_model on a float16 model (autocast off, as before
    PEFT 0.12), upcast trainable parameters by hand (param.data = param.data.float()) or with
    cast_mixed_precision_params(peft_model, dtype=torch.float16). (A tiny Llama in float16 stands in.)"""

    def run(lib):
        by_hand = lib.get_peft_model(llama().half(), lib.LoraConfig(task_type="CAUSAL_LM"),
                                     autocast_adapter_dtype=False)
        before = _dtypes(by_hand)
        for param in by_hand.parameters():
            if param.requires_grad:
                param.data = param.data.float()
        helper = lib.get_peft_model(llama().half(), lib.LoraConfig(task_type="CAUSAL_LM"),
                                    autocast_adapter_dtype=False)
        lib.cast_mixed_precision_params(helper, dtype=torch.float16)
        all_dtypes = {n: str(p.dtype) for n, p in helper.named_parameters()}
        return dict(before=before, by_hand=_dtypes(by_hand), helper=all_dtypes)

    assert_same(both(run))


def test_troubleshooting_autocast_adapter_dtype(tmp_path):
    """Since PEFT 0.12 float16/bfloat16 adapter weights are promoted to float32; autocast_adapter_dtype=False to
    get_peft_model, PeftModel.from_pretrained and load_adapter keeps them in the base's dtype.
    (A tiny Llama in bfloat16 stands in.)"""

    def run(lib):
        seen = {}
        for autocast in (True, False):
            model = lib.get_peft_model(llama().to(torch.bfloat16), lib.LoraConfig(task_type="CAUSAL_LM"),
                                       autocast_adapter_dtype=autocast)
            seen[f"get_peft_model/{autocast}"] = _dtypes(model)
            model.save_pretrained(tmp_path / lib.__name__ / str(autocast))
            loaded = lib.PeftModel.from_pretrained(llama().to(torch.bfloat16), tmp_path / lib.__name__ / str(autocast),
                                                   autocast_adapter_dtype=autocast, is_trainable=True)
            loaded.load_adapter(tmp_path / lib.__name__ / str(autocast), adapter_name="other",
                                autocast_adapter_dtype=autocast, is_trainable=True)
            seen[f"from_pretrained+load_adapter/{autocast}"] = {
                n: str(p.dtype) for n, p in loaded.named_parameters() if "lora" in n}
        return seen

    assert_same(both(run))


def test_troubleshooting_load_trained_model_correctly(tmp_path):
    """Load a trained adapter with PeftConfig.from_pretrained + PeftModel.from_pretrained (not get_peft_model): the
    trained outputs come back. (A tiny Llama stands in.)"""

    def run(lib):
        model = lib.get_peft_model(llama(), lib.LoraConfig(task_type="CAUSAL_LM"))
        perturb_by_name(model)
        trained = logits(model, **tiny_model("llama")[1])
        model.save_pretrained(tmp_path / lib.__name__)
        config = lib.PeftConfig.from_pretrained(tmp_path / lib.__name__)
        loaded = lib.PeftModel.from_pretrained(llama(), tmp_path / lib.__name__)
        return dict(config_type=type(config).__name__, peft_type=config.peft_type.value, trained=trained,
                    loaded=logits(loaded, **tiny_model("llama")[1]), training=loaded.training,
                    trainable=sum(p.requires_grad for p in loaded.parameters()))

    seen = both(run)
    assert_same(seen)
    torch.testing.assert_close(seen["peft"]["loaded"], seen["peft"]["trained"])


@pytest.mark.parametrize("how", ["task_type", "no_task_type", "classifier_and_pooler"])
def test_troubleshooting_randomly_initialized_head(tmp_path, how):
    """The classification head is randomly initialised: with task_type=SEQ_CLS PEFT puts it in modules_to_save, so
    it is saved and the reload (into a base with a different random head) reproduces the outputs; without, it does
    not. The DeBERTa tip: modules_to_save=["classifier", "pooler"]. (A tiny BERT classifier stands in.)"""
    config_kwargs = {"task_type": dict(task_type="SEQ_CLS"), "no_task_type": {},
                     "classifier_and_pooler": dict(modules_to_save=["classifier", "pooler"])}[how]

    def fresh_base(head_seed):
        """The same "pretrained" body each time; the classifier head initialised at random (seeded)."""
        torch.manual_seed(0)
        model = tf.BertForSequenceClassification(tf.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                                               num_attention_heads=2, intermediate_size=32)).eval()
        torch.manual_seed(head_seed)
        model.classifier.reset_parameters()
        return model

    def run(lib):
        model = lib.get_peft_model(fresh_base(0), lib.LoraConfig(**config_kwargs))
        perturb_by_name(model)
        model.eval()
        trained = logits(model, **BERT_IDS)
        model.save_pretrained(tmp_path / lib.__name__)
        loaded = lib.PeftModel.from_pretrained(fresh_base(1), tmp_path / lib.__name__)
        return dict(modules_to_save=sorted(model.peft_config["default"].modules_to_save or []),
                    keys=sorted(folder(tmp_path / lib.__name__)["adapter_model.safetensors"]),
                    reproduced=torch.allclose(logits(loaded, **BERT_IDS), trained))

    seen = both(run)
    assert_same(seen)
    assert seen["peft"]["reproduced"] == (how != "no_task_type")


@pytest.mark.xfail(strict=True, raises=ConfigError,
                   reason="peftcore's LoraConfig rejects trainable_token_indices (trainable tokens are "
                   "unsupported)")
def test_troubleshooting_extend_vocabulary_trainable_tokens(tmp_path):
    """Extending the vocabulary with trainable tokens: add tokens, resize_token_embeddings,
    LoraConfig(trainable_token_indices={"embed_tokens": [new ids]}); save_pretrained(..., save_embedding_layers=False)
    stores only the token deltas. (Mistral + tokenizer -> tiny Llama; new ids 64, 65.)"""

    def run(lib):
        base = llama()
        base.resize_token_embeddings(66)
        model = lib.get_peft_model(base, lib.LoraConfig(target_modules=["q_proj", "v_proj"],
                                                        trainable_token_indices={"embed_tokens": [64, 65]}))
        perturb_by_name(model)
        model.save_pretrained(tmp_path / lib.__name__, save_embedding_layers=False)
        return folder(tmp_path / lib.__name__)

    assert_same(both(run))


@pytest.mark.parametrize("how", ["target_embeddings", "save_embedding_layers", "modules_to_save"])
def test_troubleshooting_extend_vocabulary(tmp_path, how):
    """Extending the vocabulary: resize the embeddings, then (a) LoRA on embed_tokens + lm_head (the embedding layers
    are saved automatically), (b) save_pretrained(..., save_embedding_layers=True), or (c) full fine-tuning with
    modules_to_save=["embed_tokens", "lm_head"]. For inference, resize the base the same way and load.
    (Mistral-7B -> tiny Llama, vocabulary 64 -> 66.)"""
    targets = {"target_embeddings": dict(target_modules=["embed_tokens", "lm_head", "q_proj", "v_proj"]),
               "save_embedding_layers": dict(target_modules=["q_proj", "v_proj"]),
               "modules_to_save": dict(target_modules=["q_proj", "v_proj"],
                                       modules_to_save=["embed_tokens", "lm_head"])}[how]
    ids = torch.tensor([[3, 64, 65, 7, 9]])

    def run(lib):
        base = llama()
        base.resize_token_embeddings(66)
        model = lib.get_peft_model(base, lib.LoraConfig(**targets))
        perturb_by_name(model)
        model.eval()
        trained = logits(model, input_ids=ids)
        save = dict(save_embedding_layers=True) if how == "save_embedding_layers" else {}
        model.save_pretrained(tmp_path / lib.__name__, **save)
        fresh = llama()
        fresh.resize_token_embeddings(66)
        loaded = lib.PeftModel.from_pretrained(fresh, tmp_path / lib.__name__)
        disk = folder(tmp_path / lib.__name__)
        return dict(keys={k: tuple(v.shape) for k, v in disk["adapter_model.safetensors"].items()},
                    trained=trained, loaded=logits(loaded, input_ids=ids))

    seen = both(run)
    assert_same(seen)
    if how != "save_embedding_layers":
        torch.testing.assert_close(seen["peft"]["loaded"], seen["peft"]["trained"])


def test_troubleshooting_layer_and_model_status():
    """get_layer_status() / get_model_status() on LoraConfig() over AutoModel(T5): per-layer and model-wide
    name, module_type, enabled, active/merged/available adapters, requires_grad, devices, parameter counts.
    (google/flan-t5-small -> a tiny T5Model.)"""

    def run(lib):
        torch.manual_seed(0)
        base = tf.T5Model(tf.T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=2, num_heads=2, d_kv=8,
                                      decoder_start_token_id=0))
        model = lib.get_peft_model(base, lib.LoraConfig())
        return dict(layers=[asdict(s) for s in model.get_layer_status()], model=asdict(model.get_model_status()))

    seen = both(run)
    assert_same(seen)
    assert seen["peft"]["model"]["base_model_type"] == "T5Model"


def test_troubleshooting_irregular_status():
    """"irregular" entries: an adapter merged on some target modules but not others shows merged_adapters
    "irregular" in get_model_status. (A tiny Llama; one layer merged by hand.)"""

    def run(lib):
        model = lib.get_peft_model(llama(), lib.LoraConfig(task_type="CAUSAL_LM"))
        model.add_adapter("other", lib.LoraConfig(task_type="CAUSAL_LM"))
        model.get_base_model().model.layers[0].self_attn.q_proj.merge(adapter_names=["default"])
        status = asdict(model.get_model_status())
        return {k: status[k] for k in ("merged_adapters", "active_adapters", "enabled", "available_adapters",
                                       "requires_grad")}

    seen = both(run)
    assert_same(seen)
    assert seen["peft"]["merged_adapters"] == "irregular"


def test_troubleshooting_low_cpu_mem_usage_loading(tmp_path):
    """Faster loading: low_cpu_mem_usage=True to PeftModel.from_pretrained and load_adapter; same outputs."""

    def run(lib):
        first, second = _two_adapters(lib, tmp_path)
        model = lib.PeftModel.from_pretrained(tiny_generation_model("llama"), first, low_cpu_mem_usage=True).eval()
        model.load_adapter(second, adapter_name="second", low_cpu_mem_usage=True)
        out_first = logits(model, **GEN_IDS)
        model.set_adapter("second")
        devices = sorted({str(p.device) for p in model.parameters()})
        return dict(first=out_first, second=logits(model, **GEN_IDS), devices=devices)

    assert_same(both(run))


def test_troubleshooting_batch_norm_modules_to_save(tmp_path):
    """Batch norm running stats are not in the checkpoint unless the batch norm layers are in modules_to_save:
    LoraConfig(target_modules=["convolution"], modules_to_save=["classifier", "normalization"]) reproduces the
    trained outputs exactly after reloading. (microsoft/resnet-18 -> a tiny ResNetForImageClassification.)"""
    pixels = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))

    def base():
        torch.manual_seed(0)
        return tf.ResNetForImageClassification(tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                               layer_type="basic", num_labels=3))

    def run(lib):
        model = lib.get_peft_model(base(), lib.LoraConfig(target_modules=["convolution"],
                                                          modules_to_save=["classifier", "normalization"]))
        perturb_by_name(model, scale=0.1)  # same start (initialisation: test_lora_initialization)
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for _ in range(2):
            model(pixel_values=pixels, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        trained = logits(model, pixel_values=pixels)
        model.save_pretrained(tmp_path / lib.__name__)
        loaded = lib.PeftModel.from_pretrained(base().eval(), tmp_path / lib.__name__).eval()
        disk = folder(tmp_path / lib.__name__)
        return dict(trained=trained, loaded=logits(loaded, pixel_values=pixels),
                    keys=sorted(disk["adapter_model.safetensors"]))

    seen = both(run)
    assert_same(seen)
    torch.testing.assert_close(seen["peft"]["loaded"], seen["peft"]["trained"])
    assert any("running_mean" in k for k in seen["peft"]["keys"])


def test_troubleshooting_config_from_newer_version(tmp_path):
    """Version mismatch: an adapter_config.json with a keyword this version does not know ("foobar"); then the
    documented workaround, deleting that entry from the file and loading again. (A tiny Llama stands in.)"""

    def run(lib):
        model = lib.get_peft_model(llama(), lib.LoraConfig(task_type="CAUSAL_LM"))
        perturb_by_name(model)
        where = tmp_path / lib.__name__
        model.save_pretrained(where)
        config = json.loads((where / "adapter_config.json").read_text())
        (where / "adapter_config.json").write_text(json.dumps(config | {"foobar": 1}))
        loaded, caught = peft_warnings(lambda: error_of(lambda: lib.PeftModel.from_pretrained(llama(), where)))
        (where / "adapter_config.json").write_text(json.dumps(config))
        fixed = lib.PeftModel.from_pretrained(llama(), where)
        # the page shows an old PEFT's TypeError; PEFT 0.21 ignores the key with a warning naming it
        return dict(first_try=loaded, warned=any("foobar" in w for w in caught),
                    fixed=logits(fixed, **tiny_model("llama")[1]))

    assert_same(both(run))
