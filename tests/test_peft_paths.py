"""peftcore.peft_paths: each PEFT-internal path exists in peft, has a peftcore equivalent, and is documented."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path

import peft  # noqa: F401  (the reference the paths are taken from)
import pytest
import torch

import peftcore
from peftcore.peft_paths import PEFT_PATHS, peft_equivalent

DOC = Path(__file__).resolve().parents[1] / "docs" / "compatibility.md"


def _peft_object(path: str):
    module, _, attribute = path.rpartition(".")
    return getattr(importlib.import_module(module), attribute)


@pytest.mark.parametrize("path", sorted(PEFT_PATHS))
def test_each_path_is_peft_s_and_resolves_in_peftcore(path):
    theirs = _peft_object(path)
    ours = peft_equivalent(path)
    assert ours is not None, f"{path} -> {PEFT_PATHS[path]} does not resolve"
    if isinstance(theirs, type):
        assert isinstance(ours, type)
    elif isinstance(theirs, str):
        assert ours == theirs  # file names and shorthands are the same strings
    elif isinstance(theirs, dict):
        assert isinstance(ours, Mapping)  # the mapping tables are live views over the installed plugins
    else:
        assert callable(ours) and callable(theirs)


def test_unknown_paths_have_no_equivalent_and_stand_ins_cannot_be_made():
    from peftcore.peft_paths import TrainableTokensWrapper

    assert peft_equivalent("peft.tuners.loha.LoHaLayer") is None
    model = peftcore.get_peft_model(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)),
                                    peftcore.LoraConfig(target_modules=["0"], modules_to_save=["1"]))
    assert not any(isinstance(m, TrainableTokensWrapper) for m in model.modules())
    with pytest.raises(TypeError, match="no counterpart"):
        TrainableTokensWrapper()


def test_every_path_is_in_the_compatibility_table():
    text = DOC.read_text()
    missing = [path for path in PEFT_PATHS if f"`{path.removeprefix('peft.')}`" not in text]
    assert not missing, f"docs/compatibility.md lacks rows for {missing}"


def test_the_layer_base_class_finds_every_adapter_layer_as_peft_s_does():
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))

    ours = peftcore.get_peft_model(build(), peftcore.LoraConfig(target_modules=["0", "2"]))
    theirs = peft.get_peft_model(build(), peft.LoraConfig(target_modules=["0", "2"]))
    base_tuner_layer = peft_equivalent("peft.tuners.tuners_utils.BaseTunerLayer")
    from peft.tuners.tuners_utils import BaseTunerLayer

    ours_found = [n for n, m in ours.named_modules() if isinstance(m, base_tuner_layer)]
    theirs_found = [n for n, m in theirs.named_modules() if isinstance(m, BaseTunerLayer)]
    assert ours_found == theirs_found == ["base_model.model.0", "base_model.model.2"]
    get_submodules = peft_equivalent("peft.utils._get_submodules")
    from peft.utils import _get_submodules

    for key in ("", "base_model.model.0", "base_model.model.0.lora_A"):
        a, b = get_submodules(ours, key), _get_submodules(theirs, key)
        assert (type(a[0]).__name__, type(a[1]).__name__, a[2]) == (type(b[0]).__name__, type(b[1]).__name__, b[2])
