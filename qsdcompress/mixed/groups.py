"""Layer groups: the units a mixed-precision plan gives one bit width (docs/method.md §9).

A group is the set of weight layers that read the same spikes (``structure().layer_input``): a
block's q/k/v RepConvs (all fed by its head neuron), its projection (the attention neuron), each
MLP layer, each conv of a conv stage, the chain depthwise + pointwise of a SepConv (one linear map
of the same spikes), the first conv (pixels) and the head. Asking the model, not matching names,
keeps this right for any topology that describes itself.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch.nn as nn

from ..models import describe
from ..quant import weight_layers


@dataclass(frozen=True)
class LayerGroup:
    """Weight layers that share one bit width in a plan."""

    name: str
    layers: tuple[str, ...]
    params: int
    input: str | None      # the neuron whose spikes feed the group (None: pixels)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    out = []
    for column in zip(*parts):
        if len(set(column)) != 1:
            break
        out.append(column[0])
    return ".".join(out)


def _group_name(layers: list[str], feed: str | None, roles: dict[str, str]) -> str:
    """``block3.0.attn.qkv`` / ``block3.0.attn.proj`` for attention sites, the layer's own name for
    one layer, else the common prefix and the distinct tails (``...Conv.dwconv+pwconv2``)."""
    if feed in roles:
        return roles[feed]
    if len(layers) == 1:
        return layers[0]
    prefix = _common_prefix(layers)
    tails = [n[len(prefix) + 1:] if prefix else n for n in layers]
    return f"{prefix}.{'+'.join(tails)}" if prefix else "+".join(tails)


def layer_groups(model: nn.Module) -> list[LayerGroup]:
    """The groups of ``model`` in module order (see the module doc)."""
    s = describe(model)
    roles = {}
    for site in s.attention:
        roles[site.head] = f"{site.name}.qkv"
        roles[site.attn] = f"{site.name}.proj"
    members: dict[object, list[tuple[str, nn.Module]]] = {}
    for name, m in weight_layers(model):
        feed = s.layer_input.get(name, ("own", name))  # a layer the model says nothing about: its own group
        members.setdefault(feed, []).append((name, m))
    groups = []
    for feed, items in members.items():
        names = [n for n, _ in items]
        neuron = feed if isinstance(feed, str) else None
        groups.append(LayerGroup(_group_name(names, neuron, roles), tuple(names),
                                 sum(m.weight.numel() for _, m in items), neuron))
    return groups


__all__ = ["LayerGroup", "layer_groups"]
