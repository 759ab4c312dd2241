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
from typing import Any, Callable, Sequence

import click

from .config import DEFAULT_WORKDIR, Budget, FinetuneConfig, QuantConfig
from .errors import QsdError, one_line

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _fail(e: BaseException | str, as_json: bool = False, code: int = 2) -> None:
    """One line on stderr, or with ``--json`` one object ``{"error", "hint"}`` on stdout; exit ``code``."""
    from .errors import error_and_hint
    from .ui import console

    if as_json:
        error, hint = error_and_hint(e if isinstance(e, BaseException) else QsdError(e))
        click.echo(json.dumps({"error": error, "hint": hint}))
    else:
        hint = getattr(e, "hint", None)
        console.print(f"[bold red]error:[/] {e}" + (f"; {hint}" if hint else ""), markup=True, highlight=False,
                      soft_wrap=True)
    sys.exit(code)


class QsdGroup(click.Group):
    """Turns user mistakes into one-line errors with a non-zero exit (never a traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        as_json = "--json" in [*getattr(ctx, "_protected_args", []), *ctx.args]
        try:
            return super().invoke(ctx)
        except QsdError as e:
            _fail(e, as_json)
        except FileNotFoundError as e:
            _fail(f"file not found: {e.filename or e}", as_json)
        except KeyboardInterrupt:
            _fail("interrupted", as_json)
        except click.ClickException as e:
            if not as_json:
                raise
            cmd = f" {ctx.invoked_subcommand}" if ctx.invoked_subcommand else ""
            _fail(QsdError(e.format_message(), hint=f"see `qsdcompress{cmd} --help`"), True, e.exit_code)
        except (click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except Exception as e:  # a bug: say so in one line, traceback on request
            if os.environ.get("QSDCOMPRESS_DEBUG"):
                raise
            _fail(QsdError(f"{type(e).__name__}: {one_line(e)}",
                           hint="an internal error: rerun with QSDCOMPRESS_DEBUG=1 for the traceback"), as_json)


def json_option(f: Callable) -> Callable:
    """``--json``: print exactly one JSON object with the results on stdout."""
    return click.option("--json", "as_json", is_flag=True,
                        help="Print the results as one JSON object on stdout (progress goes to stderr).")(f)


def workdir_option(f: Callable) -> Callable:
    return click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
                        default=Path(DEFAULT_WORKDIR), show_default=True,
                        help="Work directory the commands share (converted.qsd, finetuned.qsd, model.onnx); "
                             "MODEL defaults to its newest fitting .qsd.")(f)


#: the help of every command's --data
DATA_HELP = ("digits | fashion-mnist[:DIR] | mnist:DIR | synthetic[:N] | cifar10:DIR | cifar100:DIR | an "
             "ImageFolder directory. Default: the model's own data (bundled models and every .qsd record it), "
             "else digits. Another data set than the model's own is refused.")


def data_option(help_text: str = DATA_HELP) -> Callable:
    return click.option("--data", default=None, help=help_text)


class LazyChoice(click.Choice):
    """A choice whose values are ``module.attr`` of this package, imported only when they are
    needed (so that ``--help`` stays quick)."""

    def __init__(self, module: str, attr: str) -> None:
        self._where = (module, attr)
        super().__init__(())

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        import importlib

        module, attr = self._where
        return tuple(getattr(importlib.import_module(module, __package__), attr))

    @choices.setter
    def choices(self, _value: Sequence[str]) -> None:
        pass


def runtime_option(f: Callable) -> Callable:
    return click.option("--runtime", type=LazyChoice(".onnx_export", "RUNTIMES"), default="onnxruntime",
                        show_default=True,
                        help="Runtime that runs the ONNX file: onnxruntime, or openvino (pip install "
                             "'qsdcompress[openvino]').")(f)


def device_option(f: Callable) -> Callable:
    return click.option("--device", default="auto", show_default=True,
                        help="auto (CUDA when present, else cpu), cpu, cuda or cuda:N.")(f)


def _int_list(_ctx: click.Context, _param: click.Parameter, value: Any) -> list[int] | None:
    if value is None or value == "" or value == []:
        return None
    items = value if isinstance(value, (list, tuple)) else str(value).strip("[]").replace(" ", "").split(",")
    try:
        return [int(v) for v in items if v != ""]
    except ValueError:
        raise click.BadParameter("give comma-separated teacher layer indices, e.g. 2,5,8,11") from None


def _field_option(fld: Any, hint: Any) -> Callable:
    """The click option of one config field: its type, bounds and choices from the field."""
    import dataclasses
    import typing

    meta = fld.metadata
    flag = meta.get("flag") or "--" + fld.name.replace("_", "-")
    default = fld.default if fld.default is not dataclasses.MISSING else fld.default_factory()
    if meta.get("cli_default", ...) is not ...:
        default = meta["cli_default"]
    args = typing.get_args(hint)
    base = next(a for a in args if a is not type(None)) if type(None) in args else hint
    kw: dict[str, Any] = {"help": meta.get("help") or None, "metavar": meta.get("metavar"),
                          "hidden": meta.get("hidden", False)}
    decls = [flag, *meta.get("aliases", ()), *([meta["short"]] if meta.get("short") else [])]
    if base is bool:
        decls = [f"{flag}/--no-{flag[2:]}"]
    elif meta.get("parse"):  # repeatable: the function reads the values given
        parse = meta["parse"]
        kw.update(multiple=True, callback=lambda _c, _p, v: parse(v))
        default = ()
    elif meta.get("text"):  # the config's validate() parses it
        default = ",".join(map(str, default)) if isinstance(default, list) else default
        default = None if default is None else str(default)
    elif meta.get("choices"):
        kw["type"] = click.Choice(meta["choices"])
    elif meta.get("path"):
        kw["type"] = click.Path(dir_okay=meta["path"] == "dir", file_okay=meta["path"] == "file", path_type=Path)
    elif base in (int, float):
        rng = click.IntRange if base is int else click.FloatRange
        kw["type"] = rng(min=meta["min"]) if meta.get("min") is not None else base
    elif typing.get_origin(base) is list:
        kw.update(type=str, callback=_int_list)
    kw.update(default=default, show_default=default not in (None, "", ()))
    return click.option(*decls, fld.name, **kw)


def config_options(cls: type, only: Sequence[str] | None = None) -> Callable:
    """Every field of a config dataclass (or those named in ``only``) as a click option; those
    marked ``cli=False`` are declared by hand: arguments and options shared by all commands."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)

    def decorate(f: Callable) -> Callable:
        for fld in reversed(dataclasses.fields(cls)):
            if fld.metadata.get("cli", True) and (only is None or fld.name in only):
                f = _field_option(fld, hints[fld.name])(f)
        return f
    return decorate


def emit(result: Any, as_json: bool) -> None:
    """Write a result (:mod:`qsdcompress.results`): JSON on stdout, or its table on stderr."""
    if as_json:
        click.echo(result.to_json())
    else:
        result.render()


@click.group(cls=QsdGroup, context_settings=CONTEXT)
@click.version_option(package_name="qsdcompress")
def main() -> None:
    """Turn a spike-driven Transformer into a low-bit QSD-Transformer.

    \b
    MODEL, in every command, is found by one rule:
      1. MODEL as given: a file (.qsd, reference checkpoint, .onnx for eval) or a bundled
         model's name (qsdcompress list);
      2. else the newest .qsd in --workdir the command takes (convert, sensitivity: a float
         model; finetune: a converted one; eval, export, report: any) whose data is --data;
      3. else the bundled model of --data (digits by default).
    --data defaults to the model's own data; data of another data set is refused.

    \b
    Pipeline (each step works with no arguments on the bundled digits model):
      qsdcompress convert --bits 4         low-bit weights + IE-LIF -> qsdcompress-out/converted.qsd
      qsdcompress sensitivity              damage per layer group and width (for mixed precision)
      qsdcompress finetune --teacher ann   distillation QAT          -> qsdcompress-out/finetuned.qsd
      qsdcompress export                   packed low-bit ONNX       -> qsdcompress-out/model.onnx
      qsdcompress report                   size, spikes and energy
      qsdcompress eval [MODEL]             top-1/top-5 on a dataset
      qsdcompress demo                     all of the above in one go
      qsdcompress list                     the bundled models and their data
    """


@main.command("eval", context_settings=CONTEXT)
@click.argument("model", required=False)
@click.option("--arch", help="Architecture of a reference checkpoint (e.g. spikformer_8_512_CAFormer); "
              "inferred from the keys when omitted.")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path),
              help="Weights file (.pth/.pt/.safetensors/.qsd); same as giving MODEL.")
@data_option()
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@device_option
@click.option("--spike-mode", type=click.Choice(["integer", "binary"]), default=None,
              help="binary: run every integer neuron as D binary spikes over D virtual steps.")
@click.option("--max-batches", type=click.IntRange(1), default=None, help="Stop after this many batches.")
@runtime_option
@click.option("--precision", type=click.Choice(["f32", "bf16", "f16"]), default=None,
              help="An .onnx file's inference precision under OpenVINO (default: OpenVINO's own, bf16 on CPUs "
                   "with bf16 instructions; f32 is the arithmetic the export's parity check ran).")
@workdir_option
@json_option
def eval_cmd(model: str | None, arch: str | None, checkpoint: Path | None, data: str | None, split: str,
             batch_size: int, device: str, spike_mode: str | None, max_batches: int | None, runtime: str,
             precision: str | None, workdir: Path, as_json: bool) -> None:
    """Top-1/top-5 and loss of MODEL on a split of its data.

    MODEL is a bundled model's name, a .qsd file, a reference checkpoint (.pth/.pt/.safetensors,
    with --arch or inferred) or an exported .onnx file (run by onnxruntime); without it, the rule
    of `qsdcompress --help` (the newest .qsd of --workdir, else the bundled model of --data).

    \b
    Examples:
      qsdcompress eval qsd_8_256_fmnist --data fashion-mnist
      qsdcompress eval qsdcompress-out/converted.qsd --spike-mode binary
      qsdcompress eval qsdcompress-out/model.onnx --runtime openvino
      qsdcompress eval --arch spikformer_8_512_CAFormer --checkpoint 8_512.pth --data /data/imagenet
    """
    from .pipeline import run_eval

    if model and checkpoint:
        raise QsdError("give either MODEL or --checkpoint, not both")
    r = run_eval(model or checkpoint, data=data, split=split, batch_size=batch_size, device=device,
                 spike_mode=spike_mode, arch=arch, max_batches=max_batches, workdir=workdir, runtime=runtime,
                 precision=precision)
    emit(r, as_json)


# --- convert (qsdcompress/quant, qsdcompress/pipeline.py) ---


@main.command("convert", context_settings=CONTEXT)
@click.argument("model", required=False)
@config_options(QuantConfig)
@click.option("--arch", help="Architecture of a reference checkpoint; inferred from the keys when omitted.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output .qsd (default: WORKDIR/converted.qsd).")
@click.option("--no-eval", is_flag=True, help="Skip the top-1 before/after evaluation.")
@click.option("--keep-float", is_flag=True,
              help="Also store the float latent weights (the .qsd then has float size): finetuning starts from "
                   "them instead of from the quantized grid points.")
@config_options(Budget)
@device_option
@workdir_option
@json_option
def convert_cmd(model: str | None, arch: str | None, output: Path | None, no_eval: bool, keep_float: bool,
                device: str, workdir: Path, as_json: bool, **opts: Any) -> None:
    """Low-bit weights + IE-LIF neurons: MODEL -> WORKDIR/converted.qsd.

    MODEL is a bundled model's name, a float .qsd file or a reference checkpoint (a reference LSQ
    checkpoint keeps its 4-bit steps); without it, the rule of `qsdcompress --help`.

    Calibration uses the model's own data only: the data a .qsd or bundled model records, else
    --data. A reference checkpoint records none, so without --data the conversion is weight-only
    (the checkpoint's BatchNorm statistics kept, IE-LIF starting as the plain neuron) and no top-1
    is reported; one line says so.

    \b
    Examples:
      qsdcompress convert --bits 4
      qsdcompress convert qsd_8_256_fmnist --bits 2
      qsdcompress convert --bits 4 --first-last-bits 8 --layer-bits 'block3.*.mlp.*=2'
      qsdcompress convert 8_512.pth --arch spikformer_8_512_CAFormer --data /data/imagenet --calib-samples 1024
      qsdcompress convert --target-size-mb 0.22          # mixed precision: widths per layer group
      qsdcompress convert --max-drop 0.5 --first-last-bits 8

    With --target-size-mb, --target-energy-mj or --max-drop the widths come from a plan: per layer
    group (a block's q/k/v, its projection, each MLP layer, each conv-stage layer) the damage at
    each candidate width is measured on validation images, and scipy's MILP picks the widths
    with the least summed damage within the budget. --layer-bits, --first-last-bits and --skip
    still fix the layers they name.
    """
    from .pipeline import run_convert

    cfg = QuantConfig(**_fields_given(QuantConfig, opts))
    budget = Budget(**_fields_given(Budget, opts))
    r = run_convert(model, cfg, arch=arch, workdir=workdir, output=output, evaluate_top1=not no_eval,
                    keep_float=keep_float, budget=budget, device=device)
    emit(r, as_json)


def _fields_given(cls: type, opts: dict[str, Any]) -> dict[str, Any]:
    """The options that are ``cls``'s fields, paths as text; unset ones (None where the field's
    default is not) left to the config's own default."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(cls):
        if f.name not in opts:
            continue
        value = opts[f.name]
        if value is None and f.default is not None:
            continue
        out[f.name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    """An option's value as a config field holds it: paths as text (configs serialize to JSON)."""
    return str(value) if isinstance(value, Path) else value


# --- sensitivity (qsdcompress/mixed) ---


@main.command("sensitivity", context_settings=CONTEXT)
@click.argument("model", required=False)
@click.option("--arch", help="Architecture of a reference checkpoint; inferred from the keys when omitted.")
@data_option(DATA_HELP + " Its validation split is measured.")
@config_options(Budget, only=("candidate_bits",))
@click.option("--samples", type=click.IntRange(1), default=128, show_default=True, help="Validation images.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@config_options(QuantConfig, only=("scale_init",))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the table as JSON here (convert --sensitivity reads it).")
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the groups x bits heat map here (DIR/sensitivity.png).")
@device_option
@workdir_option
@json_option
def sensitivity_cmd(model: str | None, arch: str | None, data: str | None, candidate_bits: str, samples: int,
                    batch_size: int, scale_init: str, output: Path | None, plot_dir: Path | None, device: str,
                    workdir: Path, as_json: bool) -> None:
    """Damage per layer group and weight width: KL of the logits from the float model's on
    validation images when only that group is quantized (MODEL: a float model or a bundled
    model's name; without it, the rule of `qsdcompress --help`).

    \b
    Examples:
      qsdcompress sensitivity
      qsdcompress sensitivity --plot plots/ -o sens.json
      qsdcompress convert --sensitivity sens.json --target-size-mb 0.22     # reuses the table
      qsdcompress sensitivity --data fashion-mnist --samples 512 --json
    """
    from .io import ensure_writable_dir
    from .mixed import parse_bit_set, sensitivity

    plot = ensure_writable_dir(plot_dir, "plot directory") / "sensitivity.png" if plot_dir is not None else None
    r = sensitivity(model, data=data, bits=parse_bit_set(candidate_bits), samples=samples, batch_size=batch_size,
                    scale_init=scale_init, arch=arch, output=output, plot=plot, workdir=workdir, device=device)
    emit(r, as_json)

# --- finetune (qsdcompress/distill, qsdcompress/train) ---

def _recipe(ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path | None:
    """``--recipe``: its options become the defaults (``default_map``); the command line wins."""
    from .config import read_recipe

    if value is not None:
        options = read_recipe(value)
        FinetuneConfig.check_options(options, f"recipe {value}: ")
        ctx.default_map = {**(ctx.default_map or {}), **options}
    return value


@main.command("finetune", context_settings=CONTEXT)
@click.argument("model", required=False)
@click.option("--recipe", type=click.Path(dir_okay=False, path_type=Path), is_eager=True, callback=_recipe,
              expose_value=False,
              help="YAML/JSON file of options (e.g. recipes/digits-tiny-w4.yaml); the command line wins.")
@config_options(FinetuneConfig)
@click.option("--resume", is_flag=False, flag_value="auto", default=None,
              help="Continue the run in --run-dir (or from the checkpoint PATH given) with its options.")
@data_option()
@device_option
@workdir_option
@json_option
@click.pass_context
def finetune_cmd(ctx: click.Context, model: str | None, as_json: bool, **opts: Any) -> None:
    """Distillation-based quantization-aware finetuning of a converted model.

    Loss: CE + lambda_kd tau^2 KL(teacher || student) + lambda_fgd FGD (token-similarity of the
    student's q/k/v spikes and the teacher's attention projections). MODEL: a converted .qsd;
    without it, the newest converted .qsd of --workdir whose data is --data. Writes
    WORKDIR/finetuned.qsd. Works under torchrun (DDP). Epochs are compared on the validation
    split (higher top-1, ties broken by lower loss), the input model included.

    \b
    Examples:
      qsdcompress convert --bits 4 && qsdcompress finetune --teacher ann
      qsdcompress finetune --teacher vit_digits --lambda-kd 0.5
      qsdcompress finetune --recipe recipes/digits-tiny-w4.yaml --epochs 2
      torchrun --nproc-per-node 8 -m qsdcompress.cli finetune --recipe recipes/imagenet-qsd-8_512-w4.yaml
      qsdcompress finetune --resume        # continue a killed run
    """
    from .train import checkpoint_options, checkpoint_path, run_finetune

    resume = opts.get("resume")
    if resume and resume != "auto" and Path(resume).suffix.lower() in (".qsd", ".safetensors"):
        # `finetune --resume MODEL.qsd`: --resume took the model as its value; it is the MODEL
        if model is not None:
            raise QsdError(f"--resume {resume}: that is a model file, not a finetune checkpoint; "
                           f"use --resume alone (or --resume RUN_DIR)")
        model, opts["resume"] = resume, "auto"
    # the run's own options when resuming, then the recipe's (default_map), then the command line's
    values: dict[str, Any] = {}
    if opts.get("resume"):
        values.update(checkpoint_options(checkpoint_path(opts["resume"], opts["workdir"], opts["run_dir"])))
    given = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT,
             click.core.ParameterSource.DEFAULT_MAP)
    for name, value in opts.items():
        if name not in values or ctx.get_parameter_source(name) in given:
            values[name] = _plain(value)
    if model is not None:
        values["model"] = model
    if not values.get("clip_grad"):
        values["clip_grad"] = None
    _, result = run_finetune(FinetuneConfig.from_dict(values))
    if int(os.environ.get("RANK", "0")) == 0:
        emit(result, as_json)


# --- export and report (qsdcompress/export, qsdcompress/report) ---


@main.command("export", context_settings=CONTEXT)
@click.argument("model", required=False)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="ONNX file to write (default: WORKDIR/model.onnx).")
@click.option("--data", default=None,
              help="Images for the parity check (a data spec). Default: the model's own data when it records "
                   "one, else digits (the check compares arithmetic, so any real images will do).")
@click.option("--parity-samples", type=click.IntRange(1), default=64, show_default=True,
              help="Images the parity check runs on.")
@click.option("--int2/--no-int2", default=True, show_default=True,
              help="Store weights of <= 2 bits as INT2 (opset 25); --no-int2 stores them as INT4 (opset 21).")
@click.option("--unchecked", is_flag=True,
              help="Write the file without the parity check; its metadata and the JSON say 'unchecked'.")
@click.option("--float64-samples", type=click.IntRange(0), default=0, show_default=True,
              help="Also compare the file and PyTorch float32 with PyTorch float64 on this many images "
                   "(slow: float64 convolutions cost about 10x float32 ones on a CPU).")
@click.option("--format", "fmt", type=LazyChoice(".onnx_export", "FORMATS"), default="int", show_default=True,
              help="int: every layer fed by spikes runs as an integer kernel (uint8 spikes x int8 weights, "
                   "int32 sums, onnxruntime's com.microsoft MatMulIntegerToFloat); fastest under onnxruntime. "
                   "std-int: the same integers in standard QDQ ops, which onnxruntime and OpenVINO lower to "
                   "integer kernels (fastest under OpenVINO). qdq: weights dequantized to float, standard ops.")
@runtime_option
@workdir_option
@json_option
def export_cmd(model: str | None, output: Path | None, data: str | None, parity_samples: int, int2: bool,
               unchecked: bool, float64_samples: int, fmt: str, runtime: str, workdir: Path, as_json: bool) -> None:
    """Export MODEL to ONNX with packed low-bit weights and check it with onnxruntime.

    MODEL: a .qsd file or a bundled model's name; without it, the rule of `qsdcompress --help`
    (the newest .qsd in --workdir, else the bundled model of --data). BatchNorm and IE-LIF
    are folded into the convolutions, b-bit weights are stored as INT4 (b <= 4), INT2 (b <= 2)
    or INT8 with a per-channel scale. With --format int (default) a layer whose input is spikes
    multiplies the spike counts (uint8) by its integers (int8) with int32 sums, then applies one
    float scale per channel; the attention products are integer too. The first layer (pixels),
    depthwise convs and layers fed by another layer's output stay float.

    The parity check (docs/method.md §7): onnxruntime runs the file cut at every neuron and fed
    PyTorch's spikes, so each layer computes from exactly PyTorch's input spikes. A spike may
    differ only where PyTorch's membrane input lies within float rounding of a rounding boundary
    (such flips cascade on badly conditioned models, so end-to-end differences are reported, not
    judged); the logits from PyTorch's last spikes must match. Otherwise nothing is written and
    the error names the first layer that diverges. The check's PyTorch pass runs on the CPU, the
    runtime's device, so export has no --device.

    \b
    Examples:
      qsdcompress export
      qsdcompress export --format qdq -o portable.onnx
      qsdcompress export --format std-int --runtime openvino -o ov.onnx
      qsdcompress export qsdcompress-out/finetuned.qsd -o model4.onnx --json
      qsdcompress eval qsdcompress-out/model.onnx
    """
    from .onnx_export import export

    r = export(model, output, workdir=workdir, data=data, parity_samples=parity_samples, int2=int2,
               format=fmt, check=not unchecked, float64_samples=float64_samples, runtime=runtime)
    emit(r, as_json)


@main.command("report", context_settings=CONTEXT)
@click.argument("model", required=False)
@data_option(DATA_HELP + " The firing rates are measured on it.")
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True)
@click.option("--batches", type=click.IntRange(1), default=4, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--output-format", "fmt", type=click.Choice(["table", "csv", "json", "markdown"]), default="table",
              show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the report in --output-format to this file.")
@click.option("--energy-table", type=click.Path(dir_okay=False, path_type=Path),
              help="JSON or YAML with e_mac_pj, e_ac32_pj, attention_bits, source (defaults: docs/method.md §8).")
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write PNG plots (firing rate, q/k/v spike levels, energy per layer) here.")
@click.option("--no-float", is_flag=True, help="Skip the float comparison row.")
@device_option
@workdir_option
@json_option
def report_cmd(model: str | None, data: str | None, split: str, batches: int, batch_size: int, fmt: str,
               output: Path | None, energy_table: Path | None, plot_dir: Path | None, no_float: bool,
               device: str, workdir: Path, as_json: bool) -> None:
    """Size, spikes and energy of MODEL per layer, with the float model for comparison.

    MODEL: a .qsd file or a bundled model's name; without it, the rule of `qsdcompress --help`
    (the newest .qsd in --workdir, else the bundled model of --data); WORKDIR/model.onnx,
    when present, adds its on-disk size. The energy table is printed with every report.

    \b
    Examples:
      qsdcompress report
      qsdcompress report --output-format markdown -o report.md --plot plots/
      qsdcompress report --energy-table my_energy.yaml --json
    """
    from .io import atomic_write_text
    from .reporting import plot, render, report
    from .reporting.render import show_totals
    from .ui import console

    r = report(model, workdir=workdir, data=data, split=split, batches=batches, batch_size=batch_size,
               energy_table=energy_table, compare_float=not no_float, device=device)
    if plot_dir is not None:
        r.plots = plot(r, plot_dir)
    if output is not None:
        atomic_write_text(output, render(r, fmt))
        r.output = str(output)
    if as_json:
        emit(r, True)
    elif output is None:
        if fmt == "table":
            r.render()
        else:
            click.echo(render(r, fmt), nl=False)
    else:
        console.print(f"report written to {output} ({fmt})")
        show_totals(r)

# --- list ---


@main.command("list", context_settings=CONTEXT)
@json_option
def list_cmd(as_json: bool) -> None:
    """The bundled models: their names (usable as MODEL and --teacher), data and test top-1.

    \b
    Examples:
      qsdcompress list
      qsdcompress eval qsd_tiny_fmnist            # its own data, fashion-mnist
      qsdcompress finetune --teacher vit_fmnist --data fashion-mnist
    """
    from .zoo import catalogue

    emit(catalogue(), as_json)


# --- demo ---


@main.command("demo", context_settings=CONTEXT)
@config_options(QuantConfig, only=("bits",))
@click.option("--data", default="digits", show_default=True,
              help="digits (bundled, runs anywhere) or fashion-mnist[:DIR] (the real benchmark: "
                   "apt-get install dataset-fashion-mnist).")
@click.option("--teacher", default="ann", show_default=True,
              help="Teacher for finetuning: ann (the bundled counterpart ANN), vit_digits or vit_fmnist "
                   "(the bundled ViT of that data set).")
@click.option("--epochs", type=click.IntRange(1), default=None, help="Finetuning epochs (default: the finetune default).")
@device_option
@workdir_option
@json_option
def demo_cmd(bits: str, data: str, teacher: str, epochs: int | None, device: str, workdir: Path,
             as_json: bool) -> None:
    """The whole pipeline on the bundled digits model, in a few minutes on a laptop CPU.

    convert (W4 + IE-LIF) -> finetune (ANN teacher, KD + fine-grained distillation) -> export
    (packed ONNX, checked with onnxruntime) -> report, ending with one table: float vs converted
    vs finetuned vs ONNX (val and test top-1, size, SOPs, energy). Outputs stay in --workdir.
    With --data fashion-mnist the same runs on the real benchmark and its bundled model.
    """
    from .pipeline import demo
    from .ui import console

    from .quant import parse_bits

    r = demo(workdir=workdir, bits=parse_bits(bits), teacher=teacher, epochs=epochs, data=data, device=device,
             on_stage=lambda s: console.print(f"[bold cyan]{s}[/]"))
    emit(r, as_json)


if __name__ == "__main__":  # pragma: no cover
    main()
