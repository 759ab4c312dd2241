"""Export passes: one signature, ``pass(proto, ctx) -> facts``, run in a listed order.

Each pass rewrites the ONNX graph in place and returns what it wants reported (merged into the
export result); what a pass needs beyond the graph is in :class:`PassContext`, and whatever
state it builds lives inside it. The ``qdq`` and ``std-int`` formats are built this way (the
exporter lists their passes once, ``exporter.FORMAT_PASSES``); the ``int`` format's rewrite
(``integer.py``) predates them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .folding import QWeight
from .graph import clean_graph, pack_graph


@dataclass
class PassContext:
    """What the passes share: the weight registry and the storage options; ``facts`` collects
    what each pass reports (merged into the export result)."""

    registry: dict[str, QWeight]
    int2: bool
    opset: int
    facts: dict[str, Any] = field(default_factory=dict)


Pass = Callable[[Any, PassContext], dict]


def pack_weights(proto: Any, ctx: PassContext) -> dict:
    """Each weight as a packed INT4/INT2/INT8 initializer feeding ``DequantizeLinear`` (``graph.pack_graph``)."""
    return {"initializers": pack_graph(proto, ctx.registry, ctx.int2)}


def clean(proto: Any, ctx: PassContext) -> dict:
    """Duplicates merged, shape arithmetic folded, short names, the opset (``graph.clean_graph``)."""
    clean_graph(proto, ctx.opset)
    return {}


def run_passes(proto: Any, ctx: PassContext, passes: tuple[Pass, ...]) -> dict:
    """Run ``passes`` in order on ``proto`` (in place); their facts, merged."""
    for p in passes:
        ctx.facts.update(p(proto, ctx))
    return ctx.facts


__all__ = ["Pass", "PassContext", "run_passes", "pack_weights", "clean"]
