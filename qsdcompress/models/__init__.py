"""Model registry: the spike-driven Transformer family, registered in timm.

After ``import qsdcompress`` both ``timm.create_model("qsd_8_512")`` and
``qsdcompress.create_model("qsd_8_512")`` work. Reference factory names
(``spikformer_8_512_CAFormer``, ``metaspikformer_8_512``, ...) are aliases.
"""
from __future__ import annotations

import difflib
from dataclasses import fields
from typing import Any, Callable

import torch.nn as nn
from timm.models import register_model as _timm_register

from ..errors import QsdError
from .spikedriven import SDTConfig, SpikeDrivenTransformer

_ARCHS: dict[str, dict[str, Any]] = {}
_ALIASES: dict[str, str] = {}
_TIMM_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")

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


def register_arch(name: str, aliases: tuple[str, ...] = (), **cfg: Any) -> None:
    """Register an architecture under ``name`` (and aliases) here and in timm."""
    _ARCHS[name] = cfg
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
# Fashion-MNIST (1x28x28): qsd_tiny's widths on a 7x7 token grid, with layer scale 0.1 so that the
# attention branches carry real signal (at 1e-6 they start, and stay, nearly switched off; 0.1
# learned faster than 1.0 in a short pilot).
register_arch("qsd_tiny_fmnist", (), **{**_ARCHS["qsd_tiny"], "layer_scale": 0.1, "in_chans": 1,
                                       "img_size": 28, "mean": (0.286,), "std": (0.353,)})


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
    known = {f.name for f in fields(SDTConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise QsdError(f"unknown model argument(s) {', '.join(unknown)}; accepted: {', '.join(sorted(known))}")
    base.update(kwargs)
    for k in ("embed_dim", "strides", "split_blocks", "mean", "std"):
        if base.get(k) is not None:
            base[k] = tuple(base[k])
    return SDTConfig(**base)


def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> SpikeDrivenTransformer:
    """Build a registered model. ``pretrained=True`` loads bundled weights (``qsd_tiny`` only)."""
    canonical = resolve_name(name)
    cfg = model_config(canonical, **kwargs)
    model = SpikeDrivenTransformer(cfg)
    model.arch = canonical  # type: ignore[assignment]
    if pretrained:
        from ..zoo import load_bundled_weights

        load_bundled_weights(model, ann=cfg.neuron == "relu")
    return model


__all__ = ["create_model", "list_models", "model_config", "resolve_name", "register_arch",
           "SDTConfig", "SpikeDrivenTransformer"]
