"""Serialisable run configurations (YAML/JSON round trip) and recipes.

A recipe is a YAML (or JSON) file whose keys are option names (``lambda_fgd`` or ``lambda-fgd``);
it supplies defaults, and options given on the command line win.
"""
from __future__ import annotations

import json
import os
import copy
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .errors import QsdError, one_line

#: the work directory the commands share (converted.qsd, finetuned.qsd, model.onnx)
DEFAULT_WORKDIR = "qsdcompress-out"


def option(default: Any, help: str = "", *, min: float | None = None, choices: Sequence[str] | None = None,
           metavar: str | None = None, short: str | None = None, path: str | None = None, cli: bool = True,
           flag: str | None = None, aliases: Sequence[str] = (), hidden: bool = False, text: bool = False,
           parse: Any = None, cli_default: Any = ...) -> Any:
    """A config field with what its command-line option needs: help, bounds, choices (the CLI's
    options are generated from these, so each option is declared once).

    ``flag``: the option's name when it is not ``--field-name``; ``aliases``: older names;
    ``text``: read as text that the config's ``validate`` parses (bit widths, lists of them);
    ``parse``: a function of the repeated values (a repeatable option); ``cli_default``: the
    command line's default where it differs (e.g. None: unset, the config's own rule applies).
    """
    meta = {"help": help, "min": min, "choices": tuple(choices) if choices else None, "metavar": metavar,
            "short": short, "path": path, "cli": cli, "flag": flag, "aliases": tuple(aliases), "hidden": hidden,
            "text": text, "parse": parse, "cli_default": cli_default}  # path: "file" or "dir" (click.Path)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class FinetuneConfig:
    """Everything a ``finetune`` run depends on; written next to its outputs."""

    # inputs and outputs
    model: str | None = option(None, "Input: a converted .qsd or a bundled name.", cli=False)
    workdir: str = option(DEFAULT_WORKDIR, cli=False)
    output: str | None = option(None, "Output .qsd (default: WORKDIR/finetuned.qsd).", short="-o", path="file")
    keep_float: bool = option(False, "Also store the float latent weights in the output (for further "
                                     "finetuning); the run's own checkpoints always keep them.")
    run_dir: str | None = option(None, "Checkpoints, metrics.csv and config (default: WORKDIR/finetune).",
                                 path="dir")
    data: str | None = option(None, cli=False)
    # teacher and loss: L = CE + lambda_kd tau^2 KL + lambda_fgd FGD
    teacher: str = option("ann", "ann (the bundled counterpart ANN of the student's bundled model), a bundled "
                                 "model (vit_digits, vit_fmnist, ...: qsdcompress list), a timm name or alias "
                                 "(vit_base, deit_small, caformer_b36, ...) or a .qsd file.")
    teacher_checkpoint: str | None = option(None, "Teacher weights (timm/HF .pth/.bin/.safetensors or .qsd); "
                                                  "needed offline. Any image size, class count and depth: read "
                                                  "from the weights.", path="file")
    teacher_img_size: int | None = option(None, "Input size of a timm teacher (default: the size its checkpoint "
                                                "was trained at; position embeddings are resampled to another).",
                                          min=1)
    lambda_kd: float = option(1.0, "Weight of logit KD.", min=0)
    tau: float = option(1.0, "KD temperature.")
    lambda_fgd: float = option(1.0, "Weight of fine-grained distillation.", min=0)
    fgd_layers: list[int] | None = option(None, "Teacher layer for each student attention block, "
                                                "comma-separated (default: uniform map).", metavar="I,J,...")
    ie_lif_warmup: int = option(0, "Fade IE-LIF in from the plain neuron over the first STEPS steps "
                                   "(u_hat' = b*u_hat + (1-b)*u, b: 0 -> 1); epochs that end inside the "
                                   "warm-up are measured, never kept.", min=0, metavar="STEPS")
    label_smoothing: float = option(0.0, "Label smoothing of the CE term.", min=0)
    # optimisation
    epochs: int = option(3, "Epochs over the training split.", min=1)
    steps: int | None = option(None, "Total optimizer steps (overrides --epochs).", min=1)
    limit_train_batches: int | None = option(None, "At most this many batches per epoch.", min=1)
    batch_size: int = option(64, "Per process.", min=1)
    lr: float = option(5e-4, "Peak learning rate (cosine schedule).")
    scale_lr: float | None = option(1e-3, "Learning rate of quantizer scales and IE-LIF parameters "
                                          "(none: --lr).")
    min_lr: float = option(1e-6, "Learning rate at the end of the cosine.", min=0)
    weight_decay: float = option(0.01, min=0)
    warmup_steps: int = option(5, "Linear warm-up steps.", min=0)
    warmup_lr: float = option(1e-6, "Learning rate at the start of the warm-up.", min=0)
    clip_grad: float | None = option(5.0, "Gradient norm clip (0: off).", min=0)
    opt: str = option("adamw", "timm optimizer name.")
    amp: str = option("auto", "Mixed precision on CUDA (CPU always runs fp32).",
                      choices=("auto", "bf16", "fp16", "off"))
    ema: bool = option(False, "Keep an EMA of the weights (a second candidate each epoch).")
    ema_decay: float = option(0.999, min=0)
    # bookkeeping
    seed: int = option(0, "Seed of the initialisation, data order and augmentation.")
    save_every: int = option(0, "Also checkpoint every N steps (a checkpoint is always written each epoch).",
                             min=0)
    resume: str | None = option(None, "Continue the run in --run-dir (or from the checkpoint PATH given).",
                                cli=False)
    eval_batch_size: int = option(256, min=1)
    eval_max_batches: int | None = option(None, "Evaluate at most this many batches (quick runs).", min=1)
    num_workers: int = option(0, "DataLoader worker processes.", min=0)
    device: str = option("auto", cli=False)
    threads: int | None = option(None, "CPU threads (torch.set_num_threads).", min=1)

    def validate(self) -> "FinetuneConfig":
        """One clear error per bad option, before any work is done."""
        import math

        for name in ("lambda_kd", "lambda_fgd", "tau", "lr"):
            v = getattr(self, name)
            positive = name in ("tau", "lr")
            if not math.isfinite(v) or v < 0 or (positive and v == 0):
                raise QsdError(f"--{name.replace('_', '-')} must be a finite "
                               f"{'positive' if positive else 'non-negative'} number, got {v}")
        if self.epochs < 1 and not self.steps:
            raise QsdError("--epochs must be at least 1 (or give --steps)")
        if self.batch_size < 1:
            raise QsdError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.ie_lif_warmup < 0:
            raise QsdError(f"--ie-lif-warmup must be 0 or more steps, got {self.ie_lif_warmup}")
        model_file = Path(self.resume or "").suffix.lower() in (".qsd", ".safetensors", ".onnx")
        if self.resume and self.resume != "auto" and model_file:
            raise QsdError(f"--resume {self.resume}: that is a model file, not a finetune checkpoint; "
                           f"give the model as MODEL and use --resume alone (or --resume RUN_DIR)")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FinetuneConfig":
        d = normalise_keys(d)
        if not d.get("extra", True):  # an always-empty field of early run configs
            d.pop("extra")
        cls.check_options(d)
        return cls(**d)

    @classmethod
    def check_options(cls, d: dict[str, Any], where: str = "") -> None:
        """One line naming the keys of ``d`` that are no option (``where``: the file they came from)."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise QsdError(f"{where}unknown finetune option(s): {', '.join(unknown)}",
                           hint="see `qsdcompress finetune --help`")

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "FinetuneConfig":
        import yaml

        return cls.from_dict(yaml.safe_load(text) or {})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "FinetuneConfig":
        return cls.from_dict(json.loads(text))


# --- convert: QuantConfig; its mixed-precision budget: Budget ---

SCALE_INITS = ("mse", "lsq", "absmax")
IE_LIF_MODES = ("qkv", "attention", "all", "none")
IE_LIF_INITS = ("identity", "rectify")
FLOAT_BITS = 32
REFERENCE_LSQ_BITS = 4  # reference QSD-Transformer: Qn = -8, Qp = 7
REESTIMATE_BN_BITS = 4  # auto BatchNorm re-estimation below this width and at it (measured, docs/method.md §3)


def parse_bits(value: Any, what: str = "--bits") -> int:
    """A weight bit width in 1..8, or a one-line error naming the option."""
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        bits = int(str(value).strip()) if not isinstance(value, int) else value
    except (TypeError, ValueError):
        raise QsdError(f"{what}: bit width must be an integer from 1 to 8, got {value!r}") from None
    if not 1 <= bits <= 8:
        raise QsdError(f"{what}: bit width must be from 1 to 8, got {bits}")
    return bits


def parse_layer_bits(items: Iterable[str]) -> dict[str, int]:
    """``['GLOB=BITS', ...]`` (CLI ``--layer-bits``) -> ordered ``{glob: bits}``."""
    out: dict[str, int] = {}
    for item in items:
        glob, sep, bits = str(item).rpartition("=")
        if not sep or not glob.strip():
            raise QsdError(f"--layer-bits {item!r}: expected GLOB=BITS, e.g. 'block3.*.attn.*=2'")
        out[glob.strip()] = parse_bits(bits, f"--layer-bits {item!r}")
    return out


@dataclass
class QuantConfig:
    """What ``convert`` does; serialised to JSON in every converted ``.qsd`` file.

    Bit width of a layer: ``skip`` globs keep it float, else the last matching ``layer_bits``
    glob, else ``first_last_bits`` for the first and last quantizable layers (stem conv and
    head), else ``bits``. Globs match module names (``fnmatch``), e.g. ``block3.*.attn.*``.
    """

    bits: int = option(4, "Weight bits, 1-8 (1 = sign with a per-channel scale).", text=True)
    layer_bits: dict[str, int] = option({}, "Per-layer bits by module-name glob, repeatable (last match wins), "
                                            "e.g. 'head=8'.", metavar="GLOB=BITS",
                                        parse=parse_layer_bits)
    first_last_bits: int | None = option(None, "Bits of the first conv and the head.", text=True)
    skip: list[str] = option([], "Keep matching layers float, repeatable.", metavar="GLOB",
                             parse=list)
    scale_init: str = option("mse", "mse: per-channel step minimising the weight error; lsq: 2 mean|w|/sqrt(Qp); "
                                    "absmax: no clipping.", choices=SCALE_INITS)
    ie_lif: str = option("qkv", "Which neurons become IE-LIF: q/k/v, also the attention neuron, every neuron, "
                                "or none.", choices=IE_LIF_MODES)
    ie_lif_init: str = option("identity", "identity: reproduce the replaced neuron exactly; rectify: gamma 0.25, "
                                          "beta 0.5.", choices=IE_LIF_INITS)
    ie_lif_momentum: float = option(0.1, cli=False)
    ie_lif_eps: float = option(1e-5, cli=False)
    # calibration images (a data spec); None: the data the model records as its own, else none
    # (weight-only, float statistics kept: docs/method.md §3)
    calib_data: str | None = option(
        None, "The model's own images: they calibrate IE-LIF, re-estimate BatchNorm (<= 4 bits) and give top-1 "
              "before/after on their test split. digits | fashion-mnist[:DIR] | mnist:DIR | synthetic[:N] | "
              "cifar10:DIR | an ImageFolder directory. Default: the data the model records (bundled models, "
              ".qsd files); a reference checkpoint records none, so without --data the conversion is "
              "weight-only, keeps the float statistics and reports no top-1.", flag="--data",
        aliases=("--calib-data",))
    calib_samples: int | None = option(None, "Images that calibrate the IE-LIF statistics (0: no calibration; "
                                             "default: 256).", min=0)
    calib_batches: int = option(8, "Older form of --calib-samples: this many batches of --calib-batch-size.",
                                min=0, hidden=True, cli_default=None)
    calib_batch_size: int = option(32, min=1)
    # recompute BatchNorm statistics on the calibration images after quantizing; None (auto): when
    # some layer has REESTIMATE_BN_BITS bits or fewer (docs/method.md §3)
    reestimate_bn: bool | None = option(
        None, "After quantizing the weights, recompute every BatchNorm's statistics on the calibration images "
              "(a standard post-training step, docs/method.md §3). Default: when some layer has 4 bits or fewer "
              "(it rescues W3..W1; at W8 the float statistics were slightly better).")
    mse_grid: int = option(16, cli=False)  # coarse candidates of the mse search (then as many refined ones)

    def validate(self) -> "QuantConfig":
        self.bits = parse_bits(self.bits)
        self.layer_bits = {str(k): parse_bits(v, f"--layer-bits {k}") for k, v in dict(self.layer_bits).items()}
        if self.first_last_bits is not None:
            self.first_last_bits = parse_bits(self.first_last_bits, "--first-last-bits")
        self.skip = [str(s) for s in self.skip]
        for name, value, allowed in (("--scale-init", self.scale_init, SCALE_INITS),
                                     ("--ie-lif", self.ie_lif, IE_LIF_MODES),
                                     ("--ie-lif-init", self.ie_lif_init, IE_LIF_INITS)):
            if value not in allowed:
                raise QsdError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.calib_batches < 0:
            raise QsdError(f"--calib-batches must be >= 0, got {self.calib_batches}")
        if self.calib_samples is not None and self.calib_samples < 0:
            raise QsdError(f"--calib-samples must be >= 0, got {self.calib_samples}")
        if self.calib_batch_size < 1:
            raise QsdError(f"calibration batch size must be >= 1, got {self.calib_batch_size}")
        if self.mse_grid < 2:
            raise QsdError(f"mse_grid must be >= 2, got {self.mse_grid}")
        return self

    @property
    def num_calib_samples(self) -> int:
        """Calibration images: ``calib_samples``, else ``calib_batches x calib_batch_size``."""
        return self.calib_samples if self.calib_samples is not None else self.calib_batches * self.calib_batch_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise QsdError(f"unknown quantization option(s) {', '.join(unknown)}")
        return cls(**{k: copy.deepcopy(v) for k, v in d.items()})


DEFAULT_BITS = (1, 2, 3, 4, 8)  # the widths a mixed-precision plan chooses from


def parse_bit_set(value: str | Iterable[Any], what: str = "--candidate-bits") -> tuple[int, ...]:
    """``"1,2,3,4,8"`` or a list -> sorted distinct bit widths in 1..8."""
    items = str(value).replace(" ", "").split(",") if isinstance(value, str) else list(value)
    bits = sorted({parse_bits(b, what) for b in items if str(b) != ""})
    if not bits:
        raise QsdError(f"{what}: give at least one bit width, e.g. 1,2,3,4,8")
    return tuple(bits)


@dataclass
class Budget:
    """What a mixed-precision ``convert`` must meet; serialised into the plan it produces."""

    target_size_mb: float | None = option(None, "Mixed precision: the least-damage per-group widths whose size "
                                                "(as report prints it, 1 MB = 1e6 bytes) is at most this.")
    target_energy_mj: float | None = option(None, "Mixed precision: energy per image (the report's energy model, "
                                                  "on validation images) at most this.")
    max_drop: float | None = option(None, "Mixed precision: the smallest plan whose validation top-1 drops at "
                                          "most this many points.")
    candidate_bits: list[int] = option(list(DEFAULT_BITS), "Widths a mixed-precision plan chooses from (sensitivity: "
                                                             "the widths it measures), comma-separated.", text=True)
    samples: int = option(128, "Validation images the sensitivity and the plan checks run on.", min=1,
                          flag="--sensitivity-samples")
    sensitivity: str | None = option(None, "A table from `qsdcompress sensitivity -o FILE` (else it is measured).",
                                     path="file")
    energy_table: str | None = option(None, cli=False)

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.target_size_mb, self.target_energy_mj, self.max_drop))

    def validate(self) -> "Budget":
        for name in ("target_size_mb", "target_energy_mj", "max_drop"):
            v = getattr(self, name)
            if v is not None and (not math.isfinite(float(v)) or float(v) < 0 or (name != "max_drop" and v == 0)):
                raise QsdError(f"--{name.replace('_', '-')} must be a positive number, got {v}")
        self.candidate_bits = list(parse_bit_set(self.candidate_bits))
        if self.samples < 1:
            raise QsdError(f"--sensitivity-samples must be at least 1, got {self.samples}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Budget":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise QsdError(f"unknown budget option(s) {', '.join(unknown)}")
        return cls(**dict(d))


def normalise_keys(d: dict[str, Any]) -> dict[str, Any]:
    """``lambda-fgd`` and ``lambda_fgd`` both name the option ``lambda_fgd``."""
    if not isinstance(d, dict):
        raise QsdError(f"a recipe must be a mapping of option: value, got {type(d).__name__}")
    return {str(k).replace("-", "_"): v for k, v in d.items()}


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Options of a recipe file (YAML or JSON); a clear error when unreadable."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise QsdError(f"recipe not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise QsdError(f"recipe {p} is not valid YAML: {one_line(e)}") from None
    return normalise_keys(data)


__all__ = ["FinetuneConfig", "QuantConfig", "Budget", "option", "read_recipe", "normalise_keys", "parse_bits",
           "parse_layer_bits", "parse_bit_set", "DEFAULT_WORKDIR", "DEFAULT_BITS", "SCALE_INITS", "IE_LIF_MODES",
           "IE_LIF_INITS", "FLOAT_BITS", "REFERENCE_LSQ_BITS", "REESTIMATE_BN_BITS"]
