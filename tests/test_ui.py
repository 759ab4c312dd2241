"""ui: console width rules, quiet mode and the progress bar (on stderr, never stdout)."""
from __future__ import annotations

import io
import sys

import pytest

from qsdcompress import ui


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("columns,stream,expect", [
    (None, _Stream(tty=False), 120),   # a file or pipe: wide enough for the tables
    (None, _Stream(tty=True), None),   # a terminal: its own width
    ("70", _Stream(tty=False), None),  # COLUMNS set: rich reads it
    (None, None, 120),                 # no stderr at all (pythonw)
])
def test_console_width(monkeypatch, columns, stream, expect):
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    monkeypatch.setattr(sys, "stderr", stream)
    assert ui.console_width() == expect


@pytest.mark.parametrize("value,expect", [(None, False), ("", False), ("0", False), ("1", True), ("yes", True)])
def test_quiet(monkeypatch, value, expect):
    if value is None:
        monkeypatch.delenv("QSDCOMPRESS_QUIET", raising=False)
    else:
        monkeypatch.setenv("QSDCOMPRESS_QUIET", value)
    assert ui.quiet() is expect


def test_progress_bar_counts_and_writes_to_stderr_only(monkeypatch, capsys):
    monkeypatch.setenv("QSDCOMPRESS_QUIET", "0")
    with ui.progress_bar("crunch", 3, extra="start") as (bar, task):
        for i in range(3):
            bar.update(task, advance=1, info=f"step {i}")
        t = bar.tasks[0]
        assert (t.completed, t.total, t.fields["info"]) == (3, 3, "step 2")
    out, err = capsys.readouterr()
    assert out == ""
    assert "crunch" in err and "3/3" in err and "step 2" in err


def test_quiet_progress_bar_still_counts_but_prints_nothing(monkeypatch, capsys):
    monkeypatch.setenv("QSDCOMPRESS_QUIET", "1")
    with ui.progress_bar("hidden", None) as (bar, task):
        bar.update(task, advance=5)
        assert bar.tasks[0].completed == 5 and bar.tasks[0].total is None
    assert capsys.readouterr() == ("", "")


def test_console_writes_to_stderr(capsys):
    ui.console.print("hello from the console")
    out, err = capsys.readouterr()
    assert out == "" and "hello from the console" in err


@pytest.mark.parametrize("value, expect", [(0.9266, "92.66%"), (1.0, "100.00%"), (0.0, "0.00%"),
                                           (0.12346, "12.35%"), (None, "-")])
def test_percent(value, expect):
    assert ui.percent(value) == expect
