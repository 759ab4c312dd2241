"""Teachers: the counterpart ANN, bundled ViTs, timm models by name, alias or checkpoint, and
.qsd files; frozen, fed the batch at their own input configuration."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..data import DataConfig, resize_batch
from ..errors import QsdError, one_line
from ..io import hub_unavailable, load_state_dict_checked, strip_quant_extras
from ..loading import bundled_vit, has_reference_lsq, hub_weights, load
from ..models import create_model
from ..qsdfile import read_checkpoint
from ..zoo import MODELS, ZooModel, lookup, of_file
from .capture import QKVCapture

# --- the bundled cross-architecture teachers ------------------------------------------------------

#: the bundled ViT teachers (their shapes live in the zoo's registry)
BUNDLED_VITS: dict[str, ZooModel] = {n: m for n, m in MODELS.items() if m.kind == "vit"}


def build_vit_digits() -> nn.Module:
    """An untrained timm VisionTransformer with the bundled digits teacher's shape."""
    return BUNDLED_VITS["vit_digits"].build()


#: short names for common timm teachers
TEACHER_ALIASES: dict[str, str] = {
    "vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224", "vit_large": "vit_large_patch16_224",
    "deit_tiny": "deit_tiny_patch16_224", "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224", "deit3_base": "deit3_base_patch16_224",
    "caformer_s18": "caformer_s18", "caformer_s36": "caformer_s36", "caformer_m36": "caformer_m36",
    "caformer_b36": "caformer_b36",
}


# --- teachers -----------------------------------------------------------------------------------

class Teacher(nn.Module):
    """A frozen teacher with its own input configuration and q/k/v capture.

    ``forward(x, student_data_config)`` returns ``(logits, qkv_layers, grids)`` without gradients.
    """

    def __init__(self, model: nn.Module, name: str, style: str, data_config: DataConfig,
                 capture: bool = True):
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.name = name
        self.style = style
        self.data_config = data_config
        self.num_classes = int(getattr(model, "num_classes", 0) or 0)
        self.capture = QKVCapture(model, style, int(getattr(model, "num_prefix_tokens", 0) or 0)) \
            if capture else None
        self.train(False)

    @property
    def num_layers(self) -> int:
        return self.capture.num_layers if self.capture is not None else 0

    def train(self, mode: bool = True) -> "Teacher":  # frozen: always eval
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor, student_cfg: DataConfig):  # type: ignore[override]
        if (tuple(student_cfg.input_size) != tuple(self.data_config.input_size)
                or tuple(student_cfg.mean) != tuple(self.data_config.mean)
                or tuple(student_cfg.std) != tuple(self.data_config.std)):
            x = resize_batch(x, student_cfg, self.data_config)
        logits = self.model(x)
        if self.capture is None:
            return logits, [], []
        layers = self.capture.pop()
        grids = [self.capture.grids[i] for i in range(len(layers))]
        return logits, layers, grids


def _plain_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors; reference LSQ extras (``alpha``, ``act.*``) dropped only from a
    reference LSQ checkpoint (a CAFormer's StarReLU also has ``act.scale``/``act.bias``)."""
    sd, _ = read_checkpoint(Path(path))
    return strip_quant_extras(sd)[0] if has_reference_lsq(sd) else sd


def _load_weights(model: nn.Module, path: str | os.PathLike, what: str) -> None:
    load_state_dict_checked(model, _plain_state_dict(path), source=f"{what} {path}")


def bundled_entry(model: nn.Module) -> ZooModel | None:
    """The bundled SNN a model was converted from: the file its metadata names as source, else
    the one bundled SNN with its exact architecture and arguments."""
    for meta in (getattr(model, "qsd_quant_meta", None), getattr(model, "qsd_meta", None)):
        src = (meta or {}).get("source")
        entry = of_file(src["path"]) if isinstance(src, dict) and src.get("path") else None
        if entry is not None and entry.kind == "snn":
            return entry
    if not hasattr(model, "cfg"):
        return None
    args = {k: v for k, v in json.loads(json.dumps(model.cfg.to_dict())).items() if v not in (None, {})}
    for entry in MODELS.values():
        meta = entry.metadata() if entry.kind == "snn" else {}
        theirs = {k: v for k, v in (meta.get("model_args") or {}).items() if v not in (None, {})}
        if meta.get("arch") == getattr(model, "arch", None) and theirs == args:
            return entry
    return None


def counterpart_ann(student: nn.Module, checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """The ANN with the student's topology (neurons -> clamped ReLU) and trained weights.

    Weights come from ``checkpoint``; for a student converted from a bundled SNN without one,
    that SNN's bundled counterpart ANN. Never returned untrained.
    """
    arch = getattr(student, "arch", None)
    if arch is None or not hasattr(student, "cfg"):
        raise QsdError("--teacher ann needs a spike-driven student (its architecture names the ANN)")
    cfg = {**student.cfg.to_dict(), "neuron": "relu"}
    if checkpoint is not None:
        ann = create_model(arch, **cfg)
        _load_weights(ann, checkpoint, "teacher checkpoint")
        return ann
    entry = bundled_entry(student)
    if entry is None or entry.ann is None:
        raise QsdError(f"--teacher ann needs the counterpart ANN's weights for {arch}: pass "
                       f"--teacher-checkpoint PATH (or use a timm teacher, e.g. --teacher vit_base)")
    ann = load(MODELS[entry.ann].require())
    if ann.num_classes != student.num_classes:
        raise QsdError(f"the bundled ANN {entry.ann} predicts {ann.num_classes} classes, the student "
                       f"{student.num_classes}; pass --teacher-checkpoint")
    return ann


def resolve_teacher_name(name: str) -> str:
    """timm model name for a teacher name or short alias (clear error with suggestions)."""
    import difflib

    import timm

    full = TEACHER_ALIASES.get(name, name)
    base = full.split(".")[0]
    if timm.is_model(base) or timm.is_model(full):
        return full
    choices = [*TEACHER_ALIASES, "ann", *BUNDLED_VITS]
    close = difflib.get_close_matches(name, choices + timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; try one of {', '.join(choices)}"
    raise QsdError(f"unknown teacher {name!r}{hint}")


def timm_teacher(name: str, checkpoint: str | os.PathLike | None = None,
                 num_classes: int | None = None, img_size: int | None = None) -> nn.Module:
    """A timm model with weights from ``checkpoint`` or timm's pretrained download (online only).

    A checkpoint is loaded with its own class count, depth and image size, read from its weights
    (see :func:`checkpoint_model_args`); ``num_classes`` is used only when the checkpoint does not
    tell. ``img_size`` builds the teacher at another size instead, with the position embeddings
    resampled by timm's own checkpoint filter.
    """
    import timm

    full = resolve_teacher_name(name)
    if checkpoint is not None:
        return _timm_from_checkpoint(full, checkpoint, num_classes, img_size)
    # a requested size for a model with position embeddings: timm resamples them as it loads
    kw = {"img_size": int(img_size)} if img_size and getattr(_reference_timm(full), "pos_embed", None) is not None \
        else {}
    why = hub_unavailable()  # offline, or no connection within seconds: the local cache only
    if why is not None:
        return _cached_pretrained(full, why, **kw)
    try:
        return timm.create_model(full, pretrained=True, **kw)
    except Exception as e:  # no such pretrained tag, a download that failed, ...
        raise QsdError(f"teacher {full}: could not get pretrained weights ({one_line(e, 160)}); "
                       f"pass --teacher-checkpoint PATH") from None


def _reference_timm(full: str) -> nn.Module:
    """The timm model at its defaults, without real weights when possible (only its shape is read)."""
    import timm

    try:
        with torch.device("meta"):
            return timm.create_model(full, pretrained=False)
    except Exception:  # some constructors compute on their tensors
        return timm.create_model(full, pretrained=False)


def _head_classes(ref: nn.Module, sd: dict[str, torch.Tensor]) -> int | None:
    """The class count of a checkpoint: rows of the last linear layer of the model's classifier."""
    head = ref.get_classifier() if hasattr(ref, "get_classifier") else None
    if not isinstance(head, nn.Module):
        return None
    inside = {id(m) for m in head.modules()}
    linears = [n for n, m in ref.named_modules() if id(m) in inside and isinstance(m, nn.Linear)]
    w = sd.get(f"{linears[-1]}.weight") if linears else None
    return int(w.shape[0]) if w is not None else None


def _checkpoint_img_size(ref: nn.Module, sd: dict[str, torch.Tensor]) -> int | None:
    """The square image size a checkpoint was trained at, from its position embeddings' token grid."""
    pos, pe = sd.get("pos_embed"), getattr(ref, "patch_embed", None)
    if pos is None or pe is None or getattr(ref, "pos_embed", None) is None:
        return None
    if pos.dim() == 4:  # (1, H, W, C)
        side = int(pos.shape[1])
    else:
        prefix = 0 if getattr(ref, "no_embed_class", False) else int(getattr(ref, "num_prefix_tokens", 1))
        n = int(pos.shape[1]) - prefix
        side = int(round(math.sqrt(n)))
        if side * side != n:
            return None
    return side * int(pe.patch_size[0])


def checkpoint_model_args(full: str, sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """timm arguments that rebuild the model a checkpoint was saved from: ``num_classes`` (its
    classifier), ``img_size`` (its position-embedding grid times the patch size) and ``depth``
    (``blocks.N``, ViT/DeiT) or ``depths`` (``stages.S.blocks.N``, MetaFormer/CAFormer) where they
    differ from the defaults of ``full``."""
    import re

    ref = _reference_timm(full)
    args: dict[str, Any] = {}
    classes = _head_classes(ref, sd)
    if classes is not None:
        args["num_classes"] = classes
    size = _checkpoint_img_size(ref, sd)
    if size is not None:
        args["img_size"] = size
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if blocks and isinstance(getattr(ref, "blocks", None), nn.Sequential) and len(ref.blocks) != max(blocks) + 1:
        args["depth"] = max(blocks) + 1
    stages: dict[int, set[int]] = {}
    for k in sd:
        if m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", k):
            stages.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    ref_stages = getattr(ref, "stages", None)
    if stages and ref_stages is not None and len(stages) == len(ref_stages):
        depths = tuple(max(stages[i]) + 1 for i in sorted(stages))
        if depths != tuple(len(getattr(st, "blocks", ())) for st in ref_stages):
            args["depths"] = depths
    return args


def _timm_from_checkpoint(full: str, checkpoint: str | os.PathLike, num_classes: int | None,
                          img_size: int | None) -> nn.Module:
    import sys

    import timm

    sd = _plain_state_dict(checkpoint)
    args = checkpoint_model_args(full, sd)
    if "num_classes" not in args and num_classes:
        args["num_classes"] = num_classes
    if img_size is not None and "img_size" in args:
        args["img_size"] = int(img_size)
    try:
        model = timm.create_model(full, pretrained=False, **args)
    except Exception as e:
        raise QsdError(f"teacher {full} with {args} (read from {checkpoint}): {one_line(e, 160)}") from None
    # timm's own filter: other checkpoint layouts, position embeddings resampled to the model's grid
    filt = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filt is not None:
        try:
            sd = filt(sd, model)
        except Exception:  # a layout the filter does not know: strict loading below names the keys
            pass
    load_state_dict_checked(model, sd, source=f"teacher checkpoint {checkpoint}")
    return model


def _cached_pretrained(full: str, why: str, **kwargs: Any) -> nn.Module:
    """Without the Hub (``why``): timm's pretrained weights from the local Hugging Face cache, or a
    clear error."""
    import timm
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(full)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    cached, _ = hub_weights(repo) if repo else (None, None)
    if cached is not None:
        return timm.create_model(full, pretrained=True, pretrained_cfg_overlay={"file": str(cached)}, **kwargs)
    raise QsdError(f"teacher {full}: {why} and its weights are not in the local Hugging Face cache; "
                   f"pass --teacher-checkpoint PATH (timm/HF weights or safetensors)")


def load_teacher(spec: str, student: nn.Module, checkpoint: str | os.PathLike | None = None,
                 capture: bool = True, img_size: int | None = None) -> Teacher:
    """Build the frozen teacher named by ``spec`` for ``student``.

    ``spec``: ``ann`` | a bundled ViT (``vit_digits``, ``vit_fmnist``) | a timm name or alias | a
    ``.qsd`` file. A timm teacher from a checkpoint runs at the image size it was trained at (read
    from its position embeddings; ``img_size`` overrides, resampling them); :meth:`Teacher.forward`
    resizes the student's batch to it, and FGD resizes the teacher's token grid to the student's.
    """
    if spec == "ann":
        model = counterpart_ann(student, checkpoint)
        return Teacher(model, "ann", "snn", DataConfig.from_model(model), capture)
    entry = lookup(spec)
    if spec.lower().endswith(".qsd") or (Path(spec).suffix and Path(spec).exists()) or \
            (entry is not None and entry.vit is None):
        model = load(spec)
        style = "snn" if hasattr(model, "structure") else "timm"
        return Teacher(model, str(spec), style, DataConfig.from_model(model), capture)
    if spec in BUNDLED_VITS:
        model = bundled_vit(spec, checkpoint)
    else:
        model = timm_teacher(spec, checkpoint, num_classes=getattr(student, "num_classes", None), img_size=img_size)
    return Teacher(model, spec, "timm", timm_data_config(model, img_size), capture)


def timm_data_config(model: nn.Module, img_size: int | None = None) -> DataConfig:
    """A timm model's input configuration. The input size is the one the model was built at (a
    ViT built with ``img_size=32`` takes 32x32 images whatever its pretrained config says); a model
    without position embeddings (CAFormer, ConvNeXt) runs at its pretrained config's size unless
    ``img_size`` is given, since its weights do not tell the size it was trained at."""
    from timm.data import resolve_data_config

    dc = resolve_data_config({}, model=model)
    size = tuple(dc["input_size"])
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if built is not None and getattr(model, "pos_embed", None) is not None:
        size = (size[0], *(int(v) for v in built))
    elif img_size is not None:
        size = (size[0], int(img_size), int(img_size))
    return DataConfig(input_size=size, mean=tuple(dc["mean"]), std=tuple(dc["std"]),
                      interpolation=dc.get("interpolation", "bicubic"), crop_pct=float(dc.get("crop_pct", 1.0)))
