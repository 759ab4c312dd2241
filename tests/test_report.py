"""Size, spike and energy report: paper arithmetic, a hand-computed energy check, formats, CLI."""
from __future__ import annotations

import io
import json
import math

import pandas as pd
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from qsdcompress.cli import main

import qsdcompress as q
from qsdcompress.data import DataConfig, build_loader
from qsdcompress.errors import QsdError
from qsdcompress.neurons import Neuron
from qsdcompress.quant import QuantConfig, convert
from qsdcompress.report import EnergyTable, layers_frame, plot, render, report
from qsdcompress.sizing import model_size as size_summary


def test_paper_size_arithmetic_qsd_8_512():
    with torch.device("meta"):
        m = q.create_model("qsd_8_512")
    s32 = size_summary(m)
    s4 = size_summary(m, 4)
    assert round(s32["size_mb_paper"], 1) == 55.4            # SDT-V2 55.4M "55.4MB"
    assert abs(s4["size_mb_paper"] / 6.88 - 1) < 0.02          # QSD 4-bit "6.88MB"
    assert s32["params"] == sum(p.numel() for p in m.parameters())
    # bytes: weights at 4 bits, every other parameter and one scale per output channel in float32
    convs = [mod for mod in m.modules() if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    w = sum(c.weight.numel() for c in convs)
    ch = sum(c.weight.shape[0] for c in convs)
    assert s4["size_bytes"] == math.ceil((w * 4 + 32 * (s32["params"] - w + ch)) / 8)
    assert s32["size_bytes"] == 4 * s32["params"]


def _tiny() -> nn.Module:
    m = q.create_model("qsd_tiny", embed_dim=(8, 16, 16, 16), depth=2, split_blocks=(1, 1), num_heads=2,
                       img_size=16)
    return convert(m, QuantConfig(bits=4, ie_lif="none", calib_batches=0, scale_init="lsq")).eval()


def test_energy_and_sops_against_hand_computation():
    m = _tiny()
    cfg = DataConfig.from_model(m)
    x = next(iter(build_loader("synthetic:8", "test", cfg, batch_size=8, shuffle=False)))[0]
    # independent measurement: mean spike count of every neuron, output shape of every layer
    rate, shape = {}, {}
    hooks = []
    for name, mod in m.named_modules():
        if isinstance(mod, Neuron):
            hooks.append(mod.register_forward_hook(
                lambda mm, i, o, n=name: rate.__setitem__(n, float(torch.floor(o / mm.out_scale + 0.5).mean()))))
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            hooks.append(mod.register_forward_hook(lambda mm, i, o, n=name: shape.__setitem__(n, o.shape)))
    with torch.no_grad():
        m(x)
    for h in hooks:
        h.remove()
    e_mac, e_ac4, e_ac32 = 4.6, 0.9 * 4 / 32, 0.9
    # first conv: 3 -> 4 channels, 7x7, stride 2 on 16x16 -> 8x8 outputs: 4*8*8 * 3*49 MACs
    first_macs = 4 * 8 * 8 * 3 * 49
    assert shape["downsample1_1.encode_conv"] == (8, 4, 8, 8)
    expected_pj = e_mac * first_macs
    expected_sops = 0.0

    def src(layer: str) -> str:
        p = layer.split(".")
        for i, part in enumerate(p):
            if part in ("q_conv", "k_conv", "v_conv"):
                return ".".join(p[:i] + ["head_lif"])
            if part == "proj_conv":
                return ".".join(p[:i] + ["attn_lif"])
        leaf = {"encode_conv": "encode_lif", "pwconv1": "lif1", "dwconv": "lif2", "pwconv2": "lif2", "conv1": "lif1",
                "conv2": "lif2", "fc1_conv": "fc1_lif", "fc2_conv": "fc2_lif", "head": "lif"}[p[-1]]
        return ".".join(p[:-1] + [leaf])

    for name, mod in m.named_modules():
        if not isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)) or name == "downsample1_1.encode_conv":
            continue
        per_out = mod.weight[0].numel()                        # Cin/groups * kernel
        outs = torch.Size(shape[name]).numel() / 8              # per image (T = 1)
        sops = rate[src(name)] * outs * per_out
        expected_sops += sops
        expected_pj += e_ac4 * sops
    # attention products on a 4x4 token grid, C = 16, 2 heads of 8: N*C*C/h MACs each
    for blk in ("block3.0.attn", "block4.0.attn"):
        macs = 16 * 16 * 8
        for neuron in ("k_lif", "q_lif"):
            sops = rate[f"{blk}.{neuron}"] * macs
            expected_sops += sops
            expected_pj += e_ac32 * sops
    r = report(m, data="synthetic:8", batches=1, batch_size=8, compare_float=True)
    assert r["totals"]["sops"] == pytest.approx(expected_sops, rel=1e-9)
    assert r["totals"]["energy_mj"] == pytest.approx(expected_pj * 1e-9, rel=1e-9)
    first = r["layers"][0]
    assert first["name"] == "downsample1_1.encode_conv" and first["macs"] == first_macs and first["sops"] == 0
    # float comparison: same rates at 32 bits (no source file known for this model)
    assert "float weights" in r["float"]["what"]
    exp_float = e_mac * first_macs + e_ac32 * expected_sops
    assert r["float"]["totals"]["energy_mj"] == pytest.approx(exp_float * 1e-9, rel=1e-9)
    assert r["vs_float"]["energy_ratio"] == pytest.approx(exp_float / expected_pj, rel=1e-9)
    # per-neuron entropy from its own histogram
    for n in r["neurons"]:
        tot = sum(n["histogram"])
        h = -sum(c / tot * math.log2(c / tot) for c in n["histogram"] if c)
        assert n["entropy_bits"] == pytest.approx(h, abs=1e-9)
        assert n["firing_rate"] == pytest.approx(rate[n["name"]], rel=1e-6)


def test_energy_table_file_and_errors(tmp_path):
    m = _tiny()
    base = report(m, data="synthetic:8", batches=1, batch_size=8, compare_float=False)
    y = tmp_path / "e.yaml"
    y.write_text("e_mac_pj: 9.2\ne_ac32_pj: 1.8\nsource: doubled\n")
    dbl = report(m, data="synthetic:8", batches=1, batch_size=8, energy_table=y, compare_float=False)
    assert dbl["totals"]["energy_mj"] == pytest.approx(2 * base["totals"]["energy_mj"], rel=1e-9)
    assert dbl["energy_table"]["source"] == "doubled"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"e_mac": 1}))
    with pytest.raises(QsdError, match="unknown key"):
        EnergyTable.from_file(bad)
    assert EnergyTable().e_ac(4) == pytest.approx(0.1125)


def test_formats_and_plots(tmp_path):
    m = _tiny()
    r = report(m, data="digits", batches=1, batch_size=16)
    df = layers_frame(r)
    assert len(df) == len(r["layers"]) and {"SDSA k^T v", "SDSA q (k^T v)"} <= set(df["type"])
    csv = render(r, "csv")
    parsed = pd.read_csv(io.StringIO(csv), comment="#")
    assert len(parsed) == len(df) and "energy table" in csv
    md = render(r, "markdown")
    assert "## Energy table" in md and "E_MAC = 4.6 pJ" in md
    assert json.loads(render(r, "json"))["totals"]["params"] == r["totals"]["params"]
    assert "top1" in r["totals"]
    with pytest.raises(QsdError):
        render(r, "xml")
    files = plot(r, tmp_path / "plots")
    assert {p.rsplit("/", 1)[-1] for p in files} == {"firing_rate.png", "energy.png", "qkv_histograms.png"}
    for f in files:
        assert open(f, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_report_json_with_source_float_and_onnx(tmp_path):
    from qsdcompress.cli import main
    from qsdcompress.zoo import bundled_path

    m = convert(q.load(), QuantConfig(bits=4, ie_lif="none", calib_batches=0, scale_init="lsq"))
    m.qsd_quant_meta["source"] = {"path": str(bundled_path())}
    q.save(m, tmp_path / "converted.qsd")
    (tmp_path / "model.onnx").write_bytes(b"x" * 1234)  # only its size is read
    res = CliRunner().invoke(main, ["report", "--workdir", str(tmp_path), "--batches", "1", "--batch-size", "16",
                                    "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert {"params", "size_bytes", "size_mb_paper", "sops", "energy_mj", "top1"} <= set(d["totals"])
    assert d["totals"]["onnx_bytes"] == 1234
    assert d["float"]["what"].startswith("source float model")
    assert d["vs_float"]["size_ratio"] > 5 and d["vs_float"]["energy_ratio"] > 1
    assert isinstance(d["layers"], list) and d["energy_table"]["e_mac_pj"] == 4.6
    out = tmp_path / "r.md"
    res = CliRunner().invoke(main, ["report", "--workdir", str(tmp_path), "--batches", "1", "--batch-size", "8",
                                    "--format", "markdown", "-o", str(out), "--no-float"])
    assert res.exit_code == 0 and out.read_text().startswith("# qsdcompress report")


def test_terminal_tables_fit_80_columns_and_keep_names_and_numbers():
    from rich.console import Console

    from qsdcompress.report.render import NAME_WIDTH, compact, short_name, show

    r = report(q.create_model("qsd_8_256").eval(), data="synthetic:2", batches=1, batch_size=2)
    buf = io.StringIO()
    show(r, Console(file=buf, width=80))
    text = buf.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    for row in r["layers"]:
        shown = short_name(row["name"], NAME_WIDTH)
        assert shown.lstrip("…") and row["name"].endswith(shown.lstrip("…"))
        line = next(line for line in text.splitlines() if line.strip().startswith(shown))
        assert compact(row["energy_pj"]) in line and compact(row["macs"]) in line
    assert "…" not in "".join(line.split()[-1] for line in text.splitlines() if line.strip())
    assert [compact(v) for v in (0, 0.1234, 12.34, 138_400, 1.384e6, 2.5e9)] == ["0", "0.123", "12.3", "138k",
                                                                                "1.38M", "2.5G"]
    assert short_name("block3.0.attn.proj_conv.0.body.2.1", 20) == "…0.body.2.1"  # whole dotted parts only


def test_convert_report_and_export_print_the_same_size(tmp_path):
    """One size function: ``convert --json``, ``report --json`` and ``export --json`` agree on one file."""
    runner = CliRunner()
    wd = tmp_path / "wd"
    conv = runner.invoke(main, ["convert", "--bits", "4", "--no-eval", "--calib-batches", "1", "--json",
                                "--workdir", str(wd)])
    assert conv.exit_code == 0, conv.output
    c = json.loads(conv.stdout)
    rep = runner.invoke(main, ["report", str(wd / "converted.qsd"), "--batches", "1", "--json", "--no-float"])
    assert rep.exit_code == 0, rep.output
    t = json.loads(rep.stdout)["totals"]
    assert (c["size_bytes"], c["size_mb_paper"]) == (t["size_bytes"], t["size_mb_paper"])
    ex = runner.invoke(main, ["export", str(wd / "converted.qsd"), "-o", str(tmp_path / "m.onnx"),
                              "--parity-samples", "8", "--json"])
    assert ex.exit_code == 0, ex.output
    assert json.loads(ex.stdout)["weight_bits_bytes"] == c["size_bytes"]
    # the paper convention by hand: params(M) * mean weight bits / 32, all conv/linear at 4 bits
    assert abs(c["size_mb_paper"] - c["parameters"] / 1e6 * 4 / 32) < 1e-4
