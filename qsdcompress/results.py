"""What each command returns: one small dataclass per result, each with its one rendering as a
table (``render``, on stderr) and as JSON (``to_json``, what ``--json`` prints).

A result also reads like the dict the API returned before (``r["top1"]``, ``r.get("plan")``,
``{**r}``), so scripts keep working; fields marked ``flatten`` (an export's graph facts, a
sensitivity table) contribute their keys at the top level, as they always did, and ``optional``
ones are left out while unset. The report's result (``reporting.render.ReportResult``) lives
beside the tables that render it.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

from .ui import console, percent, short_name


def json_default(o: Any) -> Any:
    """numpy scalars and arrays, paths and other results as JSON values."""
    if isinstance(o, Result):
        return o.to_dict()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def flat(default: Any = None) -> Any:
    """A dict field whose keys appear at the result's top level (``to_dict``, ``r[key]``)."""
    return field(default_factory=lambda: dict(default or {}), metadata={"flatten": True})


def optional(key: str | None = None) -> Any:
    """A field left out of the dict while None; ``key``: its name there, where that is no identifier
    a field may take (the report's ``float``)."""
    return field(default=None, metadata={"optional": True, "key": key})


@dataclass
class Result(Mapping):
    """Base of the results: dict-style reading, JSON, and a table on stderr."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("flatten"):
                out.update(value)
            elif value is not None or not f.metadata.get("optional"):
                out[f.metadata.get("key") or f.name] = value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), default=json_default)

    def render(self) -> None:
        console.print_json(self.to_json())

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


def _table(title: str, columns: tuple[str, ...], **kw: Any) -> Any:
    from rich.table import Table

    t = Table(title=title, **kw)
    for c in columns:
        t.add_column(c, justify="right")
    return t


def _pairs(rows: list[tuple[str, str]]) -> Any:
    """A two-column table without a header: what, value."""
    from rich.table import Table

    t = Table(show_header=False)
    t.add_column()
    t.add_column(justify="right")
    for what, value in rows:
        t.add_row(what, value)
    return t


def nbytes(n: int | None) -> str:
    """A size as the tables print it (1 MB = 1e6 bytes)."""
    if not n:
        return "-"
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


@dataclass
class EvalResult(Result):
    """Top-1/top-5/loss of one model on one split (``eval``)."""

    model: str
    data: str
    split: str
    top1: float
    top5: float
    loss: float
    samples: int
    seconds: float
    images_per_s: float | None
    spike_mode: str | None = None     # PyTorch models: integer or binary spikes
    parameters: int | None = None
    runtime: str | None = None        # ONNX files: the runtime and its precision
    precision: str | None = None

    def render(self) -> None:
        ran = f" ({self.runtime}, {self.precision})" if self.runtime else ""
        t = _table(f"eval: {self.model} on {self.data} {self.split}{ran}",
                   ("top1", "top5", "loss", "samples", "images/s"))
        t.add_row(percent(self.top1), percent(self.top5), f"{self.loss:.4f}", str(self.samples), str(self.images_per_s))
        console.print(t)


@dataclass
class ConvertResult(Result):
    """A conversion: where it went, top-1 before/after, widths, size (``convert``)."""

    output: str
    arch: str | None
    top1_before: float | None
    top1_after: float | None
    top1_data: str | None
    top1_note: str | None
    top1_images: int | None            # test images behind top1_before/top1_after
    calibration: dict
    config: dict
    summary: dict = flat()            # pipeline.convert_summary: layers per width, IE-LIF, sizes
    source: dict = field(default_factory=dict)
    convert_seconds: float = 0.0
    plan: dict | None = None          # a mixed-precision plan, when a budget chose the widths

    def render(self) -> None:
        s = self.summary
        t = _table(f"convert: {self.arch} -> {self.output}", ("weight bits", "layers", "parameters"))
        for bits, e in s["layers_per_bits"].items():
            t.add_row("float32" if int(bits) >= 32 else str(bits), str(e["layers"]), f"{e['params']:,}")
        console.print(t)
        cal = self.calibration or {}
        rows = [("IE-LIF neurons", str(s["neurons_replaced"])), ("parameters", f"{s['parameters']:,}"),
                ("size (theoretical)", f"{s['size_bytes'] / 1e6:.3f} MB  ({s['compression']}x smaller than float32 "
                                       f"{s['float_size_bytes'] / 1e6:.3f} MB)"),
                ("size (paper convention)", f"{s['size_mb_paper']} MB vs {s['float_size_mb_paper']} MB")]
        if self.top1_before is not None:
            rows.append((f"top-1 on {self.top1_images} {self.top1_data} test images",
                         f"{percent(self.top1_before)} -> {percent(self.top1_after)}"))
        rows.append(("calibration", f"{cal.get('samples', 0)} images of {cal.get('data') or '-'}"
                     + (", BatchNorm re-estimated" if cal.get("batchnorm_reestimated") else "")))
        rows.append(("time", f"{self.convert_seconds} s"))
        console.print(_pairs(rows))
        for note in (cal.get("note"), self.top1_note):
            if note:
                console.print(f"[yellow]note:[/] {note}")
        if self.plan:
            _render_plan(self.plan)


def _render_plan(plan: dict) -> None:
    """The mixed-precision plan: width per group, predicted vs measured."""
    from rich.table import Table

    t = Table(title="mixed-precision plan (docs/method.md §9)")
    t.add_column("group")
    t.add_column("bits", justify="right")
    for name, bits in plan["groups"].items():
        t.add_row(name, str(bits))
    console.print(t)
    pr, me = plan["predicted"], plan["measured"]
    lines = [f"budget {plan['budget']}: {'met' if plan['budget_met'] else 'NOT met'}",
             f"size {plan['size_bytes']:,} bytes (predicted {pr['size_bytes']:,})",
             f"KL to float on {plan['validation_images']} val images: predicted {pr['kl']:.3g} (sum over groups), "
             f"measured {me['kl']:.3g}",
             f"val top-1 {percent(me['val_top1'])} (float {percent(me['val_top1_float'])}, "
             f"drop {me['drop_points']:.2f} points)"]
    if "energy_mj" in me:
        lines.append(f"energy per image {me['energy_mj']:.4g} mJ (predicted {pr['energy_mj']:.4g})")
    for line in lines:
        console.print("  " + line)


@dataclass
class FinetuneResult(Result):
    """A finetune run: the kept model, its val and test figures, the history (``finetune``)."""

    output: str
    top1: float
    top5: float
    loss: float
    val_top1: float
    val_top5: float
    val_loss: float
    val_images: int | None             # how many images each figure is measured on
    test_images: int
    input_val_top1: float | None
    input_val_loss: float | None
    best_epoch: int
    kept: str                          # "input", "model" or "ema"
    epochs: int
    steps: int
    losses: dict
    history: list
    teacher: str | None
    input: str | None
    run_dir: str
    metrics_csv: str
    world_size: int
    seconds: float

    def render(self) -> None:
        t = _table(f"finetune -> {self.output} (teacher {self.teacher})",
                   ("epoch", "loss", "ce", "kd", "fgd", "val top1", "H(qkv)", "img/s"))
        for h in self.history:
            ent = f"{h['entropy_qkv']:.2f}" if "entropy_qkv" in h else "-"
            t.add_row(str(h["epoch"]), f"{h['loss']:.4f}", f"{h['ce']:.4f}", f"{h['kd']:.4f}", f"{h['fgd']:.4f}",
                      percent(h["val_top1"]), ent, str(h.get("images_per_s")))
        console.print(t)
        kept = ("the input model (no epoch beat it on validation)" if self.kept == "input"
                else f"epoch {self.best_epoch} ({self.kept})")
        console.print(f"kept {kept}: val top-1 {percent(self.val_top1)} ({self.val_images} images), test top-1 "
                      f"{percent(self.top1)} ({self.test_images} images) in {self.seconds:.0f}s; metrics: "
                      f"{self.metrics_csv}")


@dataclass
class ExportResult(Result):
    """An exported file: its size against params x bits / 8, how it was checked (``export``)."""

    output: str
    source: str
    file_bytes: int
    weight_bits_bytes: int
    quantized_weight_bytes: int
    file_vs_weight_bits: float
    file_vs_quantized_weights: float
    parity: dict = flat()              # parity.check_parity (or {"parity": "unchecked"})
    facts: dict = flat()               # exporter.build_onnx: format, opset, initializers, integer layers
    seconds: float = 0.0

    def line(self) -> str:
        """One line: the file, its size, its check."""
        p = self.parity
        check = ("NOT parity-checked (--unchecked)" if p.get("parity") == "unchecked" else
                 f"parity checked by {p['parity_runtime']} ({p['parity_precision']}) on {p['parity_samples']} "
                 f"images of {p['parity_data']}: {p['layers_checked']} layers fed PyTorch's spikes, "
                 f"{p['spike_flips']} flips at fragile spikes, top-1 agreement {p['top1_agreement'] * 100:.1f}%")
        return (f"exported {self.output} ({self.facts.get('format')} format, {self.file_bytes:,} bytes; "
                f"{self.file_vs_weight_bits:.3f}x params*bits/8); {check}")

    def render(self) -> None:
        f, p = self.facts, self.parity
        rows = [("file bytes", f"{self.file_bytes:,}"),
                ("params*bits/8 (quantized weights at b bits, rest float32)", f"{self.weight_bits_bytes:,}"),
                ("file / params*bits/8", f"{self.file_vs_weight_bits:.3f}x"),
                ("weight storage", ", ".join(f"{k} x{v}" for k, v in f["initializers"].items())
                 + f" (opset {f['opset']})"),
                ("format", f.get("format", "qdq"))]
        if f.get("format") == "int":
            rows.append(("integer layers", f"{f['integer_layers']} of {f['weight_layers']} "
                                           f"(+{f['integer_products']} attention products)"))
        ran = f.get("integer_layers_executed") or {}
        if ran:
            rows.append((f"ran as integer ({ran['runtime']}, {ran['precision']})",
                         f"{ran['integer_layers']} of {ran['compute_layers']} compute layers"))
        if p.get("parity") == "unchecked":
            rows.append(("parity", "NOT checked (--unchecked; marked so in the file)"))
        else:
            rows += [(f"parity images ({p['parity_data']})",
                      f"{p['parity_samples']} under {p['parity_runtime']} {p['parity_precision']}"),
                     ("layers fed PyTorch's spikes",
                      f"{p['layers_checked']}, spike flips {p['spike_flips']} (all within float rounding of a "
                      f"boundary)"),
                     ("images differing end to end",
                      f"{p['images_differing']} (max |logit diff| {p['max_abs_diff']:.3g})"),
                     ("top-1 agreement", percent(p["top1_agreement"]))]
        t = _pairs(rows)
        t.title = f"export: {self.output}"
        console.print(t)


@dataclass
class SensitivityResult(Result):
    """Damage per layer group and width (``sensitivity``); ``table`` is what convert reads back."""

    model: str
    arch: str | None
    table: dict = flat()               # SensitivityTable.to_dict: bits, groups, samples, data, ...
    output: str | None = None
    plot: str | None = None

    def render(self) -> None:
        from rich import box
        from rich.table import Table

        s = self.table
        t = Table(title=f"sensitivity of {self.model}: KL to float (nats/image), only that group quantized",
                  box=box.SIMPLE, pad_edge=False)
        t.add_column("group", no_wrap=True)
        for b in s["bits"]:
            t.add_column(f"W{b}", justify="right", no_wrap=True)
        for g in s["groups"]:
            t.add_row(short_name(g["name"], 30), *[f"{g['damage'][str(b)]:.1e}" for b in s["bits"]])
        console.print(t)
        console.print(f"{s['samples']} val images of {s.get('data')}, float val top-1 "
                      f"{percent(s['float_val_top1'])}; {s['seconds']:.1f} s"
                      + (f"; table: {self.output}" if self.output else "")
                      + (f"; heat map: {self.plot}" if self.plot else ""))


@dataclass
class DemoResult(Result):
    """The whole pipeline's comparison: one row per stage (``demo``)."""

    workdir: str
    data: str
    bits: int
    teacher: str
    rows: dict                         # float, converted, finetuned, onnx: top1, size, SOPs, energy
    stages: dict = field(default_factory=dict)
    energy_table: dict = field(default_factory=dict)
    seconds: float = 0.0

    def render(self) -> None:
        from rich.table import Table

        t = Table(title=f"qsdcompress demo: bundled {self.data} model, W{self.bits}, {self.seconds:.0f} s, "
                        f"outputs in {self.workdir}")
        for c in ("model", "val top-1", "val loss", "test top-1", "size", "size x", "SOPs", "energy (mJ)",
                  "energy x"):
            # fold, not an ellipsis: on a narrow terminal a number wraps but is never cut
            t.add_column(c, justify="left" if c == "model" else "right", overflow="fold")
        for name, r in self.rows.items():
            loss = f"{r['val_loss']:.4f}" if r.get("val_loss") is not None else "-"
            t.add_row(name, percent(r.get("val_top1")), loss, percent(r["top1"]), nbytes(r["size_bytes"]),
                      f"{r['size_x']:.1f}x" if r["size_x"] else "-", f"{r['sops']:.3g}" if r["sops"] else "-",
                      f"{r['energy_mj']:.4g}" if r["energy_mj"] else "-",
                      f"{r['energy_x']:.1f}x" if r["energy_x"] else "-")
        console.print(t)
        for name, r in self.rows.items():
            console.print(f"  [dim]{name}: {r['what']}[/]")
        images = self.stages.get("images") or {}
        console.print(f"  [dim]val: the {images.get('val', '?')} held-out training images finetune chooses on "
                      f"(higher top-1, ties broken by lower loss; never worse than its input there); test: the "
                      f"{images.get('test', '?')} test images, measured once[/]")
        if self.energy_table:
            console.print(f"  [dim]energy per image, {self.energy_table.get('source', '45 nm convention')}[/]")


@dataclass
class ModelList(Result):
    """The bundled models (``list``)."""

    models: list

    def render(self) -> None:
        from rich import box
        from rich.table import Table

        t = Table(title="bundled models (MODEL in every command)", box=box.SIMPLE, pad_edge=False)
        for c, j in (("name", "left"), ("kind", "left"), ("data", "left"), ("test top-1", "right"),
                     ("what", "left")):
            t.add_column(c, justify=j)  # type: ignore[arg-type]
        for m in self.models:
            what = m["description"] if m["installed"] else f"not installed: {m['trained_by']}"
            t.add_row(m["name"], m["kind"], m["data"], percent(m.get("test_top1")), what)
        console.print(t)


__all__ = ["Result", "optional", "EvalResult", "ConvertResult", "FinetuneResult", "ExportResult", "SensitivityResult",
           "DemoResult", "ModelList", "json_default", "nbytes"]
