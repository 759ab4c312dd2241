"""The ``qsdcompress`` command line: a thin click layer over the Python API.

Every command takes ``--json`` (exactly one JSON object on stdout; progress and tables go to
stderr) and works with no arguments on the bundled digits model. Commands share a work
directory (``--workdir``, default ``./qsdcompress-out``): ``convert`` writes ``converted.qsd``,
``finetune`` reads it and writes ``finetuned.qsd``, ``export`` and ``report`` take the newest.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import click

from .errors import QsdError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _fail(msg: str) -> None:
    from .ui import console

    console.print(f"[bold red]error:[/] {msg}", markup=True, highlight=False, soft_wrap=True)
    sys.exit(2)


class QsdGroup(click.Group):
    """Turns user mistakes into one-line errors with a non-zero exit (never a traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except QsdError as e:
            _fail(str(e))
        except FileNotFoundError as e:
            _fail(f"file not found: {e.filename or e}")
        except KeyboardInterrupt:
            _fail("interrupted")
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except Exception as e:  # a bug: say so in one line, traceback on request
            if os.environ.get("QSDCOMPRESS_DEBUG"):
                raise
            _fail(f"{type(e).__name__}: {e} (internal error; rerun with QSDCOMPRESS_DEBUG=1 for the traceback)")


def json_option(f: Callable) -> Callable:
    """``--json``: print exactly one JSON object with the results on stdout."""
    return click.option("--json", "as_json", is_flag=True,
                        help="Print the results as one JSON object on stdout (progress goes to stderr).")(f)


def workdir_option(f: Callable) -> Callable:
    return click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
                        default=Path("qsdcompress-out"), show_default=True,
                        help="Work directory the commands share (converted.qsd, finetuned.qsd, model.onnx).")(f)


def emit(result: dict, as_json: bool, show: Callable[[dict], None] | None = None) -> None:
    """Write the result: JSON on stdout, or a human rendering on stderr."""
    if as_json:
        click.echo(json.dumps(result, default=_json_default))
    elif show is not None:
        show(result)
    else:
        from .ui import console

        console.print_json(json.dumps(result, default=_json_default))


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


@click.group(cls=QsdGroup, context_settings=CONTEXT)
@click.version_option(package_name="qsdcompress")
def main() -> None:
    """Turn a spike-driven Transformer into a low-bit QSD-Transformer.

    \b
    Pipeline (each step works with no arguments on the bundled digits model):
      qsdcompress convert --bits 4         low-bit weights + IE-LIF -> qsdcompress-out/converted.qsd
      qsdcompress finetune --teacher ann   distillation QAT          -> qsdcompress-out/finetuned.qsd
      qsdcompress export                   packed low-bit ONNX       -> qsdcompress-out/model.onnx
      qsdcompress report                   size, spikes and energy
      qsdcompress eval [MODEL]             top-1/top-5 on a dataset
      qsdcompress demo                     all of the above in one go
    """


def _show_eval(r: dict) -> None:
    from rich.table import Table

    from .ui import console

    t = Table(title=f"eval: {r.get('model')} on {r.get('data')}")
    for c in ("top1", "top5", "loss", "samples", "images/s"):
        t.add_column(c, justify="right")
    t.add_row(f"{r['top1'] * 100:.2f}%", f"{r['top5'] * 100:.2f}%", f"{r['loss']:.4f}", str(r["samples"]),
              str(r.get("images_per_s")))
    console.print(t)


@main.command("eval", context_settings=CONTEXT)
@click.argument("model", required=False)
@click.option("--arch", help="Architecture of a reference checkpoint (e.g. spikformer_8_512_CAFormer); "
              "inferred from the keys when omitted.")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path),
              help="Weights file (.pth/.pt/.safetensors/.qsd); same as giving MODEL.")
@click.option("--data", default="digits", show_default=True,
              help="digits | synthetic[:N] | cifar10:DIR | cifar100:DIR | an ImageFolder directory.")
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--spike-mode", type=click.Choice(["integer", "binary"]), default=None,
              help="binary: run every integer neuron as D binary spikes over D virtual steps.")
@click.option("--max-batches", type=click.IntRange(1), default=None, help="Stop after this many batches.")
@json_option
def eval_cmd(model: str | None, arch: str | None, checkpoint: Path | None, data: str, split: str,
             batch_size: int, device: str, spike_mode: str | None, max_batches: int | None,
             as_json: bool) -> None:
    """Top-1/top-5 and loss of MODEL (default: the bundled digits model).

    MODEL is a .qsd file, a reference checkpoint (.pth/.pt/.safetensors, with --arch or inferred)
    or an exported .onnx file (run by onnxruntime).

    \b
    Examples:
      qsdcompress eval
      qsdcompress eval qsdcompress-out/converted.qsd --spike-mode binary
      qsdcompress eval --arch spikformer_8_512_CAFormer --checkpoint 8_512.pth --data /data/imagenet
    """
    from . import api

    if model and checkpoint:
        raise QsdError("give either MODEL or --checkpoint, not both")
    r = api.eval(model or checkpoint, data=data, split=split, batch_size=batch_size, device=device,
                 spike_mode=spike_mode, arch=arch, max_batches=max_batches)
    emit(r, as_json, _show_eval)


# --- convert (qsdcompress/quant.py) ---

# --- finetune (qsdcompress/distill.py, qsdcompress/train.py) ---

# --- export and report (qsdcompress/export.py, qsdcompress/report.py) ---

# --- demo ---


if __name__ == "__main__":  # pragma: no cover
    main()
