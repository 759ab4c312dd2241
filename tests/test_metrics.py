"""metrics: top-k hits and :func:`evaluate`, against counts and a cross-entropy computed here by
hand (plain Python over the logits), never by the module itself."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qsdcompress.metrics import evaluate, topk_correct


def _reference(batches: list[tuple[torch.Tensor, torch.Tensor]], k: int) -> tuple[int, float]:
    """Images whose label is among the ``k`` largest logits, and the summed cross-entropy."""
    hits, loss = 0, 0.0
    for logits, y in batches:
        for row, label in zip(logits.tolist(), y.tolist()):
            ranked = sorted(range(len(row)), key=lambda c: -row[c])
            hits += label in ranked[:k]
            top = max(row)
            loss += top + math.log(sum(math.exp(v - top) for v in row)) - row[label]
    return hits, loss


def _batches(n_batches: int = 3, batch: int = 7, classes: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, classes, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n_batches)]


def test_topk_correct_counts_like_a_sort():
    (logits, y), = _batches(1, batch=50)
    top1, top5 = topk_correct(logits, y)
    assert top1 == _reference([(logits, y)], 1)[0]
    assert top5 == _reference([(logits, y)], 5)[0]
    assert topk_correct(logits, y, ks=(3,)) == [_reference([(logits, y)], 3)[0]]


def test_topk_with_fewer_classes_than_k_counts_every_image():
    logits, y = torch.tensor([[0.1, 0.9, 0.0], [2.0, -1.0, 0.5]]), torch.tensor([0, 1])
    assert topk_correct(logits, y) == [0, 2]  # argmax 1 and 0: no top-1 hit; 3 classes < 5


def test_evaluate_matches_a_hand_computation():
    batches = _batches()
    out = evaluate(lambda x: x, batches)  # the "model" passes the logits through
    n = sum(len(y) for _, y in batches)
    hits1, loss = _reference(batches, 1)
    hits5, _ = _reference(batches, 5)
    assert out["samples"] == n == 21
    assert out["top1"] == pytest.approx(hits1 / n, abs=0)
    assert out["top5"] == pytest.approx(hits5 / n, abs=0)
    assert out["loss"] == pytest.approx(loss / n, rel=1e-5)
    assert out["seconds"] >= 0


def test_evaluate_stops_after_max_batches_and_takes_numpy_logits():
    batches = _batches(4)
    out = evaluate(lambda x: x.numpy().astype(np.float64), batches, max_batches=2)
    hits1, loss = _reference(batches[:2], 1)
    assert out["samples"] == 14
    assert out["top1"] == pytest.approx(hits1 / 14, abs=0)
    assert out["loss"] == pytest.approx(loss / 14, rel=1e-5)


def test_evaluate_puts_a_module_in_eval_mode_and_handles_an_empty_loader():
    lin = torch.nn.Linear(10, 10)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(10))
        lin.bias.zero_()
    drop = torch.nn.Sequential(torch.nn.Dropout(0.9), lin).train()
    batches = _batches(2)
    out = evaluate(drop, batches)
    assert not drop.training  # dropout off: the identity layer gives the logits back exactly
    assert out["top1"] == pytest.approx(_reference(batches, 1)[0] / 14, abs=0)
    empty = evaluate(lambda x: x, [])
    assert (empty["samples"], empty["top1"], empty["loss"]) == (0, 0.0, 0.0)
