"""Preference data from a model and a reward: ``aligndistil make-prefs``.

For every prompt, sample ``k`` responses from a model, score them with a ground-truth
reward (:func:`aligndistil.rewards.get_reward`), and keep the best as ``chosen`` and the
worst as ``rejected``. A prompt is skipped (and counted) when its best and worst scores
differ by less than ``tie_threshold`` (a near-tie carries no reliable preference), when
fewer than two of its responses are non-empty, or when best and worst are the same text.
An exact tie is skipped whatever the threshold.

The JSONL file holds one ``{prompt, chosen, rejected, chosen_reward, rejected_reward}``
record per line; the prompt is written as a one-message chat (``[{"role": "user", ...}]``)
when the chat template was used, so that training renders exactly the prompt the responses
were sampled for. Beside it, ``<name>.meta.json`` records the model, the reward, the seed,
the generation settings and the counts. Both are written to temporary files and renamed
into place, the sidecar last: a file set with a sidecar is complete, and an interrupted run
leaves no file that looks complete (:func:`prefs_complete`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from aligndistil.fileio import atomic_write_text
from aligndistil.errors import AlignDistilError

__all__ = ["PrefsError", "PrefsSettings", "make_prefs", "meta_path", "prefs_complete", "prefs_settings"]

META_SUFFIX = ".meta.json"


class PrefsError(AlignDistilError, RuntimeError):
    """make-prefs could not produce a data set; nothing that looks complete was written."""


def meta_path(out: str | os.PathLike) -> Path:
    """The sidecar of a preference file: ``prefs.jsonl`` -> ``prefs.meta.json``."""
    out = Path(out)
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(stem + META_SUFFIX)


def prefs_settings(
    model: str, prompts: str | list[str], reward: str, *, k: int, max_new_tokens: int, temperature: float,
    top_p: float, seed: int, tie_threshold: float, max_prompts: int | None, use_chat_template: bool,
) -> dict:
    """Everything that decides a preference file's content (and its fingerprint)."""
    if isinstance(prompts, str):
        prompt_source = prompts
    else:
        prompt_source = "sha256:" + hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]
    return {
        "model": str(model), "prompts": prompt_source, "reward": str(reward), "k": int(k),
        "max_new_tokens": int(max_new_tokens), "temperature": float(temperature), "top_p": float(top_p),
        "seed": int(seed), "tie_threshold": float(tie_threshold), "max_prompts": max_prompts,
        "use_chat_template": bool(use_chat_template),
    }


def _fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def prefs_complete(out: str | os.PathLike, settings: dict | None = None) -> bool:
    """True if ``out`` and its sidecar are a finished make-prefs output (of ``settings``)."""
    out, meta = Path(out), meta_path(out)
    if not (out.is_file() and meta.is_file()):
        return False
    try:
        info = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if settings is not None and info.get("fingerprint") != _fingerprint(settings):
        return False
    n_lines = sum(1 for line in out.read_text().splitlines() if line.strip())
    return n_lines == info.get("counts", {}).get("n_pairs")


@dataclass(frozen=True)
class PrefsSettings:
    """How pairs are made (the flags of ``aligndistil make-prefs``).

    Attributes:
        reward: a reward spec for :func:`aligndistil.rewards.get_reward`.
        k: responses sampled per prompt (>= 2).
        max_new_tokens, temperature, top_p: generation settings.
        seed: the sampling seed (each sample has its own stream; see
            :func:`aligndistil.model.sampling.sample_with_logprobs`).
        tie_threshold: skip a prompt when ``|best - worst| < tie_threshold``.
        max_prompts: use only the first N prompts.
        batch_size: samples generated together (never changes the pairs).
        use_chat_template: render prompts as one user message with the chat template.
    """

    reward: str = "vader"
    k: int = 2
    max_new_tokens: int = 40
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    tie_threshold: float = 0.05
    max_prompts: int | None = None
    batch_size: int = 32
    use_chat_template: bool = True

    def check(self) -> None:
        """Raise ValueError on settings that cannot make pairs."""
        if self.k < 2:
            raise ValueError(f"k must be at least 2 (best vs worst), got {self.k}")
        if self.tie_threshold < 0:
            raise ValueError(f"tie_threshold must be >= 0, got {self.tie_threshold}")
        if self.max_prompts is not None and self.max_prompts <= 0:
            raise ValueError(f"max_prompts must be > 0, got {self.max_prompts}")

    def fingerprinted(self, model: str, prompts: str | list[str]) -> dict:
        """The settings that decide the file's content (:func:`prefs_settings`; no batch size)."""
        return prefs_settings(model, prompts, self.reward, k=self.k, max_new_tokens=self.max_new_tokens,
                              temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                              tie_threshold=self.tie_threshold, max_prompts=self.max_prompts,
                              use_chat_template=self.use_chat_template)


def make_prefs(model: str, prompts: str | list[str], out: str | os.PathLike, settings: PrefsSettings | None = None,
               *, progress: bool = True, skip_if_complete: bool = False, device: str = "auto", log=print,
               **fields) -> dict:
    """Sample, score and pair responses; write ``out`` (JSONL) and its sidecar.

    Args:
        model: a local HF folder, a hub id, or ``smollm2``.
        prompts: a prompt file, a shipped set (``sentiment:train``), or a list of prompts.
        out: the JSONL file to write.
        settings: a :class:`PrefsSettings`. Its fields can also be given as keywords
            (``reward=..., k=...``, as the CLI does); they override ``settings``.
        progress: show a progress bar; ``log``: where the summary line goes.
        skip_if_complete: return the existing sidecar if ``out`` is complete with the same
            settings.
        device: where the model samples (``auto``: the first CUDA GPU if there is one, else
            the CPU; :func:`aligndistil.model.loading.resolve_device`). Recorded in the sidecar,
            not in the fingerprint: the pairs are meant to be the same, though a GPU's
            arithmetic can change an occasional draw.

    Returns:
        The sidecar's content: ``settings``, ``fingerprint``, ``counts`` (``n_prompts``,
        ``n_samples``, ``n_pairs``, ``n_ties``, ``n_too_few``, ``n_identical``), the mean
        reward of all samples with its 95% interval, and ``seconds``.

    Raises:
        PrefsError: no pair survived, or the reward failed (the message names the reward
            and the prompts being scored); nothing is written in either case.
        ValueError, PromptFileError, ModelLoadError: bad arguments, prompt file or model.
        TypeError: a keyword that is not a :class:`PrefsSettings` field.
    """
    from aligndistil.data.prompt_sets import load_prompts
    from aligndistil.rewards import get_reward
    from aligndistil.model.loading import resolve_device
    from aligndistil.workflows.eval_metrics import mean_ci95

    s = dataclasses.replace(settings, **fields) if settings is not None else PrefsSettings(**fields)
    s.check()
    dev = resolve_device(device)
    out = Path(out)
    fingerprinted = s.fingerprinted(model, prompts)
    if skip_if_complete and prefs_complete(out, fingerprinted):
        log(f"[make-prefs] {out}: complete with the same settings, skipped")
        return json.loads(meta_path(out).read_text())
    prompt_list = load_prompts(prompts) if isinstance(prompts, (str, os.PathLike)) else list(prompts)
    if s.max_prompts is not None:
        prompt_list = prompt_list[:s.max_prompts]
    scorer = _Scorer(get_reward(s.reward), out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta_path(out).unlink(missing_ok=True)  # from here on, the old output no longer looks complete

    started = time.time()
    samples = _sample(model, prompt_list, s, scorer, progress, device=dev)
    for r in samples:
        r["reward"] = scorer.scores[(r["prompt_index"], r["sample_index"])]
    lines, counts = _pair(samples, prompt_list, s)
    if not lines:
        raise PrefsError(
            f"make-prefs: no pair survived ({counts['n_ties']} ties below {s.tie_threshold}, "
            f"{counts['n_too_few']} prompts with fewer than 2 non-empty responses, {counts['n_identical']} "
            f"identical); nothing was written to {out}. Use more prompts, a larger k or a lower --tie-threshold."
        )
    mean, half = mean_ci95([r["reward"] for r in samples])
    info = {
        "settings": fingerprinted,
        "fingerprint": _fingerprint(fingerprinted),
        "counts": counts,
        "sample_reward": {"mean": mean, "ci95": half if math.isfinite(half) else None},
        "mean_response_tokens": sum(r["n_tokens"] for r in samples) / len(samples),
        "share_ended_with_eos": sum(r["ended"] for r in samples) / len(samples),
        "seconds": round(time.time() - started, 1),
        "device": str(dev),
        "data": out.name,
    }
    _write(out, lines, info)
    log(f"[make-prefs] {out}: {counts['n_pairs']} pairs from {counts['n_prompts']} prompts x {s.k} samples "
        f"({counts['n_ties']} ties, {counts['n_too_few']} too few, {counts['n_identical']} identical skipped); "
        f"sample reward {mean:+.3f} +- {half:.3f}; {info['seconds']} s")
    return info


def _sample(model: str, prompt_list: list[str], s: PrefsSettings, scorer, progress: bool, device=None) -> list[dict]:
    """Sample: ``k`` responses per prompt, each on its own seeded stream; every batch is
    scored as soon as it is decoded (``scorer``), so a failing reward stops the run early."""
    from aligndistil.model.loading import load_causal_lm, load_tokenizer
    from aligndistil.model.sampling import generate_texts

    tokenizer = load_tokenizer(model)
    lm = load_causal_lm(model, device=device)
    return generate_texts(lm, tokenizer, prompt_list, num_samples=s.k, max_new_tokens=s.max_new_tokens,
                          temperature=s.temperature, top_p=s.top_p, seed=s.seed, batch_size=s.batch_size,
                          use_chat_template=s.use_chat_template, progress=progress, desc="make-prefs",
                          on_batch=scorer)


class _Scorer:
    """Score: the reward of each sample, by ``(prompt index, sample index)``."""

    def __init__(self, reward_fn, out: Path):
        self.reward_fn, self.out = reward_fn, out
        self.scores: dict[tuple[int, int], float] = {}

    def __call__(self, batch: list[dict]) -> None:
        first, last = batch[0]["prompt_index"], batch[-1]["prompt_index"]
        try:
            values = self.reward_fn([r["prompt"] for r in batch], [r["response"] for r in batch])
        except Exception as e:  # RewardError, or ValueError for NaN / wrong count
            raise PrefsError(f"make-prefs: scoring the responses to prompts {first}-{last} failed: {e}; "
                             f"nothing was written to {self.out}") from e
        for r, v in zip(batch, values):
            self.scores[(r["prompt_index"], r["sample_index"])] = v


def _pair(samples: list[dict], prompt_list: list[str], s: PrefsSettings) -> tuple[list[str], dict]:
    """Pair: best vs worst non-empty response per prompt, as JSONL lines, with the counts of
    prompts skipped (too few responses, a tie below ``tie_threshold``, identical texts)."""
    by_prompt: dict[int, list[dict]] = {}
    for r in samples:
        by_prompt.setdefault(r["prompt_index"], []).append(r)
    counts = {"n_prompts": len(prompt_list), "n_samples": len(samples), "n_pairs": 0,
              "n_ties": 0, "n_too_few": 0, "n_identical": 0}
    lines = []
    for i, rows in sorted(by_prompt.items()):
        rows = [r for r in rows if r["response"]]
        if len(rows) < 2:
            counts["n_too_few"] += 1
            continue
        # Stable: among equal scores the earlier sample wins "best" and the later "worst".
        best = max(rows, key=lambda r: r["reward"])
        worst = min(reversed(rows), key=lambda r: r["reward"])
        gap = best["reward"] - worst["reward"]
        if gap <= 0 or gap < s.tie_threshold:  # an exact tie is never a preference
            counts["n_ties"] += 1
            continue
        if best["response"] == worst["response"]:
            counts["n_identical"] += 1
            continue
        prompt = [{"role": "user", "content": prompt_list[i]}] if s.use_chat_template else prompt_list[i]
        lines.append(json.dumps({"prompt": prompt, "chosen": best["response"], "rejected": worst["response"],
                                 "chosen_reward": best["reward"], "rejected_reward": worst["reward"]},
                                ensure_ascii=False))
    counts["n_pairs"] = len(lines)
    return lines, counts


def _write(out: Path, lines: list[str], info: dict) -> None:
    """Write: the pairs, then the sidecar (last: a sidecar marks the output complete)."""
    atomic_write_text(out, "\n".join(lines) + "\n")
    atomic_write_text(meta_path(out), json.dumps(info, indent=2) + "\n")
