"""The mathematics of aligndistil as pure tensor functions, one module per paper family.

Every loss takes tensors already aligned to response tokens (see
:func:`aligndistil.model.outputs.align_to_response`): per-token logits ``(B, T, V)`` or label
log-probs ``(B, T)``, label ids ``(B, T)`` and a response mask ``(B, T)``. Each returns
``(losses, metrics)`` with ``losses`` of shape ``(B,)``, never reduced, so that the caller
normalises with a global count (:mod:`.reductions`); metrics are detached.

The room:

- :mod:`.ops`: the per-token formulas every loss shares (label log-probs, token KL, TVD,
  AlignDistil's ``alpha`` and teacher logits), each written once;
- :mod:`.dpo` (DPO family, on label log-probs), :mod:`.tdpo`, :mod:`.sparsepo`,
  :mod:`.aligndistil`: one module per paper. The token-level ones have two layers: a
  STATISTICS PRODUCER (per-token log-probs / KL / alpha) and a ``*_from_stats`` function
  that holds the loss's validation and composition once. The public ``tdpo_loss``,
  ``sparsepo_loss`` and ``aligndistil_loss`` are the plain producer followed by it;
- :mod:`.fused`: producers of the same statistics from hidden states and head weights,
  chunk by chunk, never ``(B, T, V)`` (what training uses by default);
- :mod:`.online` (KL estimators, token rewards, GAE, whitening), :mod:`.ppo` (PPO's clipped
  losses, also RTO's) and :mod:`.reinforce` (AlignDistil App. E's REINFORCE baselines): the
  online methods' formulas (docs/online-rl.md);
- :mod:`.reductions` (exact means under accumulation and data parallelism) and
  :mod:`.checks` (argument validation).
"""

from aligndistil.losses.aligndistil import (
    aligndistil_loss,
    aligndistil_loss_from_stats,
    aligndistil_teacher_logits,
    aligndistil_token_stats,
    kl_row_weight,
)
from aligndistil.losses.dpo import dpo_loss, dpop_loss, ipo_loss, kto_loss, sequence_logps, simpo_loss
from aligndistil.losses.ops import adaptive_alpha, alpha_from_tvd, contrastive_alpha, vanilla_alpha
from aligndistil.losses.online import (
    gae_advantages,
    kl_estimate,
    kl_full,
    kl_k1,
    kl_k3,
    log_ratio_token_reward,
    masked_whiten,
    token_rewards,
)
from aligndistil.losses.ppo import ppo_policy_loss, ppo_value_loss
from aligndistil.losses.reductions import sequence_mean, token_mean
from aligndistil.losses.reinforce import (
    reward_to_go,
    sequence_baseline,
    sequence_reinforce_loss,
    sequence_reinforce_loss_from_stats,
    token_reinforce_loss,
    token_reinforce_loss_from_stats,
)
from aligndistil.losses.sparsepo import SparsePOMask, mapo_mask, mask_sparsity, sparsepo_loss, sparsepo_loss_from_stats
from aligndistil.losses.tdpo import pair_token_stats, tdpo_loss, tdpo_loss_from_stats, token_level_dpo_from_stats

__all__ = [
    "adaptive_alpha", "alpha_from_tvd", "aligndistil_loss", "aligndistil_loss_from_stats", "aligndistil_teacher_logits",
    "aligndistil_token_stats", "contrastive_alpha", "kl_row_weight", "vanilla_alpha",
    "dpo_loss", "dpop_loss", "ipo_loss", "kto_loss", "sequence_logps", "simpo_loss",
    "sequence_mean", "token_mean",
    "SparsePOMask", "mapo_mask", "mask_sparsity", "sparsepo_loss", "sparsepo_loss_from_stats",
    "pair_token_stats", "tdpo_loss", "tdpo_loss_from_stats", "token_level_dpo_from_stats",
    "gae_advantages", "kl_estimate", "kl_full", "kl_k1", "kl_k3", "log_ratio_token_reward", "masked_whiten",
    "token_rewards", "ppo_policy_loss", "ppo_value_loss",
    "reward_to_go", "sequence_baseline", "sequence_reinforce_loss", "sequence_reinforce_loss_from_stats",
    "token_reinforce_loss", "token_reinforce_loss_from_stats",
]
