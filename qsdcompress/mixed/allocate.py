"""Bit allocation under a budget: a multiple-choice knapsack solved exactly by scipy's MILP
(HiGHS) (docs/method.md §9).

One binary ``x[g, k]`` per group and candidate width, ``sum_k x[g, k] = 1``. Size and energy are
linear in the widths (each layer adds ``params * b`` bits plus its float32 scales; each layer's
energy is ``E_AC(b) * SOPs``), so ``size = base + sum x * size[g, k]`` exactly and the budgets are
linear constraints. The objective is the predicted damage ``sum x * damage[g, k]`` (additive over
groups), then, among plans of that damage, the smallest size.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..errors import QsdError


@dataclass
class Problem:
    """The knapsack: per group (rows) and candidate width (columns) its predicted damage and costs."""

    groups: list[str]
    bits: list[int]
    damage: np.ndarray                       # (G, K), made non-increasing in bits (see monotone)
    size_bits: np.ndarray                    # (G, K) bits the group adds to the model
    base_size_bits: int                      # everything else (fixed layers, BatchNorm, biases, ...)
    energy_pj: np.ndarray | None = None      # (G, K) energy per image the group adds
    base_energy_pj: float = 0.0
    limits: dict[str, float] = field(default_factory=dict)  # "size_bits" / "energy_pj" -> cap

    def totals(self, choice: Sequence[int]) -> dict:
        rows = np.arange(len(self.groups))
        out = {"size_bits": int(self.base_size_bits + self.size_bits[rows, choice].sum()),
               "damage": float(self.damage[rows, choice].sum())}
        if self.energy_pj is not None:
            out["energy_pj"] = float(self.base_energy_pj + self.energy_pj[rows, choice].sum())
        return out

    def cost(self, key: str) -> tuple[np.ndarray, float]:
        return (self.size_bits, float(self.base_size_bits)) if key == "size_bits" else \
            (self.energy_pj, float(self.base_energy_pj))  # type: ignore[return-value]


def monotone(damage: np.ndarray) -> np.ndarray:
    """Fewer bits never predict less damage: each column is raised to the largest damage of any
    wider column (a measured inversion is noise, not a reason to spend fewer bits)."""
    out = damage.astype(float).copy()
    for k in range(out.shape[1] - 2, -1, -1):
        out[:, k] = np.maximum(out[:, k], out[:, k + 1])
    return out


def _milp(objective: np.ndarray, constraints: list[tuple[np.ndarray, float]]) -> np.ndarray | None:
    """argmin of ``sum objective * x`` over one-choice-per-row binaries under ``sum A * x <= cap``;
    the chosen column per row, or None when infeasible."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    G, K = objective.shape
    one = np.zeros((G, G * K))
    for g in range(G):
        one[g, g * K:(g + 1) * K] = 1.0
    cons = [LinearConstraint(one, 1.0, 1.0)]
    for a, cap in constraints:
        cons.append(LinearConstraint(a.reshape(1, -1), -np.inf, cap))
    res = milp(objective.reshape(-1), constraints=cons, integrality=np.ones(G * K), bounds=Bounds(0, 1),
               options={"time_limit": 60})
    if res.x is None or res.status not in (0, 1):
        return None
    return np.rint(res.x).reshape(G, K).argmax(1)


def _caps(p: Problem) -> list[tuple[np.ndarray, float]]:
    out = []
    for key, cap in p.limits.items():
        a, base = p.cost(key)
        out.append((a, cap - base))
    return out


def smallest(p: Problem, key: str) -> float:
    """The least ``key`` (``size_bits``/``energy_pj``) any plan reaches: every group at its cheapest width."""
    a, base = p.cost(key)
    return base + float(a.min(1).sum())


def solve(p: Problem, damage_cap: float | None = None) -> np.ndarray | None:
    """Least damage under the limits, then the smallest size at that damage; with ``damage_cap``,
    the smallest size whose predicted damage is at most the cap."""
    caps = _caps(p)
    if damage_cap is None:
        first = _milp(p.damage, caps)
        if first is None:
            return None
        damage_cap = float(p.damage[np.arange(len(p.groups)), first].sum())
    slack = 1e-9 * max(abs(damage_cap), 1e-12) + 1e-15
    return _milp(p.size_bits.astype(float), caps + [(p.damage, damage_cap + slack)])


def search_drop(p: Problem, measure: Callable[[np.ndarray], float], max_drop: float,
                steps: int = 7) -> tuple[np.ndarray, list[dict]]:
    """The smallest plan whose measured drop (points) is at most ``max_drop``: bisection over the
    predicted-damage cap in log space, each candidate measured (predicted damage ranks plans; the
    drop itself is not additive). Raises a one-line error when even the least-damage plan drops more."""
    history: list[dict] = []

    def trial(choice: np.ndarray, cap: float | None) -> float:
        drop = measure(choice)
        history.append({"damage_cap": cap, **p.totals(choice), "drop_points": round(drop, 4)})
        return drop

    safest = solve(p)
    if safest is None:
        raise QsdError("no plan meets the size/energy budget")  # callers check the limits first
    d_safe = trial(safest, None)
    if d_safe > max_drop:
        raise QsdError(f"--max-drop {max_drop:g}: the smallest validation top-1 drop reachable is {d_safe:.2f} points "
                       f"(least-damage plan within the other budgets); allow at least that")
    cheapest = solve(p, float("inf"))
    assert cheapest is not None
    if trial(cheapest, float("inf")) <= max_drop:
        return cheapest, history
    best = safest
    lo = max(p.totals(safest)["damage"], 1e-12)
    hi = max(p.totals(cheapest)["damage"], lo * 1.0001)
    for _ in range(steps):
        cap = float(np.sqrt(lo * hi))
        choice = solve(p, cap)
        if choice is None:
            break
        if trial(choice, cap) <= max_drop:
            lo = cap
            if p.totals(choice)["size_bits"] < p.totals(best)["size_bits"]:
                best = choice
        else:
            hi = cap
    return best, history


__all__ = ["Problem", "monotone", "solve", "smallest", "search_drop"]
