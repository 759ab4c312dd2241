"""``convert`` under a budget: measure (or read) the sensitivity table, price every group at every
candidate width with the size function and the report's energy model, solve the knapsack, convert
with the plan and measure what came out (docs/method.md §9).

Options that name layers (``--layer-bits``, ``--first-last-bits``, ``--skip``) win: those layers
keep their width, count as a fixed cost, and the plan covers the others.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch.nn as nn

from ..config import Budget
from ..errors import QsdError
from ..quant import FLOAT_BITS, QuantConfig, calibration_data, convert, layer_bits, plan_bits
from ..reporting.accounting import collect, layer_rows, totals
from ..reporting.energy import EnergyTable
from ..sizing import model_size
from .allocate import Problem, monotone, search_drop, smallest, solve
from .damage import Quantizer, Reference, validation_batches
from .groups import LayerGroup
from .sensitivity_table import SensitivityTable, measure_sensitivity

MB = 1e6  # bytes, as every size the commands print


def read_table(path: str | os.PathLike) -> SensitivityTable:
    """A sensitivity table saved by ``qsdcompress sensitivity --json`` (or ``-o``)."""
    p = Path(path)
    if not p.is_file():
        raise QsdError(f"sensitivity table not found: {p}")
    try:
        return SensitivityTable.from_dict(json.loads(p.read_text()))
    except json.JSONDecodeError as e:
        raise QsdError(f"{p} is not JSON: {e.msg} (line {e.lineno})") from None


def energy_mj(model: nn.Module, images: list, table: EnergyTable) -> float:
    """Energy per image of ``model`` on ``images``: the report's accounting (docs/method.md §8)."""
    st = collect(model, images)
    return float(totals(model, layer_rows(model, st, table), st)["energy_mj"])


def _free(groups: list[LayerGroup], fixed: Mapping[str, int]) -> list[tuple[str, list[str]]]:
    out = [(g.name, [n for n in g.layers if n not in fixed]) for g in groups]
    return [(name, layers) for name, layers in out if layers]


def _size_costs(model: nn.Module, free, bits: list[int], fixed: Mapping[str, int]) -> tuple[np.ndarray, int]:
    """Bits each group adds at each width, from ``sizing.model_size`` itself (it is linear per layer)."""
    base = model_size(model, dict(fixed))["size_bits"]
    costs = np.array([[model_size(model, {**fixed, **{n: b for n in layers}})["size_bits"] - base for b in bits]
                      for _, layers in free], dtype=float)
    return costs, base


def _energy_costs(model: nn.Module, free, bits: list[int], fixed: Mapping[str, int], images: list,
                  table: EnergyTable) -> tuple[np.ndarray, float]:
    """Energy (pJ per image) each group adds at each width: the report's per-layer rows, from the
    float model's firing rates on the validation images."""
    st = collect(model, images)
    names = [n for _, layers in free for n in layers]
    base_rows = layer_rows(model, st, table, bits_override=dict(fixed))
    base = sum(r["energy_pj"] for r in base_rows)
    at_float = {r["name"]: r["energy_pj"] for r in base_rows}
    per_bits = {b: {r["name"]: r["energy_pj"] for r in layer_rows(model, st, table,
                                                                   bits_override={**fixed, **{n: b for n in names}})}
                for b in bits}
    costs = np.array([[sum(per_bits[b].get(n, 0.0) - at_float.get(n, 0.0) for n in layers) for b in bits]
                      for _, layers in free])
    return costs, base


def _problem(model: nn.Module, sens: SensitivityTable, budget: Budget, fixed: Mapping[str, int],
             images: list, etable: EnergyTable) -> tuple[Problem, list[tuple[str, list[str]]]]:
    bits = list(budget.candidate_bits)
    free = _free(sens.groups, fixed)
    damage = monotone(np.array([[sens.damage[name][b] for b in bits] for name, _ in free]))
    size, base = _size_costs(model, free, bits, fixed)
    p = Problem([name for name, _ in free], bits, damage, size, base)
    if budget.target_size_mb is not None:
        p.limits["size_bits"] = 8 * math.floor(budget.target_size_mb * MB)
    if budget.target_energy_mj is not None:
        p.energy_pj, p.base_energy_pj = _energy_costs(model, free, bits, fixed, images, etable)
        p.limits["energy_pj"] = budget.target_energy_mj * 1e9
    return p, free


def _check_reachable(p: Problem, budget: Budget) -> None:
    """One line naming the smallest reachable value when a size or energy target cannot be met."""
    cheapest = f"every planned group at {min(p.bits)} bits"
    if "size_bits" in p.limits and smallest(p, "size_bits") > p.limits["size_bits"]:
        least = math.ceil(smallest(p, "size_bits") / 8)
        raise QsdError(f"--target-size-mb {budget.target_size_mb:g} cannot be met: the smallest reachable size is "
                       f"{least / MB:.4f} MB ({least:,} bytes, {cheapest}; layers fixed by --layer-bits, "
                       f"--first-last-bits or --skip keep their width)")
    if "energy_pj" in p.limits and smallest(p, "energy_pj") > p.limits["energy_pj"]:
        least = smallest(p, "energy_pj") * 1e-9
        raise QsdError(f"--target-energy-mj {budget.target_energy_mj:g} cannot be met: the smallest reachable energy "
                       f"is {least:.6f} mJ per image ({cheapest}; the first layer and the attention products do "
                       f"not depend on the weight bits)")


class Planner:
    """Everything a budgeted convert measures once: validation batches, float reference,
    sensitivity table, in-place quantizer, knapsack."""

    def __init__(self, model: nn.Module, config: QuantConfig, budget: Budget):
        self.model, self.config, self.budget = model, config, budget.validate()
        model.eval()
        data = calibration_data(model, config)
        if not data:
            raise QsdError("a mixed-precision plan measures each layer group's damage on validation images: pass "
                           "--data with images of the model's own data")
        self.batches = validation_batches(model, data, budget.samples)
        self.images = [x for x, _ in self.batches]
        self.etable = EnergyTable.from_file(budget.energy_table) if budget.energy_table else EnergyTable()
        self.fixed = plan_bits(model, config, explicit_only=True)  # what --layer-bits etc. name
        if budget.sensitivity:
            self.table = read_table(budget.sensitivity)
            self.table.check_fits(model, budget.candidate_bits)
            self.quantizer = Quantizer(model, config.scale_init, config.mse_grid)
            self.ref = Reference.of(model, self.batches)
        else:
            self.table, self.ref, self.quantizer = measure_sensitivity(
                model, self.batches, budget.candidate_bits, config.scale_init, config.mse_grid, data)
        self.problem, self.free = _problem(model, self.table, budget, self.fixed, self.images, self.etable)
        self.problem.base_size_bits += self._converted_extra_bits()
        _check_reachable(self.problem, budget)

    def _converted_extra_bits(self) -> int:
        """Bits a conversion adds whatever the widths (IE-LIF's float parameters): the size of a
        quick uncalibrated conversion minus the size the float structure gives at the same widths."""
        trial = replace(self.config, calib_samples=0, scale_init="absmax")
        converted = convert(self.model, trial)
        return model_size(converted)["size_bits"] - model_size(self.model, layer_bits(converted))["size_bits"]

    def layer_plan(self, choice: np.ndarray) -> dict[str, int]:
        bits = self.problem.bits
        return {n: bits[k] for (_, layers), k in zip(self.free, choice) for n in layers}

    def drop_points(self, choice: np.ndarray) -> float:
        """Validation top-1 drop (points) of the plan, quantized in place (IE-LIF's identity init
        and calibration leave the float neurons as they were, docs/method.md §4)."""
        widths = {**{n: b for n, b in self.fixed.items() if b < FLOAT_BITS}, **self.layer_plan(choice)}
        with self.quantizer.applied(widths):
            top1 = self.ref.measure(self.model)["top1"]
        return (self.ref.top1 - top1) * 100

    def choose(self) -> tuple[np.ndarray, list[dict]]:
        if self.budget.max_drop is not None:
            return search_drop(self.problem, self.drop_points, float(self.budget.max_drop))
        choice = solve(self.problem)
        if choice is None:
            raise QsdError("the budget cannot be met with these candidate bit widths")
        return choice, []


def _summary(planner: Planner, choice: np.ndarray, converted: nn.Module, history: list[dict]) -> dict:
    """The plan as stored in the ``.qsd`` and printed: widths, predicted and measured figures."""
    p, b = planner.problem, planner.budget
    predicted = p.totals(choice)
    measured = planner.ref.measure(converted)
    size = model_size(converted)
    out: dict[str, Any] = {
        "budget": {k: v for k, v in b.to_dict().items() if v is not None},
        "groups": {name: p.bits[k] for name, k in zip(p.groups, choice)},
        "layer_bits": layer_bits(converted), "fixed_layers": dict(planner.fixed),
        "size_bytes": size["size_bytes"],
        "predicted": {"size_bytes": math.ceil(predicted["size_bits"] / 8), "kl": predicted["damage"]},
        "measured": {"kl": measured["kl"], "val_top1": measured["top1"], "val_top1_float": planner.ref.top1,
                     "drop_points": round((planner.ref.top1 - measured["top1"]) * 100, 4)},
        "validation_images": planner.ref.samples, "metric": "KL(float || quantized), nats per image",
        "solver": "scipy.optimize.milp (HiGHS), multiple-choice knapsack",
        "sensitivity": {"seconds": planner.table.seconds, "samples": planner.table.samples,
                        "from": b.sensitivity or "measured"},
    }
    if p.energy_pj is not None:
        out["predicted"]["energy_mj"] = predicted["energy_pj"] * 1e-9
        out["measured"]["energy_mj"] = energy_mj(converted, planner.images, planner.etable)
    if history:
        out["search"] = history
    return out


def convert_to_budget(model: nn.Module, config: QuantConfig, budget: Budget,
                      calib_loader: Any = None) -> tuple[nn.Module, dict]:
    """Convert float ``model`` with the per-group widths that meet ``budget`` with the least
    predicted damage; returns the converted model (its ``.qsd`` metadata holds the plan) and the plan.

    Size is exact (the same function before and after). Energy is predicted from the float
    model's firing rates; when the converted model's measured energy is over the target, the
    energy limit is tightened by the overshoot and the plan solved again (at most 3 times).
    """
    planner = Planner(model, config, budget)
    for _ in range(4):
        choice, history = planner.choose()
        cfg = replace(config, layer_bits={**planner.layer_plan(choice), **config.layer_bits})
        converted = convert(model, cfg, calib_loader)
        plan = _summary(planner, choice, converted, history)
        target = budget.target_energy_mj
        if target is None or plan["measured"]["energy_mj"] <= target:
            break
        planner.problem.limits["energy_pj"] *= 0.999 * target / plan["measured"]["energy_mj"]
        if smallest(planner.problem, "energy_pj") > planner.problem.limits["energy_pj"]:
            break
    plan["budget_met"] = _met(plan, budget)
    converted.qsd_quant_meta["mixed_precision"] = plan
    return converted, plan


def _met(plan: dict, budget: Budget) -> bool:
    ok = True
    if budget.target_size_mb is not None:
        ok &= plan["size_bytes"] <= budget.target_size_mb * MB
    if budget.target_energy_mj is not None:
        ok &= plan["measured"]["energy_mj"] <= budget.target_energy_mj
    if budget.max_drop is not None:
        ok &= plan["measured"]["drop_points"] <= budget.max_drop + 1e-9
    return bool(ok)


__all__ = ["Budget", "Planner", "convert_to_budget", "read_table", "energy_mj", "MB"]
