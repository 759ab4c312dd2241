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


@contextmanager
def progress_bar(description: str, total: int | None, extra: str = "") -> Iterator[tuple[Progress, int]]:
    """A rich progress bar on stderr; ``extra`` is a field updated with ``update(task, info=...)``."""
    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*cols, console=console, transient=False, disable=quiet()) as p:
        task = p.add_task(description, total=total, info=extra)
        yield p, task
