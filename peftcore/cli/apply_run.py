"""What ``peftcore apply`` does: load, attach, evaluate, train, evaluate, save, reload and compare."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import torch

from peftcore.cli import adapter_bodies, assets, launch, models, quantize
from peftcore.cli import datasets as data
from peftcore.cli import training_loop as train
from peftcore.cli.errors import CliError, user_errors
from peftcore.cli.render import human_bytes, progress, status, table
from peftcore.config import TaskType
from peftcore.files import SAFETENSORS_WEIGHTS_NAME
from peftcore.loop_hooks import run_length_field
from peftcore.member_adapters import member_field

SEQ_CLS, CAUSAL_LM = TaskType.SEQ_CLS.value, TaskType.CAUSAL_LM.value
# Built-in model -> the dataset it trains on when none is given
DEFAULT_DATASETS = {"minilm": "sms-spam", "smollm2": "movie-sentiment"}
# (n_train, n_test) for built-in sets, and training defaults: MiniLM + sms-spam finishes in about a minute on
# 2 CPU cores (0.52 -> 0.96-0.97 held-out accuracy over two seeds at lr 2e-3; 0.90 at 1e-3)
BUILTIN_SIZES = {SEQ_CLS: (512, 256), CAUSAL_LM: (128, 32)}
TRAINING_DEFAULTS = {SEQ_CLS: dict(epochs=2, lr=2e-3, batch_size=16), CAUSAL_LM: dict(epochs=1, lr=1e-3, batch_size=8)}
RELOAD_TOLERANCE = 1e-4  # the reloaded adapter runs the same computation; anything above is a bug


@dataclass
class ApplyRequest:
    method: Any
    config_kwargs: dict[str, Any]
    model: str | None = None
    dataset: str | None = None
    out: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    n_train: int | None = None
    n_test: int | None = None
    balanced: bool | None = None
    epochs: float | None = None
    lr: float | None = None
    batch_size: int | None = None
    max_length: int = 128
    seed: int = 0
    device: str | None = None
    gradient_checkpointing: bool = False
    offload_activations: bool = False
    quantize: str | None = None
    nproc_per_node: int = 1
    as_json: bool = False


@dataclass
class Results:
    """Everything ``apply`` reports, in the order of the final table."""

    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (what, before, after)
    facts: dict[str, Any] = field(default_factory=dict)

    def metric(self, key: str, label: str, before: float, after: float, fmt: str = "{:.3f}") -> None:
        self.rows.append((label, fmt.format(before), fmt.format(after)))
        self.facts[key] = {"before": before, "after": after}


def run_apply(request: ApplyRequest, report: bool = True):
    started = time.perf_counter()
    models.quiet_transformers()
    model_spec = request.model or models.DEFAULT_MODEL
    model_path = models.resolve(model_spec)
    task_type = str(request.config_kwargs.get("task_type") or models.infer_task_type(model_path)).upper()
    if task_type not in (SEQ_CLS, CAUSAL_LM):
        raise CliError(f"apply trains SEQ_CLS or CAUSAL_LM models, not {task_type}",
                       "use the Python API (get_peft_model) for other task types")
    request.config_kwargs["task_type"] = task_type
    request.device = _check_device(request.device)
    if request.offload_activations and not request.gradient_checkpointing:
        raise CliError("--offload-activations needs --gradient-checkpointing (it moves what checkpointing keeps)",
                       "add --gradient-checkpointing")
    config = _make_config(request)  # bad options fail here, before any model or data is loaded
    quantize.loading_kwargs(request.quantize, request.device)  # and a missing quantization plugin
    dataset_spec = request.dataset or DEFAULT_DATASETS.get(model_spec)
    for key, value in TRAINING_DEFAULTS[task_type].items():
        if getattr(request, key) is None:
            setattr(request, key, value)
    settings = train.TrainSettings(epochs=request.epochs, learning_rate=request.lr, batch_size=request.batch_size,
                                   max_length=request.max_length, seed=request.seed)
    out = Path(request.out or _default_out(request.method.name, model_spec, dataset_spec))
    results = Results(facts={"method": request.method.name, "model": model_spec, "task_type": task_type,
                             "dataset": dataset_spec, "out": str(out), "device": request.device,
                             "quantize": request.quantize})
    if request.nproc_per_node > 1 and not launch.in_worker():
        launch.check_request(request.nproc_per_node, request.batch_size)
        results, out = launch.launch(run_apply, request, request.nproc_per_node)  # rank 0's results
    else:
        runner = _classification if task_type == SEQ_CLS else _causal_lm
        with user_errors(hint=f"see `peftcore apply {request.method.name} --help`"):
            runner(request, config, model_path, dataset_spec, settings, out, results)
        results.facts["processes"] = launch.world_size()
    results.facts["seconds"] = round(time.perf_counter() - started, 1)
    if not report:
        return results, out
    _report(results, out, request.as_json)


def _check_device(name: str | None) -> str:
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CliError(f"--device {name!r} is not a torch device", "use cpu, cuda or cuda:N") from None
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and not (hasattr(backend, "is_available") and backend.is_available()):
        raise CliError(f"--device {name}: no {device.type} device is available here", "use --device cpu") from None
    return name


def _default_out(method: str, model_spec: str, dataset_spec: str | None) -> str:
    model_name = model_spec if model_spec in assets.MODEL_ALIASES else Path(model_spec).name or "model"
    dataset_name = dataset_spec if dataset_spec is None or data.is_builtin(dataset_spec) else Path(dataset_spec).stem
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{method}-{model_name}-{dataset_name or 'untrained'}")
    return str(Path("peftcore-out") / slug)


def _sizes(request: ApplyRequest, dataset_spec: str, total: int, task_type: str) -> tuple[int, int]:
    if data.is_builtin(dataset_spec):
        n_train, n_test = BUILTIN_SIZES[task_type]
        return data.split_sizes(total, request.n_train or n_train, request.n_test or n_test)
    return data.split_sizes(total, request.n_train, request.n_test)


# A method whose schedule spans the whole run (AdaLoRA's rank budget) takes the run's length in
# the config field marked metadata={"run_length": True}. The CLI knows it only once the data is
# split: until then a provisional value lets the other options be checked early; _attach fills
# in the real one.
PROVISIONAL_RUN_LENGTH = 1000


def _make_config(request: ApplyRequest, run_steps: int | None = None):
    kwargs = dict(request.config_kwargs)
    run_length = run_length_field(request.method.config_class)
    if run_length is not None and kwargs.get(run_length) is None:
        kwargs[run_length] = run_steps or PROVISIONAL_RUN_LENGTH
    try:
        return request.method.config_class(**kwargs)
    except (ValueError, TypeError) as exc:
        name = request.method.config_class.__name__
        raise CliError(str(exc) if str(exc).startswith(name) else f"{name}: {exc}",
                       f"check the method options: peftcore apply {request.method.name} --help") from None


def _attach(request: ApplyRequest, config, base, results: Results, run_steps: int | None = None):
    from peftcore import get_peft_model

    run_length = run_length_field(type(config))
    if run_steps and run_length is not None and request.config_kwargs.get(run_length) is None:
        config = _make_config(request, run_steps)
    limit = models.max_positions(base)
    if limit is not None and request.max_length > limit:
        raise CliError(f"--max-length {request.max_length} is more than the model's {limit} positions",
                       f"use --max-length {limit} or less")
    members = member_field(type(config))
    peft_model = _attach_over_members(config, members, base, results) if members else get_peft_model(base, config)
    peft_model = peft_model.to(request.device)
    if request.gradient_checkpointing:
        peft_model.gradient_checkpointing_enable(offload=request.offload_activations)
    trainable, total = peft_model.get_nb_trainable_parameters()
    targets = config.target_modules if hasattr(config, "target_modules") else None
    results.facts.update(trainable_params=trainable, total_params=total,
                         targets=sorted(targets) if isinstance(targets, (set, list)) else targets)
    return peft_model


def _attach_over_members(config, field_name: str, base, results: Results):
    """A method that builds on adapters (fusion): ``--<field>`` lists adapter folders, loaded (layers only) first.

    Each member is named after its folder and saved beside the new adapter, which is
    ``default`` (the top of --out), so the folder reloads on its own.
    """
    from peftcore.peft_model import TASK_MODELS, PeftModel

    folders = [Path(f) for f in getattr(config, field_name)]
    names = adapter_bodies.names_for(folders)
    status(f"loading the adapters it builds on: {', '.join(f'{n} ({f})' for n, f in zip(names, folders))}")
    model_cls = TASK_MODELS.get(str(config.task_type), PeftModel)
    peft_model, _ = adapter_bodies.load_bodies(base, folders, names, model_cls)
    setattr(config, field_name, names)
    peft_model.add_adapter("default", config)
    peft_model.set_adapter("default")
    results.facts["members"] = {name: str(folder) for name, folder in zip(names, folders)}
    return peft_model


def _fit(peft_model, examples, pad_id, settings, label: str) -> list[float]:
    steps = train.total_steps(len(examples), settings)
    with progress(steps, label) as advance:
        return train.fit(peft_model, examples, pad_id, settings, on_step=lambda step, loss: advance(loss))


# -- sequence classification ----------------------------------------------------------------------


def _classification(request, config, model_path, dataset_spec, settings, out, results) -> None:
    tokenizer = models.load_tokenizer(model_path)
    train_set = test_set = None
    label_names = ["0", "1"]
    if dataset_spec is not None:
        full = data.load_classification(dataset_spec, request.text_column, request.label_column)
        n_train, n_test = _sizes(request, dataset_spec, len(full), SEQ_CLS)
        balanced = request.balanced if request.balanced is not None else data.is_builtin(dataset_spec)
        train_set, test_set = data.split(full, n_train, n_test, seed=request.seed, balanced=balanced)
        label_names = full.label_names
        results.facts.update(n_train=n_train, n_test=n_test, labels=label_names)
        status(f"data: {full.name}, {len(full)} rows, {len(label_names)} classes; {n_train} train / {n_test} held out")

    def load_base():
        torch.manual_seed(request.seed)  # the new classifier head's init
        # a checkpoint whose head has another number of classes gets a new head, as the data needs
        base = models.load_model(
            model_path,
            SEQ_CLS,
            num_labels=len(label_names),
            ignore_mismatched_sizes=True,
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
            **quantize.loading_kwargs(request.quantize, request.device),
        )
        return quantize.prepare(base, request.quantize, request.gradient_checkpointing)

    status(f"model: {model_path}")
    run_steps = train.total_steps(len(train_set), settings) if train_set is not None else None
    peft_model = _attach(request, config, load_base(), results, run_steps)
    pad = train.pad_id(tokenizer)
    probe = train.classification_examples(tokenizer, test_set or _probe_set(), settings.max_length)
    if train_set is not None:
        status("evaluating before training (the classifier head is freshly initialised)")
        before = train.accuracy(train.predict_logits(peft_model, probe, 64, pad), test_set.labels)
        examples = train.classification_examples(tokenizer, train_set, settings.max_length)
        losses = _fit(peft_model, examples, pad, settings, "training")
        after = train.accuracy(train.predict_logits(peft_model, probe, 64, pad), test_set.labels)
        results.metric("accuracy", "accuracy (held out)", before, after)
        results.metric(
            "train_loss", "training loss (first step, last 5)", losses[0], sum(losses[-5:]) / len(losses[-5:]), "{:.4f}"
        )
    expected = train.predict_logits(peft_model, probe[:64], 64, pad)
    _save_and_check(
        peft_model, out, load_base, lambda m: train.predict_logits(m, probe[:64], 64, pad), expected, results
    )


def _probe_set() -> data.LabelledText:
    texts = ["The film was a delight from start to finish.", "Call now to claim your free prize!",
             "See you at lunch tomorrow?", "A dull, lifeless script."]
    return data.LabelledText(texts, [0] * len(texts), ["0"], "probe", "built-in sentences")


# -- causal LM ------------------------------------------------------------------------------------------


def _causal_lm(request, config, model_path, dataset_spec, settings, out, results) -> None:
    tokenizer = models.load_tokenizer(model_path)
    train_set = test_set = None
    if dataset_spec is not None:
        full = data.load_prompt_completions(dataset_spec, request.text_column, request.label_column)
        n_train, n_test = _sizes(request, dataset_spec, len(full), CAUSAL_LM)
        train_set, test_set = data.split_prompts(full, n_train, n_test, seed=request.seed)
        results.facts.update(n_train=n_train, n_test=n_test)
        status(f"data: {full.name}, {len(full)} rows as prompt -> completion; {n_train} train / {n_test} held out")
    probe_set = test_set or data.PromptCompletions(["The capital of France is"], [" Paris"], "probe", "built-in")

    def load_base():
        base = models.load_model(model_path, CAUSAL_LM, **quantize.loading_kwargs(request.quantize, request.device))
        return quantize.prepare(base, request.quantize, request.gradient_checkpointing)

    status(f"model: {model_path}")
    run_steps = train.total_steps(len(train_set), settings) if train_set is not None else None
    peft_model = _attach(request, config, load_base(), results, run_steps)
    sample_prompt = probe_set.prompts[0] or probe_set.completions[0][:40]
    results.facts["sample_prompt"] = sample_prompt
    if train_set is not None:
        status("evaluating before training")
        sample_before = train.generate_text(peft_model, tokenizer, sample_prompt)
        loss_before = train.mean_token_loss(peft_model, tokenizer, test_set, settings)
        choice_before = train.choice_accuracy(peft_model, tokenizer, test_set, settings)
        examples = train.prompt_completion_examples(tokenizer, train_set, settings.max_length)
        _fit(peft_model, examples, train.pad_id(tokenizer), settings, "training")
        results.metric("eval_loss", "loss per completion token (held out)", loss_before,
                       train.mean_token_loss(peft_model, tokenizer, test_set, settings), "{:.4f}")
        if choice_before is not None:
            results.metric("answer_accuracy", "answer accuracy (held out)", choice_before,
                           train.choice_accuracy(peft_model, tokenizer, test_set, settings))
        results.facts["generation"] = {
            "before": sample_before,
            "after": train.generate_text(peft_model, tokenizer, sample_prompt),
            "expected": probe_set.completions[0],
        }
    probe = train.prompt_completion_examples(tokenizer, probe_set, settings.max_length)[:16]
    nll = lambda m: _every_token_nll(m, probe, train.pad_id(tokenizer))  # noqa: E731
    _save_and_check(peft_model, out, load_base, nll, nll(peft_model), results)


@torch.no_grad()
def _every_token_nll(model, examples, pad_id) -> torch.Tensor:
    """The loss at every real position: what the reloaded adapter must reproduce (without full logits)."""
    model.eval()
    batch = train.to_device(train.pad_batch(examples, pad_id), model)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, train.IGNORE_INDEX)
    return model.token_nll(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).cpu()


# -- saving and the reload check ----------------------------------------------------------------------


def _save_and_check(peft_model, out: Path, load_base, outputs_of, expected: torch.Tensor, results: Results) -> None:
    from peftcore import PeftModel

    peft_model.save_pretrained(out, is_main_process=launch.is_main())  # every rank: sharded adapters gather
    if not launch.is_main():
        launch.barrier()  # wait for rank 0's reload check
        return
    weights = out / SAFETENSORS_WEIGHTS_NAME
    results.facts["adapter_bytes"] = weights.stat().st_size
    status(f"saved the adapter to {out}; reloading it with PeftModel.from_pretrained")
    reloaded = PeftModel.from_pretrained(load_base(), str(out)).to(next(peft_model.parameters()).device)
    diff = (outputs_of(reloaded) - expected).abs().max().item()
    results.facts["reload_max_abs_diff"] = diff
    launch.barrier()
    if not diff <= RELOAD_TOLERANCE:
        raise CliError(f"the reloaded adapter in {out} changes the outputs (max abs diff {diff:.3g})",
                       "this is a bug in peftcore or the method plugin; please report it")


def _report(results: Results, out: Path, as_json: bool) -> None:
    facts = results.facts
    if as_json:
        click.echo(json.dumps(facts, indent=2, default=str))
        return
    if "generation" in facts:
        gen = facts["generation"]
        click.echo(f"\ngeneration on a held-out prompt (greedy, 12 new tokens)\nprompt:   {facts['sample_prompt']!r}\n"
                   f"expected: {gen['expected']!r}\nbefore:   {gen['before']!r}\nafter:    {gen['after']!r}")
    rows = [list(r) for r in results.rows]
    share = 100 * facts["trainable_params"] / facts["total_params"]
    info = [
        [
            "method",
            facts["method"],
            f"targets: {', '.join(facts['targets']) if isinstance(facts['targets'], list) else facts['targets']}",
        ],
        ["trainable params", f"{facts['trainable_params']:,}", f"of {facts['total_params']:,} ({share:.2f}%)"],
        ["adapter size", human_bytes(facts["adapter_bytes"]), SAFETENSORS_WEIGHTS_NAME],
        ["reload check", f"max |diff| {facts['reload_max_abs_diff']:.2g}", "PeftModel.from_pretrained, same outputs"],
        ["saved to", str(out), f"{facts['seconds']:.0f} s in all"],
    ]
    click.echo("")
    if rows:
        click.echo(table(rows, ["", "before", "after"]))
        click.echo("")
    click.echo(table(info))
    if facts.get("dataset") is None:
        click.echo("\n(no --dataset: the adapter was attached and saved without training)")
