"""A third-party plugin written only from docs/writing-a-plugin.md, discovered through its entry point.

The package's files are the code blocks of that page; it is "installed" as a
real distribution (dist-info with entry_points.txt on sys.path) in a fresh
interpreter, so discovery, the public hooks and PEFT-format files are all
exercised exactly as a user of the published package would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "writing-a-plugin.md"


def _files_from_doc() -> dict[str, str]:
    blocks = re.findall(r"```\w+ file=(\S+)\n(.*?)```", DOC.read_text(), flags=re.S)
    return dict(blocks)


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("site")
    files = _files_from_doc()
    assert {"pyproject.toml", "src/peftcore_shift/plugin.py", "src/peftcore_shift/layer.py"} <= set(files)
    for rel, text in files.items():
        if rel.startswith("src/"):
            target = root / rel[len("src/"):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
    import tomllib

    entry_points = tomllib.loads(files["pyproject.toml"])["project"]["entry-points"]["peftcore"]
    entry = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
    dist = root / "peftcore_shift-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: peftcore-shift\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text(f"[peftcore]\n{entry}\n")
    return root


def _run(site: Path, code: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_documented_plugin_is_discovered_and_works_end_to_end(installed_plugin, tmp_path):
    out = _run(
        installed_plugin,
        f"""
        import copy, json, torch, warnings
        import peftcore
        from peftcore import ShiftConfig, get_peft_model, PeftModel
        from peftcore.plugins import methods, plugin_infos
        from peftcore.testing import tiny_model

        assert "SHIFT" in methods(), methods()
        info = [p for p in plugin_infos() if p.name == "shift"][0]
        assert (info.distribution, info.version, info.error) == ("peftcore-shift", "0.1.0", None)

        base, inputs = tiny_model("bert")
        pristine = copy.deepcopy(base)
        expected = base(**inputs).logits
        model = get_peft_model(base, ShiftConfig(target_modules=["intermediate.dense"])).eval()
        torch.testing.assert_close(model(**inputs).logits, expected, atol=0, rtol=0)   # init 0: no-op

        with torch.no_grad():
            for name, p in model.named_parameters():
                if "shift_vector" in name:
                    p.normal_()
        shifted = model(**inputs).logits
        assert not torch.allclose(shifted, expected)
        n_layers, width = base.config.num_hidden_layers, base.config.intermediate_size
        assert model.get_nb_trainable_parameters()[0] == n_layers * width

        mixed = model(**inputs, adapter_names=["default", "__base__"]).logits   # one adapter per row
        torch.testing.assert_close(mixed[0], shifted[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(mixed[1], expected[1], atol=1e-6, rtol=0)
        model.merge_adapter()
        torch.testing.assert_close(model(**inputs).logits, shifted, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        with model.disable_adapter():
            torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-5, rtol=0)

        model.save_pretrained({str(tmp_path)!r})
        keys = json.load(open({str(tmp_path / "adapter_config.json")!r}))
        assert keys["peft_type"] == "SHIFT" and keys["inference_mode"] is True
        from safetensors import safe_open
        with safe_open({str(tmp_path / "adapter_model.safetensors")!r}, "pt") as f:
            names = sorted(f.keys())
        assert names[0] == "base_model.model.bert.encoder.layer.0.intermediate.dense.shift_vector", names
        reloaded = PeftModel.from_pretrained(pristine, {str(tmp_path)!r})
        torch.testing.assert_close(reloaded(**inputs).logits, shifted, atol=1e-6, rtol=0)

        # the core put the float32 vectors the page creates on the base model's dtype
        doubled = get_peft_model(tiny_model("bert")[0].double(), ShiftConfig(target_modules=["intermediate.dense"]))
        assert {{p.dtype for n, p in doubled.named_parameters() if "shift_vector" in n}} == {{torch.float64}}
        # no bias to merge into: refused, naming the layer, nothing changed
        no_bias = torch.nn.Sequential(torch.nn.Linear(3, 3, bias=False))
        no_bias = get_peft_model(no_bias, ShiftConfig(target_modules=["0"]))
        try:
            no_bias.merge_adapter()
        except ValueError as exc:
            assert "into 0: it changes the bias, but the base layer has none" in str(exc), exc
        else:
            raise AssertionError("merge into a layer without bias was not refused")
        assert not no_bias.base_model.model[0].merged
        print("ok")
    """,
    )
    assert out.strip().endswith("ok")


def test_third_party_layer_support_wins_for_its_subclass_only(installed_plugin):
    out = _run(installed_plugin, """
        import torch
        from torch import nn
        from peftcore import LayerSupport, ShiftConfig, get_peft_model, hookimpl, register_plugin
        from peftcore_shift.layer import ShiftLinear

        class FancyLinear(nn.Linear):
            pass

        class ShiftFancy(ShiftLinear):
            pass

        class FancySupport:
            @hookimpl
            def register_layer_support(self, register):
                register(LayerSupport("SHIFT", FancyLinear, ShiftFancy))

        register_plugin(FancySupport(), name="fancy")
        net = nn.Sequential(nn.Linear(3, 3), FancyLinear(3, 3))
        model = get_peft_model(net, ShiftConfig(target_modules=["0", "1"]))
        inner = model.base_model.model
        assert type(inner[0]) is ShiftLinear and type(inner[1]) is ShiftFancy, (type(inner[0]), type(inner[1]))
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_without_plugins_peftcore_says_so_plainly():
    env = dict(os.environ, PEFTCORE_DISABLE_PLUGINS="1")
    code = "from peftcore import LoraConfig"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "no installed plugin provides it" in done.stderr and "No peftcore method plugin is installed" in done.stderr
