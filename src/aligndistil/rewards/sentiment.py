"""The built-in sentiment reward: VADER's compound score of the response.

This is the ground truth of the papers' controlled sentiment experiments (TDPO Fig. 3,
SparsePO Fig. 2): steer a model toward positive sentiment and measure it with a fixed
classifier. Registered as the reward spec ``"vader"`` (:mod:`aligndistil.rewards.specs`).
"""

from __future__ import annotations

__all__ = ["VaderReward"]


class VaderReward:
    """VADER compound sentiment of the response, in ``[-1, 1]`` (prompt ignored).

    The VADER lexicon ships inside the ``vaderSentiment`` wheel, so this works offline.
    The package is imported when the reward is built, not when this module is, so the
    rest of aligndistil does not depend on it.
    """

    name = "vader"

    def __init__(self) -> None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as exc:
            raise ImportError(
                "The 'vader' reward needs the vaderSentiment package; install it with "
                "'pip install vaderSentiment' (or 'pip install aligndistil[eval]')."
            ) from exc
        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [float(self._analyzer.polarity_scores(r)["compound"]) for r in responses]
