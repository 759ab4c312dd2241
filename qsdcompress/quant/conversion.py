"""``convert``: quantize weights, put in IE-LIF neurons, calibrate; and the two ways back to the
same structure: ``restore_quantized`` from ``.qsd`` metadata, ``import_reference_lsq`` from a
reference QSD-Transformer LSQ checkpoint."""
from __future__ import annotations

import copy
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from ..data import DataConfig, build_loader, first_samples, foreign_data_reason, model_data
from ..errors import QsdError
from ..io import load_state_dict_checked, strip_quant_extras
from ..neurons import IELIF, AffineMultiSpike, iter_neurons
from ..config import FLOAT_BITS, REESTIMATE_BN_BITS, REFERENCE_LSQ_BITS, QuantConfig
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


def calib_loader_for(model: nn.Module, data: str, config: QuantConfig):
    """The loader of calibration images (train split of ``data``; labels unused)."""
    return build_loader(data, "train", DataConfig.from_model(model), batch_size=config.calib_batch_size,
                        shuffle=True, num_classes=getattr(model, "num_classes", 10), seed=0)


def _first_samples(loader: Iterable | None, n: int) -> list[torch.Tensor]:
    """Image batches holding the first ``n`` images of a loader (labels dropped)."""
    if loader is None:
        return []
    return [b[0] if isinstance(b, (list, tuple)) else b for b in first_samples(loader, n)]


def calibration_data(model: nn.Module, config: QuantConfig) -> str | None:
    """The data that calibrates ``model`` and measures it: ``config.calib_data``, else the data the
    model records as its own (:func:`~qsdcompress.data.model_data`), else None (weight-only)."""
    return config.calib_data or model_data(model)


def _calibration_batches(model: nn.Module, config: QuantConfig, calib_loader: Iterable | None
                         ) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """The calibration images and what they are: the caller's loader, else ``config.calib_data``,
    else the data the model records as its own (:func:`~qsdcompress.data.model_data`), else none."""
    n = config.num_calib_samples
    if calib_loader is not None:
        return _first_samples(calib_loader, n), {"data": None, "from": "the caller's loader", "own_data": True}
    data = calibration_data(model, config)
    info: dict[str, Any] = {"data": data, "from": "given" if config.calib_data else "the model's metadata",
                            "own_data": bool(data)}
    if not data or n <= 0:
        return [], {**info, "data": None, "from": None, "own_data": False}
    loader = calib_loader_for(model, data, config)
    reason = foreign_data_reason(model, data, loader)
    if reason:
        info.update(own_data=False, foreign=reason)
    return _first_samples(loader, n), info


def _reestimate_rule(m: nn.Module, config: QuantConfig, batches: list, info: dict) -> bool:
    """Re-estimate BatchNorm: as asked, else (auto) at <= REESTIMATE_BN_BITS on the model's own data only."""
    if config.reestimate_bn is not None:
        if config.reestimate_bn and not batches:
            raise QsdError("--reestimate-bn recomputes BatchNorm statistics on calibration images: pass --data "
                           "with images of the model's own data")
        return config.reestimate_bn
    low_bits = min(layer_bits(m).values(), default=FLOAT_BITS) <= REESTIMATE_BN_BITS
    return bool(batches) and low_bits and info["own_data"]


def _skipped_note(config: QuantConfig, targets: list, batches: list, info: dict, reestimated: bool) -> str | None:
    """One line: what calibration left out and which option supplies the data."""
    if not batches:
        ie = "; IE-LIF starts as the plain neuron (identity)" if targets else ""
        return (f"no calibration data: weight-only quantization, BatchNorm statistics kept from the float "
                f"model{ie}; pass --data with images of the model's own data to re-estimate BatchNorm "
                f"(<= {REESTIMATE_BN_BITS} bits) and calibrate IE-LIF")
    if info.get("foreign") and not reestimated:
        return (f"calibration data not the model's own ({info['foreign']}): BatchNorm statistics kept from the "
                f"float model (--reestimate-bn forces the re-estimation)")
    if info.get("foreign"):
        return f"BatchNorm re-estimated on data that is not the model's own ({info['foreign']}), as asked"
    return None


def convert(model: nn.Module, config: QuantConfig | Mapping[str, Any] | None = None,
            calib_loader: Iterable | None = None, inplace: bool = False) -> nn.Module:
    """Quantize weights, put in IE-LIF neurons and calibrate; returns the converted model.

    The float model survives unless ``inplace``. Calibration images (``config.num_calib_samples``
    of them) come from ``calib_loader`` (image batches or ``(images, labels)``), else from
    ``config.calib_data``, else from the data the model records as its own; with none, the
    conversion is weight-only and keeps the float statistics (docs/method.md §3). BatchNorm is
    re-estimated automatically only on the model's own data. ``model.qsd_quant_meta["calibration"]``
    says what was done (``data``, ``samples``, ``batchnorm_reestimated``, ``note``).
    """
    if config is None:
        config = QuantConfig()
    elif isinstance(config, Mapping):
        config = QuantConfig.from_dict(config)
    config.validate()
    targets = ie_lif_targets(model, config.ie_lif)  # errors before any work
    batches, info = _calibration_batches(model, config, calib_loader)
    if targets and config.ie_lif_init == "rectify" and not batches:
        raise QsdError("--ie-lif-init rectify sets IE-LIF from the statistics of calibration images: pass --data "
                       "with images of the model's own data (or use --ie-lif-init identity)")
    m = model if inplace else copy.deepcopy(model)
    was_training = m.training
    m.eval()
    if targets:
        ref = next(m.parameters())
        example = batches[0][:1] if batches else torch.zeros(1, *_input_size(m), dtype=ref.dtype)
        channels = neuron_channels(m, targets, example.to(device=ref.device, dtype=ref.dtype))
    quantize_(m, config)
    reestimate = _reestimate_rule(m, config, batches, info)
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
    m.qsd_quant_meta["calibration"] = {
        "data": info["data"] if batches else None, "samples": sum(len(b) for b in batches),
        "from": info["from"] if batches else None, "own_data": bool(batches) and info["own_data"],
        "batchnorm_reestimated": bool(batches) and reestimate,
        "note": _skipped_note(config, targets, batches, info, reestimate)}
    return m


def _input_size(model: nn.Module) -> tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))  # type: ignore[return-value]



__all__ = ["convert", "restore_quantized", "import_reference_lsq", "quant_meta", "calib_loader_for",
           "calibration_data"]
