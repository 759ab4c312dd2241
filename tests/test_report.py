"""Size, spike and energy report: paper arithmetic, a hand-computed energy check, formats, CLI."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

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
from qsdcompress.reporting import EnergyTable, layers_frame, plot, render, report
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
    assert "## Energy table" in md and "E_MAC = 4.6 pJ" in md and "| block3.0 | " in md
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
                                    "--output-format", "markdown", "-o", str(out), "--no-float"])
    assert res.exit_code == 0 and out.read_text().startswith("# qsdcompress report")


def _shortens(shown: str, name: str) -> bool:
    """``shown`` is ``name`` whole, or its start and end around one ``…``."""
    if "…" not in shown:
        return shown == name
    head, tail = shown.split("…")
    return name.startswith(head) and name.endswith(tail) and len(head) + len(tail) < len(name)


def test_terminal_tables_fit_80_columns_and_keep_names_and_numbers():
    from rich.console import Console

    from qsdcompress.reporting.render import NAME_WIDTH, compact, short_name, show

    r = report(q.create_model("qsd_8_256").eval(), data="synthetic:2", batches=1, batch_size=2)
    buf = io.StringIO()
    show(r, Console(file=buf, width=80))
    text = buf.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    for row in r["layers"]:
        shown = short_name(row["name"], NAME_WIDTH)
        assert len(shown) <= NAME_WIDTH and _shortens(shown, row["name"])
        line = next(line for line in text.splitlines() if line.strip().startswith(shown + " "))
        assert compact(row["energy_pj"]) in line and compact(row["macs"]) in line
    assert "…" not in "".join(line.split()[-1] for line in text.splitlines() if line.strip())
    assert [compact(v) for v in (0, 0.1234, 12.34, 138_400, 1.384e6, 2.5e9)] == ["0", "0.123", "12.3", "138k",
                                                                                "1.38M", "2.5G"]


def test_short_name_keeps_the_block_and_elides_the_middle():
    from qsdcompress.mixed import layer_groups
    from qsdcompress.reporting.render import short_name

    assert short_name("block3.1.attn.q_conv", 30) == "block3.1.attn.q_conv"
    assert short_name("block3.1.attn.q_conv", 15) == "block3.1…q_conv"
    assert short_name("block3.0.attn.proj_conv.0.body.2.1", 20) == "block3.0…0.body.2.1"  # whole dotted parts
    assert short_name("ConvBlock1_1.0.Conv.dwconv+pwconv2", 30) == "ConvBlock1_1.0…dwconv+pwconv2"
    assert short_name("downsample1_1.encode_conv.weight", 30) == "downsample1_1…weight"
    with torch.device("meta"):
        groups = layer_groups(q.create_model("qsd_8_512"))
    shown = {g.name: short_name(g.name, 24) for g in groups}  # sensitivity's table, narrower
    for name, s in shown.items():
        assert len(s) <= 24 and _shortens(s, name)
        if name.startswith("block"):  # the block path survives: block3.1 never looks like block3.2
            assert s.startswith(".".join(name.split(".")[:2]) + ("…" if s != name else ""))
    assert len(set(shown.values())) == len(shown)


def _long_workdir(tmp_path) -> Path:
    """A work directory whose path is over 120 characters, holding a converted digits model that
    names its float source, and an ONNX file."""
    from qsdcompress.zoo import bundled_path

    wd = tmp_path / ("a_rather_long_directory_name_" * 4) / "project"
    assert len(str(wd)) > 120
    wd.mkdir(parents=True)
    m = convert(q.load(), QuantConfig(bits=2, ie_lif="none", calib_batches=0, scale_init="lsq"))
    m.qsd_quant_meta["source"] = {"path": str(bundled_path())}
    q.save(m, wd / "converted.qsd")
    (wd / "model.onnx").write_bytes(b"x" * 10)
    return wd


@pytest.mark.parametrize("console_width", [80, 120, 200])
def test_report_fits_80_columns_with_a_long_work_directory(tmp_path, console_width):
    """Whatever the console's width (120 on a pipe) and the path's length: every line <= 80
    columns; paths are shortened in the tables and printed whole below them."""
    from rich.console import Console

    from qsdcompress.reporting.render import show

    wd = _long_workdir(tmp_path)
    r = report(workdir=wd, batches=1, batch_size=16)
    buf = io.StringIO()
    show(r, Console(file=buf, width=console_width))
    lines = buf.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    assert lines[0].startswith("layers of …/project/converted.qsd")
    folded = "".join(line.rstrip() for line in lines)
    for path in (wd / "converted.qsd", wd / "model.onnx", Path(r["float"]["file"])):
        assert str(path) in folded
    totals = "\n".join(lines)
    assert "source float model …/" in totals and "9." not in totals.split("energy vs float")[0][-3:]
    assert f"{r['vs_float']['energy_ratio']:.2f}x less" in totals


def _reference_stages(rows: list[dict]) -> dict[str, float]:
    """Energy per stage of qsd_tiny (blocks block3.0, block4.0), grouped by hand."""
    prefixes = {"stage 1 conv": ("downsample1_1.", "ConvBlock1_1.", "downsample1_2.", "ConvBlock1_2."),
                "stage 2 conv": ("downsample2.", "ConvBlock2_1.", "ConvBlock2_2."),
                "stage 3 conv": ("downsample3.",), "block3.0": ("block3.0.",),
                "stage 4 conv": ("downsample4.",), "block4.0": ("block4.0.",), "head": ("head",)}
    out = {k: 0.0 for k in prefixes}
    for r in rows:
        (stage,) = [k for k, ps in prefixes.items() if r["name"].startswith(ps)]
        out[stage] += r["energy_pj"]
    return out


def test_energy_by_stage_sums_to_the_total_and_the_plot_says_it():
    from qsdcompress.reporting.plots import energy_figure

    r = report(_tiny(), data="synthetic:8", batches=1, batch_size=8, compare_float=False)
    ref = _reference_stages(r["layers"])
    assert [s["stage"] for s in r["stages"]] == list(ref)
    for s in r["stages"]:
        assert s["energy_pj"] == pytest.approx(ref[s["stage"]], rel=1e-12)
    assert sum(s["energy_pj"] for s in r["stages"]) * 1e-9 == pytest.approx(r["totals"]["energy_mj"], rel=1e-12)
    assert sum(s["layers"] for s in r["stages"]) == len(r["layers"])
    assert sum(s["share"] for s in r["stages"]) == pytest.approx(1.0)
    fig = energy_figure(r)
    by_stage, top = fig.axes
    assert [t.get_text() for t in by_stage.get_yticklabels()] == list(ref)  # first stage on top
    assert by_stage.get_xscale() == "log" and "energy per image" in by_stage.get_xlabel()
    assert len(top.patches) == 10 and f"{r['totals']['energy_mj']:.4g} mJ" in fig._suptitle.get_text()


def test_progress_follows_the_work(monkeypatch):
    """The bar advances once per loaded model, per batch of each pass and per accounting, and
    ends full; its text names the step that runs."""
    import contextlib

    import qsdcompress.reporting as rep

    seen: list[tuple[int, int, str]] = []

    class Bar:
        completed, total = 0, 0

        def update(self, task, advance=0, total=None, info=None):
            self.completed += advance
            self.total = total if total is not None else self.total
            seen.append((self.completed, self.total, info))

    @contextlib.contextmanager
    def fake(description, total, extra=""):
        bar = Bar()
        bar.total = total
        yield bar, 0

    monkeypatch.setattr(rep, "progress_bar", fake)
    report(_tiny(), data="synthetic:8", batches=3, batch_size=2)
    done = [s for s in seen if s[2] is not None]
    assert done[-1][0] == done[-1][1] == 3 + 3 + 2  # model, data, 3 batches, accounting; float: 2 steps
    steps = [s[2] for s in done]
    assert [x for x in steps if x.startswith("spikes: batch")] == ["spikes: batch 1/3", "spikes: batch 2/3",
                                                                   "spikes: batch 3/3"]
    assert [c for c, _, _ in done] == sorted(c for c, _, _ in done)


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
