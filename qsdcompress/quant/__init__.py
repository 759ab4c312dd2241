"""Conversion to a QSD-Transformer: low-bit Brevitas weights, IE-LIF neurons, calibration.

* :class:`QuantConfig` (what to do) and bit-width parsing live in :mod:`qsdcompress.config`.
* ``layers``: the Brevitas weight quantizers, scale initialisation, the per-layer bit plan and
  :func:`quantize_` (swap conv/linear layers in place).
* ``ielif``: which neurons become IE-LIF (the model publishes its q/k/v neurons), calibration of
  their statistics, folding them back into plain neurons.
* ``conversion``: :func:`convert` and the ways back to a converted structure
  (:func:`restore_quantized` from ``.qsd`` metadata, :func:`import_reference_lsq`).
"""
from ..config import (FLOAT_BITS, IE_LIF_INITS, IE_LIF_MODES, REFERENCE_LSQ_BITS, SCALE_INITS, QuantConfig,
                     parse_bits, parse_layer_bits)
from .conversion import calib_loader_for, calibration_data, convert, import_reference_lsq, quant_meta, restore_quantized
from .ielif import (calibrate, fold_ie_lif, ie_lif_targets, neuron_channels, preceding_bn, reestimate_batchnorm,
                    replace_with_ie_lif)
from .layers import (attach_lsq_grad_scale, init_step, is_quant_layer, layer_bits, make_quant_layer, plan_bits,
                     quant_bits, quantize_, scale_param, weight_layers)

__all__ = [
    "QuantConfig", "quantize_", "convert", "layer_bits", "plan_bits", "restore_quantized", "import_reference_lsq",
    "fold_ie_lif", "attach_lsq_grad_scale", "calibrate", "reestimate_batchnorm", "init_step", "make_quant_layer",
    "is_quant_layer",
    "quant_bits", "replace_with_ie_lif", "preceding_bn", "parse_bits", "parse_layer_bits", "quant_meta",
    "calib_loader_for", "calibration_data", "ie_lif_targets", "neuron_channels", "scale_param", "weight_layers",
    "SCALE_INITS", "IE_LIF_MODES", "IE_LIF_INITS", "FLOAT_BITS", "REFERENCE_LSQ_BITS",
]
