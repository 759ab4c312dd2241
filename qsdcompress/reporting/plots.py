"""PNG plots of a report: energy by stage and the costliest layers, firing rate per layer, q/k/v
spike-level histograms. They read the report's result alone (a saved ``--json`` plots the same)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..io import atomic_path
from .accounting import energy_by_stage

#: layers shown beside the stages in ``energy.png``
TOP_LAYERS = 10
#: a log axis once the largest bar is this many times the smallest (else small bars vanish)
LOG_RATIO = 30.0


def _energy_unit(max_pj: float) -> tuple[float, str]:
    """Divisor and name of the unit that keeps the largest bar between 1 and 1000."""
    for div, unit in ((1e9, "mJ"), (1e6, "µJ"), (1e3, "nJ")):
        if max_pj >= div:
            return div, unit
    return 1.0, "pJ"


def _hbars(ax: Any, labels: list[str], values_pj: list[float], total_pj: float, unit: tuple[float, str],
           title: str) -> None:
    """Horizontal bars, first label on top, each with its share of ``total_pj``; log scale when
    the values span more than :data:`LOG_RATIO`."""
    div, name = unit
    vals = [v / div for v in values_pj]
    ys = list(range(len(vals)))[::-1]
    ax.barh(ys, vals, color="tab:blue")
    ax.set_yticks(ys, labels, fontsize=7)
    positive = [v for v in vals if v > 0]
    if positive and max(positive) / min(positive) > LOG_RATIO:
        ax.set_xscale("log")
        ax.set_xlabel(f"energy per image ({name}, log scale)")
    else:
        ax.set_xlabel(f"energy per image ({name})")
    for y, v in zip(ys, values_pj):
        share = 100 * v / (total_pj or 1.0)
        if v > 0:
            ax.annotate(f"{share:.1f}%" if share >= 0.1 else "<0.1%", (v / div, y), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=6)
    ax.set_title(title, fontsize=9)
    ax.margins(x=0.15)


def energy_figure(result: dict, top: int = TOP_LAYERS) -> Any:
    """Energy per stage (every transformer block, the conv stages, the head) beside the ``top``
    costliest layers; the total and where it was measured in the title."""
    import matplotlib.pyplot as plt

    stages = result.get("stages") or energy_by_stage(result["layers"])
    layers = sorted(result["layers"], key=lambda r: r["energy_pj"], reverse=True)[:top]
    total = sum(s["energy_pj"] for s in stages)
    unit = _energy_unit(max([s["energy_pj"] for s in stages] + [0.0]))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, max(3.5, 0.28 * max(len(stages), len(layers)) + 1.2)))
    _hbars(a, [s["stage"] for s in stages], [s["energy_pj"] for s in stages], total, unit,
           "by stage (share of the total)")
    _hbars(b, [r["name"] for r in layers], [r["energy_pj"] for r in layers], total, unit,
           f"the {len(layers)} costliest layers (share of the total)")
    t = result["totals"]
    name = Path(str(result.get("model", ""))).name
    fig.suptitle(f"energy per image: {t['energy_mj']:.4g} mJ in all ({name}, {t['images']} images of "
                 f"{result.get('data', '?')} {result.get('split', '')})", fontsize=10)
    fig.tight_layout()
    return fig


def _firing_figure(result: dict) -> Any:
    import matplotlib.pyplot as plt

    rows = result["layers"]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.18), 4))
    ax.bar(range(len(rows)), [r["firing_rate"] or 0 for r in rows])
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=90, fontsize=5)
    ax.set_ylabel("input firing rate (spikes / element / step)")
    ax.set_title("firing rate per layer")
    return fig


def _level_histogram(ax: Any, ns: list[dict], shift: float, label: str) -> None:
    levels = len(ns[0]["histogram"])
    agg = [sum(n["histogram"][i] for n in ns) for i in range(levels)]
    tot = max(sum(agg), 1)
    ax.bar([x + shift for x in range(levels)], [a / tot for a in agg], width=0.4, label=label)


def _qkv_figure(result: dict) -> Any | None:
    """q/k/v spike levels of all blocks; the source float model's plain neurons beside them when
    known (e.g. before IE-LIF)."""
    import matplotlib.pyplot as plt

    qkv = [n for n in result["neurons"] if n["name"].rsplit(".", 1)[-1] in ("q_lif", "k_lif", "v_lif")]
    if not qkv:
        return None
    ref = {n["name"]: n for n in (result.get("float", {}).get("neurons") or [])}
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, kind in zip(axes, ("q_lif", "k_lif", "v_lif")):
        ns = [n for n in qkv if n["name"].endswith(kind)]
        if not ns:
            continue
        _level_histogram(ax, ns, -0.2, f"{ns[0]['type']} (this model)")
        rs = [ref[n["name"]] for n in ns if n["name"] in ref]
        if rs:
            _level_histogram(ax, rs, 0.2, f"{rs[0]['type']} (float source model)")
        ax.set_title(f"{kind[0]} spikes, all blocks")
        ax.set_xlabel("spike level S")
        ax.legend(fontsize=6)
    axes[0].set_ylabel("fraction")
    return fig


def plot(result: dict, out_dir: str | os.PathLike) -> list[str]:
    """Write ``energy.png`` (by stage and top layers), ``firing_rate.png`` (per layer) and
    ``qkv_histograms.png`` into ``out_dir``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    figures = {"firing_rate.png": _firing_figure(result), "energy.png": energy_figure(result),
               "qkv_histograms.png": _qkv_figure(result)}
    for name, fig in figures.items():
        if fig is None:
            continue
        p = out / name
        with atomic_path(p) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(str(p))
    return written


__all__ = ["plot", "energy_figure", "TOP_LAYERS"]
