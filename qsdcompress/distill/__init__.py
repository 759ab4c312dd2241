"""Distillation for quantization-aware finetuning (docs/method.md §5).

* Teachers: the counterpart ANN of the student's topology (``ann``), any timm model by name or
  short alias (``vit_base``, ``deit_small``, ``caformer_b36``, ...), a bundled ViT (``vit_digits``,
  ``vit_fmnist``) or a ``.qsd`` file. A teacher is frozen, in eval mode, and gets the batch
  re-sized and re-normalised to its own input configuration. It is never silently random: without
  weights (and offline) it is an error. A timm checkpoint of another image size, class count or
  depth is rebuilt as saved (:func:`checkpoint_model_args`) and runs at the size it was trained at.
* Fine-grained distillation (FGD): token-similarity matrices of the student's q/k/v spikes (after
  IE-LIF) against the teacher's attention projections, which do not depend on channel width.
* Logit KD: ``tau^2 * KL(p_teacher^tau || p_student^tau)``.
"""
from .capture import QKVCapture, resize_tokens, tokens_from_spikes
from .losses import fgd_loss, kd_loss, layer_map, similarity
from .teachers import (BUNDLED_VITS, TEACHER_ALIASES, Teacher, build_vit_digits, bundled_entry,
                       checkpoint_model_args, counterpart_ann, load_teacher, resolve_teacher_name, timm_data_config,
                       timm_teacher)

__all__ = [
    "Teacher", "QKVCapture", "load_teacher", "counterpart_ann", "timm_teacher",
    "build_vit_digits", "bundled_entry", "BUNDLED_VITS",
    "resolve_teacher_name", "similarity", "layer_map",
    "fgd_loss", "kd_loss", "tokens_from_spikes", "resize_tokens", "TEACHER_ALIASES",
    "checkpoint_model_args", "timm_data_config",
]
