"""Output helpers: aligned tables on stdout, progress on stderr, human sizes."""

from __future__ import annotations

import sys
from contextlib import contextmanager

import click

from peftcore.cli import launch


def table(rows: list[list[str]], header: list[str] | None = None) -> str:
    body = [header] + rows if header else rows
    widths = [max(len(str(row[i])) for row in body) for i in range(len(body[0]))]

    def line(row):
        return "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()

    lines = [line(row) for row in body]
    if header:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def human_bytes(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def status(message: str) -> None:
    """A progress line for humans (stderr, so stdout stays the result); rank 0's only in a multi-process run."""
    if launch.is_main():
        click.echo(message, err=True)


@contextmanager
def progress(length: int, label: str):
    """A progress bar on stderr; yields ``advance(loss)`` to call once per step."""
    shown = {"loss": None}

    def show(_):
        return f"loss {shown['loss']:.4f}" if shown["loss"] is not None else ""

    if not launch.is_main():
        yield lambda loss=None: None
        return
    with click.progressbar(length=length, label=label, file=sys.stderr, item_show_func=show, show_pos=True) as bar:
        def advance(loss: float | None = None) -> None:
            shown["loss"] = loss
            bar.update(1, loss)

        yield advance
