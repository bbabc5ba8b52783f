"""Property-based fuzzing (hypothesis): generated configs, mutated adapter_config.json and safetensors files.

The properties: a config is refused with a ``ConfigError`` naming one of the fields it
was given, or built with exactly the values given (Python and file agree); a mutated
adapter folder loaded with ``PeftModel.from_pretrained`` fails with an
``AdapterFileError`` naming the file, or loads a model whose adapter holds exactly the
file's tensors under exactly the file's settings (anything the file lacks is warned
about). Never another exception, never a silently different model.

CI runs the fixed, derandomized "ci" profile (tests/conftest.py); ``tox -e fuzz`` the
"long" one (HYPOTHESIS_PROFILE=long).
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import pytest
import safetensors.torch
import torch
from hypothesis import assume, event, given
from hypothesis import strategies as st
from torch import nn

from peftcore import AdapterFileError, LoraConfig, PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peftcore.config import json_ready
from peftcore.plugins import methods
from peftcore.validation import ConfigError

REQUIRED = {"ADALORA": {"total_step": 50}, "PROMPT_TUNING": {"num_virtual_tokens": 3},
            "PREFIX_TUNING": {"num_virtual_tokens": 3}, "P_TUNING": {"num_virtual_tokens": 3}}
AUTOMATIC = ("peft_type", "peft_version")  # set by the class (peft_version: this release's, when None)

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.floats(-5, 5, allow_nan=False),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.5, 1.0]),
    st.sampled_from(["false", "true", "none", "all", "lora_only", "q_proj", "gaussian", "TEXT", "MLP", "zero", "",
                     "SEQ_CLS", "(", ".*"]),
    st.text(max_size=6),
)
json_values = st.one_of(
    json_scalars,
    st.lists(st.one_of(st.integers(-1, 5), st.sampled_from(["q_proj", "0", "2", "a.lora_E"])), max_size=3),
    st.dictionaries(st.sampled_from(["q_proj", "0", "a.lora_E", "["]),
                    st.one_of(st.integers(-1, 5), st.floats(-2, 2), st.text(max_size=3), st.lists(st.booleans())),
                    max_size=2),
)


def _fields(peft_type: str) -> list[str]:
    """The fields a config file may hold: runtime-only fields (``metadata={"runtime": True}``) are never read from
    or written to a file, so a file cannot round-trip them."""
    cls = methods()[peft_type].config_class
    return [f.name for f in dataclasses.fields(cls)
            if f.init and f.name not in AUTOMATIC and not f.metadata.get("runtime")]


def _same(kept, given) -> bool:
    """Equal, allowing the conversions PEFT makes too: target lists become sets, enums their values, and
    LoRA's rank/alpha patterns read None as {}."""
    if isinstance(given, float) and math.isnan(given):
        return False
    if kept == {} and given is None:
        return True
    return json_ready(kept) == json_ready(given) or (isinstance(kept, set) and kept == set(given))


@pytest.mark.parametrize("peft_type", sorted(REQUIRED) + ["IA3", "LORA"])
@given(data=st.data())
def test_generated_configs_are_refused_naming_a_field_or_kept_as_given(tmp_path_factory, peft_type, data):
    cls = methods()[peft_type].config_class
    chosen = data.draw(st.lists(st.sampled_from(_fields(peft_type)), min_size=1, max_size=4, unique=True))
    kwargs = {**REQUIRED.get(peft_type, {}), **{name: data.draw(json_values, label=name) for name in chosen}}
    folder = tmp_path_factory.mktemp("config")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, **kwargs}))
    try:
        made = cls(**kwargs)
    except ConfigError as exc:
        assert exc.field in str(exc)
        event("refused")
        with pytest.raises(AdapterFileError) as from_file:
            PeftConfig.from_pretrained(folder)
        assert str(from_file.value) == f"{folder / 'adapter_config.json'}: {exc}"
        return
    for name, value in kwargs.items():
        assert _same(getattr(made, name), value), (name, getattr(made, name), value)
        if isinstance(dataclasses.asdict(cls(**REQUIRED.get(peft_type, {})))[name], bool):
            assert type(getattr(made, name)) is bool
    read = PeftConfig.from_pretrained(folder)
    assert json_ready(dataclasses.asdict(read)) == json_ready(dataclasses.asdict(made))
    event("kept")


# -- mutated files through PeftModel.from_pretrained ----------------------------------------------------------


def base_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = get_peft_model(base_model(), LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_()
    folder = tmp_path_factory.mktemp("adapter") / "lora"
    model.save_pretrained(folder)
    return (folder / "adapter_config.json").read_bytes(), (folder / "adapter_model.safetensors").read_bytes()


def load_checked(folder) -> None:
    """The property for one folder: an AdapterFileError naming a file of it, or exactly the file's adapter."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = PeftModel.from_pretrained(base_model(), folder)
        except AdapterFileError as exc:
            assert str(folder) in str(exc), exc
            event("refused naming the file")
            return
    on_disk = safetensors.torch.load_file(folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    loaded = model.peft_config["default"]
    for key, value in config.items():
        if key in {f.name for f in dataclasses.fields(loaded)} and key not in ("inference_mode", *AUTOMATIC):
            assert _same(getattr(loaded, key), value), (key, getattr(loaded, key), value)
    missing = []
    for key, tensor in get_peft_model_state_dict(model).items():
        if key in on_disk:
            assert torch.equal(tensor, on_disk[key].to(tensor.dtype)), key
        else:
            missing.append(key)
    if missing:
        assert any("missing from the file" in str(w.message) for w in caught), missing
    event("loaded, partly (warned)" if missing else "loaded in full")


def _folder(tmp_path_factory, config: bytes, weights: bytes):
    folder = tmp_path_factory.mktemp("mutated")
    (folder / "adapter_config.json").write_bytes(config)
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


byte_edits = st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=6)


@given(edits=byte_edits, header_bias=st.booleans(), cut=st.one_of(st.none(), st.floats(0, 1)))
def test_mutated_safetensors_load_correctly_or_fail_naming_the_file(tmp_path_factory, saved, edits, header_bias,
                                                                   cut):
    config, weights = saved
    data = bytearray(weights)
    header_end = 8 + int.from_bytes(weights[:8], "little")
    for where, value in edits:  # half the examples hit the JSON header, where most of the structure is
        data[int(where * ((header_end if header_bias else len(data)) - 1))] = value
    if cut is not None:
        data = data[: int(cut * len(data))]
    assume(bytes(data) != weights)
    load_checked(_folder(tmp_path_factory, config, bytes(data)))


@given(data=st.data())
def test_mutated_header_fields_load_correctly_or_fail_naming_the_file(tmp_path_factory, saved, data):
    """Edits that keep the header valid JSON: dtypes, shapes and offsets changed, keys renamed or dropped."""
    config, weights = saved
    size = int.from_bytes(weights[:8], "little")
    header = json.loads(weights[8:8 + size])
    key = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    edit = data.draw(st.sampled_from(["dtype", "shape", "offsets", "rename", "drop"]))
    if edit == "dtype":
        header[key]["dtype"] = data.draw(st.sampled_from(["I32", "BOOL", "F16", "F64", "I64", "U8", "BF16", "X"]))
    elif edit == "shape":
        header[key]["shape"] = data.draw(st.lists(st.integers(0, 13), max_size=3))
    elif edit == "offsets":
        header[key]["data_offsets"] = data.draw(st.lists(st.integers(0, 400), min_size=2, max_size=2))
    elif edit == "rename":
        header[key.replace("lora_A", "lora_X").replace("lora_B", "lora_Y") + "x"] = header.pop(key)
    else:
        del header[key]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    body = weights[8 + size:]
    load_checked(_folder(tmp_path_factory, config, len(text).to_bytes(8, "little") + text + body))


@given(data=st.data())
def test_mutated_configs_load_correctly_or_fail_naming_the_file(tmp_path_factory, saved, data):
    config, weights = saved
    parsed = json.loads(config)
    edit = data.draw(st.sampled_from(["value", "drop", "bytes"]))
    if edit == "value":
        parsed[data.draw(st.sampled_from(sorted(parsed)))] = data.draw(json_values)
        text = json.dumps(parsed).encode()
    elif edit == "drop":
        del parsed[data.draw(st.sampled_from(sorted(parsed)))]
        text = json.dumps(parsed).encode()
    else:
        raw = bytearray(config)
        for where, value in data.draw(byte_edits):
            raw[int(where * (len(raw) - 1))] = value
        text = bytes(raw)
    assume(text != config)
    load_checked(_folder(tmp_path_factory, text, weights))
