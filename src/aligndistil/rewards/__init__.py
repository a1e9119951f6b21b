"""Pluggable ground-truth rewards on (prompt, response) text.

:mod:`~aligndistil.rewards.specs` turns a reward spec (``"vader"``, ``"bt:<folder>"``,
``"module:function"``) into a checked callable ``(prompts, responses) -> list[float]``;
:mod:`~aligndistil.rewards.sentiment` holds the built-in VADER reward and
:mod:`~aligndistil.rewards.bradley_terry` the trainable Bradley-Terry reward model.
"""

from aligndistil.rewards.specs import (  # noqa: F401
    BT_PREFIX,
    BUILTIN_REWARDS,
    CheckedReward,
    RewardError,
    RewardFn,
    get_reward,
    resolve_callable,
)
from aligndistil.rewards.sentiment import VaderReward  # noqa: F401

__all__ = [
    "RewardFn",
    "RewardError",
    "VaderReward",
    "CheckedReward",
    "BT_PREFIX",
    "BUILTIN_REWARDS",
    "get_reward",
    "resolve_callable",
]
