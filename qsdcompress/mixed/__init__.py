"""Mixed precision: per-group sensitivity and bit allocation under a size, energy or accuracy
budget (docs/method.md §9).

* ``groups``: the layer groups a plan gives one width (the model says which layers read the same spikes).
* ``evaluate``: float reference on validation images, in-place quantization, replay of the float prefix.
* ``sensitivity``: the damage table (KL to the float model per group and width) and its heat map.
* ``allocate``: the multiple-choice knapsack (scipy's MILP) and the accuracy-target search.
* ``plan``: :class:`Budget` and :func:`convert_to_budget`, what ``convert --target-*`` runs.

``qsdcompress.sensitivity(model)`` is :func:`sensitivity`.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

import torch.nn as nn

from ..config import DEFAULT_BITS, Budget, parse_bit_set
from ..data import data_for
from ..io import atomic_write_text
from ..loading import pick_device, resolve_source
from ..results import SensitivityResult
from .allocate import Problem, monotone, search_drop, smallest, solve
from .damage import PrefixCache, Quantizer, Reference, validation_batches
from .groups import LayerGroup, layer_groups
from .plan import MB, Planner, convert_to_budget, energy_mj, read_table
from .sensitivity_table import SensitivityTable, measure_sensitivity, plot_sensitivity


def sensitivity(model: nn.Module | str | os.PathLike | None = None, data: str | None = None,
                bits: Iterable[int] | str = DEFAULT_BITS, samples: int = 128, batch_size: int = 64,
                scale_init: str = "mse", arch: str | None = None, output: str | os.PathLike | None = None,
                plot: str | os.PathLike | None = None, workdir: str | os.PathLike | None = None,
                device: str = "auto") -> SensitivityResult:
    """Per-group damage (KL to the float logits on ``samples`` validation images of ``data``) when
    only that group is quantized to each width in ``bits``; ``model`` is a float model, a path or
    None (the one rule of :func:`~qsdcompress.loading.locate_model`: a float model of the work
    directory, else the bundled model of ``data``); ``data`` defaults to the model's own. ``output`` writes the table as JSON (``convert
    --sensitivity`` reads it), ``plot`` a heat map PNG."""
    m, name = resolve_source(model, workdir, data, "float", arch)
    data = data_for(m, data, name)
    dev = pick_device(device)
    m.to(dev)
    batches = validation_batches(m, data, samples, batch_size)
    table, _, _ = measure_sensitivity(m, batches, bits, scale_init, data=data)
    result = SensitivityResult(model=name, arch=getattr(m, "arch", None), table=table.to_dict())
    if output is not None:
        atomic_write_text(output, json.dumps(result.to_dict(), indent=1))
        result.output = str(output)
    if plot is not None:
        result.plot = plot_sensitivity(table, plot)
    return result


__all__ = ["sensitivity", "Budget", "convert_to_budget", "SensitivityTable", "measure_sensitivity",
           "plot_sensitivity", "layer_groups", "LayerGroup", "Problem", "solve", "search_drop", "smallest",
           "monotone", "Planner", "PrefixCache", "Quantizer", "Reference", "validation_batches", "read_table",
           "energy_mj", "parse_bit_set", "DEFAULT_BITS", "MB"]
