"""Every config field of every installed method is checked when the config is made and when it is read from a file.

The two paths are one: a bad value gives the same message from Python and from
``adapter_config.json``, where the file's path comes first.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import pytest
import torch

from peftcore import AdapterFileError, PeftConfig, PeftModel
from peftcore.plugins import methods
from peftcore.testing import tiny_model
from peftcore.validation import ConfigError

# The fewest fields each method needs to build at all.
REQUIRED = {
    "ADALORA": {"total_step": 100},
    "PROMPT_TUNING": {"num_virtual_tokens": 4},
    "PREFIX_TUNING": {"num_virtual_tokens": 4},
    "P_TUNING": {"num_virtual_tokens": 4},
}
NOT_VALUES = ("peft_type",)  # set by the class itself


def config_classes():
    return sorted(((m.peft_type, m.config_class) for m in methods().values()), key=lambda pair: pair[0])


def _defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def fields_with_default_of(kind):
    """(peft_type, class, field) for every field whose default is of ``kind`` (bool: booleans, else numbers)."""
    found = []
    for peft_type, cls in config_classes():
        for name, default in _defaults(cls).items():
            is_bool = isinstance(default, bool)
            if name in NOT_VALUES or (kind is bool) != is_bool:
                continue
            if kind is bool or isinstance(default, (int, float)):
                found.append(pytest.param(peft_type, cls, name, id=f"{peft_type}.{name}"))
    return found


def _write(folder, data: dict):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(data))
    return path


def refused_both_ways(tmp_path, peft_type, cls, field: str, value) -> None:
    """``cls(**{field: value})`` raises ConfigError naming field and value; the same file names the file too."""
    kwargs = {**REQUIRED.get(peft_type, {}), field: value}
    with pytest.raises(ConfigError) as made:
        cls(**kwargs)
    message = str(made.value)
    assert made.value.field == field and field in message and repr(value) in message, message
    path = _write(tmp_path / "adapter", {"peft_type": peft_type, **kwargs})
    with pytest.raises(AdapterFileError) as read:
        PeftConfig.from_pretrained(tmp_path / "adapter")
    assert str(read.value) == f"{path}: {message}"  # one validation path: the file adds only its name


@pytest.mark.parametrize(("peft_type", "cls", "field"), fields_with_default_of(bool))
@pytest.mark.parametrize("value", ["false", "true", 0, 1, None, "no"])
def test_boolean_fields_take_only_booleans(tmp_path, peft_type, cls, field, value):
    refused_both_ways(tmp_path, peft_type, cls, field, value)


@pytest.mark.parametrize(("peft_type", "cls", "field"), fields_with_default_of(int))
@pytest.mark.parametrize("value", ["8", True, math.nan, math.inf, -math.inf, [3], {"a": 1}])
def test_numeric_fields_refuse_strings_booleans_and_non_finite_numbers(tmp_path, peft_type, cls, field, value):
    refused_both_ways(tmp_path, peft_type, cls, field, value)


# The cases an adversarial run found accepted (and failing later inside torch, or never).
FOUND_ACCEPTED = [
    ("LORA", "lora_alpha", "16"),
    ("LORA", "lora_alpha", None),
    ("LORA", "lora_alpha", math.nan),
    ("LORA", "lora_alpha", math.inf),
    ("LORA", "lora_dropout", "0.1"),
    ("LORA", "lora_dropout", 1.0),
    ("LORA", "target_modules", 5),
    ("LORA", "target_modules", ["q_proj", 3]),
    ("LORA", "layers_to_transform", "0"),
    ("LORA", "layers_to_transform", [-1]),
    ("LORA", "rank_pattern", [1]),
    ("LORA", "rank_pattern", {"q_proj": "4"}),
    ("LORA", "rank_pattern", {"q_proj": 0}),
    ("LORA", "alpha_pattern", ["q_proj"]),
    ("LORA", "alpha_pattern", {"q_proj": "x"}),
    ("LORA", "alpha_pattern", {"q_proj": math.nan}),
    ("LORA", "use_dora", "false"),
    ("LORA", "init_lora_weights", "false"),
    ("LORA", "modules_to_save", "classifier"),  # a bare string would be iterated letter by letter
    ("LORA", "exclude_modules", 3),
    ("ADALORA", "init_r", 0),
    ("ADALORA", "target_r", 0),
    ("ADALORA", "beta1", 1.5),
    ("ADALORA", "deltaT", 0),
    ("ADALORA", "rank_pattern", {"a.lora_E": [1, 0]}),
    ("IA3", "feedforward_modules", 5),
    ("IA3", "init_ia3_weights", "true"),
    ("PROMPT_TUNING", "num_virtual_tokens", "4"),
    ("PROMPT_TUNING", "num_virtual_tokens", 0),
    ("PREFIX_TUNING", "encoder_hidden_size", -2),
    ("P_TUNING", "encoder_dropout", math.nan),
    ("P_TUNING", "num_transformer_submodules", 3),
]


@pytest.mark.parametrize(("peft_type", "field", "value"), FOUND_ACCEPTED, ids=lambda v: repr(v)[:30])
def test_values_found_accepted_before_are_refused(tmp_path, peft_type, field, value):
    refused_both_ways(tmp_path, peft_type, methods()[peft_type].config_class, field, value)


def test_checks_that_relate_fields_go_the_same_way(tmp_path):
    adalora = methods()["ADALORA"].config_class
    with pytest.raises(ConfigError, match="target_r=13 exceeds init_r=12"):
        adalora(total_step=10, target_r=13)
    _write(tmp_path / "a", {"peft_type": "ADALORA", "total_step": 10, "target_r": 13})
    with pytest.raises(AdapterFileError, match=r"adapter_config.json: AdaLoraConfig: target_r=13 exceeds init_r=12"):
        PeftConfig.from_pretrained(tmp_path / "a")


@pytest.mark.parametrize(("field", "pattern"), [("target_modules", "q_proj("), ("rank_pattern", {"[": 2}),
                                                 ("exclude_modules", "*x")])
def test_regular_expressions_must_compile(field, pattern):
    lora = methods()["LORA"].config_class
    with pytest.raises(ConfigError, match=f"{field}=.* is not a valid regular expression"):
        lora(**{field: pattern})


def test_good_values_are_kept_as_given():
    lora = methods()["LORA"].config_class
    config = lora(r=4, lora_alpha=0.5, lora_dropout=0.25, target_modules=("q_proj", "v_proj"), use_dora=True,
                  rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3.5}, layers_to_transform=[0, 1],
                  init_lora_weights="gaussian")
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_dora) == (4, 0.5, 0.25, True)
    assert config.target_modules == {"q_proj", "v_proj"} and config.rank_pattern == {"q_proj": 2}
    assert config.alpha_pattern == {"v_proj": 3.5} and config.init_lora_weights == "gaussian"


def test_a_nan_alpha_can_no_longer_reach_a_model():
    """The fast path used to compute such an adapter with scale 1.0, the plain path with NaN (see test_fast_*)."""
    lora = methods()["LORA"].config_class
    with pytest.raises(ConfigError, match="lora_alpha must be a finite number, got nan"):
        lora(lora_alpha=float("nan"))


# -- reading adapter_config.json: every failure is one error naming the file -----------------------------------


@pytest.mark.parametrize(("content", "problem"), [
    (b"{", "not valid JSON"),
    (b"", "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b"[1, 2]", "expected a JSON object, got list"),
    (b'"LORA"', "expected a JSON object, got str"),
    (b"null", "expected a JSON object, got NoneType"),
    (b"3", "expected a JSON object, got int"),
    (b'{"peft_type": "LORA"}\xff', "not UTF-8"),
    (b'{"peft_type": "LORA", "r": 4, "r": 8}', "keys given twice: \\['r'\\]"),
    (b'{"r": 4}', "has no 'peft_type'"),
    (b'{"peft_type": "NO_SUCH_METHOD"}', "Unknown PEFT method 'NO_SUCH_METHOD'"),
    (b'{"peft_type": 7}', "Unknown PEFT method '7'"),
    (b'{"peft_type": "LORA", "r": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b'{"peft_type": "LORA", "lora_alpha": NaN}', "lora_alpha must be a finite number, got nan"),
])
def test_every_parse_failure_names_the_file(tmp_path, content, problem):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes(content)
    (folder / "adapter_model.safetensors").write_bytes(b"")
    for load in (lambda: PeftConfig.from_pretrained(folder), lambda: PeftModel.from_pretrained(tiny_model("llama")[0],
                                                                                                  folder)):
        with pytest.raises(AdapterFileError, match=problem) as caught:
            load()
        assert str(caught.value).startswith(str(folder / "adapter_config.json") + ": ")


def test_a_config_that_is_a_folder_is_reported_as_missing(tmp_path):
    (tmp_path / "adapter" / "adapter_config.json").mkdir(parents=True)
    with pytest.raises(AdapterFileError, match="no adapter_config.json"):
        PeftConfig.from_pretrained(tmp_path / "adapter")


def test_unknown_keys_warn_naming_the_file(tmp_path):
    path = _write(tmp_path / "a", {"peft_type": "LORA", "some_future_key": 1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftConfig.from_pretrained(tmp_path / "a")
    message = [str(w.message) for w in caught if "some_future_key" in str(w.message)][0]
    assert message.startswith("Unexpected keyword arguments ['some_future_key'] for class LoraConfig, these are "
                              "ignored.") and message.endswith(f"(in {path})")


def test_get_peft_config_refuses_what_is_not_a_dict():
    from peftcore import get_peft_config

    with pytest.raises(AdapterFileError, match="a JSON object \\(dict\\), got list"):
        get_peft_config([("peft_type", "LORA")])


# -- checked against the model ------------------------------------------------------------------------------


def test_modules_to_save_must_name_a_module_except_the_tasks_usual_heads():
    from peftcore import LoraConfig, get_peft_model

    base, _ = tiny_model("bert")
    with pytest.raises(ValueError, match=r"modules_to_save names \['clasifier'\], but BertForSequenceClassification"):
        get_peft_model(base, LoraConfig(task_type="SEQ_CLS", target_modules=["query"], modules_to_save=["clasifier"]))
    assert not any("lora" in name for name, _ in base.named_modules())
    # SEQ_CLS adds PEFT's usual heads, "classifier" and "score"; BERT has only the first, which is fine
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", target_modules=["query"], modules_to_save=["pooler"]))
    assert set(model.peft_config["default"].modules_to_save) == {"pooler", "classifier", "score"}


# -- loading weights: what fits, what does not ---------------------------------------------------------------


def _saved_lora(tmp_path):
    from peftcore import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama")[0], LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "a")
    return tmp_path / "a"


def test_a_partly_matching_file_loads_with_peft_s_warning(tmp_path):
    import safetensors.torch

    folder = _saved_lora(tmp_path)
    path = folder / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(path)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    tensors["base_model.model.extra.weight"] = torch.zeros(2)
    safetensors.torch.save_file(tensors, path)
    with pytest.warns(UserWarning) as caught:
        PeftModel.from_pretrained(tiny_model("llama")[0], folder)
    messages = " ".join(str(w.message) for w in caught)
    assert f"{path}: 1 adapter tensors missing from the file" in messages and "match nothing" in messages


@pytest.mark.parametrize(("dtype", "name"), [(torch.int64, "int64"), (torch.bool, "bool"), (torch.uint8, "uint8"),
                                             (torch.complex64, "complex64")])
def test_tensors_that_cannot_be_weights_are_refused_naming_file_and_tensor(tmp_path, dtype, name):
    import safetensors.torch

    folder = _saved_lora(tmp_path)
    path = folder / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(path)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].to(dtype)
    safetensors.torch.save_file(tensors, path)
    with pytest.raises(AdapterFileError, match=rf"{path}: tensor '{key}' is {name}, but .* is float32"):
        PeftModel.from_pretrained(tiny_model("llama")[0], folder)


def test_a_file_with_none_of_the_adapter_s_tensors_is_refused(tmp_path):
    import safetensors.torch

    folder = _saved_lora(tmp_path)
    path = folder / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(path)
    safetensors.torch.save_file({k.replace("q_proj", "k").replace("v_proj", "k2"): v for k, v in tensors.items()},
                                path)
    with pytest.raises(AdapterFileError, match=rf"{path}: none of its 8 tensors belongs to the LORA adapter"):
        PeftModel.from_pretrained(tiny_model("llama")[0], folder)
