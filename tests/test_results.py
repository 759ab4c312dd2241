"""Results: a dataclass per command, read like a dict, one JSON and one table rendering each."""
from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
from rich.console import Console

import qsdcompress.results as results
from qsdcompress.results import (ConvertResult, EvalResult, ExportResult, ModelList, Result, SensitivityResult,
                                 json_default, nbytes)


def _eval() -> EvalResult:
    return EvalResult(model="m.qsd", data="digits", split="test", top1=0.975, top5=1.0, loss=0.1234, samples=360,
                      seconds=1.5, images_per_s=240.0, spike_mode="integer", parameters=1000)


def _export() -> ExportResult:
    parity = {"parity": "checked", "parity_runtime": "onnxruntime", "parity_precision": "f32", "parity_samples": 4,
              "parity_data": "digits", "layers_checked": 7, "spike_flips": 1, "images_differing": 0,
              "max_abs_diff": 1e-6, "top1_agreement": 1.0}
    facts = {"format": "int", "opset": 21, "initializers": {"INT4": 10}, "integer_layers": 5, "weight_layers": 9,
             "integer_products": 2}
    return ExportResult(output="m.onnx", source="m.qsd", file_bytes=1200, weight_bits_bytes=1000,
                        quantized_weight_bytes=800, file_vs_weight_bits=1.2, file_vs_quantized_weights=1.5,
                        parity=parity, facts=facts, seconds=3.0)


@pytest.fixture
def shown(monkeypatch) -> io.StringIO:
    buf = io.StringIO()
    monkeypatch.setattr(results, "console", Console(file=buf, width=80, highlight=False))
    return buf


def test_a_result_reads_like_the_dict_it_replaces():
    r = _eval()
    assert r["top1"] == 0.975 and r.get("runtime") is None and r.get("missing", 7) == 7
    assert dict(r) == dataclasses.asdict(r) and {**r}["samples"] == 360 and "loss" in r and len(r) == 13
    with pytest.raises(KeyError):
        r["nope"]


def test_flattened_fields_keep_their_keys_at_the_top_level():
    r = _export()
    d = r.to_dict()
    assert "parity" in d and d["parity"] == "checked"  # the parity dict's own key, not the field
    assert d["integer_layers"] == 5 and d["top1_agreement"] == 1.0 and "facts" not in d
    assert r["opset"] == 21 and r.facts["format"] == "int"


def test_json_is_the_dict_with_numpy_values_made_plain():
    r = _eval()
    r.top1 = np.float32(0.5)
    r.samples = np.int64(360)
    back = json.loads(r.to_json())
    assert back["top1"] == 0.5 and back["samples"] == 360 and back["model"] == "m.qsd"
    assert json.loads(json.dumps({"r": _eval()}, default=json_default))["r"]["split"] == "test"


def test_each_result_renders_its_figures(shown):
    _eval().render()
    _export().render()
    text = shown.getvalue()
    for figure in ("97.50%", "0.1234", "360", "1,200", "1.200x", "INT4 x10 (opset 21)", "5 of 9 (+2", "100.00%"):
        assert figure in text, figure
    assert ("exported m.onnx (int format, 1,200 bytes; 1.200x params*bits/8); parity checked by onnxruntime "
            "(f32) on 4 images of digits") in _export().line()


def test_sensitivity_keeps_the_block_in_group_names(shown):
    table = {"bits": [2, 4], "samples": 8, "data": "digits", "float_val_top1": 0.9, "seconds": 1.0,
             "groups": [{"name": "block3.1.attn.proj_conv.0.body.and.more", "damage": {"2": 0.5, "4": 0.01}}]}
    SensitivityResult(model="m", arch=None, table=table, output="t.json").render()
    text = shown.getvalue()
    assert "block3.1…" in text and "5.0e-01" in text and "table: t.json" in text


def test_convert_and_list_render(shown):
    summary = {"layers_per_bits": {"4": {"layers": 3, "params": 900}, "32": {"layers": 1, "params": 10}},
               "neurons_replaced": 6, "parameters": 910, "size_bytes": 490, "float_size_bytes": 3640,
               "compression": 7.4, "size_mb_paper": 0.0, "float_size_mb_paper": 0.0}
    ConvertResult(output="c.qsd", arch="qsd_tiny", top1_before=0.9, top1_after=0.89, top1_data="digits",
                  top1_images=360, top1_note=None, calibration={"samples": 64, "data": "digits"}, config={},
                  summary=summary).render()
    ModelList(models=[{"name": "qsd_x", "kind": "snn", "data": "digits", "description": "d", "installed": False,
                       "trained_by": "python train.py", "test_top1": None}]).render()
    text = shown.getvalue()
    assert "float32" in text and "90.00% -> 89.00%" in text and "64 images of digits" in text
    assert "top-1 on 360 digits test images" in text
    assert "not installed: python train.py" in text


def test_every_result_class_has_its_own_renderer():
    for cls in Result.__subclasses__():
        assert cls.render is not Result.render, cls.__name__


def test_sizes_print_in_units_of_1e6_bytes():
    assert nbytes(954_056) == "954.1 kB" and nbytes(2_500_000) == "2.50 MB" and nbytes(None) == "-"


def test_optional_fields_are_left_out_while_unset_and_keep_their_key():
    from qsdcompress.reporting import ReportResult

    r = ReportResult(model="m", arch=None, data="digits", split="test", T=1, totals={"energy_mj": 1.0}, layers=[],
                     stages=[], neurons=[], energy_table={})
    assert "float" not in r and "vs_float" not in r and "plots" not in r.to_dict()
    r.float_model, r.vs_float = {"what": "float weights"}, {"energy_ratio": 2.0}
    assert r["float"]["what"] == "float weights" and "float_model" not in r
    assert json.loads(r.to_json())["vs_float"] == {"energy_ratio": 2.0}
