"""``peftcore apply METHOD``: one sub-command per installed method, options built from its config class."""

from __future__ import annotations

import click

from peftcore.cli import config_options
from peftcore.cli.errors import CliError

# apply's own options; a config field with one of these names becomes --config-<name>
COMMON_OPTIONS = [
    click.Option(
        ["--model", "-m"],
        default=None,
        metavar="NAME_OR_PATH",
        help="base model: a local transformers folder or a built-in alias (minilm, smollm2) [default: minilm]",
    ),
    click.Option(
        ["--dataset", "-d"],
        default=None,
        metavar="PATH_OR_NAME",
        help="training data: a .csv/.tsv/.json/.jsonl file or a built-in set (sms-spam, movie-sentiment, questions); "
        "without it the adapter is attached and saved untrained, except for the built-in models, "
        "which default to sms-spam (minilm) and movie-sentiment (smollm2)",
    ),
    click.Option(
        ["--out", "-o"],
        default=None,
        type=click.Path(file_okay=False),
        metavar="DIR",
        help="where to save the adapter [default: ./peftcore-out/<method>-<model>-<dataset>]",
    ),
    click.Option(["--text-column"], default=None, help="column with the input text (default: text, sentence, ...)"),
    click.Option(["--label-column"], default=None, help="column with the class label (default: label, labels, ...)"),
    click.Option(
        ["--n-train"],
        type=click.IntRange(min=1),
        default=None,
        help="training examples [default: 512 (128 for causal LMs) for built-in sets, the rest of a file]",
    ),
    click.Option(
        ["--n-test"],
        type=click.IntRange(min=1),
        default=None,
        help="held-out examples [default: 256 (32 for causal LMs) for built-in sets, a fifth of a file up to 1000]",
    ),
    click.Option(
        ["--balanced/--no-balanced"],
        default=None,
        help="draw the same number of examples per class [default: on for built-in sets]",
    ),
    click.Option(
        ["--epochs"],
        type=click.FloatRange(min=0, min_open=True),
        default=None,
        help="passes over the training set (fractions allowed) [default: 2 (1 for causal LMs)]",
    ),
    click.Option(
        ["--lr"],
        type=click.FloatRange(min=0, min_open=True),
        default=None,
        help="peak learning rate (AdamW, linear warm-up and decay) [default: 2e-3 (1e-3 for causal LMs)]",
    ),
    click.Option(["--batch-size"], type=click.IntRange(min=1), default=None, help="[default: 16 (8 for causal LMs)]"),
    click.Option(
        ["--max-length"],
        type=click.IntRange(min=8),
        default=128,
        show_default=True,
        help="tokens per example, up to the model's maximum (8,192 for smollm2; causal LMs compute their loss in "
        "chunks, so 4,096 trains in a few GB)",
    ),
    click.Option(["--seed"], type=int, default=0, show_default=True, help="data split, shuffling, head init, dropout"),
    click.Option(
        ["--device"],
        default=None,
        metavar="DEVICE",
        help="torch device to train on, e.g. cpu, cuda, cuda:1 [default: cuda when available, else cpu]",
    ),
    click.Option(
        ["--gradient-checkpointing"],
        is_flag=True,
        default=False,
        help="recompute activations in the backward pass (less memory, slower)",
    ),
    click.Option(
        ["--offload-activations"],
        is_flag=True,
        default=False,
        help="with --gradient-checkpointing on a GPU: keep the checkpointed layer inputs in host memory",
    ),
    click.Option(
        ["--quantize"],
        type=click.Choice(["4bit", "8bit"]),
        default=None,
        help="load the base through bitsandbytes (4bit: NF4 with double quantization, QLoRA) and prepare it as "
        "PEFT's prepare_model_for_kbit_training does; needs the peftcore-bnb plugin",
    ),
    click.Option(
        ["--nproc-per-node"],
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="train on N local processes (DDP; gloo on CPU, nccl on GPUs), started by torch's elastic launcher "
        "(what torchrun runs); each takes a share of every batch, rank 0 evaluates, reports and saves",
    ),
    click.Option(["--json", "as_json"], is_flag=True, default=False, help="print the results as JSON on stdout"),
]
RESERVED = {name.lstrip("-") for option in COMMON_OPTIONS for name in option.opts} | {"json", "help"}


def _method_command(method) -> click.Command:
    options, to_field = config_options.build_options(method.config_class, RESERVED)

    def callback(**params):
        from peftcore.cli.apply_run import ApplyRequest, run_apply

        common = {o.name: params.pop(o.name) for o in COMMON_OPTIONS}
        request = ApplyRequest(method=method, config_kwargs=config_options.config_kwargs(params, to_field), **common)
        run_apply(request)

    summary = method.description or f"{method.peft_type} adapters"
    return click.Command(
        method.name, callback=callback, params=COMMON_OPTIONS + options,
        help=f"{summary}.\n\nAttach {method.name} to a model, train it when there is a dataset, evaluate on a held-out "
             f"split and save a PEFT-format adapter. With no options: MiniLM on sms-spam.\n\n"
             f"Options after the common ones come from {method.config_class.__name__}.",
        short_help=summary,
    )


class ApplyGroup(click.Group):
    """Sub-commands are the installed methods, discovered at run time."""

    def list_commands(self, ctx):
        from peftcore.plugins import methods

        return sorted(m.name for m in methods().values())

    def get_command(self, ctx, name):
        from peftcore.plugins import get_method

        try:
            return _method_command(get_method(name))
        except ValueError:
            return None

    def resolve_command(self, ctx, args):
        from peftcore.plugins import get_method

        name = args[0] if args else None
        if name is not None and not name.startswith("-") and self.get_command(ctx, name) is None:
            try:
                get_method(name)
            except ValueError as exc:
                raise CliError(str(exc).split(". ")[0].split("; ")[0],
                               _unknown_method_hint()) from None
        return super().resolve_command(ctx, args)


def _unknown_method_hint() -> str:
    from peftcore.plugins import methods, no_methods_hint

    names = sorted(m.name for m in methods().values())
    if not names:
        return no_methods_hint()
    return f"installed methods: {', '.join(names)} (see `peftcore list`)"


apply = ApplyGroup(
    "apply",
    help="Attach a PEFT method to a model, fine-tune it on a dataset and save the adapter.\n\n"
         "Run `peftcore apply lora` with no options for the built-in quick start (MiniLM on SMS spam).",
    no_args_is_help=True,
)
