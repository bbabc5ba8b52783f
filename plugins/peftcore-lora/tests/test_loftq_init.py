"""LoftQ initialisation (``init_lora_weights="loftq"``) on full-precision bases, without bitsandbytes.

References: the NF4 table rebuilt from normal quantiles (QLoRA's construction), float64 round trips written
here from the definitions, Eckart–Young for the SVD step, and ``peft`` itself (its LoftQ asks for a GPU; the
tests run it on the CPU by redirecting its ``.to("cuda")`` calls).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import peftcore
from peftcore import LoftQConfig, LoraConfig, PeftConfig, get_peft_model
from peftcore.testing import AcceleratorCallsOnCpu, tiny_model

from peftcore_lora import loftq

# -- the quantizers ------------------------------------------------------------------------------------------


def test_nf4_table_is_qloras_normal_quantiles():
    """QLoRA (App. E): 8 positive quantiles of N(0,1) from (offset, 0.5], 7 negative ones, and 0, over the max."""
    offset = 0.9677083
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.sort(torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative])).values
    values = values / values.abs().max()
    torch.testing.assert_close(torch.tensor(loftq.NF4_CODE, dtype=torch.float64), values, atol=2e-7, rtol=0)


def _nf4_reference(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """float64, from the definition: per block of the flattened weight, absmax scale and the nearest NF4 value."""
    code = torch.tensor(loftq.NF4_CODE, dtype=torch.float64)
    flat = w.reshape(-1).double()
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), blocksize):
        block = flat[start:start + blocksize]
        absmax = block.abs().max()
        nearest = (block.unsqueeze(1) / absmax - code).abs().argmin(dim=1)
        out[start:start + blocksize] = code[nearest] * absmax
    return out.reshape(w.shape)


@pytest.mark.parametrize("shape", [(32, 64), (7, 50)])  # 50·7 = 350: a short last block
def test_nf4_roundtrip_matches_a_float64_reference(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    torch.testing.assert_close(loftq.nf4_roundtrip(w).double(), _nf4_reference(w), atol=1e-6, rtol=1e-6)


def test_nf4_roundtrip_is_bitsandbytes():
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(1)
    # rows a multiple of 64 long: bitsandbytes 0.50's CPU dequantize kernel reads other rows' blocks wrongly
    # (it disagrees with its own quantize and its default backend), which is no reference
    w = torch.randn(48, 128)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    assert torch.equal(loftq.nf4_roundtrip(w), bnb_functional.dequantize_4bit(packed, state))
    table = bnb_functional.get_4bit_type("nf4", device="cpu")
    assert table.tolist() == list(loftq.NF4_CODE)


def test_int8_roundtrip_matches_a_float64_reference():
    torch.manual_seed(0)
    w = torch.randn(12, 40)
    half = w.half().double()
    absmax = half.abs().amax(dim=1, keepdim=True)
    expected = torch.round(half * 127 / absmax) * absmax / 127
    torch.testing.assert_close(loftq.int8_roundtrip(w).double(), expected, atol=1e-6, rtol=1e-6)


# -- the decomposition ------------------------------------------------------------------------------------------


def _weight() -> torch.Tensor:
    torch.manual_seed(0)  # columns of different scale: a residual with structure for the SVD to find
    return torch.randn(96, 128) @ torch.diag(torch.linspace(0.1, 3, 128))


@pytest.mark.parametrize("bits", [4, 8])
def test_svd_step_is_the_best_rank_r_approximation_of_the_residual(bits):
    w, r = _weight(), 8
    q, a, b = loftq.loftq_decompose(w, bits, r, num_iter=1)
    assert a.shape == (r, 128) and b.shape == (96, r)
    torch.testing.assert_close(q, loftq.quantize_roundtrip(w, bits))  # one iteration quantizes W itself
    residual = (w - q).double()
    singular = torch.linalg.svdvals(residual)
    eckart_young = singular[r:].square().sum().sqrt()
    assert (residual - (b @ a).double()).norm().item() == pytest.approx(eckart_young.item(), rel=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_beats_quantization_alone_and_improves_with_iterations(bits):
    w = _weight().double()
    quantized_only = (w - loftq.quantize_roundtrip(w.float(), bits).double()).norm()
    errors = []
    for iters in (1, 2, 4):
        q, a, b = loftq.loftq_decompose(w.float(), bits, 8, num_iter=iters)
        errors.append((w - q.double() - (b @ a).double()).norm().item())
    assert errors[0] < quantized_only.item()
    assert errors[0] > errors[1] > errors[2]


def test_already_quantized_weight_gets_one_svd_of_its_residual():
    w = _weight()
    q = loftq.nf4_roundtrip(w)
    q_out, a, b = loftq.loftq_decompose(w, 4, 4, dequantized=q)
    assert torch.equal(q_out, q)
    left, right = loftq.low_rank_factors(w - q, 4)
    torch.testing.assert_close(b @ a, left @ right)


# -- get_peft_model with init_lora_weights="loftq" ------------------------------------------------------------


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits.double()


@pytest.mark.parametrize("bits", [4, 8])
def test_get_peft_model_quantizes_targets_and_the_adapter_recovers_the_original(bits):
    base, inputs = tiny_model("llama")
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    reference = _logits(base, inputs)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"], init_lora_weights="loftq",
                        loftq_config=LoftQConfig(loftq_bits=bits))
    model = get_peft_model(base, config)
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A"):
            continue
        key = name.removeprefix("base_model.model.") + ".weight"
        weight = module.get_base_layer().weight
        assert torch.equal(weight, loftq.quantize_roundtrip(original[key], bits).to(weight.dtype)), key
        w, q = original[key].double(), weight.double()
        delta = module.scaling["default"] * (module.lora_B["default"].weight @ module.lora_A["default"].weight)
        assert (w - q - delta.double()).norm() < (w - q).norm(), key
    for name, param in model.base_model.model.named_parameters():
        if "lora_" not in name and "base_layer" not in name:
            assert torch.equal(param, original[name]), name  # untargeted layers keep their weights
    with_adapter = _logits(model, inputs)
    with model.disable_adapter():
        quantized_only = _logits(model, inputs)
    assert (with_adapter - reference).norm() < (quantized_only - reference).norm()


def test_conv1d_weights_are_quantized_as_stored_and_factored_as_applied():
    base, inputs = tiny_model("gpt2")
    original = base.transformer.h[0].attn.c_attn.weight.detach().clone()  # (in, out)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True,
                        init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 2})
    model = get_peft_model(base, config)
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.shape == (4, original.shape[0]) and b.shape == (original.shape[1], 4)
    q = layer.get_base_layer().weight
    assert (original.T - q.T - b @ a).norm() < (original - q).norm()
    model(**inputs)


def test_lora_bias_starts_at_zero_and_dora_takes_the_quantized_base():
    base, inputs = tiny_model("llama")
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=2, target_modules=["v_proj"], lora_bias=True,
                                            init_lora_weights="loftq", loftq_config=LoftQConfig()))
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    assert torch.equal(layer.lora_B["default"].bias, torch.zeros_like(layer.lora_B["default"].bias))
    base, _ = tiny_model("llama")
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=2, target_modules=["v_proj"], use_dora=True,
                                            init_lora_weights="loftq", loftq_config=LoftQConfig()))
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    w = layer.get_base_layer().weight + layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight, w.norm(dim=1))


def test_scaling_other_than_one_is_warned_about_as_peft_ignores_it():
    base, _ = tiny_model("llama")
    with pytest.warns(RuntimeWarning, match=r"scaling 2 .*lora_alpha == r"):
        get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="loftq",
                                        loftq_config=LoftQConfig()))


def test_embedding_targets_are_refused_naming_the_module():
    net = nn.Sequential()
    net.add_module("emb", nn.Embedding(10, 64))
    with pytest.raises(ValueError, match=r"LoftQ initialisation is only available for Linear/Conv1D.*emb"):
        get_peft_model(net, LoraConfig(r=2, target_modules=["emb"], init_lora_weights="loftq",
                                       loftq_config=LoftQConfig()))


# -- the config --------------------------------------------------------------------------------------------------


def test_loftq_config_is_exported_where_peft_has_it():
    import peftcore_lora

    assert peftcore.LoftQConfig is peftcore_lora.LoftQConfig is LoftQConfig
    assert vars(LoftQConfig()) == {"loftq_bits": 4, "loftq_iter": 1}


def test_loftq_needs_a_loftq_config_in_peft_words():
    with pytest.raises(ValueError, match=r"`loftq_config` must be specified when `init_lora_weights` is 'loftq'"):
        LoraConfig(init_lora_weights="loftq")


@pytest.mark.parametrize("given, message", [
    (dict(loftq_bits=2), r"Only nf4 and int8 quantization is supported"),
    (dict(loftq_iter=0), r"Number of iterations must be greater than 0"),
    (dict(loftq_bits="4"), r"loftq_bits must be an integer"),
])
def test_bad_loftq_configs_are_refused_when_made(given, message):
    with pytest.raises(ValueError, match=message):
        LoftQConfig(**given)
    with pytest.raises(ValueError, match=rf"loftq_config=.*{message}"):
        LoraConfig(init_lora_weights="loftq", loftq_config=given)


def test_unknown_loftq_keys_are_refused():
    with pytest.raises(ValueError, match=r"loftq_config has unknown keys \['bits'\]"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"bits": 4})


def test_a_dict_is_accepted_and_kept_whole_and_files_round_trip(tmp_path):
    config = LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_iter": 3})
    assert config.loftq_config == {"loftq_bits": 4, "loftq_iter": 3}
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["loftq_config"] == config.loftq_config
    read = PeftConfig.from_pretrained(tmp_path)
    assert read.init_lora_weights == "loftq" and read.loftq_config == config.loftq_config


def test_loftq_config_without_loftq_init_is_dropped_with_peft_warning():
    with pytest.warns(UserWarning, match="`loftq_config` specified but will be ignored"):
        config = LoraConfig(loftq_config=LoftQConfig())
    assert config.loftq_config == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LoraConfig(loftq_config=None).loftq_config is None  # as PEFT keeps it


# -- against peft ------------------------------------------------------------------------------------------------


def _llama64() -> nn.Module:
    """A tiny Llama with rows a multiple of 64 long (see test_nf4_roundtrip_is_bitsandbytes for why)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100))


@pytest.mark.parametrize("bits, iters", [(4, 1), (4, 3), (8, 2)])
def test_same_weights_and_config_file_as_peft(tmp_path, bits, iters):
    peft = pytest.importorskip("peft")
    pytest.importorskip("scipy")  # peft's LoraConfig asks for it when init_lora_weights="loftq"
    pytest.importorskip("bitsandbytes")  # peft's LoftQ quantizes through it
    kwargs = dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights="loftq")
    with AcceleratorCallsOnCpu():
        theirs = peft.get_peft_model(
            _llama64(), peft.LoraConfig(**kwargs, loftq_config=peft.LoftQConfig(bits, iters))
        )
    ours = get_peft_model(_llama64(), LoraConfig(**kwargs, loftq_config=LoftQConfig(bits, iters)))
    their_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        if bits == 4:  # the same NF4 round trip and the same SVD: the same numbers
            assert torch.equal(param, their_params[name]), name
        else:  # bitsandbytes' int8 path multiplies in another order
            torch.testing.assert_close(param, their_params[name], atol=1e-5, rtol=1e-5)
    assert set(their_params) == {n for n, _ in ours.named_parameters()}
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "peftcore")
    their_file = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    our_file = json.loads((tmp_path / "peftcore" / "adapter_config.json").read_text())
    assert set(our_file) == set(their_file)
    for key in ("init_lora_weights", "loftq_config", "r", "lora_alpha"):
        assert our_file[key] == their_file[key], key
    loaded = peft.PeftConfig.from_pretrained(tmp_path / "peftcore")
    assert loaded.init_lora_weights == "loftq" and loaded.loftq_config == {"loftq_bits": bits, "loftq_iter": iters}


def test_a_saved_loftq_adapter_loads_onto_the_original_base_as_it_was(tmp_path):
    """The file says init_lora_weights="loftq", so loading quantizes the original base again (as peft does):
    the same deterministic Q, then the file's A and B."""
    base, inputs = tiny_model("llama")
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="loftq",
                        loftq_config=LoftQConfig(loftq_iter=2))
    model = get_peft_model(base, config)
    with torch.no_grad():  # as if trained
        model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.mul_(1.5)
    expected = _logits(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = peftcore.PeftModel.from_pretrained(tiny_model("llama")[0], tmp_path)
    torch.testing.assert_close(_logits(loaded, inputs), expected, atol=0, rtol=0)
