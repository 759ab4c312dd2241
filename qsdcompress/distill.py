"""Distillation for quantization-aware finetuning (docs/method.md §5).

* Teachers: the counterpart ANN of the student's topology (``ann``), any timm model by name or
  short alias (``vit_base``, ``deit_small``, ``caformer_b36``, ...), a bundled ViT (``vit_digits``,
  ``vit_fmnist``) or a ``.qsd`` file. A teacher is frozen, in eval mode, and gets the batch
  re-sized and re-normalised to its own input configuration. It is never silently random: without
  weights (and offline) it is an error. A timm checkpoint of another image size, class count or
  depth is rebuilt as saved (:func:`checkpoint_model_args`) and runs at the size it was trained at.
* Fine-grained distillation (FGD): token-similarity matrices of the student's q/k/v spikes (after
  IE-LIF) against the teacher's attention projections, which do not depend on channel width.
* Logit KD: ``tau^2 * KL(p_teacher^tau || p_student^tau)``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import DataConfig, resize_batch
from .errors import QsdError, one_line
from .io import hub_unavailable, load_state_dict_checked, read_checkpoint, strip_quant_extras
from .loading import bundled_model, has_reference_lsq, hub_weights, load
from .models import create_model, describe

# --- the bundled cross-architecture teacher -------------------------------------------------------

@dataclass(frozen=True)
class BundledViT:
    """A small timm ``VisionTransformer`` trained on one data set (``examples/train_vit_teacher.py``):
    a cross-architecture teacher whose token grid matches the bundled student of that data set."""

    name: str
    data: str
    args: dict[str, Any]
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def path(self) -> Path:
        return Path(__file__).resolve().parent / "zoo" / f"{self.name}.safetensors"

    def build(self) -> nn.Module:
        """An untrained model of this teacher's shape."""
        from timm.models.vision_transformer import VisionTransformer

        m = VisionTransformer(**self.args)
        m.pretrained_cfg = {"input_size": self.input_size, "mean": self.mean, "std": self.std,
                            "interpolation": "bilinear", "crop_pct": 1.0, "num_classes": self.args["num_classes"]}
        return m


#: the bundled ViT teachers. digits: patch 4 on 32x32 gives ``qsd_tiny``'s 8x8 token grid (plus a
#: class token); Fashion-MNIST: patch 4 on 28x28 grayscale gives ``qsd_tiny_fmnist``'s 7x7 grid.
BUNDLED_VITS: dict[str, BundledViT] = {
    "vit_digits": BundledViT(
        "vit_digits", "digits", dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0,
                                     num_classes=10, global_pool="token"),
        (3, 32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "vit_fmnist": BundledViT(
        "vit_fmnist", "fashion-mnist", dict(img_size=28, patch_size=4, in_chans=1, embed_dim=96, depth=4, num_heads=4,
                                            mlp_ratio=2.0, num_classes=10, global_pool="token"),
        (1, 28, 28), (0.286,), (0.353,)),
}


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


# --- q/k/v capture ------------------------------------------------------------------------------

def tokens_from_spikes(s: torch.Tensor) -> torch.Tensor:
    """Neuron output ``(T, B, C, H, W)`` -> ``(B, N, C)``: mean over T, tokens in raster order."""
    return s.float().mean(0).flatten(2).transpose(1, 2)


def resize_tokens(x: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a ``(B, N, C)`` token grid ``src_grid`` (h, w) to ``dst_grid``."""
    if tuple(src_grid) == tuple(dst_grid):
        return x
    b, n, c = x.shape
    g = x.transpose(1, 2).reshape(b, c, *src_grid)
    g = F.interpolate(g, size=tuple(dst_grid), mode="bilinear", align_corners=False)
    return g.flatten(2).transpose(1, 2)


def _grid_of(n: int) -> tuple[int, int]:
    s = int(round(math.sqrt(n)))
    if s * s != n:
        raise QsdError(f"cannot tell the token grid of {n} tokens (not a square); FGD needs a 2-D grid")
    return s, s


class QKVCapture:
    """Forward hooks collecting q/k/v as ``(B, N, C)`` per attention block, in forward order.

    ``snn`` style: hooks on the q/k/v neurons of each attention block, as the model publishes
    them (spike-driven models and their counterpart ANN; IE-LIF keeps the names). ``timm`` style: hooks on every
    ``qkv`` linear layer; its output is split into q, k, v, prefix tokens are dropped.
    """

    def __init__(self, model: nn.Module, style: str, prefix_tokens: int = 0):
        self.style = style
        self.prefix_tokens = prefix_tokens
        self.handles: list[Any] = []
        self.store: dict[int, dict[str, torch.Tensor]] = {}
        self.grids: dict[int, tuple[int, int]] = {}
        self.enabled = True
        if style == "snn":
            sites = describe(model).attention
            if not sites:
                raise QsdError(f"{type(model).__name__} has no spike-driven attention blocks for FGD")
            for i, site in enumerate(sites):
                for z in ("q", "k", "v"):
                    mod = model.get_submodule(getattr(site, z))
                    self.handles.append(mod.register_forward_hook(self._snn_hook(i, z)))
            self.num_layers = len(sites)
        elif style == "timm":
            layers = [m for n, m in model.named_modules()
                      if n.split(".")[-1] == "qkv" and isinstance(m, nn.Linear)]
            if not layers:
                raise QsdError(f"teacher {type(model).__name__} has no attention 'qkv' projections; "
                               f"use --lambda-fgd 0 (logit KD only) or a ViT/DeiT/CAFormer teacher")
            for i, m in enumerate(layers):
                self.handles.append(m.register_forward_hook(self._timm_hook(i)))
            self.num_layers = len(layers)
        else:
            raise ValueError(f"unknown capture style {style!r}")

    def _snn_hook(self, i: int, z: str) -> Callable:
        def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            if self.enabled:
                self.store.setdefault(i, {})[z] = tokens_from_spikes(out)
                self.grids[i] = (int(out.shape[-2]), int(out.shape[-1]))
        return hook

    def _timm_hook(self, i: int) -> Callable:
        def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            if not self.enabled:
                return
            out = out.float()
            if out.dim() == 4:  # MetaFormer attention runs on (B, H, W, 3C)
                grid = (int(out.shape[1]), int(out.shape[2]))
                out = out.flatten(1, 2)
            else:
                out = out[:, self.prefix_tokens:]
                grid = _grid_of(out.shape[1])
            q, k, v = out.chunk(3, dim=-1)
            self.store[i] = {"q": q, "k": k, "v": v}
            self.grids[i] = grid
        return hook

    def pop(self) -> list[dict[str, torch.Tensor]]:
        """The captured layers of the last forward, in order; clears the store."""
        out = [self.store[i] for i in sorted(self.store)]
        self.store = {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# --- losses -------------------------------------------------------------------------------------

def similarity(x: torch.Tensor) -> torch.Tensor:
    """``G(X) = row_l2_normalise(X X^T)`` for ``X`` of shape ``(B, N, C)`` -> ``(B, N, N)``."""
    x = x.float()
    return F.normalize(x @ x.transpose(1, 2), p=2, dim=-1)


def layer_map(num_student: int, num_teacher: int, override: Sequence[int] | None = None) -> list[int]:
    """Teacher layer for each student layer: ``m(l) = round((l + 1) L_A / L_S) - 1`` (round half up).

    ``override`` (``--fgd-layers``) gives the teacher index of every student layer explicitly.
    """
    if override is not None and len(override) > 0:
        override = [int(v) for v in override]
        if len(override) != num_student:
            raise QsdError(f"--fgd-layers has {len(override)} entries; the student has {num_student} "
                           f"attention blocks")
        bad = [v for v in override if not 0 <= v < num_teacher]
        if bad:
            raise QsdError(f"--fgd-layers {bad}: the teacher has attention layers 0..{num_teacher - 1}")
        return override
    out = []
    for l in range(num_student):
        m = math.floor((l + 1) * num_teacher / num_student + 0.5) - 1
        out.append(min(max(m, 0), num_teacher - 1))
    return out


def fgd_loss(student: Sequence[dict[str, torch.Tensor]], teacher: Sequence[dict[str, torch.Tensor]],
             mapping: Sequence[int], student_grid: tuple[int, int] | None = None,
             teacher_grids: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """``mean_{l, z in q,k,v} ||G(z_s^l) - G(z_A^m(l))||_F^2 / N`` (also averaged over the batch).

    Teacher tokens on another grid are resized bilinearly to the student grid first.
    """
    terms = []
    for l, feats in enumerate(student):
        tf = teacher[mapping[l]]
        for z in ("q", "k", "v"):
            s, t = feats[z], tf[z].detach()
            n = s.shape[1]
            if t.shape[1] != n:
                src = teacher_grids[mapping[l]] if teacher_grids is not None else _grid_of(t.shape[1])
                dst = student_grid if student_grid is not None else _grid_of(n)
                t = resize_tokens(t, src, dst)
            d = similarity(s) - similarity(t)
            terms.append(d.pow(2).sum(dim=(1, 2)).mean() / n)
    if not terms:
        raise QsdError("FGD found no student attention layers")
    return torch.stack(terms).mean()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """``tau^2 * KL(p_teacher^tau || p_student^tau)``, averaged over the batch."""
    log_ps = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_pt = F.log_softmax(teacher_logits.float().detach() / tau, dim=-1)
    return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True) * tau * tau


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


def counterpart_ann(student: nn.Module, checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """The ANN with the student's topology (neurons -> clamped ReLU) and trained weights.

    Weights come from ``checkpoint``; for the bundled students without one (``qsd_tiny``,
    ``qsd_tiny_fmnist``), their bundled ANN. Never returned untrained.
    """
    arch = getattr(student, "arch", None)
    if arch is None or not hasattr(student, "cfg"):
        raise QsdError("--teacher ann needs a spike-driven student (its architecture names the ANN)")
    cfg = {**student.cfg.to_dict(), "neuron": "relu"}
    if checkpoint is not None:
        ann = create_model(arch, **cfg)
        _load_weights(ann, checkpoint, "teacher checkpoint")
    elif arch in ("qsd_tiny", "qsd_tiny_fmnist"):
        ann = bundled_model(ann=True, data="fashion-mnist" if arch == "qsd_tiny_fmnist" else "digits")
        if ann.num_classes != student.num_classes:
            raise QsdError(f"the bundled ANN predicts {ann.num_classes} classes, the student "
                           f"{student.num_classes}; pass --teacher-checkpoint")
    else:
        raise QsdError(f"--teacher ann needs the counterpart ANN's weights for {arch}: pass "
                       f"--teacher-checkpoint PATH (or use a timm teacher, e.g. --teacher vit_base)")
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


def bundled_vit_teacher(name: str = "vit_digits", path: str | os.PathLike | None = None) -> nn.Module:
    """A bundled ViT teacher (:data:`BUNDLED_VITS`), from ``path`` if given."""
    vit = BUNDLED_VITS[name]
    path = Path(path) if path is not None else vit.path
    if not path.exists():
        raise QsdError(f"bundled ViT teacher missing: {path} (run examples/train_vit_teacher.py --data {vit.data})")
    model = vit.build()
    _load_weights(model, path, "ViT teacher")
    return model


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
    if spec.lower().endswith(".qsd") or (Path(spec).suffix and Path(spec).exists()):
        model = load(spec)
        style = "snn" if hasattr(model, "structure") else "timm"
        return Teacher(model, str(spec), style, DataConfig.from_model(model), capture)
    if spec in BUNDLED_VITS:
        model = bundled_vit_teacher(spec, checkpoint)
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


__all__ = [
    "Teacher", "QKVCapture", "load_teacher", "counterpart_ann", "timm_teacher",
    "build_vit_digits", "bundled_vit_teacher", "BundledViT", "BUNDLED_VITS",
    "resolve_teacher_name", "similarity", "layer_map",
    "fgd_loss", "kd_loss", "tokens_from_spikes", "resize_tokens", "TEACHER_ALIASES",
    "checkpoint_model_args", "timm_data_config",
]
