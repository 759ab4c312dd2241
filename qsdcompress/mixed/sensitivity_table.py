"""Per-group sensitivity: the damage when only one group of layers drops to b bits
(docs/method.md §9).

Damage is the mean KL divergence of the model's class distribution from the float model's on
validation images (nats per image); the top-1 of each cell is recorded beside it. One float pass
caches the float logits and the outputs of the modules before each group (:class:`PrefixCache`),
then every (group, bits) cell quantizes that group in place, runs the rest of the network and
restores the float layers: no re-conversion, no calibration.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch.nn as nn

from ..errors import QsdError
from ..io import atomic_path
from ..config import DEFAULT_BITS, parse_bit_set
from ..ui import progress_bar
from .damage import Batch, PrefixCache, Quantizer, Reference
from .groups import LayerGroup, layer_groups

METRIC = "kl"  # mean KL(p_float || p_quantized) in nats per image


@dataclass
class SensitivityTable:
    """Damage per group and bit width (and top-1), with what it was measured on."""

    bits: list[int]
    groups: list[LayerGroup]
    damage: dict[str, dict[int, float]]
    top1: dict[str, dict[int, float]] = field(default_factory=dict)
    float_top1: float | None = None
    samples: int = 0
    data: str | None = None
    scale_init: str = "mse"
    seconds: float = 0.0
    metric: str = METRIC

    def to_dict(self) -> dict:
        return {"metric": self.metric, "bits": list(self.bits), "samples": self.samples, "data": self.data,
                "scale_init": self.scale_init, "float_val_top1": self.float_top1, "seconds": self.seconds,
                "groups": [{**g.to_dict(), "damage": {str(b): self.damage[g.name][b] for b in self.bits},
                            "top1": {str(b): self.top1[g.name][b] for b in self.bits if b in self.top1.get(g.name, {})}}
                           for g in self.groups]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SensitivityTable":
        try:
            bits = [int(b) for b in d["bits"]]
            groups = [LayerGroup(g["name"], tuple(g["layers"]), int(g["params"]), g.get("input")) for g in d["groups"]]
            damage = {g["name"]: {int(b): float(v) for b, v in g["damage"].items()} for g in d["groups"]}
            top1 = {g["name"]: {int(b): float(v) for b, v in (g.get("top1") or {}).items()} for g in d["groups"]}
        except (KeyError, TypeError, ValueError) as e:
            raise QsdError(f"not a sensitivity table (qsdcompress sensitivity --json): missing or bad {e}") from None
        if d.get("metric", METRIC) != METRIC:
            raise QsdError(f"sensitivity table measures {d.get('metric')!r}, expected {METRIC!r}")
        return cls(bits, groups, damage, top1, d.get("float_val_top1"), int(d.get("samples", 0)), d.get("data"),
                   d.get("scale_init", "mse"), float(d.get("seconds", 0.0)))

    def check_fits(self, model: nn.Module, bits: Iterable[int]) -> None:
        """One clear error when this table was measured on another model or lacks a bit width."""
        own = {g.name: g.layers for g in layer_groups(model)}
        theirs = {g.name: g.layers for g in self.groups}
        if own != theirs:
            diff = sorted(set(own.items()) ^ set(theirs.items()))
            raise QsdError(f"the sensitivity table does not fit this model (group {diff[0][0]} differs); "
                           f"measure it on this model with qsdcompress sensitivity")
        missing = sorted(set(bits) - set(self.bits))
        if missing:
            raise QsdError(f"the sensitivity table has no {', '.join(map(str, missing))}-bit column; "
                           f"measure it with --bits including them")


def measure_sensitivity(model: nn.Module, batches: list[Batch], bits: Iterable[int] = DEFAULT_BITS,
                        scale_init: str = "mse", mse_grid: int = 16, data: str | None = None,
                        max_cache_bytes: float = 1e9) -> tuple[SensitivityTable, Reference, Quantizer]:
    """The sensitivity table of float ``model`` on ``batches`` (see the module doc); also returns the
    float reference and the layer cache, which planning reuses."""
    t0 = time.perf_counter()
    bits = parse_bit_set(bits)
    was = model.training
    model.eval()
    quantizer = Quantizer(model, scale_init, mse_grid)
    groups = layer_groups(model)
    cache = PrefixCache(model, batches, {g.name: list(g.layers) for g in groups}, max_cache_bytes)
    ref = Reference(batches, cache.logits)
    damage: dict[str, dict[int, float]] = {g.name: {} for g in groups}
    top1: dict[str, dict[int, float]] = {g.name: {} for g in groups}
    try:
        with progress_bar("sensitivity", len(groups) * len(bits)) as (bar, task):
            for g in groups:
                for b in bits:
                    with quantizer.applied({name: b for name in g.layers}):
                        s = ref.score(cache.run(g.name, batches))
                    damage[g.name][b], top1[g.name][b] = s["kl"], s["top1"]
                    bar.update(task, advance=1, info=f"{g.name} W{b}")
    finally:
        model.train(was)
    table = SensitivityTable(list(bits), groups, damage, top1, ref.top1, ref.samples, data, scale_init,
                             round(time.perf_counter() - t0, 2))
    return table, ref, quantizer


def plot_sensitivity(table: SensitivityTable, path: str | os.PathLike) -> str:
    """Heat map of log10 damage, groups x bits, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [g.name for g in table.groups]
    floor = 1e-6
    values = np.array([[math.log10(max(table.damage[n][b], floor)) for b in table.bits] for n in names])
    fig, ax = plt.subplots(figsize=(2.5 + 0.7 * len(table.bits), 1.2 + 0.22 * len(names)))
    im = ax.imshow(values, aspect="auto", cmap="magma_r", vmin=math.log10(floor))
    ax.set_xticks(range(len(table.bits)), [f"W{b}" for b in table.bits])
    ax.set_yticks(range(len(names)), names, fontsize=6)
    fig.colorbar(im, ax=ax, label=f"log10 KL to float (nats/image, floor {floor:g})")
    ax.set_title(f"sensitivity: only one group quantized ({table.samples} val images)", fontsize=8)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(p) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return str(p)


__all__ = ["SensitivityTable", "measure_sensitivity", "plot_sensitivity", "parse_bit_set", "DEFAULT_BITS", "METRIC"]
