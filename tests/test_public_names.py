"""Top-level names a method plugin does not provide: probing says no, importing says why."""

from __future__ import annotations

import pytest

import peftcore


def test_hasattr_on_a_method_no_plugin_provides_is_false():
    assert hasattr(peftcore, "LoraConfig")
    assert not hasattr(peftcore, "LoHaConfig")
    assert getattr(peftcore, "LoHaConfig", None) is None


def test_importing_it_names_the_installed_methods():
    with pytest.raises(ImportError, match=r"'LoHaConfig' from peftcore: no installed plugin provides it; .*LoraConfig"):
        from peftcore import LoHaConfig  # noqa: F401


def test_unknown_lowercase_names_are_plain_attribute_errors():
    with pytest.raises(AttributeError, match="has no attribute 'not_a_name'"):
        peftcore.not_a_name  # noqa: B018


@pytest.mark.parametrize("name", ["LoraConfig", "IA3Config", "AdaLoraConfig", "PromptTuningConfig"])
def test_peft_type_and_task_type_are_peft_enums(name):
    import peft

    kwargs = {"PromptTuningConfig": dict(num_virtual_tokens=2), "AdaLoraConfig": dict(total_step=10)}.get(name, {})
    ours = getattr(peftcore, name)(task_type="CAUSAL_LM", **kwargs)
    theirs = getattr(peft, name)(task_type="CAUSAL_LM", **kwargs)
    assert ours.peft_type.value == theirs.peft_type.value and ours.peft_type == theirs.peft_type.value
    assert ours.task_type.value == "CAUSAL_LM" and str(ours.peft_type) == theirs.peft_type.value
    assert ours.to_dict()["peft_type"] == theirs.peft_type.value  # written as the plain string


def test_a_name_an_uninstalled_plugin_provides_says_which_plugin():
    """peftcore.replace_lora_weights_loftq comes from peftcore-bnb (the core never imports bitsandbytes)."""
    from peftcore.plugins import get_plugin_manager, register_plugin, unregister_plugin

    bnb_plugin = get_plugin_manager().get_plugin("bnb")
    if bnb_plugin is not None:
        assert peftcore.replace_lora_weights_loftq is bnb_plugin.replace_lora_weights_loftq
        unregister_plugin(bnb_plugin)
    try:
        assert not hasattr(peftcore, "replace_lora_weights_loftq")
        with pytest.raises(AttributeError, match=r"provided by the peftcore-bnb plugin, which is not installed"):
            peftcore.replace_lora_weights_loftq  # noqa: B018
        with pytest.raises(ImportError, match=r"pip install peftcore-bnb"):
            from peftcore import replace_lora_weights_loftq  # noqa: F401
    finally:
        if bnb_plugin is not None:
            register_plugin(bnb_plugin, name="bnb")
