"""The mathematics of aligndistil as pure tensor functions, one module per paper family.

Every loss takes tensors already aligned to response tokens (see
:func:`aligndistil.model.outputs.align_to_response`): per-token logits ``(B, T, V)`` or label
log-probs ``(B, T)``, label ids ``(B, T)`` and a response mask ``(B, T)``. Each returns
``(losses, metrics)`` with ``losses`` of shape ``(B,)``, never reduced, so that the caller
normalises with a global count (:mod:`.reductions`); metrics are detached.
"""

from aligndistil.losses.aligndistil import (
    adaptive_alpha,
    aligndistil_loss,
    aligndistil_loss_from_token_kl,
    aligndistil_teacher_logits,
    contrastive_alpha,
    vanilla_alpha,
)
from aligndistil.losses.dpo import dpo_loss, dpop_loss, ipo_loss, kto_loss, sequence_logps, simpo_loss
from aligndistil.losses.reductions import sequence_mean, token_mean
from aligndistil.losses.sparsepo import SparsePOMask, mapo_mask, mask_sparsity, sparsepo_loss, sparsepo_loss_from_stats
from aligndistil.losses.tdpo import tdpo_loss, token_level_dpo_from_stats

__all__ = [
    "adaptive_alpha", "aligndistil_loss", "aligndistil_loss_from_token_kl", "aligndistil_teacher_logits",
    "contrastive_alpha", "vanilla_alpha",
    "dpo_loss", "dpop_loss", "ipo_loss", "kto_loss", "sequence_logps", "simpo_loss",
    "sequence_mean", "token_mean",
    "SparsePOMask", "mapo_mask", "mask_sparsity", "sparsepo_loss", "sparsepo_loss_from_stats",
    "tdpo_loss", "token_level_dpo_from_stats",
]
