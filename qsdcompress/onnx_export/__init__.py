"""ONNX export with really packed low-bit weights, checked against PyTorch under onnxruntime or OpenVINO.

* ``folding``: the converted model folded into plain layers (BatchNorm and IE-LIF into per-channel
  scales; integer neurons as plain ops) and each weight kept as integers x scale.
* ``graph``: tracing, packed INT4/INT2/INT8 initializers feeding ``DequantizeLinear``, clean-up helpers.
* ``passes``: the one signature of an export pass, the context passes share, the shared passes and the
  runner (every format is a list of passes: ``exporter.FORMAT_PASSES``).
* ``integer``/``requant``: the ``int`` format's passes (onnxruntime's integer kernels, com.microsoft ops).
* ``standard``: the ``std-int`` format's passes (QDQ integer layers, standard ops: onnxruntime and OpenVINO).
* ``runtime``: the runtimes (:data:`RUNTIMES`: onnxruntime, optional OpenVINO), metadata, what ran as integers.
* ``parity``: that check, layer by layer against PyTorch, fed the same spikes (docs/method.md §7).
* ``exporter``: :func:`export` (``qsdcompress.export``), which ties them together and writes the
  file atomically.
"""
from .exporter import FORMATS, ExportConfig, build_onnx, export
from .folding import ExportNeuron, QWeight, export_module, is_weight_layer, quantized_weight
from .graph import BASE_OPSET, INPUT_NAME, INT2_OPSET, OUTPUT_NAME, packed_tensor, storage_bits
from .parity import FRAGILE_REL, RTOL, check_parity, measure_parity
from .runtime import (ORT_CONFIG, RUNTIMES, Runtime, executed_layers, onnx_metadata, onnx_predictor, ort_session,
                      parity_batch)

__all__ = ["ExportConfig", "QWeight", "export", "build_onnx", "export_module", "onnx_predictor", "onnx_metadata",
           "check_parity", "quantized_weight", "packed_tensor", "storage_bits", "is_weight_layer", "parity_batch", "ort_session",
           "ExportNeuron", "ORT_CONFIG", "RTOL", "FRAGILE_REL", "measure_parity", "BASE_OPSET", "INT2_OPSET",
           "INPUT_NAME", "OUTPUT_NAME", "FORMATS", "RUNTIMES", "Runtime", "executed_layers"]
