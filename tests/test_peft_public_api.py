"""PEFT's public helpers beyond the model classes, run side by side with ``peft`` on the same tiny models.

Each test builds the same model twice (same seed), applies the same config with both libraries and
compares what a user observes: returned structures, state-dict keys and values, errors.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import peft
import pytest
import torch
from torch import nn

import peftcore
from peftcore.testing import tiny_model


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1, self.head = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.lin1(torch.relu(self.lin0(x))))


def both(build, config_of):
    """{library: model} for ``build()`` made with the same seed and wrapped by each library."""
    out = {}
    for lib in (peftcore, peft):
        torch.manual_seed(0)
        out[lib] = lib.get_peft_model(build(), config_of(lib))
    return out


def lora_mlp(lib, **kw):
    return lib.LoraConfig(target_modules=["lin0", "lin1"], modules_to_save=["head"], **kw)


# -- names -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification", "AutoPeftModelForQuestionAnswering", "AutoPeftModelForFeatureExtraction",
    "LoraModel", "IA3Model", "AdaLoraModel", "LoraRuntimeConfig", "PromptLearningConfig", "PeftError",
    "PeftWarning", "NoMatchingPeftModuleError", "PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING", "inject_adapter_in_model", "get_layer_status", "get_model_status",
    "get_base_model_state_dict", "set_base_model_state_dict", "cast_mixed_precision_params",
])
def test_peft_names_are_importable_from_peftcore(name):
    assert hasattr(peft, name)
    assert getattr(peftcore, name) is not None
    exec(f"from peftcore import {name}", {})


def test_mapping_tables_agree_with_peft_for_the_installed_methods():
    for peft_type, config_class in peftcore.PEFT_TYPE_TO_CONFIG_MAPPING.items():
        if peft_type in peft.PEFT_TYPE_TO_CONFIG_MAPPING:
            assert config_class.__name__ == peft.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type].__name__
    assert {"LORA", "IA3", "ADALORA", "PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING"} <= set(
        peftcore.PEFT_TYPE_TO_CONFIG_MAPPING)
    for peft_type in ("LORA", "IA3", "ADALORA"):
        ours, theirs = peftcore.PEFT_TYPE_TO_TUNER_MAPPING[peft_type], peft.PEFT_TYPE_TO_TUNER_MAPPING[peft_type]
        assert ours.__name__ == theirs.__name__
    assert "PROMPT_TUNING" not in peftcore.PEFT_TYPE_TO_TUNER_MAPPING  # prompt methods edit inputs, not layers
    for task, cls in peft.MODEL_TYPE_TO_PEFT_MODEL_MAPPING.items():
        assert peftcore.MODEL_TYPE_TO_PEFT_MODEL_MAPPING[task].__name__ == cls.__name__
    with pytest.raises(KeyError, match="LOHA.*installed"):
        peftcore.PEFT_TYPE_TO_CONFIG_MAPPING["LOHA"]


def test_mapping_tables_follow_plugins_registered_later():
    from peftcore import Method, hookimpl

    @dataclasses.dataclass
    class ToyConfig(peftcore.LayerConfig):
        def __post_init__(self):
            self.peft_type = "TOY"
            super().__post_init__()

    class Toy:
        @staticmethod
        @hookimpl
        def register_methods(register):
            register(Method(peft_type="TOY", config_class=ToyConfig, tensor_prefixes=("toy_",)))

    peftcore.register_plugin(Toy, name="toy-for-mapping")
    try:
        assert peftcore.PEFT_TYPE_TO_CONFIG_MAPPING["TOY"] is ToyConfig
        assert peftcore.PEFT_TYPE_TO_TUNER_MAPPING["TOY"] is peftcore.LayerTuner
    finally:
        peftcore.unregister_plugin(name="toy-for-mapping")
    assert "TOY" not in peftcore.PEFT_TYPE_TO_CONFIG_MAPPING


def test_tuner_classes_are_the_base_model_and_have_peft_prefix():
    models = both(MLP, lora_mlp)
    for lib, model in models.items():
        assert isinstance(model.base_model, lib.LoraModel)
        assert model.base_model.prefix == "lora_"
    ia3 = peftcore.get_peft_model(MLP(), peftcore.IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    assert isinstance(ia3.base_model, peftcore.IA3Model) and ia3.base_model.prefix == "ia3_"


def test_tuner_class_called_directly_injects_in_place():
    for lib in (peftcore, peft):
        torch.manual_seed(0)
        mlp = MLP()
        tuner = lib.LoraModel(mlp, lib.LoraConfig(target_modules=["lin0"]), "default")
        assert tuner.model is mlp and type(mlp.lin0).__name__ == "Linear" and hasattr(mlp.lin0, "lora_A")


# -- errors ----------------------------------------------------------------------------------------------------


def test_no_matching_module_error_is_a_value_error_and_a_peft_error():
    for lib in (peftcore, peft):
        with pytest.raises(lib.NoMatchingPeftModuleError) as info:
            lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["nope"]))
        assert isinstance(info.value, ValueError) and isinstance(info.value, lib.PeftError)
    assert issubclass(peftcore.PeftWarning, UserWarning)
    assert issubclass(peftcore.AdapterFileError, peftcore.PeftError)  # every deliberate peftcore error is one


# -- status ----------------------------------------------------------------------------------------------------


def _as_dicts(statuses):
    return [dataclasses.asdict(s) for s in statuses]


@pytest.mark.parametrize("state", ["fresh", "merged", "disabled", "two_adapters"])
def test_layer_and_model_status_equal_peft(state):
    models = both(MLP, lora_mlp)
    for lib, model in models.items():
        if state == "merged":
            model.merge_adapter()
        elif state == "disabled":
            model.base_model.disable_adapter_layers()
        elif state == "two_adapters":
            model.add_adapter("other", lib.LoraConfig(target_modules=["lin1"]))
    ours, theirs = models[peftcore], models[peft]
    assert _as_dicts(peftcore.get_layer_status(ours)) == _as_dicts(peft.get_layer_status(theirs))
    assert dataclasses.asdict(ours.get_model_status()) == dataclasses.asdict(theirs.get_model_status())


def test_model_status_reports_irregular_layers_like_peft():
    models = both(MLP, lora_mlp)
    for model in models.values():
        model.base_model.model.lin0.merge()  # one layer merged by hand, the other not
    ours, theirs = (peftcore.get_model_status(models[peftcore]), peft.get_model_status(models[peft]))
    assert ours.merged_adapters == theirs.merged_adapters == "irregular"


def test_status_of_a_plain_model_with_injected_layers_and_errors():
    for lib in (peftcore, peft):
        torch.manual_seed(0)
        mlp = lib.inject_adapter_in_model(lib.LoraConfig(target_modules=["lin0"]), MLP())
        status = lib.get_model_status(mlp)
        assert (status.base_model_type, status.adapter_model_type, status.num_adapter_layers) == ("other", "None", 1)
        with pytest.raises(ValueError, match="adapter layers"):
            lib.get_layer_status(MLP())
    prompt = peftcore.get_peft_model(tiny_model("llama")[0], peftcore.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(TypeError, match="prompt-learning"):
        peftcore.get_layer_status(prompt)


# -- base state dict -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_base_model_state_dict_has_the_original_keys_and_values(arch):
    torch.manual_seed(0)
    original = {k: v.clone() for k, v in tiny_model(arch)[0].state_dict().items()}
    for lib in (peftcore, peft):
        model = lib.get_peft_model(tiny_model(arch)[0], lib.LoraConfig(target_modules="all-linear", use_dora=True))
        base = lib.get_base_model_state_dict(model)
        assert sorted(base) == sorted(original)
        assert all(torch.equal(base[k], original[k]) for k in original)


def test_set_base_model_state_dict_loads_base_weights_only_and_checks_keys():
    models = both(MLP, lora_mlp)
    torch.manual_seed(5)
    new_base = MLP().state_dict()
    for lib, model in models.items():
        adapter_before = {k: v.clone() for k, v in lib.get_peft_model_state_dict(model).items()}
        result = lib.set_base_model_state_dict(model, new_base)
        assert (list(result.missing_keys), list(result.unexpected_keys)) == ([], [])
        assert all(torch.equal(lib.get_base_model_state_dict(model)[k], v) for k, v in new_base.items())
        assert all(torch.equal(lib.get_peft_model_state_dict(model)[k], v) for k, v in adapter_before.items())
        partial = {k: v for k, v in new_base.items() if k != "lin0.bias"} | {"extra.weight": torch.zeros(1)}
        with pytest.raises(RuntimeError, match=r"Missing key.*lin0\.bias(.|\n)*Unexpected key.*extra\.weight"):
            lib.set_base_model_state_dict(model, partial)
        loose = lib.set_base_model_state_dict(model, partial, strict=False)
        assert (list(loose.missing_keys), list(loose.unexpected_keys)) == (["lin0.bias"], ["extra.weight"])


# -- inject_adapter_in_model -----------------------------------------------------------------------------------


def test_inject_adapter_in_model_returns_the_same_model_with_equal_outputs():
    outputs = {}
    for lib in (peftcore, peft):
        torch.manual_seed(0)
        mlp = MLP()
        torch.manual_seed(1)
        returned = lib.inject_adapter_in_model(lib.LoraConfig(target_modules=["lin0", "lin1"],
                                                              init_lora_weights=False), mlp)
        assert returned is mlp
        assert sorted(n for n, p in mlp.named_parameters() if p.requires_grad) == [
            "lin0.lora_A.default.weight", "lin0.lora_B.default.weight",
            "lin1.lora_A.default.weight", "lin1.lora_B.default.weight"]
        outputs[lib] = mlp(torch.ones(3, 8))
    # init_lora_weights=False draws B at random; the draws differ between libraries, so compare shapes and that
    # the adapter changes the output (B != 0) in both
    assert outputs[peftcore].shape == outputs[peft].shape


def test_inject_adapter_in_model_from_state_dict_keys():
    for lib in (peftcore, peft):
        source = lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin1"]))
        state = lib.get_peft_model_state_dict(source)
        state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mlp = lib.inject_adapter_in_model(lib.LoraConfig(target_modules=["lin0"]), MLP(), state_dict=state)
        assert hasattr(mlp.lin1, "lora_A") and not hasattr(mlp.lin0, "lora_A")
        assert any("lin0" in str(w.message) and "lin1" in str(w.message) for w in caught)


def test_low_level_state_dict_round_trip_on_an_injected_model_equals_peft():
    """PEFT's low-level API: inject, then get/set_peft_model_state_dict on the model itself (no PeftModel)."""
    keys, outputs = {}, {}
    for lib in (peftcore, peft):
        torch.manual_seed(0)
        config = lib.LoraConfig(target_modules=["lin0"], modules_to_save=["head"], init_lora_weights=False)
        source = lib.inject_adapter_in_model(config, MLP())
        state = lib.get_peft_model_state_dict(source)
        keys[lib] = sorted(state)
        torch.manual_seed(0)
        target = lib.inject_adapter_in_model(config, MLP(), low_cpu_mem_usage=True)
        assert "meta" in {p.device.type for p in target.parameters()}  # PEFT's test of low_cpu_mem_usage
        result = lib.set_peft_model_state_dict(target, state, low_cpu_mem_usage=True)
        assert not [k for k in result.unexpected_keys]
        assert {p.device.type for p in target.parameters()} == {"cpu"}
        x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
        outputs[lib] = sorted(n for n, p in target.named_parameters() if p.requires_grad)
    assert keys[peftcore] == keys[peft] == ["head.bias", "head.weight", "lin0.lora_A.weight", "lin0.lora_B.weight"]
    assert outputs[peftcore] == outputs[peft]


def test_targeted_module_names_like_peft():
    models = both(MLP, lambda lib: lib.LoraConfig(target_modules=["lin0", "head"]))
    assert models[peftcore].base_model.targeted_module_names == models[peft].base_model.targeted_module_names
    assert models[peftcore].base_model.targeted_module_names == ["lin0", "head"]
    with pytest.raises(ValueError):
        models[peftcore].add_adapter("bad", peftcore.LoraConfig(target_modules=["lin0"], r=0))
    with pytest.raises(ValueError):  # nothing matched: the failed adapter leaves no names behind
        models[peftcore].add_adapter("none", peftcore.LoraConfig(target_modules=["nothing"]))
    assert models[peftcore].base_model.targeted_module_names == ["lin0", "head"]


def test_deleting_a_merged_adapter_is_refused_with_peft_s_wording():
    for lib, model in both(MLP, lora_mlp).items():
        model.merge_adapter()
        with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['default'\] while they are merged"):
            model.delete_adapter("default")


def test_inject_adapter_in_model_refuses_prompt_learning():
    for lib in (peftcore, peft):
        with pytest.raises(ValueError, match="prompt"):
            lib.inject_adapter_in_model(lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
                                        tiny_model("llama")[0])


# -- mixed precision ------------------------------------------------------------------------------------------


def test_cast_mixed_precision_params_like_peft():
    models = both(MLP, lora_mlp)
    dtypes = {}
    for lib, model in models.items():
        lib.cast_mixed_precision_params(model, torch.bfloat16)
        dtypes[lib] = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes[peftcore] == dtypes[peft]
    assert {d for n, d in dtypes[peftcore].items() if "lora_" in n} == {torch.float32}
    assert dtypes[peftcore]["base_model.model.lin0.base_layer.weight"] == torch.bfloat16
    with pytest.raises(TypeError, match="floating torch.dtype"):
        peftcore.cast_mixed_precision_params(models[peftcore], "bf16")


# -- runtime config ---------------------------------------------------------------------------------------------


def test_lora_runtime_config_is_accepted_and_never_saved(tmp_path):
    config = peftcore.LoraConfig(target_modules=["lin0"], runtime_config=peftcore.LoraRuntimeConfig(True))
    model = peftcore.get_peft_model(MLP(), config)
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "runtime_config" not in written
    assert peftcore.LoraConfig.from_pretrained(tmp_path).runtime_config == peftcore.LoraRuntimeConfig()
    with pytest.raises(ValueError, match="ephemeral_gpu_offload"):
        peftcore.LoraRuntimeConfig(ephemeral_gpu_offload="yes")


def test_a_runtime_config_in_a_file_is_ignored_with_peft_s_warning(tmp_path):
    for lib in (peftcore, peft):
        lib.LoraConfig(target_modules=["lin0"]).save_pretrained(tmp_path / lib.__name__)
        path = tmp_path / lib.__name__ / "adapter_config.json"
        written = json.loads(path.read_text())
        assert written["inference_mode"] is False  # PeftConfig.save_pretrained writes the config as it is
        path.write_text(json.dumps({**written, "runtime_config": {"ephemeral_gpu_offload": True}}))
        with pytest.warns(UserWarning, match="contains a `runtime_config` key. This is ignored"):
            read = lib.LoraConfig.from_pretrained(tmp_path / lib.__name__)
        assert read.runtime_config.ephemeral_gpu_offload is False


# -- AutoPeftModel ----------------------------------------------------------------------------------------------


@pytest.fixture
def saved_llama(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_model("llama")[0].save_pretrained(tmp_path / "base")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path  # name_or_path is the folder


def test_auto_peft_model_for_causal_lm_loads_base_and_adapter(saved_llama):
    base, tmp = saved_llama
    ids = torch.tensor([[3, 5, 7, 9]])
    torch.manual_seed(2)
    config = peftcore.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], init_lora_weights=False)
    model = peftcore.get_peft_model(base, config)
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp / "adapter")
    written = json.loads((tmp / "adapter" / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == str(tmp / "base")
    for lib in (peftcore, peft):
        loaded = lib.AutoPeftModelForCausalLM.from_pretrained(tmp / "adapter")
        assert type(loaded).__name__ == "PeftModelForCausalLM"
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
    with pytest.raises(ValueError, match="AutoPeftModelForCausalLM"):
        peftcore.AutoPeftModel.from_pretrained(tmp / "adapter")
    with pytest.raises(ValueError, match="PeftModelForCausalLM"):
        peftcore.AutoPeftModelForSequenceClassification.from_pretrained(tmp / "adapter")
    with pytest.raises(OSError, match="from_pretrained"):
        peftcore.AutoPeftModelForCausalLM()


def test_auto_peft_model_without_task_type_uses_auto_mapping(saved_llama):
    base, tmp = saved_llama
    model = peftcore.get_peft_model(base, peftcore.LoraConfig(target_modules=["q_proj"]))
    model.save_pretrained(tmp / "adapter")
    written = json.loads((tmp / "adapter" / "adapter_config.json").read_text())
    assert written["auto_mapping"] == {"base_model_class": "LlamaForCausalLM",
                                       "parent_library": "transformers.models.llama.modeling_llama"}
    for lib in (peftcore, peft):
        loaded = lib.AutoPeftModel.from_pretrained(tmp / "adapter")
        assert type(loaded.get_base_model()).__name__ == "LlamaForCausalLM"
    with pytest.raises(ValueError, match="import_allowlist"):
        peftcore.AutoPeftModel.from_pretrained(tmp / "adapter", import_allowlist=["diffusers"])


def test_peft_saved_adapter_without_task_type_loads_through_peftcore_auto_mapping(saved_llama):
    base, tmp = saved_llama
    peft.get_peft_model(base, peft.LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp / "from-peft")
    loaded = peftcore.AutoPeftModel.from_pretrained(tmp / "from-peft")
    assert isinstance(loaded, peftcore.PeftModel) and type(loaded.get_base_model()).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize("name", ["PromptTuningConfig", "PrefixTuningConfig", "PromptEncoderConfig"])
def test_prompt_configs_without_num_virtual_tokens_are_made_but_not_applied(name):
    for lib in (peftcore, peft):
        getattr(lib, name)(task_type="CAUSAL_LM")  # PEFT accepts the config; it may be completed later
    config = getattr(peftcore, name)(task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match=f"{name}: num_virtual_tokens is required to apply"):
        peftcore.get_peft_model(tiny_model("llama")[0], config)


# -- requires_grad and layer helpers ----------------------------------------------------------------------------


def test_set_requires_grad_on_inactive_adapters_like_peft():
    trainable = {}
    for lib, model in both(MLP, lora_mlp).items():
        model.add_adapter("other", lib.LoraConfig(target_modules=["lin0"], modules_to_save=["head"]))
        model.set_requires_grad("other")  # "other" is not active: PEFT trains it anyway
        trainable[lib] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        model.set_requires_grad(["default", "other"], requires_grad=False)
        assert not [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable[peftcore] == trainable[peft]
    assert "base_model.model.lin0.lora_A.other.weight" in trainable[peftcore]
    assert "base_model.model.head.modules_to_save.other.weight" in trainable[peftcore]
    with pytest.raises(ValueError, match="Adapter missing does not exist"):
        both(MLP, lora_mlp)[peftcore].set_requires_grad("missing")
    prompt = peftcore.get_peft_model(tiny_model("llama")[0], peftcore.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(TypeError, match="not supported for prompt learning"):
        prompt.set_requires_grad("default")


def test_get_delta_weight_is_the_merge_delta_as_in_peft():
    models = both(MLP, lambda lib: lib.LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    layer = models[peftcore].base_model.model.lin0
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    expected = B @ A * layer.scaling["default"]  # float64 reference: LoRA's delta is s * B A
    torch.testing.assert_close(layer.get_delta_weight("default").double(), expected)
    saved = peftcore.get_peft_model(MLP(), lora_mlp(peftcore)).base_model.model.head
    assert saved.active_adapters == ["default"] and saved.adapter_layer_names == ("modules_to_save",)


def test_several_active_adapters_may_share_a_model_but_not_a_modules_to_save_wrapper():
    for lib in (peftcore, peft):
        torch.manual_seed(0)
        model = lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
        model.add_adapter("other", lib.LoraConfig(target_modules=["lin0"], modules_to_save=["head"]))
        model.base_model.set_adapter(["default", "other"])  # each wrapper holds one of them: allowed
        assert model.base_model.model.lin1.active_adapters == ["default"]
        assert model.base_model.model.head.active_adapters == ["other"]
        model.add_adapter("third", lib.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
        with pytest.raises(ValueError, match="Only one adapter can be set at a time for ModulesToSaveWrapper"):
            model.base_model.set_adapter(["default", "third"])
        assert model.base_model.model.lin1.active_adapters == ["default"]  # refused before anything switched


def test_get_peft_model_with_low_cpu_mem_usage_leaves_the_adapter_on_meta_like_peft():
    for lib in (peftcore, peft):
        model = lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin0"]), low_cpu_mem_usage=True)
        devices = {n: p.device.type for n, p in model.named_parameters()}
        assert {d for n, d in devices.items() if "lora_" in n} == {"meta"}
        assert {d for n, d in devices.items() if "lora_" not in n} == {"cpu"}


def test_renaming_the_base_model_warns_with_peft_s_words():
    mlp = MLP()
    mlp.name_or_path = "org/model"
    with pytest.warns(UserWarning, match="`base_model_name_or_path` was renamed from 'mine' to 'org/model'"):
        peftcore.get_peft_model(mlp, peftcore.LoraConfig(target_modules=["lin0"], base_model_name_or_path="mine"))


def test_biases_in_a_state_dict_load_whatever_the_receiving_config_says_like_peft():
    outputs = {}
    for lib in (peftcore, peft):
        torch.manual_seed(0)
        model = lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin0"], bias="all", init_lora_weights=False))
        with torch.no_grad():
            for module in model.modules():
                if getattr(module, "bias", None) is not None:
                    module.bias.fill_(1.23)
        x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
        expected = model(x)
        state = lib.get_peft_model_state_dict(model)
        torch.manual_seed(0)
        fresh = lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin0"]))  # bias="none" here
        result = lib.set_peft_model_state_dict(fresh, state)
        assert not result.unexpected_keys
        torch.testing.assert_close(fresh(x), expected)
        outputs[lib] = sorted(state)
    assert outputs[peftcore] == outputs[peft]


def test_modules_to_save_attributes_read_the_copy_in_use_and_keyword_calls_pass_through():
    class KeywordsOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 2)

        def forward(self, *, pixel_values):
            return self.lin(pixel_values)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk, self.vision = nn.Linear(8, 8), KeywordsOnly()

        def forward(self, x):
            return self.vision(pixel_values=self.trunk(x))

    for lib in (peftcore, peft):
        model = lib.get_peft_model(Outer(), lib.LoraConfig(target_modules=["trunk"], modules_to_save=["vision"]))
        wrapper = model.base_model.model.vision
        assert wrapper.lin is wrapper.modules_to_save["default"].lin
        with model.disable_adapter():
            assert wrapper.lin is wrapper.original_module.lin
            assert model(torch.ones(2, 8)).shape == (2, 2)
        assert model(torch.ones(2, 8)).shape == (2, 2)
        with pytest.raises(AttributeError):
            wrapper.no_such_attribute
