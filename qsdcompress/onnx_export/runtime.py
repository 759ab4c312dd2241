"""Running an exported file: the runtimes (onnxruntime, OpenVINO), the stored metadata, the parity
images, and what each runtime really executed as integer arithmetic.

A :class:`Runtime` names a runtime and its precision; ``Runtime.session(model)`` gives a
:class:`Session` with one call, ``run(output_names, feeds)`` (numpy in, numpy out), which the
parity check, the predictor of ``eval`` and the benchmark all use. OpenVINO is optional
(``pip install qsdcompress[openvino]``): asking for it without the package raises a one-line error.

OpenVINO's CPU plugin runs float layers in bf16 by default on CPUs with AVX512-BF16 or AMX (the
2-core AMD EPYC here included): its ``INFERENCE_PRECISION_HINT``. bf16 keeps 8 bits of mantissa,
which moves a neuron's membrane input far beyond float32 rounding, so the parity check under
OpenVINO runs at ``f32`` (:data:`PARITY_PRECISION`) and every result says which precision ran.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn as nn

from ..data import DataConfig, build_loader
from ..errors import QsdError, one_line
from ..io import META_KEY
from .graph import INPUT_NAME, OUTPUT_NAME

ORT_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}  # no int8 rounding of activations
RUNTIMES = ("onnxruntime", "openvino")
PARITY_PRECISION = {"onnxruntime": None, "openvino": "f32"}   # None: the runtime's only/default precision
# OpenVINO at f32: float32 everywhere, also in the layers whose weights it keeps compressed (the
# float-fed 1x1 convs it runs as FullyConnected): by default it quantizes their activations to
# int8 in groups of 32 on the fly, which broke the parity contract at f32 (measured on the
# bundled W4 model's qdq file: 3,355 unexplained flips on 16 images, 0 with this off)
_OV_FLOAT32 = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}

# compute layers, by what each runtime calls them in its executed graph
_ORT_INTEGER = {"QLinearConv", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul", "QGemm",
                "DynamicQuantizeMatMul"}
_ORT_FLOAT = {"Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm", "MatMulNBits"}
_OV_COMPUTE = {"Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution"}
_OV_INTEGER_PRECISIONS = {"u8", "i8"}


def ort_session(path_or_bytes: str | os.PathLike | bytes, threads: int | None = None,
                options: Mapping[str, str] | None = None, optimized_path: str | None = None):
    """An onnxruntime CPU session with the project's options (``ORT_CONFIG``, all graph optimizations)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    for k, v in {**ORT_CONFIG, **(options or {})}.items():
        so.add_session_config_entry(k, v)
    # all graph optimizations (the default, stated): constant folding widens the packed weights
    # and computes the im2col indices once at load
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    src = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _model_bytes(model: Any) -> bytes | str:
    """An ONNX ModelProto as bytes; a path as a string; bytes as they are."""
    if hasattr(model, "SerializeToString"):
        return model.SerializeToString()
    return model if isinstance(model, bytes) else str(model)


class Session:
    """One loaded model: ``run(output_names, feeds)`` returns the named outputs as numpy arrays."""

    runtime: str = ""
    precision: str = "f32"

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The logits of images ``x``."""
        return self.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


class _OrtSession(Session):
    runtime = "onnxruntime"

    def __init__(self, model: Any, threads: int | None, options: Mapping[str, str] | None):
        self.raw = ort_session(_model_bytes(model), threads, options)

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.raw.run(outputs, feeds)


_CORE: Any = None


def openvino_core() -> Any:
    """The process's one ``openvino.Core``; a one-line error when OpenVINO is not installed."""
    global _CORE
    if _CORE is None:
        try:
            import openvino as ov
        except ImportError:
            raise QsdError("the openvino runtime needs the openvino package: pip install 'qsdcompress[openvino]'") \
                from None
        _CORE = ov.Core()
    return _CORE


def _has_int2(source: bytes | str) -> bool:
    """Whether an ONNX file (path or bytes) holds an INT2 initializer."""
    import onnx

    try:
        proto = onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(source)
    except Exception:
        return False
    return any(t.data_type == onnx.TensorProto.INT2 for t in proto.graph.initializer)


def _ov_message(e: BaseException) -> str:
    """The informative line of an OpenVINO error (its first lines name source files)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith(("Exception from", "Check "))]
    return (lines[0] if lines else one_line(e))[:200]


class _OvSession(Session):
    """OpenVINO compiles a model for fixed input shapes (fastest, and the cut graphs of the parity
    check have inputs of unknown rank): one compiled model per set of feed shapes, kept."""

    runtime = "openvino"

    def __init__(self, model: Any, precision: str | None, threads: int | None, options: Mapping[str, Any] | None):
        self.core = openvino_core()
        src = _model_bytes(model)
        self.source = src if isinstance(src, str) else bytes(src)
        self.config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", **(options or {})}
        if precision == "f32":
            self.config.update(_OV_FLOAT32)
        elif precision:
            self.config["INFERENCE_PRECISION_HINT"] = precision
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled: dict[tuple, Any] = {}
        self.requests: dict[int, Any] = {}     # one infer request per compiled model, reused
        self.model = self.read()    # read now: a file OpenVINO cannot read fails here, in one line
        hint = self.config.get("INFERENCE_PRECISION_HINT")
        self.precision = str(hint) if hint else self.core.get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()

    def read(self) -> Any:
        try:
            if isinstance(self.source, str):
                return self.core.read_model(self.source)
            return self.core.read_model(model=self.source, weights=b"")
        except RuntimeError as e:
            hint = ("; it has INT2 weights, which OpenVINO does not read: export with --runtime openvino "
                    "(or --no-int2) to store them as INT4") if _has_int2(self.source) else ""
            raise QsdError(f"OpenVINO cannot read this model: {_ov_message(e)}{hint}") from None

    def compile(self, shapes: dict[str, tuple[int, ...]] | None) -> Any:
        key = tuple(sorted(shapes.items())) if shapes else ()
        if key not in self.compiled:
            model = self.model.clone()
            if shapes:
                model.reshape({name: list(shape) for name, shape in shapes.items()})
            try:
                self.compiled[key] = self.core.compile_model(model, "CPU", self.config)
            except Exception as e:
                raise QsdError(f"OpenVINO cannot compile this model: {_ov_message(e)}") from None
        return self.compiled[key]

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        compiled = self.compile({k: tuple(v.shape) for k, v in feeds.items()})
        if id(compiled) not in self.requests:
            self.requests[id(compiled)] = compiled.create_infer_request()
        res = self.requests[id(compiled)].infer(feeds)
        by_name = {name: res[port] for port in compiled.outputs for name in port.get_names()}
        return [np.asarray(by_name[o]) for o in outputs]


class Runtime:
    """An ONNX runtime by name (:data:`RUNTIMES`) with its float precision (OpenVINO's
    ``INFERENCE_PRECISION_HINT``: ``f32``, ``bf16``; None: the runtime's default), threads and
    extra options (onnxruntime session config entries, OpenVINO compile properties). OpenVINO at
    ``f32`` also computes its compressed-weight layers' activations in float32."""

    def __init__(self, name: str = "onnxruntime", precision: str | None = None, threads: int | None = None,
                 options: Mapping[str, Any] | None = None):
        if name not in RUNTIMES:
            raise QsdError(f"unknown runtime {name!r}; choose one of {', '.join(RUNTIMES)}")
        if name == "onnxruntime" and precision not in (None, "f32"):
            raise QsdError(f"onnxruntime runs float layers in f32 only, not {precision}")
        if name == "openvino":
            openvino_core()
        self.name, self.precision, self.threads, self.options = name, precision, threads, dict(options or {})

    def session(self, model: Any) -> Session:
        """A session of ``model`` (ModelProto, bytes or path)."""
        if self.name == "onnxruntime":
            return _OrtSession(model, self.threads, self.options)
        return _OvSession(model, self.precision, self.threads, self.options)

    def __repr__(self) -> str:
        return f"Runtime({self.name!r}, precision={self.precision!r})"


def parity_runtime(name: str) -> Runtime:
    """The runtime a parity check runs under: OpenVINO at f32 (its bf16 default breaks the contract)."""
    return Runtime(name, precision=PARITY_PRECISION.get(name))


def _input_shapes(model: Any, batch: int) -> dict[str, tuple[int, ...]]:
    """Each graph input's shape, a dimension the file leaves open (the batch) set to ``batch``."""
    import onnx

    if hasattr(model, "graph"):
        proto = model
    elif isinstance(model, bytes):
        proto = onnx.load_from_string(model)
    else:
        proto = onnx.load(str(model), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    return {i.name: tuple(d.dim_value or batch for d in i.type.tensor_type.shape.dim)
            for i in proto.graph.input if i.name not in inits}


def executed_layers(model: Any, runtime: Runtime | str = "onnxruntime", batch: int = 1) -> dict:
    """Which compute layers (convs, matmuls, gemms) ``runtime`` really runs as integer arithmetic,
    read from its executed graph (onnxruntime: the optimized model it saves; OpenVINO: the runtime
    model's layer types and precisions, compiled for ``batch`` images), not assumed from the file."""
    rt = runtime if isinstance(runtime, Runtime) else Runtime(runtime)
    precision, layers = _ort_layers(model, rt) if rt.name == "onnxruntime" else _ov_layers(model, rt, batch)
    kinds: dict[str, Counter] = {"integer": Counter(), "float": Counter()}
    for name, integer in layers:
        kinds["integer" if integer else "float"][name] += 1
    n_int, n_float = sum(kinds["integer"].values()), sum(kinds["float"].values())
    return {"runtime": rt.name, "precision": precision, "integer": dict(kinds["integer"]),
            "float": dict(kinds["float"]), "integer_layers": n_int, "compute_layers": n_int + n_float}


def _ort_layers(model: Any, rt: Runtime) -> tuple[str, list[tuple[str, bool]]]:
    """onnxruntime's optimized graph (all optimizations, as sessions run it): its compute ops."""
    import onnx

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "optimized.onnx")
        ort_session(_model_bytes(model), 1, rt.options, optimized_path=path)
        ops = [n.op_type for n in onnx.load(path, load_external_data=False).graph.node]
    return "f32", [(op, op in _ORT_INTEGER) for op in ops if op in _ORT_INTEGER or op in _ORT_FLOAT]


def _ov_layers(model: Any, rt: Runtime, batch: int) -> tuple[str, list[tuple[str, bool]]]:
    """OpenVINO's runtime model: each compute layer's type and the precision it ran in."""
    sess = _OvSession(model, rt.precision, 1, rt.options)
    compiled = sess.compile(_input_shapes(model, batch))
    layers = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str) if "layerType" in info else ""
        prec = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else ""
        if layer in _OV_COMPUTE:
            layers.append((f"{layer} {prec}", prec in _OV_INTEGER_PRECISIONS))
    return sess.precision, layers


def onnx_metadata(path: str | os.PathLike) -> dict:
    """The qsdcompress metadata stored in an exported ONNX file."""
    import onnx

    p = Path(path)
    if not p.exists():
        raise QsdError(f"file not found: {p}")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # not an ONNX file
        raise QsdError(f"{p} is not a readable ONNX file: {one_line(e)}") from None
    props = {m.key: m.value for m in proto.metadata_props}
    if META_KEY not in props:
        raise QsdError(f"{p} was not exported by qsdcompress (no '{META_KEY}' metadata); "
                       "its input size and normalisation are unknown")
    return json.loads(props[META_KEY])


class OnnxPredictor:
    """Logits of an exported file under one runtime; ``runtime`` and ``precision`` say what ran."""

    def __init__(self, session: Session):
        self.session = session
        self.runtime = session.runtime
        self.precision = session.precision

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)
        return torch.from_numpy(np.ascontiguousarray(self.session(arr)))


def onnx_predictor(path: str | os.PathLike, runtime: str = "onnxruntime", precision: str | None = None
                   ) -> tuple[Callable[[torch.Tensor], torch.Tensor], DataConfig, int]:
    """A predictor of an exported file under ``runtime`` (its ``runtime``/``precision`` attributes
    say which ran; OpenVINO's default precision unless ``precision``), its DataConfig and number
    of classes."""
    meta = onnx_metadata(path)
    if meta.get("format") == "int" and runtime != "onnxruntime":
        raise QsdError(f"{path}: the int format uses onnxruntime's com.microsoft ops, which {runtime} cannot run; "
                       "export with --format std-int (or qdq) for it")
    predict = OnnxPredictor(Runtime(runtime, precision).session(path))
    dc = meta.get("data_config", {})
    cfg = DataConfig(input_size=tuple(dc.get("input_size", (3, 224, 224))), mean=tuple(dc.get("mean", (0.5,) * 3)),
                     std=tuple(dc.get("std", (0.5,) * 3)), interpolation=dc.get("interpolation", "bicubic"),
                     crop_pct=float(dc.get("crop_pct", 0.875)))
    return predict, cfg, int(meta.get("num_classes", 0))


def parity_batch(model: nn.Module, data: str, n: int) -> torch.Tensor:
    """``n`` real images prepared the way the model expects."""
    cfg = DataConfig.from_model(model)
    loader = build_loader(data, "test", cfg, batch_size=n, shuffle=False,
                          num_classes=getattr(model, "num_classes", 10))
    x = next(iter(loader))[0]
    return x


__all__ = ["ORT_CONFIG", "RUNTIMES", "PARITY_PRECISION", "Runtime", "Session", "OnnxPredictor", "ort_session",
           "openvino_core", "parity_runtime", "executed_layers", "onnx_metadata", "onnx_predictor", "parity_batch"]
