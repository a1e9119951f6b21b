"""Rewards for the online-method tests, named as ``module:function`` specs (``_online_rewards:vowels``).

The tiny model writes random characters, so VADER scores almost every sample 0 and PPO would
see no signal; ``vowels`` gives every sample a different score. The others are broken on
purpose: each must stop a run with a clear error.
"""

from __future__ import annotations


def vowels(prompts, responses):
    """The share of vowels in each response (0 for an empty one)."""
    return [sum(c in "aeiou" for c in r) / max(1, len(r)) for r in responses]


def nan(prompts, responses):
    return [float("nan")] * len(responses)


def not_a_number(prompts, responses):
    return ["good"] * len(responses)


def one_short(prompts, responses):
    return [0.0] * (len(responses) - 1)


def zero(prompts, responses):
    """0 for every response: what PPO's score is then is only ``missing_eos_penalty``'s doing."""
    return [0.0] * len(responses)
