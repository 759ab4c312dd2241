"""Quantization-aware finetuning with distillation (``qsdcompress finetune``).

* ``loop``: the run (:func:`run_finetune`, :func:`finetune`): setup, one epoch, validation,
  keeping the best model.
* ``checkpoint``: bit-exact, pickle-free resumable checkpoints.
* ``optim``: parameter groups, optimizer and schedule.
* ``distributed``: torchrun / DDP.
"""
from .checkpoint import (CHECKPOINT_NAME, checkpoint_options, checkpoint_path, load_checkpoint, rng_state,
                         save_checkpoint, set_rng_state)
from .distributed import DistInfo, init_distributed
from .loop import LOSS_PARTS, Run, compute_losses, finetune, run_finetune, train_one_epoch, validate
from .optim import build_optimizer, build_scheduler, is_quant_param, param_groups

__all__ = ["finetune", "run_finetune", "compute_losses", "train_one_epoch", "validate", "Run", "init_distributed",
           "DistInfo", "param_groups", "build_optimizer", "build_scheduler", "save_checkpoint", "load_checkpoint",
           "checkpoint_path", "checkpoint_options", "rng_state", "set_rng_state", "is_quant_param",
           "CHECKPOINT_NAME", "LOSS_PARTS"]
