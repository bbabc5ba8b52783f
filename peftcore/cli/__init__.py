"""The ``peftcore`` command: ``list``, ``apply``, ``info``, ``merge`` and ``fuse``.

Split by responsibility: one module per command, ``config_options`` turns a
method's config dataclass into options, ``models`` finds and loads base models,
``errors`` and ``render`` keep the output consistent. Training and data loading
live in :mod:`peftcore.cli.training_loop` and :mod:`peftcore.cli.datasets`, usable without the CLI.
"""

from __future__ import annotations

import click

from peftcore import __version__
from peftcore.cli.apply_cmd import apply
from peftcore.cli.fuse_cmd import fuse
from peftcore.cli.info_cmd import info
from peftcore.cli.list_cmd import list_methods
from peftcore.cli.merge_cmd import merge


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="peftcore")
def main() -> None:
    """Parameter-efficient fine-tuning with installable method plugins, in PEFT's format.

    Quick start: `peftcore apply lora` fine-tunes the built-in MiniLM on SMS spam.
    """


main.add_command(list_methods)
main.add_command(apply)
main.add_command(info)
main.add_command(merge)
main.add_command(fuse)

__all__ = ["main"]
