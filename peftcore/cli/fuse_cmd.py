"""``peftcore fuse ADAPTER... --type ties --weights ... --out DIR``: a weighted merge into a new PEFT adapter folder."""

from __future__ import annotations

import json
from pathlib import Path

import click

from peftcore.cli import adapter_bodies, models
from peftcore.cli.errors import CliError, user_errors
from peftcore.cli.merge_cmd import first_output, num_labels_of_head, probe_inputs
from peftcore.cli.render import human_bytes, status, table

FUSED = "default"  # saved at the top of --out
RELOAD_TOLERANCE = 1e-5


def _parse_weights(text: str | None, count: int) -> list[float]:
    if text is None:
        return [1.0 / count] * count
    try:
        weights = [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise CliError(f"--weights {text!r} is not a list of numbers", "e.g. --weights 0.5,0.5") from None
    if len(weights) != count:
        raise CliError(f"--weights has {len(weights)} values for {count} adapters", "give one weight per adapter")
    return weights


def _check_compatible(folders, configs, weights_files, model_spec, union_targets) -> None:
    """One method, one base model, the same adapted modules: errors name the adapters and the fix."""
    from peftcore.plugins import get_method
    from peftcore.serialization import tensors_by_module

    types = {str(f): c.peft_type for f, c in zip(folders, configs)}
    if len(set(types.values())) > 1:
        raise CliError(f"the adapters are of different methods: {types}", "fuse adapters of one method")
    method = get_method(configs[0].peft_type)
    if method.kind != "layer":
        raise CliError(f"{method.peft_type} adapters edit the model's inputs and have no weights to combine")
    bases = {str(f): c.base_model_name_or_path for f, c in zip(folders, configs) if c.base_model_name_or_path}
    if len(set(bases.values())) > 1 and model_spec is None:
        raise CliError(f"the adapters were trained on different base models: {bases}",
                       "fuse adapters of one base model (pass --model NAME_OR_PATH if these name the same model)")
    modules = {f: set(tensors_by_module(w, method.tensor_prefixes)) for f, w in zip(folders, weights_files)}
    first = folders[0]
    for other in folders[1:]:
        only_first, only_other = modules[first] - modules[other], modules[other] - modules[first]
        if (only_first or only_other) and not union_targets:
            sample = sorted(only_first or only_other)[0]
            raise CliError(
                f"{first} and {other} adapt different modules ({len(only_first)} only in the first, "
                f"{len(only_other)} only in the second, e.g. {sample})",
                "fuse adapters that target the same modules, or pass --union-targets to combine each module from "
                "the adapters that have it (PEFT's behaviour)",
            )


@click.command("fuse")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option("--type", "combination_type", default=None, metavar="TYPE",
              help="svd (default for LoRA), linear, cat, ties, ties_svd, dare_linear, dare_linear_svd, dare_ties, "
                   "dare_ties_svd, magnitude_prune, magnitude_prune_svd, or task_arithmetic (exactly the weighted "
                   "sum of the adapters' weight changes)")
@click.option("--weights", default=None, metavar="W,W,...", help="one weight per adapter [default: 1/N each]")
@click.option("--density", type=float, default=None, help="fraction of entries kept (ties, dare_*, magnitude_prune*)")
@click.option("--majority-sign-method", type=click.Choice(["total", "frequency"]), default=None,
              help="TIES sign election [default: total]")
@click.option("--svd-rank", type=click.IntRange(min=1), default=None,
              help="rank of the result for the *svd types and task_arithmetic [default: the largest input rank; "
                   "task_arithmetic: the sum of the ranks, exact]")
@click.option("--svd-clamp", type=click.FloatRange(0, 1), default=None, help="clamp the factors at this quantile")
@click.option("--svd-full-matrices/--no-svd-full-matrices", default=None, help="full SVD in the dense *_svd types")
@click.option("--svd-driver", default=None, help="cuSOLVER driver (CUDA only)")
@click.option("--seed", type=int, default=None, help="random seed for the dare_* types [default: torch's global RNG]")
@click.option("--model", "-m", "model_spec", default=None, metavar="NAME_OR_PATH",
              help="the base model [default: base_model_name_or_path from the adapter configs]")
@click.option("--union-targets", is_flag=True, default=False,
              help="allow adapters of different target modules (each module combines the adapters that have it)")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="folder for the new adapter")
@click.option("--json", "as_json", is_flag=True, default=False, help="print the results as JSON on stdout")
def fuse(adapters: tuple[Path, ...], combination_type, weights, density, majority_sign_method, svd_rank, svd_clamp,
         svd_full_matrices, svd_driver, seed, model_spec, union_targets, out: Path, as_json: bool) -> None:
    """Combine the adapters in ADAPTER... (PEFT's add_weighted_adapter) into one new adapter saved in --out.

    The adapted layers are combined; task heads (modules_to_save) are not (each task keeps its own), so the new
    adapter holds layers only.
    """
    models.quiet_transformers()
    folders = list(adapters)
    if any(out.resolve() == f.resolve() for f in folders):
        raise CliError("--out is one of the adapter folders", "pass a new folder for the fused adapter")
    read = [adapter_bodies.read_adapter(f) for f in folders]
    configs, weights_files = [c for c, _ in read], [w for _, w in read]
    _check_compatible(folders, configs, weights_files, model_spec, union_targets)
    mix = _parse_weights(weights, len(folders))
    options = {k: v for k, v in dict(density=density, majority_sign_method=majority_sign_method, svd_rank=svd_rank,
                                     svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices, svd_driver=svd_driver,
                                     seed=seed).items() if v is not None}
    spec = model_spec or configs[0].base_model_name_or_path
    if not spec:
        raise CliError("the adapter configs name no base model", "pass it with --model NAME_OR_PATH")
    path = models.resolve(spec)
    task = str(configs[0].task_type) if configs[0].task_type else None
    kwargs = {}
    if task in ("SEQ_CLS", "TOKEN_CLS"):  # the checkpoint class the adapters' module names come from
        kwargs = dict(num_labels=num_labels_of_head(weights_files[0]) or 2, ignore_mismatched_sizes=True)
    status(f"loading {path}")
    base = models.load_model(path, task, **kwargs)
    names = adapter_bodies.names_for(folders)
    peft_model, heads = adapter_bodies.load_bodies(base, folders, names)
    hint = "see `peftcore fuse --help`; --type cat, svd or task_arithmetic combine adapters of different ranks"
    with user_errors(hint=hint):
        peft_model.add_weighted_adapter(names, mix, FUSED, combination_type=combination_type, **options)
    with user_errors():
        peft_model.save_pretrained(out, selected_adapters=[FUSED])
    # reload the files beside the in-memory result and compare outputs: the folder must hold what was computed
    peft_model.load_adapter(out, "reloaded")
    inputs = probe_inputs(base)
    outputs = {}
    for name in (FUSED, "reloaded"):
        peft_model.set_adapter(name)
        outputs[name] = first_output(peft_model, inputs)
    diff = (outputs[FUSED] - outputs["reloaded"]).abs().max().item()
    if not diff <= RELOAD_TOLERANCE:
        raise CliError(f"the fused adapter saved in {out} changes the outputs when reloaded (max abs diff {diff:.3g})",
                       "this is a bug in peftcore or the method plugin; please report it")
    fused_config = peft_model.peft_config[FUSED]
    facts = {"type": combination_type or "default", "adapters": dict(zip(names, mix)), "options": options,
             "rank": getattr(fused_config, "r", None), "heads_left_out": heads, "out": str(out),
             "reload_max_abs_diff": diff, "layers": sum(1 for _, layer in peft_model.base_model.adapter_layers()
                                                       if layer.has_adapter(FUSED))}
    if as_json:
        click.echo(json.dumps(facts, indent=2, default=str))
        return
    size = (out / "adapter_model.safetensors").stat().st_size
    rows = [["type", facts["type"], ", ".join(f"{k}={v}" for k, v in options.items())],
            ["adapters", ", ".join(f"{n} x {w:g}" for n, w in zip(names, mix)), f"from {', '.join(map(str, folders))}"],
            ["result", f"rank {facts['rank']}" if facts["rank"] else fused_config.peft_type,
             f"{facts['layers']} layers"],
            ["reload check", f"max |diff| {diff:.2g}", "the saved folder gives the same outputs"],
            ["saved to", str(out), human_bytes(size)]]
    if heads:
        rows.append(["heads", "not merged", f"{', '.join(heads)}: each task keeps its own (the new adapter has none)"])
    click.echo(table(rows))

