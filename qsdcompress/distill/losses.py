"""The distillation losses: fine-grained distillation of token similarities and logit KD
(docs/method.md §5)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import QsdError
from .capture import grid_of, resize_tokens


def similarity(x: torch.Tensor) -> torch.Tensor:
    """``G(X) = row_l2_normalise(X X^T)`` for ``X`` of shape ``(B, N, C)`` -> ``(B, N, N)``."""
    x = x.float()
    return F.normalize(x @ x.transpose(1, 2), p=2, dim=-1)


def layer_map(num_student: int, num_teacher: int, override: Sequence[int] | None = None) -> list[int]:
    """Teacher layer for each student layer: ``m(l) = round((l + 1) L_A / L_S) - 1`` (round half up).

    ``override`` (``--fgd-layers``) gives the teacher index of every student layer explicitly.
    """
    if override is not None and len(override) > 0:
        override = [int(v) for v in override]
        if len(override) != num_student:
            raise QsdError(f"--fgd-layers has {len(override)} entries; the student has {num_student} "
                           f"attention blocks")
        bad = [v for v in override if not 0 <= v < num_teacher]
        if bad:
            raise QsdError(f"--fgd-layers {bad}: the teacher has attention layers 0..{num_teacher - 1}")
        return override
    out = []
    for l in range(num_student):
        m = math.floor((l + 1) * num_teacher / num_student + 0.5) - 1
        out.append(min(max(m, 0), num_teacher - 1))
    return out


def fgd_loss(student: Sequence[dict[str, torch.Tensor]], teacher: Sequence[dict[str, torch.Tensor]],
             mapping: Sequence[int], student_grid: tuple[int, int] | None = None,
             teacher_grids: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """``mean_{l, z in q,k,v} ||G(z_s^l) - G(z_A^m(l))||_F^2 / N`` (also averaged over the batch).

    Teacher tokens on another grid are resized bilinearly to the student grid first.
    """
    terms = []
    for l, feats in enumerate(student):
        tf = teacher[mapping[l]]
        for z in ("q", "k", "v"):
            s, t = feats[z], tf[z].detach()
            n = s.shape[1]
            if t.shape[1] != n:
                src = teacher_grids[mapping[l]] if teacher_grids is not None else grid_of(t.shape[1])
                dst = student_grid if student_grid is not None else grid_of(n)
                t = resize_tokens(t, src, dst)
            d = similarity(s) - similarity(t)
            terms.append(d.pow(2).sum(dim=(1, 2)).mean() / n)
    if not terms:
        raise QsdError("FGD found no student attention layers")
    return torch.stack(terms).mean()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """``tau^2 * KL(p_teacher^tau || p_student^tau)``, averaged over the batch."""
    log_ps = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_pt = F.log_softmax(teacher_logits.float().detach() / tau, dim=-1)
    return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True) * tau * tau
