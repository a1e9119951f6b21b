"""AlignDistil Table 2 in miniature: how often each reward ranks a held-out pair correctly.

Three rewards on the same held-out pairs (sampled from the initial model on the HELD-OUT
prompt split, labelled by the ground-truth reward, never trained on):

* the DPO implicit reward ``beta0 log pi_dpo(y|x)/pi_ref(y|x)`` (AlignDistil Eq. 6);
* the contrastive reward ``beta0 log pi_dpo(y|x)/pi_rev(y|x)`` (Eq. 12);
* a Bradley-Terry reward model (:mod:`aligndistil.rewards.bradley_terry`) trained on the
  study's training pairs.

The held-out split has 84 prompts and make-prefs keeps at most one pair (best against worst
of ``k`` samples) per prompt, so the study runs make-prefs once per seed of
``heldout_seeds`` and joins the files: several pairs per prompt, from independent samples.
Pairs of one prompt are not independent, so the difference contrastive - DPO is given with a
bootstrap over PROMPTS (:func:`aligndistil.workflows.frontier_report.paired_bootstrap_diff`);
each accuracy with a Wilson interval over pairs (:func:`.frontier_report.wilson_interval`),
which treats pairs as independent and is therefore a little narrow.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from aligndistil.fileio import atomic_write_text

__all__ = ["heldout_pairs", "reward_model", "run_table2", "score_pairs"]


def heldout_pairs(s, policy: str, progress: bool, log) -> Path:
    """``<out>/data/heldout.jsonl``: one make-prefs pass over the held-out prompts per seed, joined."""
    from aligndistil.workflows.make_prefs import make_prefs

    data = Path(s.out_dir) / "data"
    if s.tiny:  # the tiny model's samples are noise that VADER scores 0: use its synthetic pairs
        return Path(s.out_dir) / "tiny" / "prefs.jsonl"
    parts = []
    for seed in s.heldout_seeds:
        f = data / f"heldout-seed{seed}.jsonl"
        make_prefs(policy, s.eval_prompts, f, k=s.heldout_k, max_new_tokens=s.max_new_tokens, temperature=1.0,
                   seed=seed, tie_threshold=0.05, batch_size=s.eval_batch_size, progress=progress,
                   skip_if_complete=True, log=log)
        parts.append(f.read_text().strip())
    return atomic_write_text(data / "heldout.jsonl", "\n".join(p for p in parts if p) + "\n")


def reward_model(s, policy: str, train_pairs: Path, progress: bool, log) -> Path:
    """The Bradley-Terry reward model on the training pairs (skipped when trained with the same settings)."""
    from aligndistil.rewards.bradley_terry import MARKER, train_reward_model

    folder = Path(s.out_dir) / "reward_model"
    settings = {"steps": s.rm_steps, "learning_rate": 1e-5, "batch_size": 8, "max_length": s.max_length,
                "max_prompt_length": s.max_prompt_length, "seed": 0}
    marker = folder / MARKER
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("pairs") == str(train_pairs) and info.get("frontier_settings") == settings:
            log(f"[frontier] reward model: complete in {folder}, skipped")
            return folder
    train_reward_model(policy, train_pairs, folder, progress=progress, log=log, **settings)
    info = json.loads(marker.read_text())
    info["frontier_settings"] = settings
    atomic_write_text(marker, json.dumps(info, indent=2) + "\n")
    return folder


def _score(c: float, r: float) -> float:
    return 1.0 if c > r else 0.5 if c == r else 0.0


def score_pairs(pairs: Path, policy: str, dpo: str, rev: str, rm_folder: Path | None, beta0: float) -> dict:
    """Per pair: 1 (chosen ranked above rejected), 0.5 (tie) or 0, for each reward; and the prompts."""
    from aligndistil.data import load_records
    from aligndistil.model.loading import load_causal_lm, load_tokenizer
    from aligndistil.workflows.eval_metrics import implicit_rewards
    from aligndistil.workflows.evaluate import pair_logps

    tok = load_tokenizer(policy)
    lp = {role: pair_logps(load_causal_lm(path), pairs, tok) for role, path in
          (("ref", policy), ("dpo", dpo), ("rev", rev))}
    out = {}
    for key, den in (("dpo", "ref"), ("contrastive", "rev")):
        c = implicit_rewards(lp["dpo"][0], lp[den][0], beta0)
        r = implicit_rewards(lp["dpo"][1], lp[den][1], beta0)
        out[key] = [_score(a, b) for a, b in zip(c, r)]
    recs = [r.data for r in load_records(pairs)]
    if rm_folder is not None:
        from aligndistil.rewards.bradley_terry import BTReward

        rm = BTReward(rm_folder)
        prompts = [r["prompt"] for r in recs]
        text = [(r["chosen"] if isinstance(r["chosen"], str) else r["chosen"][-1]["content"],
                 r["rejected"] if isinstance(r["rejected"], str) else r["rejected"][-1]["content"]) for r in recs]
        c, r = rm(prompts, [t[0] for t in text]), rm(prompts, [t[1] for t in text])
        out["reward_model"] = [_score(a, b) for a, b in zip(c, r)]
    out["prompts"] = [json.dumps(r["prompt"], sort_keys=True) for r in recs]
    return out


def run_table2(s, policy: str, dpo: str, rev: str, train_pairs: Path, progress: bool, log) -> dict:
    """Held-out pairs, the reward model, the three accuracies with intervals (cached in ``<out>/table2.json``)."""
    from aligndistil.workflows.frontier_report import paired_bootstrap_diff, wilson_interval

    pairs = heldout_pairs(s, policy, progress, log)
    rm = reward_model(s, policy, train_pairs, progress, log)
    key = {"pairs_sha256": hashlib.sha256(pairs.read_bytes()).hexdigest(), "policy": policy, "dpo": dpo, "rev": rev,
           "rm": json.loads((rm / "reward_model.json").read_text()).get("seconds"), "beta0": s.beta0}
    cache = Path(s.out_dir) / "table2.json"
    if cache.is_file():
        done = json.loads(cache.read_text())
        if done.get("key") == key:
            log("[frontier] Table 2: complete, skipped")
            return done["table2"]
    scores = score_pairs(pairs, policy, dpo, rev, rm, s.beta0)
    n = len(scores["prompts"])
    rewards = {}
    for k in ("dpo", "contrastive", "reward_model"):
        if k in scores:
            correct = sum(scores[k])
            rewards[k] = {"accuracy": correct / n, "correct": correct, "wilson": list(wilson_interval(correct, n))}
    d, lo, hi = paired_bootstrap_diff(scores["contrastive"], scores["dpo"], scores["prompts"])
    t2 = {"n_pairs": n, "n_prompts": len(set(scores["prompts"])), "pairs": str(pairs),
          "source": "the synthetic tiny pairs" if s.tiny else
          f"make-prefs on {s.eval_prompts}, k={s.heldout_k}, seeds {list(s.heldout_seeds)}",
          "reward_model": f"bt:{rm}", "rewards": rewards,
          "contrastive_minus_dpo": {"diff": d, "lo": lo, "hi": hi, "bootstrap": "2000 resamples of prompts"}}
    atomic_write_text(cache, json.dumps({"key": key, "table2": t2}, indent=2) + "\n")
    log("[frontier] Table 2: " + ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in rewards.items()) + f" on {n} pairs")
    return t2
