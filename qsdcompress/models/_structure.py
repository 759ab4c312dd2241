"""What a model tells the tools about itself (timm's ``pretrained_cfg`` idea, for structure).

Quantization, export, report and distillation never match module names or classes of a model
family. They ask the model (``model.structure()``) which BatchNorm follows which conv, which
neuron's spikes feed each weight layer, which BatchNorm is a neuron's whole input, and where the
q/k/v neurons of each attention block are. A new topology describes itself in its own file and
the tools work on it unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from ..errors import QsdError


@dataclass(frozen=True)
class RepConvSite:
    """A reparameterisable conv: ``1x1 conv -> BN with border padding -> depthwise -> 1x1 -> BN``,
    followed by ``outer_bn``. Export folds all of it into three plain convs."""

    conv1: str
    pad_bn: str        # module with ``.bn`` and ``.pad_pixels`` (pads with the BN output for zero input)
    depthwise: str
    pointwise: str
    bn: str
    outer_bn: str


@dataclass(frozen=True)
class AttentionSite:
    """A spike-driven self-attention block: ``q_s @ (k_s^T @ v_s) * scale``."""

    name: str          # the attention module
    head: str          # neuron whose spikes feed the q/k/v convs
    q: str             # q/k/v neurons (IE-LIF goes here; FGD reads their spikes)
    k: str
    v: str
    attn: str          # neuron after the product (feeds the projection)
    num_heads: int


@dataclass
class ModelStructure:
    """Names of modules (as in ``named_modules``) and how they connect."""

    conv_bn: list[tuple[str, str]] = field(default_factory=list)   # (conv, BN directly after it)
    repconv: list[RepConvSite] = field(default_factory=list)
    neuron_bn: dict[str, str] = field(default_factory=dict)         # neuron -> BN that is its whole input
    layer_input: dict[str, str | None] = field(default_factory=dict)  # weight layer -> feeding neuron (None: pixels)
    attention: list[AttentionSite] = field(default_factory=list)

    def merge(self, other: "ModelStructure") -> "ModelStructure":
        self.conv_bn += other.conv_bn
        self.repconv += other.repconv
        self.neuron_bn.update(other.neuron_bn)
        self.layer_input.update(other.layer_input)
        self.attention += other.attention
        return self

    def attention_neurons(self, which: tuple[str, ...] = ("q", "k", "v")) -> list[str]:
        """Neuron names of every attention block, ``which`` among ``head, q, k, v, attn``."""
        return [getattr(site, w) for site in self.attention for w in which]


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def describe(model: nn.Module) -> ModelStructure:
    """The structure a model publishes; a clear error for a model that publishes none."""
    fn = getattr(model, "structure", None)
    if fn is None:
        raise QsdError(f"{type(model).__name__} does not describe its structure (no structure() method); "
                       f"only the spike-driven Transformer family is supported")
    return fn()
