"""Serialisable run configurations (YAML/JSON round trip) and recipes.

A recipe is a YAML (or JSON) file whose keys are option names (``lambda_fgd`` or ``lambda-fgd``);
it supplies defaults, and options given on the command line win.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .errors import QsdError, one_line

#: the work directory the commands share (converted.qsd, finetuned.qsd, model.onnx)
DEFAULT_WORKDIR = "qsdcompress-out"


@dataclass
class FinetuneConfig:
    """Everything a ``finetune`` run depends on; written next to its outputs."""

    # inputs and outputs
    model: str | None = None            # input .qsd (default <workdir>/converted.qsd)
    workdir: str = DEFAULT_WORKDIR
    output: str | None = None           # default <workdir>/finetuned.qsd
    keep_float: bool = False            # also store the float latent weights in the output .qsd
    run_dir: str | None = None          # checkpoints, metrics.csv, config (default <workdir>/finetune)
    data: str = "digits"
    # teacher and loss: L = CE + lambda_kd tau^2 KL + lambda_fgd FGD
    teacher: str = "ann"
    teacher_checkpoint: str | None = None
    teacher_img_size: int | None = None  # timm teacher input size (default: the checkpoint's own)
    lambda_kd: float = 1.0
    tau: float = 1.0
    lambda_fgd: float = 1.0
    fgd_layers: list[int] | None = None
    ie_lif_warmup: int = 0              # steps over which IE-LIF fades in from the plain neuron (0: off)
    label_smoothing: float = 0.0
    # optimisation
    epochs: int = 3
    steps: int | None = None            # total optimizer steps (overrides epochs when set)
    limit_train_batches: int | None = None  # at most this many batches per epoch
    batch_size: int = 64
    lr: float = 5e-4
    scale_lr: float | None = 1e-3       # quantizer scales and IE-LIF parameters (None: = lr)
    min_lr: float = 1e-6
    weight_decay: float = 0.01
    warmup_steps: int = 5
    warmup_lr: float = 1e-6
    clip_grad: float | None = 5.0
    opt: str = "adamw"
    amp: str = "auto"                   # auto | bf16 | fp16 | off (CUDA only; CPU runs fp32)
    ema: bool = False
    ema_decay: float = 0.999
    # bookkeeping
    seed: int = 0
    save_every: int = 0                 # also checkpoint every N steps (0: only each epoch)
    resume: str | None = None           # "auto" (run_dir/checkpoint.pt) or a checkpoint path
    eval_batch_size: int = 256
    eval_max_batches: int | None = None
    num_workers: int = 0
    device: str = "auto"
    threads: int | None = None

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
                           f"give the model as MODEL and use --resume alone (or --resume RUN_DIR/checkpoint.pt)")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FinetuneConfig":
        d = normalise_keys(d)
        if not d.get("extra", True):  # an always-empty field of early run configs
            d.pop("extra")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise QsdError(f"unknown finetune option(s): {', '.join(unknown)}")
        return cls(**d)

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


__all__ = ["FinetuneConfig", "read_recipe", "normalise_keys", "DEFAULT_WORKDIR"]
