"""Measuring the damage of quantizing part of a float model, cheaply (docs/method.md §9).

* :class:`Reference`: validation batches and the float model's log-probabilities on them, computed
  once; the damage of a model is its mean KL divergence from them (and its top-1).
* :class:`Quantizer`: swaps layers of the float model for their Brevitas counterparts in place and
  back, with the same quantizer and scale initialisation as ``convert`` (docs/method.md §3); the
  steps and Brevitas layers are built once per (layer, bits) and reused.
* :class:`PrefixCache`: the outputs of the modules that finish before a group's first layer
  starts, recorded in the one float pass; while a group is quantized those modules return their
  recorded output instead of running again, so each measurement only runs the rest of the network.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import DataConfig, build_loader, first_samples
from ..errors import QsdError
from ..quant import init_step, is_quant_layer, make_quant_layer, weight_layers

Batch = tuple[torch.Tensor, torch.Tensor]


def validation_batches(model: nn.Module, data: str, samples: int, batch_size: int = 64) -> list[Batch]:
    """The first ``samples`` images (and labels) of the ``val`` split of ``data``, in a fixed order,
    on the model's device."""
    if samples < 1:
        raise QsdError(f"--sensitivity-samples must be at least 1, got {samples}")
    loader = build_loader(data, "val", DataConfig.from_model(model), batch_size=min(batch_size, samples),
                          shuffle=False, num_classes=getattr(model, "num_classes", 10))
    dev = next(model.parameters()).device
    out: list[Batch] = [(x.to(dev), y.to(dev)) for x, y in first_samples(loader, samples)]
    if not out:
        raise QsdError(f"the val split of {data!r} gave no images")
    return out


def kl_from(ref_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-image ``KL(p_float || p_model)`` in nats."""
    logp = F.log_softmax(logits.double(), dim=1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(1)


class Reference:
    """Float log-probabilities and labels of the validation batches: the yardstick of damage."""

    def __init__(self, batches: list[Batch], logits: list[torch.Tensor]):
        self.batches = batches
        self.logp = [F.log_softmax(z.double(), dim=1) for z in logits]
        self.samples = sum(len(x) for x, _ in batches)
        self.top1 = self._top1(logits)

    @classmethod
    @torch.no_grad()
    def of(cls, model: nn.Module, batches: list[Batch]) -> "Reference":
        """The reference of float ``model`` (in eval mode) on ``batches``."""
        return cls(batches, [model(x).float() for x, _ in batches])

    def _top1(self, logits: Iterable[torch.Tensor]) -> float:
        hits = sum(int((z.argmax(1) == y).sum()) for z, (_, y) in zip(logits, self.batches))
        return hits / max(self.samples, 1)

    def score(self, logits: list[torch.Tensor]) -> dict:
        """Mean KL from the float model (nats per image) and top-1 of the given logits."""
        kl = sum(float(kl_from(r, z).sum()) for r, z in zip(self.logp, logits)) / max(self.samples, 1)
        return {"kl": max(kl, 0.0), "top1": self._top1(logits)}

    @torch.no_grad()
    def measure(self, model: nn.Module) -> dict:
        """Damage of any model of the same classes (e.g. a converted one) on these batches."""
        was = model.training
        model.eval()
        out = self.score([model(x).float() for x, _ in self.batches])
        model.train(was)
        return out


class Quantizer:
    """Quantize named layers of a float model in place for a ``with`` block, then restore them."""

    def __init__(self, model: nn.Module, scale_init: str = "mse", grid: int = 16):
        self.model, self.scale_init, self.grid = model, scale_init, grid
        self._layers: dict[tuple[str, int], nn.Module] = {}
        self.float_layers = {name: model.get_submodule(name) for name in self._names()}

    def _names(self) -> list[str]:
        out = []
        for name, m in weight_layers(self.model):
            if is_quant_layer(m):
                raise QsdError(f"{name} is already quantized: mixed precision starts from a float model "
                               f"(give the float checkpoint, not a converted .qsd)")
            out.append(name)
        return out

    def layer(self, name: str, bits: int) -> nn.Module:
        """The Brevitas layer of ``name`` at ``bits`` (sharing the float weight), built once."""
        key = (name, int(bits))
        if key not in self._layers:
            m = self.float_layers[name]
            step = init_step(m.weight, int(bits), self.scale_init, self.grid)
            self._layers[key] = make_quant_layer(m, int(bits), step)
        return self._layers[key]

    @contextmanager
    def applied(self, bits: Mapping[str, int]) -> Iterator[None]:
        swapped = []
        try:
            for name, b in bits.items():
                if b < 32:
                    self.model.set_submodule(name, self.layer(name, b))
                    swapped.append(name)
            yield
        finally:
            for name in swapped:
                self.model.set_submodule(name, self.float_layers[name])


class PrefixCache:
    """Float outputs of the modules that run before a given layer, replayed instead of recomputed.

    A module qualifies when the model calls it exactly once per forward, it returns one tensor
    and it finishes before the layer starts: its output cannot depend on the layer. Only the
    outermost such modules are kept. Nothing is cached beyond ``max_bytes`` (then every
    measurement runs the whole network).
    """

    def __init__(self, model: nn.Module, batches: list[Batch], starts: Mapping[str, list[str]],
                 max_bytes: float = 1e9):
        self.model, self.batch = model, 0
        spans, sizes = self._trace(batches[0][0])
        scale = sum(len(x) for x, _ in batches) / max(len(batches[0][0]), 1)
        self.skips = {key: self._outermost(spans, layers) for key, layers in starts.items()}
        needed = sorted({n for names in self.skips.values() for n in names})
        if sum(sizes[n] for n in needed) * scale > max_bytes:
            self.skips, needed = {key: [] for key in starts}, []
        self.outputs: dict[str, list[torch.Tensor]] = {n: [] for n in needed}
        self.logits = self._record(batches, needed)

    def _trace(self, x: torch.Tensor) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
        """(start, end) event index of every module called once with a tensor output, and its bytes."""
        clock, calls, spans, sizes, hooks = [0], {}, {}, {}, []

        def pre(name):
            def h(_m, _i):
                calls[name] = calls.get(name, 0) + 1
                spans[name] = (clock[0], -1)
                clock[0] += 1
            return h

        def post(name):
            def h(_m, _i, out):
                spans[name] = (spans[name][0], clock[0])
                clock[0] += 1
                sizes[name] = out.numel() * out.element_size() if isinstance(out, torch.Tensor) else -1
            return h

        for name, m in self.model.named_modules():
            if name:
                hooks += [m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post(name))]
        try:
            with torch.no_grad():
                self.model(x)
        finally:
            for h in hooks:
                h.remove()
        ok = {n for n in spans if calls[n] == 1 and sizes.get(n, -1) >= 0}
        return {n: spans[n] for n in ok}, {n: sizes[n] for n in ok}

    @staticmethod
    def _outermost(spans: Mapping[str, tuple[int, int]], layers: list[str]) -> list[str]:
        starts = [spans[n][0] for n in layers if n in spans]
        if len(starts) < len(layers):  # a layer called more than once: replay nothing
            return []
        first = min(starts)
        done = {n for n, (_, end) in spans.items() if end < first}

        def inside_done(n: str) -> bool:
            parts = n.split(".")
            return any(".".join(parts[:i]) in done for i in range(1, len(parts)))
        return sorted(n for n in done if not inside_done(n))

    @torch.no_grad()
    def _record(self, batches: list[Batch], needed: list[str]) -> list[torch.Tensor]:
        hooks = [self.model.get_submodule(n).register_forward_hook(
            lambda _m, _i, out, n=n: self.outputs[n].append(out.detach())) for n in needed]
        try:
            return [self.model(x).float() for x, _ in batches]
        finally:
            for h in hooks:
                h.remove()

    @contextmanager
    def replaying(self, key: Any) -> Iterator[None]:
        """While active, the modules before ``key``'s layers return their recorded outputs
        (of batch ``self.batch``)."""
        mods = [self.model.get_submodule(n) for n in self.skips.get(key, [])]
        try:
            for n, m in zip(self.skips.get(key, []), mods):
                m.forward = lambda *a, _n=n, **k: self.outputs[_n][self.batch].clone()  # type: ignore[method-assign]
            yield
        finally:
            for m in mods:
                m.__dict__.pop("forward", None)

    @torch.no_grad()
    def run(self, key: Any, batches: list[Batch]) -> list[torch.Tensor]:
        """Logits of the model as it is now, replaying what comes before ``key``'s layers."""
        out = []
        with self.replaying(key):
            for i, (x, _) in enumerate(batches):
                self.batch = i
                out.append(self.model(x).float())
        return out


__all__ = ["validation_batches", "kl_from", "Reference", "Quantizer", "PrefixCache", "Batch"]
