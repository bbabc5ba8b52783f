"""The plugin contract beyond the documented example: discovery checks, layer support rules, and the hooks.

Installed-plugin cases run ``peftcore list`` in a fresh interpreter with a real
distribution (dist-info + entry point) on ``PYTHONPATH``; the others register
plugin objects in-process.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from peftcore import (
    AdapterLayer,
    LayerConfig,
    LayerSupport,
    LoraConfig,
    Method,
    PeftModel,
    get_peft_model,
    hookimpl,
    register_plugin,
    unregister_plugin,
)
from peftcore.plugins import PluginError, pick_layer_support
from peftcore.testing import tiny_model

GOOD_METHOD = '''
from dataclasses import dataclass
from peftcore import LayerConfig, Method, hookimpl

@dataclass
class {name}Config(LayerConfig):
    def __post_init__(self):
        self.peft_type = "{peft_type}"
        super().__post_init__()

@hookimpl
def register_methods(register):
    register(Method(peft_type="{peft_type}", name="{name_lower}", config_class={name}Config))
'''


def _install(root, dist_name: str, module: str, source: str) -> None:
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    dist = root / f"{dist_name.replace('-', '_')}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[peftcore]\n{module} = {module}\n")


def _listing(root) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "peftcore.cli", "list", "--json"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _broken(listing: dict) -> dict[str, str]:
    return {b["plugin"]: b["error"] for b in listing["broken_plugins"]}


# -- what discovery refuses, with the reason ------------------------------------------------------


def test_misspelt_undecorated_incompatible_and_clashing_plugins_are_listed_as_broken(tmp_path):
    _install(
        tmp_path,
        "peftcore-typo",
        "peftcore_typo",
        GOOD_METHOD.format(name="Typo", name_lower="typo", peft_type="TYPO")
        + """
@hookimpl
def register_layer_suport(register):
    pass
""",
    )
    _install(
        tmp_path,
        "peftcore-bare",
        "peftcore_bare",
        GOOD_METHOD.format(name="Bare", name_lower="bare", peft_type="BARE")
        + """
def register_layer_support(register):
    pass
""",
    )
    _install(tmp_path, "peftcore-future", "peftcore_future", "PEFTCORE_HOOKSPEC_VERSION = 99\n" +
             GOOD_METHOD.format(name="Future", name_lower="future", peft_type="FUTURE"))
    _install(tmp_path, "peftcore-lora-clone", "peftcore_lora_clone",
             GOOD_METHOD.format(name="Clone", name_lower="clone", peft_type="LORA"))
    _install(
        tmp_path, "peftcore-fine", "peftcore_fine", GOOD_METHOD.format(name="Fine", name_lower="fine", peft_type="FINE")
    )
    listing = _listing(tmp_path)
    broken = _broken(listing)
    assert "register_layer_suport (did you mean register_layer_support?)" in broken["peftcore_typo"]
    assert "defines register_layer_support without @peftcore.hookimpl" in broken["peftcore_bare"]
    assert "written for peftcore hookspec version 99" in broken["peftcore_future"]
    # one of the two LORA plugins is refused, naming the other; LoRA itself stays usable
    clash = [name for name in ("peftcore_lora_clone", "lora") if name in broken]
    assert len(clash) == 1 and "registers the method 'LORA', which plugin" in broken[clash[0]]
    methods = {m["name"]: m for m in listing["methods"]}
    assert "fine" in methods and not {"typo", "bare", "future"} & set(methods)
    assert [m["peft_type"] for m in listing["methods"]].count("LORA") == 1
    assert listing["hookspec_version"] == 2


def test_registering_a_misspelt_or_clashing_plugin_by_hand_raises_and_registers_nothing():
    class Misspelt:
        @hookimpl
        def adapter_injectd(self, model, config, adapter_name):
            pass

    class SecondLora:
        @hookimpl
        def register_methods(self, register):
            register(Method(peft_type="LORA", name="lora2", config_class=LoraConfig))

    for plugin, message in ((Misspelt(), "adapter_injectd .did you mean adapter_injected"), (SecondLora(), "'LORA'")):
        with pytest.raises(PluginError, match=message):
            register_plugin(plugin)
        from peftcore.plugins import get_plugin_manager

        assert not get_plugin_manager().is_registered(plugin)


# -- which wrapper a module gets ------------------------------------------------------------------


class FancyLinear(nn.Linear):
    pass


class FancierLinear(FancyLinear):
    pass


def _factory(tag):
    def make(target, adapter_name, config, module_name):
        wrapper = AdapterLayer(target, module_name)
        wrapper.tag = tag
        return wrapper
    return make


@pytest.fixture
def layer_supports():
    """A made-up method with several candidate wrappers for the same modules."""
    entries = []

    class Supports:
        @hookimpl
        def register_layer_support(self, register):
            for entry in entries:
                register(entry)

    plugin = Supports()
    register_plugin(plugin, name="layer-support-rules")

    def pick(module):
        from peftcore.plugins import layer_supports as registered

        registered.cache_clear()
        support = pick_layer_support("RULES", module, None)
        return None if support is None else support.factory(module, "a", None, "m").tag

    yield entries, pick
    unregister_plugin(plugin)


def test_the_closest_base_type_wins_then_the_priority_then_the_later_registration(layer_supports):
    entries, pick = layer_supports
    entries += [LayerSupport("RULES", nn.Linear, _factory("linear"), priority=5),
                LayerSupport("RULES", FancyLinear, _factory("fancy"))]
    assert pick(nn.Linear(2, 2)) == "linear"
    assert pick(FancierLinear(2, 2)) == "fancy"  # one step up its MRO beats two, whatever the priority
    entries.append(LayerSupport("RULES", FancyLinear, _factory("fancy-priority"), priority=1))
    assert pick(FancierLinear(2, 2)) == "fancy-priority"
    entries.append(LayerSupport("RULES", FancyLinear, _factory("fancy-priority-later"), priority=1))
    assert pick(FancierLinear(2, 2)) == "fancy-priority-later"  # a full tie: the later registration
    entries.append(LayerSupport("RULES", FancierLinear, _factory("refuses"), accepts=lambda module, config: False))
    assert pick(FancierLinear(2, 2)) == "fancy-priority-later"  # ``accepts`` narrows the match
    assert pick(nn.Conv2d(1, 1, 1)) is None


# -- the layer contract ----------------------------------------------------------------------------


@dataclass
class ShiftConfig(LayerConfig):
    def __post_init__(self):
        self.peft_type = "SHIFTV1"
        super().__post_init__()


class ShiftLinearV1(AdapterLayer):
    """The SHIFT example exactly as docs/writing-a-plugin.md gave it under hookspec version 1."""

    adapter_layer_names = ("shift_vector",)
    peft_type = "SHIFTV1"

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config, module_name: str = ""):
        super().__init__(base_layer)
        self.shift_vector = nn.ParameterDict({})
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name, config):
        out_features = self.get_base_layer().weight.shape[0]
        self.shift_vector[adapter_name] = nn.Parameter(torch.randn(out_features) * 0.0)
        self.set_adapter(self.active_adapters or [adapter_name])

    def forward(self, x, *args, adapter_names=None, **kwargs):
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            result = result + self.shift_vector[name]
        return result

    def delta_weight(self, adapter_name):
        return self.shift_vector[adapter_name]

    def merge(self, safe_merge=False, adapter_names=None):
        base = self.get_base_layer()
        for name in self.adapters_to_merge(adapter_names):
            base.bias.data = base.bias.data + self.shift_vector[name].data
            self.merged_adapters.append(name)

    def unmerge(self):
        base = self.get_base_layer()
        while self.merged_adapters:
            base.bias.data -= self.shift_vector[self.merged_adapters.pop()].data


class ShiftV1Plugin:
    @hookimpl
    def register_methods(self, register):
        register(Method(peft_type="SHIFTV1", name="shiftv1", config_class=ShiftConfig, tensor_prefixes=("shift_",)))

    @hookimpl
    def register_layer_support(self, register):
        register(LayerSupport("SHIFTV1", nn.Linear, ShiftLinearV1))


@pytest.fixture
def shift_v1():
    plugin = ShiftV1Plugin()
    register_plugin(plugin, name="shift-v1")
    yield
    unregister_plugin(plugin)


def test_a_hookspec_1_layer_still_works_and_the_core_places_its_tensors(shift_v1, tmp_path):
    base, inputs = tiny_model("bert")
    base = base.double()
    pristine = copy.deepcopy(base)
    model = get_peft_model(base, ShiftConfig(target_modules=["intermediate.dense"]))
    vectors = {n: p for n, p in model.named_parameters() if "shift_vector" in n}
    assert vectors and all(p.dtype == torch.float64 for p in vectors.values())  # made float32, placed by the core
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.add_adapter("second", ShiftConfig(target_modules=["intermediate.dense"]))
    assert any(
        issubclass(w.category, DeprecationWarning) and "should also take module_name" in str(w.message) for w in caught
    )
    with torch.no_grad():
        for p in vectors.values():
            p.normal_()
        shifted = model(**inputs).logits
        model.save_pretrained(tmp_path)
        reloaded = PeftModel.from_pretrained(pristine, tmp_path)
        torch.testing.assert_close(reloaded(**inputs).logits, shifted)


class RecordingLora:
    """LoRA's Linear, recording every module_name the core hands to update_layer."""

    seen: list[tuple[str, str]] = []

    @hookimpl
    def register_layer_support(self, register):
        from peftcore_lora.layer import Linear

        class Recorded(Linear):
            def update_layer(self, adapter_name, config, module_name=""):
                RecordingLora.seen.append((adapter_name, module_name))
                super().update_layer(adapter_name, config, module_name)

        register(LayerSupport("LORA", nn.Linear, Recorded, priority=10))


def test_the_core_passes_module_name_to_update_layer_every_time():
    plugin = RecordingLora()
    register_plugin(plugin, name="recording-lora")
    RecordingLora.seen.clear()
    try:
        model = get_peft_model(tiny_model("llama")[0], LoraConfig(target_modules=["q_proj"]))
        model.add_adapter("second", LoraConfig(target_modules=["q_proj"]))
    finally:
        unregister_plugin(plugin)
    expected = [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert RecordingLora.seen == [("default", n) for n in expected] + [("second", n) for n in expected]


@pytest.mark.parametrize("method", ["lora-dora", "ia3", "adalora"])
def test_new_adapters_get_the_base_layer_dtype_from_the_core(method):
    from peftcore import AdaLoraConfig, IA3Config

    config = {"lora-dora": lambda: LoraConfig(r=2, target_modules=["q_proj"], use_dora=True),
              "ia3": lambda: IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
              "adalora": lambda: AdaLoraConfig(target_modules=["q_proj"], total_step=10)}[method]()
    model = get_peft_model(tiny_model("llama")[0].double(), config)
    adapter_params = [p for n, p in model.named_parameters() if p.requires_grad]
    assert adapter_params and {p.dtype for p in adapter_params} == {torch.float64}


def test_a_failing_safe_merge_leaves_every_layer_as_it_was():
    base, inputs = tiny_model("llama")
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).eval()
    model.add_adapter("broken", LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(float("nan") if ".broken." in name and "layers.1." in name else 0.1)
        model.base_model.set_adapter(["default", "broken"])
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(
            ValueError, match=r"adapter broken seems to be broken: NaNs or infs .* of model\.layers\.1\.self_attn\.q_"
        ):
            model.merge_adapter(safe_merge=True)
    assert not any(layer.merged for _, layer in model.base_model.adapter_layers())
    assert all(
        torch.equal(v, before[k]) or (v.isnan() == before[k].isnan()).all() for k, v in model.state_dict().items()
    )


# -- configs: a method without default targets ---------------------------------------------------------


@dataclass
class NoTableConfig(LayerConfig):
    def __post_init__(self):
        self.peft_type = "NOTABLE"
        super().__post_init__()


class NoTablePlugin:
    prepared: list[str] = []

    @hookimpl
    def register_methods(self, register):
        register(Method(peft_type="NOTABLE", name="notable", config_class=NoTableConfig, tensor_prefixes=("lora_",)))

    @hookimpl
    def register_layer_support(self, register):
        from peftcore_lora.layer import Linear

        register(LayerSupport("NOTABLE", nn.Linear, lambda t, a, c, m: Linear(t, a, LoraConfig(r=1), m)))

    @hookimpl
    def prepare_config(self, config, model):
        if isinstance(config, NoTableConfig):
            NoTablePlugin.prepared.append(type(model).__name__)


def test_a_method_without_default_targets_fails_clearly_instead_of_getting_lora_s():
    plugin = NoTablePlugin()
    register_plugin(plugin, name="notable")
    try:
        with pytest.raises(ValueError, match="NoTableConfig.target_modules is None and no installed plugin has a "
                                             "default for model_type 'llama'"):
            get_peft_model(tiny_model("llama")[0], NoTableConfig())
        assert NoTablePlugin.prepared == ["LlamaForCausalLM"]  # the method's prepare_config ran before the core's
        model = get_peft_model(tiny_model("llama")[0], NoTableConfig(target_modules="all-linear"))
        assert "lm_head" not in model.peft_config["default"].target_modules
    finally:
        unregister_plugin(plugin)


def test_ia3_resolves_feedforward_modules_in_prepare_config():
    from peftcore import IA3Config
    from peftcore.plugins import hooks

    config = IA3Config()
    hooks.prepare_config(config=config, model=tiny_model("llama")[0])
    assert config.feedforward_modules == {"down_proj"}
    assert config.target_modules == {"k_proj", "v_proj", "down_proj"}


# -- training loops and the on_optimizer_step hook ----------------------------------------------------


class StepRecorder:
    steps: list[tuple[str, int]] = []

    @hookimpl
    def on_optimizer_step(self, model, step):
        StepRecorder.steps.append((type(model).__name__, step))


@pytest.fixture
def recorder():
    plugin = StepRecorder()
    register_plugin(plugin, name="step-recorder")
    StepRecorder.steps.clear()
    yield StepRecorder.steps
    unregister_plugin(plugin)


def _classification_rows(n: int = 8):
    torch.manual_seed(0)
    return [{"input_ids": torch.randint(3, 60, (6,)).tolist(), "labels": i % 2} for i in range(n)]


def test_the_cli_loop_calls_on_optimizer_step_after_every_step(recorder):
    from peftcore.cli.training_loop import TrainSettings, fit

    model = get_peft_model(tiny_model("bert")[0], LoraConfig(task_type="SEQ_CLS", r=2))
    losses = fit(model, _classification_rows(12), 0, TrainSettings(epochs=1, batch_size=4))
    assert len(losses) == 3
    assert recorder == [("PeftModelForSequenceClassification", step) for step in range(3)]


@pytest.mark.parametrize("how", ["PeftTrainer", "PeftTrainer+extra callback", "stock Trainer+PeftcoreCallback"])
def test_the_trainer_integration_calls_on_optimizer_step_once_per_step(recorder, tmp_path, how):
    from transformers import Trainer, TrainingArguments

    from peftcore.integrations.trainer import PeftcoreCallback, PeftTrainer

    model = get_peft_model(tiny_model("bert")[0], LoraConfig(task_type="SEQ_CLS", r=2))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, save_strategy="no",
                             report_to=[], logging_strategy="no", use_cpu=True, disable_tqdm=True)
    rows = [{k: torch.tensor(v) for k, v in row.items()} for row in _classification_rows()]
    trainer_cls = Trainer if how.startswith("stock") else PeftTrainer
    callbacks = [PeftcoreCallback()] if "allback" in how else []
    trainer_cls(model=model, args=args, train_dataset=rows, callbacks=callbacks).train()
    assert recorder == [("PeftModelForSequenceClassification", step) for step in range(3)]
