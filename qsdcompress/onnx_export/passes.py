"""Export passes: one signature, ``pass(proto, ctx) -> facts``, run in a listed order.

Every format is a list of passes (``exporter.FORMAT_PASSES`` lists each once, in order). A pass
rewrites the ONNX graph in place and returns what it wants reported (merged into the export
result); what a pass needs beyond the graph is in :class:`PassContext`, and whatever state one
pass leaves for a later one is a declared field of it (the class has slots: an undeclared
attribute is an error). The passes every format shares are here; the ``int`` format's own are
in ``integer.py``, the ``std-int`` format's in ``standard.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .folding import QWeight
from .graph import MS_DOMAIN, clean_graph, compact_names, dedupe, drop_dead, pack_graph
from .requant import ConvSite

# the contrib domains a graph may use, each at the version its ops need
CONTRIB_OPSETS = {MS_DOMAIN: 1}


@dataclass(slots=True)
class PassContext:
    """What the passes share: the weight registry and the storage options; ``facts`` collects
    what each pass reports (merged into the export result). The other fields are state one pass
    builds for a later one; each names its writer and its readers."""

    registry: dict[str, QWeight]
    int2: bool
    opset: int
    facts: dict[str, Any] = field(default_factory=dict)
    # parameter -> the integer kernel it runs as (integer.rewrite_integer); pack_weights packs the others
    rewritten: dict[str, str] = field(default_factory=dict)
    # packed weight initializers per storage type (rewrite_integer, pack_weights): the ``initializers`` fact
    packed: dict[str, int] = field(default_factory=dict)
    # integer weight tensor -> the conv it replaced (rewrite_integer; read by integer.requantize_neurons)
    sites: dict[str, ConvSite] = field(default_factory=dict)
    # tensor merged away -> the one kept (merge_duplicates; read by integer.requantize_neurons)
    alias: dict[str, str] = field(default_factory=dict)

    def left_float(self) -> dict[str, QWeight]:
        """The registry's weights no pass turned into an integer kernel."""
        return {p: qw for p, qw in self.registry.items() if p not in self.rewritten}

    def count_packed(self, counts: dict[str, int]) -> dict[str, int]:
        """Add ``counts`` (initializers per storage type) to :attr:`packed`; the total so far."""
        for k, v in counts.items():
            self.packed[k] = self.packed.get(k, 0) + v
        return dict(self.packed)


Pass = Callable[[Any, PassContext], dict]


def pack_weights(proto: Any, ctx: PassContext) -> dict:
    """Each weight left float as a packed INT4/INT2/INT8 initializer feeding ``DequantizeLinear``
    (``graph.pack_graph``)."""
    return {"initializers": ctx.count_packed(pack_graph(proto, ctx.left_float(), ctx.int2))}


def clean(proto: Any, ctx: PassContext) -> dict:
    """Duplicates merged, shape arithmetic folded, default attributes and long names dropped
    (``graph.clean_graph``)."""
    clean_graph(proto)
    return {}


def merge_duplicates(proto: Any, ctx: PassContext) -> dict:
    """Identical nodes merged (``graph.dedupe``; the merges recorded in ``ctx.alias``). Dead nodes
    go first so only live ones merge, and those merged away go after: one pass, three steps."""
    drop_dead(proto)
    dedupe(proto, ctx.alias)
    drop_dead(proto)
    return {}


def compact(proto: Any, ctx: PassContext) -> dict:
    """Dead nodes dropped, short tensor names, no doc strings: the graph text stays small beside
    the packed weights."""
    drop_dead(proto)
    compact_names(proto)
    return {}


def set_opsets(proto: Any, ctx: PassContext) -> dict:
    """The one place a file's opsets are declared, for every format: the standard opset
    ``ctx.opset`` (the passes before see the traced one), each contrib domain the nodes use, and
    the IR version that opset needs (opset 25 with INT2 needs IR 11+; onnx's table says which)."""
    from onnx import helper

    standard = helper.make_opsetid("", ctx.opset)
    used = sorted({n.domain for n in proto.graph.node} - {"", "ai.onnx"})
    del proto.opset_import[:]
    proto.opset_import.extend([standard, *(helper.make_opsetid(d, CONTRIB_OPSETS[d]) for d in used)])
    proto.ir_version = helper.find_min_ir_version_for([standard])
    return {}


def run_passes(proto: Any, ctx: PassContext, passes: tuple[Pass, ...]) -> dict:
    """Run ``passes`` in order on ``proto`` (in place); their facts, merged."""
    for p in passes:
        ctx.facts.update(p(proto, ctx))
    return ctx.facts


__all__ = ["Pass", "PassContext", "CONTRIB_OPSETS", "run_passes", "pack_weights", "clean", "merge_duplicates",
           "compact", "set_opsets"]
