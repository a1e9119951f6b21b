"""Reward specs: spec strings to checked reward callables.

A reward here is the yardstick a run is judged by (and, for on-policy methods, the
signal that ranks sampled responses): any callable
``(prompts: list[str], responses: list[str]) -> list[float]`` returning one finite score
per pair. :func:`get_reward` turns a spec string into such a callable: ``"vader"`` is the
built-in sentiment reward (:mod:`aligndistil.rewards.sentiment`), ``"bt:<folder>"`` a
Bradley-Terry reward model trained by ``aligndistil train-rm``
(:mod:`aligndistil.rewards.bradley_terry`), and ``"package.module:function"`` names any user
callable. Whatever comes back is wrapped (:class:`CheckedReward`) so that a reward that
raises, returns the wrong number of scores, or returns NaN/inf fails loudly with its own
name in the message, instead of silently poisoning a training run.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from typing import Callable, Protocol, Sequence, runtime_checkable

from aligndistil.errors import AlignDistilError
from aligndistil.rewards.sentiment import VaderReward

__all__ = [
    "RewardFn",
    "RewardError",
    "CheckedReward",
    "BT_PREFIX",
    "BUILTIN_REWARDS",
    "get_reward",
    "resolve_callable",
]


@runtime_checkable
class RewardFn(Protocol):
    """Scores a batch: ``fn(prompts, responses)`` returns one float per pair."""

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]: ...


class RewardError(AlignDistilError, RuntimeError):
    """A reward callable raised; the message names the reward and the original error."""


#: Prefix of a Bradley-Terry reward model spec: ``bt:<folder>`` (see :mod:`aligndistil.rewards.bradley_terry`).
BT_PREFIX = "bt:"

#: Built-in rewards by spec name; each value builds a fresh reward callable.
BUILTIN_REWARDS: dict[str, Callable[[], RewardFn]] = {
    "vader": VaderReward,
}


class CheckedReward:
    """Wraps a reward so misuse and bad output fail loudly with the reward's name.

    Checks that prompts and responses pair up, turns an exception inside the reward
    into :class:`RewardError`, and rejects outputs of the wrong length or with
    non-finite or non-numeric entries (``ValueError``). Scores come back as plain floats.
    """

    def __init__(self, fn: RewardFn, name: str) -> None:
        self.fn = fn
        self.name = name

    def __repr__(self) -> str:
        return f"CheckedReward({self.name!r})"

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        prompts, responses = list(prompts), list(responses)
        if len(prompts) != len(responses):
            raise ValueError(
                f"reward {self.name!r} got {len(prompts)} prompts but {len(responses)} responses"
            )
        try:
            scores = self.fn(prompts, responses)
        except Exception as exc:
            raise RewardError(
                f"reward {self.name!r} raised {type(exc).__name__}: {exc}"
            ) from exc
        try:
            scores = list(scores)
        except TypeError:
            raise ValueError(
                f"reward {self.name!r} returned {type(scores).__name__}, not a list of floats"
            ) from None
        if len(scores) != len(responses):
            raise ValueError(
                f"reward {self.name!r} returned {len(scores)} scores for {len(responses)} responses"
            )
        out: list[float] = []
        for i, score in enumerate(scores):
            # float() also accepts numpy scalars and 0-d tensors; bools and strings are
            # almost certainly bugs in the reward, so they are rejected.
            if isinstance(score, (bool, str, bytes)):
                raise ValueError(
                    f"reward {self.name!r} returned {score!r} (a {type(score).__name__}) "
                    f"at index {i}; expected a float"
                )
            try:
                value = float(score)
            except (TypeError, ValueError):
                raise ValueError(
                    f"reward {self.name!r} returned {score!r} at index {i}; expected a float"
                ) from None
            if not math.isfinite(value):
                raise ValueError(
                    f"reward {self.name!r} returned a non-finite score ({value}) at index {i}"
                )
            out.append(value)
        return out


def _add_cwd_to_path() -> None:
    """Put the working directory on ``sys.path``, as ``python -m`` does.

    The installed ``aligndistil`` script's ``sys.path`` starts with the script's own folder,
    not the working directory, so ``my_rewards:score`` beside the user's data would not
    import without ``PYTHONPATH=.``. (This is also why a ``module:function`` reward in a
    config runs code from the folder the command is started in: see the README.)
    """
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


def resolve_callable(spec: str) -> Callable:
    """Import ``"package.module:attr"`` (``attr`` may be dotted) and return the object.

    The module is looked up on ``sys.path`` with the working directory added (as
    ``python -m`` does), so a reward module in the current folder imports under the
    installed ``aligndistil`` command too.

    Raises:
        ValueError: the spec is malformed, the module cannot be imported, the
            attribute does not exist, or the object is not callable.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(f"reward spec {spec!r} is not of the form 'module:function'")
    _add_cwd_to_path()
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"reward spec {spec!r}: cannot import module {module_name!r}: {exc} "
            f"(searched sys.path and the working directory {os.getcwd()})"
        ) from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(
                f"reward spec {spec!r}: {module_name!r} has no attribute {attr_path!r}"
            ) from None
    if not callable(obj):
        raise ValueError(f"reward spec {spec!r} names a {type(obj).__name__}, not a callable")
    return obj


def get_reward(spec: str | RewardFn) -> CheckedReward:
    """Return the checked reward callable for ``spec``.

    Args:
        spec: a built-in name (``"vader"``), ``"bt:<folder>"`` (a reward model trained by
            ``aligndistil train-rm``), a ``"module:function"`` string naming a callable
            ``(prompts, responses) -> list[float]``, or such a callable itself.

    Returns:
        A :class:`CheckedReward` wrapping it.

    Raises:
        ValueError: the spec names nothing usable (the message lists the built-ins).
    """
    if callable(spec) and not isinstance(spec, str):
        name = getattr(spec, "name", None) or getattr(spec, "__qualname__", None)
        return CheckedReward(spec, name or type(spec).__name__)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward spec must be a non-empty string or a callable, got {spec!r}")
    spec = spec.strip()
    if spec in BUILTIN_REWARDS:
        return CheckedReward(BUILTIN_REWARDS[spec](), spec)
    # Prefixed specs for rewards that load a model belong here, before the generic
    # module:function case, since their prefix would otherwise be taken for a module name.
    if spec.startswith(BT_PREFIX):
        folder = spec[len(BT_PREFIX):]
        if not folder:
            raise ValueError(f"reward spec {spec!r}: give the reward model folder, e.g. 'bt:outputs/rm'")
        from aligndistil.rewards.bradley_terry import BTReward

        return CheckedReward(BTReward(folder), spec)
    if ":" in spec:
        return CheckedReward(resolve_callable(spec), spec)
    raise ValueError(
        f"unknown reward {spec!r}; use one of {sorted(BUILTIN_REWARDS)} or "
        "'module:function' naming a callable (prompts, responses) -> list[float]"
    )
