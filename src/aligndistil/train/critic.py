"""PPO's critic: a value model beside the policy, trained by the one loop as an extra module.

``V(s_t)`` for every response token ``t`` is a scalar head on the final hidden state of a
transformer body at the position that predicts token ``t`` (the state ``s_t = (x, y_<t)``,
the same one-position shift as the policy's logits, :mod:`aligndistil.model.outputs`).

Why a separate model and not a value head on the policy's body: with a shared body the value
loss and the policy loss pull on the same weights, and their relative scale (``vf_coef``)
then decides how much the critic's regression distorts the policy; a separate model keeps
the two losses apart, at the cost of a second body's memory. OpenRLHF does the same (a
critic model with its own optimizer), and its critic starts from the reward model, which
already maps a state to a score; ``method.critic_init=bt:DIR`` does that here, and
``policy`` (the default) copies the policy's body with a zero head, so that every value
starts at 0.

The critic is returned by :func:`make_critic` as ``{"critic": ValueModel}``
(``Method.make_modules``), so the loop gives it its own optimizer group (learning rate
``method.critic_learning_rate``, no weight decay, as TRL's value model), saves it and its
optimizer state in every checkpoint and restores both on resume, and writes
``critic.safetensors`` beside the final policy.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from aligndistil.model.outputs import gather_positions, position_ids_from_mask, response_positions, unwrap
from aligndistil.rewards.specs import BT_PREFIX

__all__ = ["CRITIC", "ValueModel", "make_critic"]

#: The critic's name among a method's extra modules (``StepContext.modules``).
CRITIC = "critic"


class ValueModel(nn.Module):
    """A transformer body (an HF base model, no LM head) and a linear scalar head.

    Args:
        body: e.g. ``LlamaModel``; called with ``input_ids``, ``attention_mask``,
            ``position_ids`` and returning ``last_hidden_state``.
        head: an ``nn.Linear(hidden_size, 1)``, or None for a zero-initialised one.
    """

    def __init__(self, body: nn.Module, head: nn.Linear | None = None):
        super().__init__()
        self.body = body
        if head is None:
            head = nn.Linear(body.config.hidden_size, 1)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.head = head
        #: What the training loop puts in this module's optimizer group.
        self.optimizer_options: dict = {"weight_decay": 0.0}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` packed ``[prompt ; response]`` -> values ``(B, T)`` aligned to response tokens.

        Column ``t`` is ``V(s_t)``, read at the position whose output predicts response token
        ``t`` (:func:`aligndistil.model.outputs.response_positions`); columns past a row's
        length hold values of padding positions, to be masked by the caller.
        """
        positions, _, _ = response_positions(input_ids, response_mask)
        h = self.body(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
        return self.head(gather_positions(h, positions).float()).squeeze(-1)


def _policy_tokenizer(policy: nn.Module):
    from aligndistil.model.loading import load_tokenizer

    return load_tokenizer(unwrap(policy).name_or_path)


def _from_reward_model(policy: nn.Module, folder: str) -> ValueModel:
    """A critic initialised from a Bradley-Terry reward model; it must read the policy's token ids."""
    from aligndistil.model.loading import check_same_vocab
    from aligndistil.rewards.bradley_terry import load_reward_model

    rm, tok, _ = load_reward_model(folder)
    check_same_vocab(_policy_tokenizer(policy), tok, name_a="policy", name_b=f"method.critic_init ({folder})")
    pv = unwrap(policy).get_input_embeddings().weight.shape[0]
    rv = rm.body.get_input_embeddings().weight.shape[0]
    if pv != rv:
        raise ValueError(f"method.critic_init {folder}: its embedding has {rv} rows but the policy's has {pv}")
    return ValueModel(rm.body, rm.head)


def make_critic(policy: nn.Module, cfg) -> dict:
    """``{"critic": ValueModel}`` from ``cfg.critic_init`` (``policy`` or ``bt:DIR``), in float32.

    Raises:
        ValueError / ModelLoadError: an unknown ``critic_init``, a reward-model folder that
            is missing or incomplete, or one whose tokenizer is not the policy's (the critic
            reads the policy's token ids, so the vocabularies must be the same).
    """
    spec = cfg.critic_init
    if spec == "policy":
        # The policy's body as it is now (on resume the checkpoint's state replaces it).
        critic = ValueModel(copy.deepcopy(unwrap(policy).base_model))
    elif isinstance(spec, str) and spec.startswith(BT_PREFIX) and spec[len(BT_PREFIX):]:
        critic = _from_reward_model(policy, spec[len(BT_PREFIX):])
    else:
        raise ValueError(f"method.critic_init must be policy or bt:<reward model folder>, got {spec!r}")
    critic.to(torch.float32).requires_grad_(True)
    if cfg.critic_learning_rate is not None:
        critic.optimizer_options["lr"] = cfg.critic_learning_rate
    return {CRITIC: critic}
