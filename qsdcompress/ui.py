"""Terminal output: one rich console on stderr (stdout is kept for ``--json``) and progress bars."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


def console_width() -> int | None:
    """None (the terminal's own width) on a terminal or when ``COLUMNS`` is set; else 120 columns,
    since rich's default of 80 for a file or pipe cuts numbers in the wider tables."""
    on_terminal = sys.stderr is not None and sys.stderr.isatty()  # None under pythonw
    return None if os.environ.get("COLUMNS") or on_terminal else 120


console = Console(stderr=True, highlight=False, width=console_width())


def quiet() -> bool:
    return os.environ.get("QSDCOMPRESS_QUIET", "") not in ("", "0")


def percent(v: float | None) -> str:
    """A fraction as the percentage every table prints (two decimals), ``-`` when unknown."""
    return f"{v * 100:.2f}%" if v is not None else "-"


def _block_head(parts: list[str]) -> int:
    """How many leading parts name the block: up to the first list index (``block3.1``,
    ``ConvBlock1_1.0``), else the top-level module alone."""
    for i, p in enumerate(parts[1:], 1):
        if p.isdigit():
            return i + 1
    return 1


def short_name(name: str, width: int) -> str:
    """``name`` in ``width`` characters, keeping its block and its end: the middle dotted parts
    become ``…`` (``block3.1.attn.proj_conv.0.body`` -> ``block3.1…proj_conv.0.body``), so
    layers of different blocks stay apart in a table."""
    if len(name) <= width:
        return name
    parts = name.split(".")
    h = _block_head(parts)
    head, rest = ".".join(parts[:h]), parts[h:]
    for k in range(len(rest) - 1, 0, -1):
        tail = ".".join(rest[-k:])
        if len(head) + 1 + len(tail) <= width:
            return f"{head}…{tail}"
    room = width - len(head) - 1
    if room >= 4:  # the block and the end of the last part
        return f"{head}…{name[-room:]}"
    tail = name[-(width - 1):]
    dot = tail.find(".")
    return "…" + (tail[dot + 1:] if 0 <= dot < len(tail) - 1 else tail)


@contextmanager
def progress_bar(description: str, total: int | None, extra: str = "") -> Iterator[tuple[Progress, int]]:
    """A rich progress bar on stderr; ``extra`` is a field updated with ``update(task, info=...)``."""
    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*cols, console=console, transient=False, disable=quiet()) as p:
        task = p.add_task(description, total=total, info=extra)
        yield p, task
