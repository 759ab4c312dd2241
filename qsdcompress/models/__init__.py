"""Model registry: the spike-driven Transformer family, registered in timm.

After ``import qsdcompress`` both ``timm.create_model("qsd_8_512")`` and
``qsdcompress.create_model("qsd_8_512")`` work. Reference factory names
(``spikformer_8_512_CAFormer``, ``metaspikformer_8_512``, ...) are aliases.

Pretrained weights follow timm's conventions: ``pretrained=True`` takes its source from the
pretrained config (a tag such as ``qsd_8_512.w4_in1k`` with ``hf_hub_id``/``hf_hub_filename``,
``pretrained_cfg_overlay=dict(file=PATH)``, or an ``hf-hub:`` name whose ``config.json`` names
one of these architectures). This layer only resolves *where* the weights are; reading a
checkpoint (and importing a reference LSQ checkpoint as a quantized model) belongs to
:mod:`qsdcompress.loading`, two layers up, which this layer may not import. So ``loading``
hands its loader down once, at import, through :func:`set_pretrained_loader`; since every
``qsdcompress`` import runs the package ``__init__`` (which imports ``loading``), the loader is in
place before any model is created.
"""
from __future__ import annotations

import difflib
from dataclasses import fields
from typing import Any, Callable

import torch.nn as nn
from timm.models import generate_default_cfgs, resolve_pretrained_cfg
from timm.models import register_model as _timm_register

from ..errors import QsdError, one_line
from ._structure import AttentionSite, ModelStructure, RepConvSite, describe
from .spikedriven import SDTConfig, SpikeDrivenTransformer

_ARCHS: dict[str, dict[str, Any]] = {}
_ALIASES: dict[str, str] = {}
_TIMM_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained_model_args")

_QSD = dict(depth=8, num_heads=8, mlp_ratio=4, neuron="multispike", attn_scale=0.25, layer_scale=1e-6)
_SDT_V2 = dict(depth=8, num_heads=8, mlp_ratio=4, neuron="lif", attn_scale=0.125, layer_scale=None,
               split_blocks=(6, 2), D=1)


def _make_entry(name: str) -> Callable[..., nn.Module]:
    def entry(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create_model(name, pretrained=pretrained, **kwargs)

    entry.__name__ = name
    entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = f"Spike-driven Transformer `{name}` ({_ARCHS.get(name, {})})."
    return entry


#: the authors' Hugging Face repository of the QSD-Transformer ImageNet-1k weights (4-bit LSQ)
QSD_HF_REPO = "Xuerui123/QSD_Transformer"
#: architectures with weights published there, as timm tags (the default pretrained config).
#: The file names inside the repository are not fixed here: ``hf_hub_filename`` names one,
#: otherwise timm's defaults (``model.safetensors``, ``pytorch_model.bin``) are tried.
HUB_WEIGHTS = {
    "qsd_8_15m": ("w4_in1k", "QSD-Transformer 15M, 4-bit weights (LSQ), ImageNet-1k"),
    "qsd_8_512": ("w4_in1k", "QSD-Transformer 55M, 4-bit weights (LSQ), ImageNet-1k"),
}
#: read by timm's ``register_model``: every architecture's pretrained configs (tags)
default_cfgs: dict[str, Any] = {}


def _default_cfgs(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    size = cfg.get("img_size", 224)
    base = dict(num_classes=cfg.get("num_classes", 1000), input_size=(3, size, size),
                mean=cfg.get("mean", (0.485, 0.456, 0.406)), std=cfg.get("std", (0.229, 0.224, 0.225)),
                interpolation="bicubic", crop_pct=0.875, first_conv="downsample1_1.encode_conv",
                classifier="head")
    entries: dict[str, Any] = {}
    if name in HUB_WEIGHTS:  # the first tag is the default: pretrained=True means these weights
        tag, what = HUB_WEIGHTS[name]
        entries[f"{name}.{tag}"] = dict(base, hf_hub_id=QSD_HF_REPO, description=what,
                                        origin_url="https://github.com/bollossom/QSD-Transformer")
    entries[name] = base
    return generate_default_cfgs(entries)


def register_arch(name: str, aliases: tuple[str, ...] = (), **cfg: Any) -> None:
    """Register an architecture under ``name`` (and aliases) here and in timm, with its
    pretrained configs (timm tags; see :data:`HUB_WEIGHTS`)."""
    _ARCHS[name] = cfg
    default_cfgs.update(_default_cfgs(name, cfg))
    for n in (name, *aliases):
        if n != name:
            _ALIASES[n] = name
        try:
            _timm_register(_make_entry(n))
        except Exception:  # already registered (module reloaded)
            pass


register_arch("qsd_8_256", ("spikformer_8_256_CAFormer",), embed_dim=(48, 96, 192, 256), **_QSD)
register_arch("qsd_8_15m", ("spikformer_8_15M_CAFormer",), embed_dim=(64, 128, 256, 360), **_QSD)
register_arch("qsd_8_384", ("spikformer_8_384_CAFormer",), embed_dim=(96, 192, 384, 480), **_QSD)
register_arch("qsd_8_512", ("spikformer_8_512_CAFormer",), embed_dim=(128, 256, 512, 640), **_QSD)
register_arch("qsd_12_512", ("spikformer_12_512_CAFormer",), embed_dim=(128, 256, 512, 640),
              **{**_QSD, "depth": 12})
register_arch("qsd_8_768", ("spikformer_8_768_CAFormer",), embed_dim=(192, 384, 768, 960), **_QSD)
register_arch("metaspikformer_8_384", (), embed_dim=(96, 192, 384, 480), **_SDT_V2)
register_arch("metaspikformer_8_512", (), embed_dim=(128, 256, 512, 640), **_SDT_V2)
register_arch("metaspikformer_8_768", (), embed_dim=(192, 384, 768, 960), **_SDT_V2)
# Small model for 32x32 inputs: stride 2 only in the first two downsamplings (not in the
# later ones), so attention sees an 8x8 token grid; 0.43M parameters.
register_arch(
    "qsd_tiny", (), embed_dim=(16, 32, 48, 64), depth=4, num_heads=4, mlp_ratio=4,
    neuron="multispike", attn_scale=0.25, layer_scale=1e-6, strides=(2, 2, 1, 1, 1),
    img_size=32, num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
)
# Fashion-MNIST (1x28x28): twice qsd_tiny's widths, 14x14 conv stages then a 7x7 token grid
# (strides 2,1,2,1,1: faster to learn than 2,2,1,1,1 in a pilot), layer scale 0.1 so that the
# attention branches carry real signal (at 1e-6 they start, and stay, nearly switched off), and
# attention scale 1/32 (at qsd_tiny's 0.25 the attention neuron saturates: docs/method.md §2).
register_arch("qsd_tiny_fmnist", (), **{**_ARCHS["qsd_tiny"], "embed_dim": (32, 64, 96, 128),
                                       "strides": (2, 1, 2, 1, 1), "layer_scale": 0.1, "attn_scale": 1 / 32,
                                       "in_chans": 1, "img_size": 28, "mean": (0.286,), "std": (0.353,)})


def list_models() -> list[str]:
    return sorted(_ARCHS)


def resolve_name(name: str) -> str:
    """Canonical architecture name; a clear error with the closest names otherwise."""
    if name in _ARCHS:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    lowered = {n.lower(): n for n in [*_ARCHS, *_ALIASES]}
    if name.lower() in lowered:
        return resolve_name(lowered[name.lower()])
    close = difflib.get_close_matches(name, [*_ARCHS, *_ALIASES], n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(list_models())}"
    raise QsdError(f"unknown model {name!r}{hint}")


def model_config(name: str, **kwargs: Any) -> SDTConfig:
    """The :class:`SDTConfig` of a registered architecture with overrides.

    ``ann=True`` gives the counterpart ANN (neurons become clamped-ReLU activations).
    """
    base = dict(_ARCHS[resolve_name(name)])
    for k in _TIMM_KWARGS:
        kwargs.pop(k, None)
    if kwargs.pop("ann", False):
        kwargs["neuron"] = "relu"
    if "in_channels" in kwargs:
        kwargs["in_chans"] = kwargs.pop("in_channels")
    if not kwargs.get("extra", True):  # an always-empty field of early .qsd files
        kwargs.pop("extra")
    known = {f.name for f in fields(SDTConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise QsdError(f"unknown model argument(s) {', '.join(unknown)}; accepted: {', '.join(sorted(known))}")
    base.update(kwargs)
    for k in ("embed_dim", "strides", "split_blocks", "mean", "std"):
        if base.get(k) is not None:
            base[k] = tuple(base[k])
    return SDTConfig(**base)


#: architectures with weights bundled in ``qsdcompress/zoo`` (``pretrained=True`` loads them)
BUNDLED_WEIGHTS = {"qsd_tiny": "digits", "qsd_tiny_fmnist": "fashion-mnist"}  # architecture -> its data

PretrainedLoader = Callable[[str, dict, dict, Any], nn.Module]
_PRETRAINED_LOADER: PretrainedLoader | None = None


def set_pretrained_loader(fn: PretrainedLoader) -> None:
    """Install the function that turns a weights source into a model:
    ``fn(arch, source, model_args, cache_dir)``; ``source`` holds the resolved pretrained config's
    ``file``, ``hf_hub_id``, ``hf_hub_filename``, ``url`` and ``tag``. :mod:`qsdcompress.loading`
    installs its loader at import (see the module docstring for why it is injected)."""
    global _PRETRAINED_LOADER
    _PRETRAINED_LOADER = fn


def weights_source(arch: str, pretrained_cfg: Any = None, overlay: dict | None = None) -> dict | None:
    """Where ``pretrained=True`` takes the weights of ``arch`` from, resolved as timm does
    (tag or config, then ``pretrained_cfg_overlay``); None when the config names no weights."""
    pc = resolve_pretrained_cfg(arch, pretrained_cfg, overlay)
    src = {k: getattr(pc, k, None) for k in ("file", "hf_hub_id", "hf_hub_filename", "url", "tag", "description")}
    return src if (src["file"] or src["hf_hub_id"] or src["url"]) else None


def _no_weights(name: str, canonical: str) -> QsdError:
    return QsdError(f"{name}: pretrained=True but no weights are bundled for this architecture (only for "
                    f"{', '.join(BUNDLED_WEIGHTS)}) and no source is given; pass "
                    f"pretrained_cfg_overlay=dict(file=PATH), or qsdcompress.load(PATH, arch={canonical!r}), "
                    f"or `qsdcompress eval PATH --arch {canonical}`")


def _create_from_source(name: str, pretrained: bool, overlay: dict | None, cache_dir: Any,
                        kwargs: dict[str, Any]) -> nn.Module:
    """An ``hf-hub:``/``local-dir:`` name through ``timm.create_model`` (its ``config.json`` names
    the architecture); a repository without one (the authors' own) gets a one-line error."""
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, pretrained_cfg_overlay=overlay,
                                 cache_dir=cache_dir, **kwargs)
    except QsdError:
        raise
    except Exception as e:  # no config.json (offline, not cached, or not a timm repository)
        tags = ", ".join(f"{a}.{t}" for a, (t, _) in HUB_WEIGHTS.items())
        raise QsdError(f"{name}: no timm config.json ({one_line(e, 100)}); for the authors' weights use "
                       f"{tags} with pretrained_cfg_overlay=dict(file=PATH) or dict(hf_hub_filename=NAME)") from None


def create_model(name: str, pretrained: bool = False, pretrained_cfg: Any = None,
                 pretrained_cfg_overlay: dict | None = None, cache_dir: Any = None,
                 **kwargs: Any) -> nn.Module:
    """Build a registered model, timm style.

    ``pretrained=True`` loads the weights its pretrained config names: a local ``file``
    (``pretrained_cfg_overlay=dict(file=PATH)``, a reference or ``.qsd`` checkpoint, read exactly
    as :func:`qsdcompress.load` reads it; a reference LSQ checkpoint comes back quantized), a
    Hugging Face file (``hf_hub_id``/``hf_hub_filename``; a tag such as ``qsd_8_512.w4_in1k``),
    or, for ``qsd_tiny`` without a source, the bundled digits weights. ``hf-hub:``/``local-dir:``
    names go through ``timm.create_model``.
    """
    if name.startswith(("hf-hub:", "local-dir:")):
        return _create_from_source(name, pretrained, pretrained_cfg_overlay, cache_dir, kwargs)
    base, _, tag = name.partition(".")
    canonical = resolve_name(base if tag else name)
    for k in _TIMM_KWARGS:
        kwargs.pop(k, None)
    cfg = model_config(canonical, **kwargs)
    source = weights_source(canonical, pretrained_cfg or tag or None, pretrained_cfg_overlay) \
        if pretrained else None
    if source is not None:
        if _PRETRAINED_LOADER is None:
            raise QsdError("loading pretrained weights needs qsdcompress.loading (import qsdcompress)")
        return _PRETRAINED_LOADER(canonical, source, kwargs, cache_dir)
    if pretrained and canonical not in BUNDLED_WEIGHTS:
        raise _no_weights(name, canonical)
    model = SpikeDrivenTransformer(cfg)
    model.arch = canonical  # type: ignore[assignment]
    if pretrained:
        from ..zoo import load_bundled_weights

        load_bundled_weights(model, ann=cfg.neuron == "relu", data=BUNDLED_WEIGHTS[canonical])
    return model


__all__ = ["create_model", "list_models", "model_config", "resolve_name", "register_arch", "describe",
           "SDTConfig", "SpikeDrivenTransformer", "ModelStructure", "AttentionSite", "RepConvSite", "BUNDLED_WEIGHTS",
           "HUB_WEIGHTS", "QSD_HF_REPO", "set_pretrained_loader", "weights_source"]
