"""AdaLoRA in peftcore: the SVD layers, the rank budget schedule, the regulariser, configs and files."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from adalora_helpers import TASK_TYPES, logits, randomize_adapters, tiny_model, train_with_allocation
from safetensors import safe_open
from torch import nn

import peftcore
from peftcore import AdaLoraConfig, get_peft_model

ARCHS = ["bert", "gpt2", "llama", "t5"]
SCHEDULE = dict(init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=12)


def _adalora_model(arch, **options):
    base, inputs = tiny_model(arch)
    reference = logits(base, inputs)
    options = {"total_step": 10, **options}
    model = get_peft_model(base, AdaLoraConfig(task_type=TASK_TYPES[arch], **options)).eval()
    return model, inputs, reference


def _triplets(model) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {"lora_A": A, "lora_B": B, "lora_E": E}} for the default adapter, read off the parameter names."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in model.named_parameters():
        for kind in ("lora_A", "lora_B", "lora_E"):
            if name.endswith(f".{kind}.default"):
                found.setdefault(name[: -len(f".{kind}.default")], {})[kind] = param
    return found


def _analytic_counts(arch, config, init_r) -> tuple[int, int]:
    """(number of adapted modules, adapter parameters) for PEFT's AdaLoRA defaults, from dimensions alone."""
    if arch == "bert":  # query, value: 16 -> 16
        modules, dims = (
            2 * config.num_hidden_layers,
            [(config.hidden_size, config.hidden_size)] * 2 * config.num_hidden_layers,
        )
    elif arch == "gpt2":  # c_attn: n_embd -> 3 n_embd
        modules, dims = config.n_layer, [(config.n_embd, 3 * config.n_embd)] * config.n_layer
    elif arch == "llama":  # q_proj: hidden -> heads*head_dim, v_proj: hidden -> kv_heads*head_dim
        head = config.hidden_size // config.num_attention_heads
        per_layer = [
            (config.hidden_size, config.num_attention_heads * head),
            (config.hidden_size, config.num_key_value_heads * head),
        ]
        modules, dims = 2 * config.num_hidden_layers, per_layer * config.num_hidden_layers
    elif arch == "t5":  # q, k, v, o in every attention block; wi, wo in every layer
        inner = config.num_heads * config.d_kv
        attention = [(config.d_model, inner)] * 3 + [(inner, config.d_model)]
        ffn = [(config.d_model, config.d_ff), (config.d_ff, config.d_model)]
        layout = (attention + ffn) * config.num_layers + (2 * attention + ffn) * config.num_decoder_layers
        modules, dims = len(layout), layout
    else:
        raise ValueError(arch)
    return modules, sum(init_r * (fan_in + fan_out + 1) for fan_in, fan_out in dims)


# -- layers -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_adapter_is_a_noop(arch):
    model, inputs, reference = _adalora_model(arch)
    assert torch.equal(logits(model, inputs), reference)  # E = 0 makes the update exactly zero
    for triplet in _triplets(model).values():
        assert not triplet["lora_E"].any()
        assert 0.01 < triplet["lora_A"].std().item() < 0.04  # N(0, 0.02)


@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_parameter_count_matches_analytic_count(arch):
    base, _ = tiny_model(arch)
    base_total = sum(p.numel() for p in base.parameters())
    head = base.config.hidden_size * base.config.num_labels + base.config.num_labels if arch == "bert" else 0
    modules, adapter = _analytic_counts(arch, base.config, init_r=5)
    model = get_peft_model(base, AdaLoraConfig(task_type=TASK_TYPES[arch], init_r=5, target_r=2, total_step=10))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == adapter + head
    assert total == base_total + adapter + head + modules  # plus one frozen ranknum per module, as in PEFT


def test_update_follows_the_svd_formula():
    torch.manual_seed(0)
    layer = nn.Linear(5, 3).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    model = get_peft_model(
        nn.Sequential(layer), AdaLoraConfig(target_modules=["0"], init_r=4, target_r=2, lora_alpha=6, total_step=5)
    )
    model.double()
    randomize_adapters(model)
    wrapped = model.base_model.model[0]
    a, b, e = wrapped.lora_A["default"], wrapped.lora_B["default"], wrapped.lora_E["default"]
    delta = b @ torch.diag(e.view(-1)) @ a * 6 / (4 + 1e-5)  # B diag(E) A · alpha / (ranknum + eps)
    torch.testing.assert_close(model(x), x @ (layer.weight + delta).T + layer.bias, atol=1e-12, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_equals_unmerged_and_unmerge_restores(arch):
    model, inputs, reference = _adalora_model(arch)
    randomize_adapters(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    unmerged = logits(model, inputs)
    assert not torch.allclose(unmerged, reference, atol=1e-4)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, inputs), unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    for name, param in model.named_parameters():
        if name in weights:
            torch.testing.assert_close(param, weights[name], atol=1e-6, rtol=0)
    plain = model.merge_and_unload()
    torch.testing.assert_close(logits(plain, inputs), unmerged, atol=1e-5, rtol=1e-5)


def test_mixed_batch_rows_equal_single_adapter_runs():
    model, inputs, reference = _adalora_model("llama")
    model.add_adapter("other", AdaLoraConfig(task_type="CAUSAL_LM", total_step=10, inference_mode=True))
    randomize_adapters(model, seed=3)
    names = ["other", "__base__", "default", "other"]
    mixed = model(input_ids=inputs["input_ids"], adapter_names=names).logits.detach()
    singles = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        singles[name] = logits(model, inputs)
    singles["__base__"] = reference
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], singles[name][row], atol=1e-6, rtol=0)


def test_conv2d_update_merges_exactly():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    x = torch.randn(2, 3, 6, 6)
    model = get_peft_model(net, AdaLoraConfig(target_modules=["0", "2"], init_r=3, target_r=2, total_step=5)).eval()
    assert model.base_model.model[0].lora_A["default"].shape == (3, 3 * 3 * 3)
    randomize_adapters(model)
    unmerged = model(x).detach()
    model.merge_adapter()
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=0)


# -- the regulariser ----------------------------------------------------------------------


def _orthogonality_term_float64(model) -> float:
    """mean over A and B of ||A Aᵀ − I||_F and ||BᵀB − I||_F, recomputed in float64."""
    norms = []
    for triplet in _triplets(model).values():
        a, b = triplet["lora_A"].detach().double(), triplet["lora_B"].detach().double()
        norms.append(torch.linalg.matrix_norm(a @ a.T - torch.eye(a.shape[0], dtype=torch.float64)))
        norms.append(torch.linalg.matrix_norm(b.T @ b - torch.eye(b.shape[1], dtype=torch.float64)))
    return torch.stack(norms).mean().item()


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_orthogonality_term_is_in_the_training_loss_and_absent_in_eval(arch):
    model, inputs, _ = _adalora_model(arch, orth_reg_weight=0.7)
    randomize_adapters(model)
    model.eval()
    eval_out = model(**inputs)
    labels = inputs["labels"]
    if arch == "bert":
        task_loss = F.cross_entropy(eval_out.logits.double(), labels)
    else:  # causal LM: predict token t+1 from position t
        task_loss = F.cross_entropy(
            eval_out.logits[:, :-1].double().reshape(-1, eval_out.logits.shape[-1]), labels[:, 1:].reshape(-1)
        )
    assert eval_out.loss.item() == pytest.approx(task_loss.item(), abs=1e-5)

    model.train()
    expected = task_loss.item() + 0.7 * _orthogonality_term_float64(model)
    if arch == "gpt2":  # a causal LM computes its training loss in chunks, without logits: the term is added too
        assert model(**inputs).loss.item() == pytest.approx(expected, abs=1e-5)
    train_out = model(**inputs, **({"skip_logits": False} if arch == "gpt2" else {}))
    torch.testing.assert_close(train_out.logits, eval_out.logits)  # dropout is off: same function
    assert train_out.loss.item() == pytest.approx(expected, abs=1e-5)
    assert train_out["loss"] is train_out.loss
    train_out.loss.backward()
    a = next(iter(_triplets(model).values()))["lora_A"]
    assert a.grad is not None and a.grad.abs().sum() > 0


def test_no_orthogonality_term_without_labels_or_with_zero_weight():
    model, inputs, _ = _adalora_model("bert", orth_reg_weight=0.0)
    randomize_adapters(model)
    model.train()
    with_zero = model(**inputs).loss
    model.eval()
    assert with_zero.item() == model(**inputs).loss.item()
    model.train()
    assert model(input_ids=inputs["input_ids"]).loss is None


# -- the rank allocator --------------------------------------------------------------------


def _expected_budget(step, init_budget, target_budget, tinit, tfinal, total_step):
    """The paper's cubic schedule, written out independently of the plugin."""
    if step <= tinit:
        return init_budget
    if step > total_step - tfinal:
        return target_budget
    progress = (step - tinit) / (total_step - tfinal - tinit)
    return int(target_budget + (init_budget - target_budget) * (1 - progress) ** 3)


def test_total_rank_budget_follows_the_cubic_schedule_and_ends_at_target():
    model, inputs, _ = _adalora_model("bert", **SCHEDULE)
    n_modules = len(_triplets(model))
    init_budget, target_budget = SCHEDULE["init_r"] * n_modules, SCHEDULE["target_r"] * n_modules
    boundary = SCHEDULE["total_step"] - SCHEDULE["tfinal"]
    config = model.peft_config["default"]
    observed = {}

    def check(step):
        nonzero_e = sum(int((t["lora_E"] != 0).sum()) for t in _triplets(model).values())
        kept = None if config.rank_pattern is None else sum(sum(m) for m in config.rank_pattern.values())
        observed[step] = (kept, nonzero_e)

    train_with_allocation(model, inputs, steps=SCHEDULE["total_step"] + 2, on_step=check)
    masked_steps = [
        s for s in range(SCHEDULE["tinit"] + 1, boundary + 1) if s % SCHEDULE["deltaT"] == 0 or s == boundary
    ]
    assert masked_steps == [4, 6, 8, 9]
    for step in range(SCHEDULE["tinit"] + 1):
        assert observed[step] == (None, init_budget)  # warm-up: nothing masked
    budgets = [
        _expected_budget(s, init_budget, target_budget, SCHEDULE["tinit"], SCHEDULE["tfinal"], SCHEDULE["total_step"])
        for s in masked_steps
    ]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] < init_budget and budgets[-1] == target_budget
    for step, budget in zip(masked_steps, budgets):
        assert observed[step] == (budget, budget), step
    for step in range(boundary, SCHEDULE["total_step"] + 2):  # final phase: the allocation stays fixed
        assert observed[step] == (target_budget, target_budget), step
    assert {len(mask) for mask in config.rank_pattern.values()} == {SCHEDULE["init_r"]}
    assert len({tuple(m) for m in config.rank_pattern.values()}) > 1  # ranks moved between modules


def test_update_and_allocate_is_reachable_and_needs_gradients():
    model, inputs, _ = _adalora_model("bert", **SCHEDULE)
    assert model.update_and_allocate.func is model.base_model.update_and_allocate.func
    model.train()
    model(**inputs).loss.backward()
    model.update_and_allocate(0)  # through PeftModel, like model.base_model.update_and_allocate
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match=r"has no gradient.*after loss\.backward\(\)"):
        model.update_and_allocate(1)


def test_one_trainable_adapter_per_model():
    model, _, _ = _adalora_model("bert")
    with pytest.raises(ValueError, match="supports only 1 trainable adapter"):
        model.add_adapter("second", AdaLoraConfig(task_type="SEQ_CLS", total_step=10))
    assert set(model.peft_config) == {"default"}
    assert not any("second" in n for n, _ in model.named_parameters())
    model.add_adapter("frozen", AdaLoraConfig(task_type="SEQ_CLS", total_step=10, inference_mode=True))
    assert model.base_model.trainable_adapter_name == "default"


# -- configs ------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "message"), [
    (dict(), "total_step is required"),
    (dict(total_step=0), "total_step must be a positive integer"),
    (dict(total_step=10, tinit=5, tfinal=5), "don't allow for a budgeting phase"),
    (dict(total_step=10, orth_reg_weight=-1.0), "`orth_reg_weight` should be greater than or equal to 0"),
    (dict(total_step=10, deltaT=0), "deltaT must be a positive integer"),
    (dict(total_step=10, use_dora=True), "ADALORA does not support DoRA"),
    (dict(total_step=10, rank_pattern={"a.b": [True]}), "does not name a lora_E parameter"),
    (dict(total_step=10, rank_pattern={"a.b.lora_E": [2]}), r"rank_pattern must be None or a dict of \(a list of bool"),
    (dict(total_step=10, init_r=0), "init_r must be a positive integer"),
    (dict(total_step=10, target_r=13), "target_r=13 exceeds init_r=12"),  # PEFT fails in training (kthvalue)
    (dict(total_step=10, beta1=1.0), r"beta1 must be in \(0, 1\), got 1.0"),
    (dict(total_step=10, beta2=0.0), r"beta2 must be in \(0, 1\), got 0.0"),
    (dict(total_step=10, rank_pattern={"a.b.lora_E": [True] * 3}), r"rank_pattern\['a.b.lora_E'\] has 3 entries"),
])
def test_bad_configs_are_refused_clearly(options, message):
    with pytest.raises(ValueError, match=message):
        AdaLoraConfig(**options)


def test_r_is_ignored_with_a_warning_as_in_peft():
    with pytest.warns(UserWarning, match="init_r"):
        AdaLoraConfig(total_step=10, r=4)


def test_unknown_architecture_needs_target_modules():
    with pytest.raises(
        ValueError,
        match="AdaLoraConfig.target_modules is None and no installed plugin has a default for model_type None",
    ):
        get_peft_model(nn.Sequential(nn.Linear(3, 3)), AdaLoraConfig(total_step=10))


def test_config_json_has_exactly_peft_keys(tmp_path):
    import peft

    model, _, _ = _adalora_model("bert")
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(written) == set(peft.AdaLoraConfig(total_step=1).to_dict())
    assert written["peft_type"] == "ADALORA" and written["rank_pattern"] is None


# -- files --------------------------------------------------------------------------------


def _shapes(path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}


def test_save_and_load_round_trip_after_allocation_shrinks_to_the_allocated_ranks(tmp_path):
    model, inputs, _ = _adalora_model("bert", **SCHEDULE)
    train_with_allocation(model, inputs, steps=SCHEDULE["total_step"])
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    assert all(key.endswith(".lora_E") for key in saved)  # adapter name stripped, as PEFT writes it
    shapes = _shapes(tmp_path)
    assert not any("ranknum" in key for key in shapes)
    for key, mask in saved.items():
        module = "base_model.model." + key[: -len(".lora_E")]
        assert shapes[module + ".lora_E"] == (sum(mask), 1)
        assert shapes[module + ".lora_A"][0] == sum(mask) == shapes[module + ".lora_B"][1]
    assert sum(shapes[k][0] for k in shapes if k.endswith(".lora_E")) == SCHEDULE["target_r"] * len(saved)

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loaded = peftcore.PeftModel.from_pretrained(tiny_model("bert")[0], tmp_path)
    torch.testing.assert_close(logits(loaded, inputs), expected, atol=1e-6, rtol=0)
    for path, triplet in _triplets(loaded).items():
        kept = sum(saved[path.removeprefix("base_model.model.") + ".lora_E"])
        assert triplet["lora_A"].shape[0] == kept
    loaded.save_pretrained(tmp_path / "again")  # already at the allocated ranks: saved as they are
    assert _shapes(tmp_path / "again") == shapes


def test_a_rank_pattern_that_does_not_fit_the_model_is_reported(tmp_path):
    model, _, _ = _adalora_model("bert", init_r=4, target_r=2)
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["rank_pattern"] = {"bert.encoder.layer.0.attention.self.query.lora_E": [True, False]}
    config_path.write_text(json.dumps(config))
    message = r"adapter_config.json: AdaLoraConfig: rank_pattern\[.*query.lora_E'\] has 2 entries but init_r is 4"
    with pytest.raises(peftcore.AdapterFileError, match=message):
        peftcore.PeftModel.from_pretrained(tiny_model("bert")[0], tmp_path)


def test_trainer_callback_allocates_ranks_without_a_manual_call(tmp_path):
    from transformers import Trainer, TrainingArguments

    from peftcore_adalora import AdaLoraCallback

    model, inputs, _ = _adalora_model("bert", **SCHEDULE)
    rows = [{"input_ids": ids, "labels": label} for ids, label in zip(inputs["input_ids"], inputs["labels"])] * 4
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=SCHEDULE["total_step"], per_device_train_batch_size=4,
                             learning_rate=1e-2, save_strategy="no", report_to=[], logging_strategy="no", use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[AdaLoraCallback()])
    trainer.train()
    rank_pattern = model.peft_config["default"].rank_pattern
    assert rank_pattern is not None
    assert sum(sum(m) for m in rank_pattern.values()) == SCHEDULE["target_r"] * len(rank_pattern)
    assert sum(int((t["lora_E"] != 0).sum()) for t in _triplets(model).values()) == SCHEDULE["target_r"] * len(
        rank_pattern
    )


def test_callback_warns_when_total_step_differs_from_the_trainer_steps():
    from transformers import TrainerControl, TrainerState

    from peftcore_adalora import AdaLoraCallback

    model, _, _ = _adalora_model("bert", total_step=10)
    with pytest.warns(UserWarning, match="total_step=10 but the Trainer will run 20 optimizer steps"):
        AdaLoraCallback().on_train_begin(None, TrainerState(max_steps=20), TrainerControl(), model=model)
    with pytest.raises(TypeError, match="Linear is not a peftcore model with an AdaLoRA adapter"):
        AdaLoraCallback(model=nn.Linear(2, 2)).on_optimizer_step(None, TrainerState(), TrainerControl())
