"""Serialisable run configurations (YAML/JSON round trip) and recipes.

A recipe is a YAML (or JSON) file whose keys are option names (``lambda_fgd`` or ``lambda-fgd``);
it supplies defaults, and options given on the command line win.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from .errors import QsdError, one_line

#: the work directory the commands share (converted.qsd, finetuned.qsd, model.onnx)
DEFAULT_WORKDIR = "qsdcompress-out"


def option(default: Any, help: str = "", *, min: float | None = None, choices: Sequence[str] | None = None,
           metavar: str | None = None, short: str | None = None, path: str | None = None, cli: bool = True) -> Any:
    """A config field with what its command-line option needs: help, bounds, choices (the CLI's
    options are generated from these, so each option is declared once)."""
    meta = {"help": help, "min": min, "choices": tuple(choices) if choices else None, "metavar": metavar,
            "short": short, "path": path, "cli": cli}  # path: "file" or "dir" (a click.Path option)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
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


__all__ = ["FinetuneConfig", "option", "read_recipe", "normalise_keys", "DEFAULT_WORKDIR"]
