"""``convert``: quantize weights, put in IE-LIF neurons, calibrate; and the two ways back to the
same structure: ``restore_quantized`` from ``.qsd`` metadata, ``import_reference_lsq`` from a
reference QSD-Transformer LSQ checkpoint."""
from __future__ import annotations

import copy
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from ..data import DataConfig, build_loader, first_samples
from ..errors import QsdError
from ..io import load_state_dict_checked, strip_quant_extras
from ..neurons import IELIF, AffineMultiSpike, iter_neurons
from .config import FLOAT_BITS, REESTIMATE_BN_BITS, REFERENCE_LSQ_BITS, QuantConfig
from .ielif import calibrate, ie_lif_targets, neuron_channels, reestimate_batchnorm, replace_with_ie_lif
from .layers import layer_bits, quantize_, weight_layers

def _neuron_meta(model: nn.Module) -> dict:
    ie = {name: {"channels": n.num_features, "levels": n.levels, "out_scale": n.out_scale,
                 "eps": n.eps, "momentum": n.momentum}
          for name, n in iter_neurons(model) if isinstance(n, IELIF)}
    aff = {name: {"channels": n.num_features, "levels": n.levels, "out_scale": n.out_scale}
           for name, n in iter_neurons(model) if isinstance(n, AffineMultiSpike)}
    out: dict[str, Any] = {"ie_lif": ie}
    if aff:
        out["affine"] = aff
    return out


def quant_meta(model: nn.Module, config: QuantConfig, source: dict | None = None) -> dict:
    """The ``.qsd`` metadata entries of a converted model (merged by ``qsdcompress.save``)."""
    bits = layer_bits(model)
    return {"quant": {**config.to_dict(), "layers": {k: v for k, v in bits.items() if v < FLOAT_BITS},
                      "float_layers": [k for k, v in bits.items() if v >= FLOAT_BITS],
                      "quantizer": "brevitas int per-output-channel signed full-range, learned scale"},
            "neurons": _neuron_meta(model), "source": source or {}}


def restore_quantized(model: nn.Module, meta: Mapping[str, Any]) -> nn.Module:
    """Rebuild the quantized layers and IE-LIF neurons that ``meta`` describes (placeholder
    scales and statistics: load the state_dict next, strictly)."""
    q = dict(meta.get("quant") or {})
    layers = {str(k): int(v) for k, v in (q.get("layers") or {}).items()}
    own = dict(weight_layers(model))
    unknown = sorted(set(layers) - set(own))
    if unknown:
        raise QsdError(f"quantized layer(s) {', '.join(unknown[:3])} do not exist in {getattr(model, 'arch', 'model')}")
    quantize_(model, QuantConfig(), plan=layers, steps={k: torch.ones(own[k].weight.shape[0]) for k in layers})
    neurons = meta.get("neurons") or {}
    for name, spec in (neurons.get("ie_lif") or {}).items():
        old = model.get_submodule(name)
        new = IELIF(int(spec["channels"]), levels=int(spec.get("levels", old.levels)),
                    out_scale=float(spec.get("out_scale", old.out_scale)),
                    momentum=spec.get("momentum", 0.1), eps=float(spec.get("eps", 1e-5)))
        model.set_submodule(name, new)
    for name, spec in (neurons.get("affine") or {}).items():
        old = model.get_submodule(name)
        model.set_submodule(name, AffineMultiSpike(int(spec["channels"]), levels=int(spec.get("levels", old.levels)),
                                                  out_scale=float(spec.get("out_scale", old.out_scale))))
    model.qsd_quant_meta = {k: copy.deepcopy(meta[k]) for k in ("quant", "neurons", "source", "calibration",
                                                                   "mixed_precision")
                            if k in meta}
    return model


def import_reference_lsq(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load a reference QSD-Transformer LSQ checkpoint (``<layer>.alpha`` per-channel steps, 4-bit,
    ``Qn=-8, Qp=7``) as our Brevitas model with the same integer weights and steps.

    Layers with ``alpha`` become 4-bit quantized layers with step ``alpha``; ``init_state`` and the
    (identity) activation quantizers ``<layer>.act.*`` are dropped; other layers stay float.
    """
    clean, _ = strip_quant_extras(sd)
    load_state_dict_checked(model, clean, source="reference LSQ checkpoint")
    own = dict(weight_layers(model))
    steps: dict[str, torch.Tensor] = {}
    for key, alpha in sd.items():
        if not key.endswith(".alpha") or ".act." in key:
            continue
        name = key[: -len(".alpha")]
        if name not in own:
            raise QsdError(f"reference checkpoint has a step for {name}, which is not a conv/linear layer here")
        alpha = alpha.detach().float().reshape(-1)
        cout = own[name].weight.shape[0]
        if alpha.numel() == 1:
            alpha = alpha.expand(cout).clone()
        if alpha.numel() != cout or not bool((alpha > 0).all()):
            raise QsdError(f"{key}: expected {cout} positive per-channel steps, got shape {tuple(alpha.shape)}")
        steps[name] = alpha
    plan = {name: REFERENCE_LSQ_BITS for name in steps}
    cfg = QuantConfig(bits=REFERENCE_LSQ_BITS, scale_init="lsq", ie_lif="none")
    quantize_(model, cfg, steps=steps, plan=plan)
    model.qsd_quant_meta = quant_meta(model, cfg, source={"format": "reference LSQ (alpha per channel)"})
    return model


def calib_loader_for(model: nn.Module, config: QuantConfig):
    """The loader of calibration images (train split of ``config.calib_data``; labels unused)."""
    return build_loader(config.calib_data, "train", DataConfig.from_model(model), batch_size=config.calib_batch_size,
                        shuffle=True, num_classes=getattr(model, "num_classes", 10), seed=0)


def _first_samples(loader: Iterable | None, n: int) -> list[torch.Tensor]:
    """Image batches holding the first ``n`` images of a loader (labels dropped)."""
    if loader is None:
        return []
    return [b[0] if isinstance(b, (list, tuple)) else b for b in first_samples(loader, n)]


def convert(model: nn.Module, config: QuantConfig | Mapping[str, Any] | None = None,
            calib_loader: Iterable | None = None, inplace: bool = False) -> nn.Module:
    """Quantize weights, put in IE-LIF neurons and calibrate; returns the converted model.

    The float model survives unless ``inplace``. ``calib_loader`` yields image batches (or
    ``(images, labels)``); ``None`` builds one from ``config.calib_data``. The first
    ``config.num_calib_samples`` images calibrate. Sets ``model.qsd_quant_meta`` (with the
    calibration data and image count) for ``qsdcompress.save``.
    """
    if config is None:
        config = QuantConfig()
    elif isinstance(config, Mapping):
        config = QuantConfig.from_dict(config)
    config.validate()
    targets = ie_lif_targets(model, config.ie_lif)  # errors before any work
    calib_from = "the caller's loader" if calib_loader is not None else config.calib_data
    if calib_loader is None and config.num_calib_samples > 0:
        calib_loader = calib_loader_for(model, config)
    batches = _first_samples(calib_loader, config.num_calib_samples)
    m = model if inplace else copy.deepcopy(model)
    was_training = m.training
    m.eval()
    if targets:
        ref = next(m.parameters())
        example = batches[0][:1] if batches else torch.zeros(1, *_input_size(m), dtype=ref.dtype)
        channels = neuron_channels(m, targets, example.to(device=ref.device, dtype=ref.dtype))
    quantize_(m, config)
    reestimate = config.reestimate_bn if config.reestimate_bn is not None else \
        min(layer_bits(m).values(), default=FLOAT_BITS) <= REESTIMATE_BN_BITS
    if targets:
        replace_with_ie_lif(m, channels, config.ie_lif_init, config.ie_lif_momentum, config.ie_lif_eps)
    if batches:
        ref = next(m.parameters())
        batches = [b.to(device=ref.device, dtype=ref.dtype) for b in batches]
        if reestimate:
            reestimate_batchnorm(m, batches)
        calibrate(m, batches, identity=config.ie_lif_init == "identity")
    m.train(was_training)
    source = dict((getattr(model, "qsd_meta", None) or {}).get("source") or {})
    m.qsd_quant_meta = quant_meta(m, config, source)
    m.qsd_quant_meta["calibration"] = {"data": calib_from if batches else None,
                                       "samples": sum(len(b) for b in batches),
                                       "batchnorm_reestimated": bool(batches) and reestimate}
    return m


def _input_size(model: nn.Module) -> tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))  # type: ignore[return-value]



__all__ = ["convert", "restore_quantized", "import_reference_lsq", "quant_meta", "calib_loader_for"]
