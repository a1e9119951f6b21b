"""Evaluation: ground-truth reward, KL, length, diversity and reward accuracy.

This mirrors the papers' controlled experiments: the TDPO / SparsePO reward-vs-KL frontier
(each model's mean ground-truth reward against its sequence KL to the reference) and
AlignDistil's Tables 2-3 (reward accuracy of the DPO reward, the contrastive reward and a
reward model on held-out pairs; KL to the DPO model; response length).

The metric functions at the top are pure and documented with their exact definitions; the
tests check each on hand-made cases. :func:`evaluate` runs them over a list of models:

* every model samples one response per test prompt (per ``num_samples``) with a fixed seed,
  each sample on its own seeded random stream, so all models are compared on the same
  random draws (:func:`aligndistil.model.sampling.sample_with_logprobs`);
* the ground-truth reward scores each response;
* ``KL(pi || pi_other)`` is estimated by Monte Carlo on the model's own samples,
  ``mean_y sum_t [log pi(y_t|s_t) - log pi_other(y_t|s_t)]`` (response tokens up to and
  including EOS), for ``pi_other`` = the reference and the DPO model. The estimate is
  unbiased only when samples are drawn at temperature 1 without top-p, which is the default;
  results record the sampling settings. The exact per-token form,
  ``mean_y sum_t KL(pi(.|s_t) || pi_other(.|s_t))``, estimates the same quantity with less
  variance and is reported beside it (``*_tokenwise``);
* on held-out preference pairs, the share ranked correctly by the DPO reward
  ``beta0 log pi_dpo/pi_ref``, the contrastive reward ``beta0 log pi_dpo/pi_rev`` and,
  if given, a reward model.

Outputs in ``out_dir``: ``results.json``, ``results.md`` (the tables), ``samples/<name>.jsonl``
(every response with its reward and KL terms) and PNG plots (:mod:`aligndistil.workflows.plots`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from aligndistil.fileio import atomic_write_text

__all__ = [
    "EvalError",
    "mean_ci95",
    "distinct_n",
    "sequence_kl_mc",
    "sequence_kl_tokenwise",
    "reward_accuracy",
    "implicit_rewards",
    "pair_logps",
    "continuation_logits",
    "evaluate",
    "format_table",
]

#: Two-sided 95% quantile of the standard normal.
Z95 = 1.959963984540054


class EvalError(RuntimeError):
    """The evaluation could not be completed (the message says which model and why)."""


# ---------------------------------------------------------------------------- pure metrics
def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its normal-approximation 95% interval.

    ``half = 1.96 * s / sqrt(n)`` with ``s`` the sample standard deviation (``n - 1`` in the
    denominator). With fewer than two values the half-width is NaN (no spread to estimate).

    Raises:
        ValueError: no values, or a non-finite value.
    """
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_ci95 needs at least one value")
    if not all(math.isfinite(x) for x in xs):
        raise ValueError("mean_ci95 got a non-finite value")
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, float("nan")
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, Z95 * math.sqrt(var / n)


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Corpus-level distinct-n: unique word n-grams over all n-grams, across all texts.

    Words are the whitespace-separated tokens of each text (case kept, punctuation attached);
    n-grams never cross text boundaries. Returns 0.0 when no text has ``n`` words.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    total, seen = 0, set()
    for t in texts:
        words = t.split()
        for i in range(len(words) - n + 1):
            seen.add(tuple(words[i:i + n]))
            total += 1
    return len(seen) / total if total else 0.0


def sequence_kl_mc(logp_self: torch.Tensor, logp_other: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample Monte-Carlo term of ``KL(pi_self || pi_other)``: ``(B, T) x 3 -> (B,)``.

    ``sum_t mask * (log pi_self(y_t|s_t) - log pi_other(y_t|s_t))`` for a ``y`` drawn from
    ``pi_self``; its mean over samples is an unbiased estimate of the sequence KL (any single
    term may be negative).
    """
    if not (logp_self.shape == logp_other.shape == mask.shape):
        raise ValueError(f"shapes differ: {tuple(logp_self.shape)}, {tuple(logp_other.shape)}, {tuple(mask.shape)}")
    return ((logp_self - logp_other) * mask).sum(-1)


def sequence_kl_tokenwise(logits_self: torch.Tensor, logits_other: torch.Tensor, mask: torch.Tensor,
                          normalized: bool = False) -> torch.Tensor:
    """Per-sample ``sum_t KL(pi_self(.|s_t) || pi_other(.|s_t))`` over the full vocabulary.

    ``(B, T, V), (B, T, V), (B, T) -> (B,)``; never negative. On samples from ``pi_self``
    its mean estimates the same sequence KL as :func:`sequence_kl_mc`, with less variance.
    With ``normalized=True`` both inputs are already log-probabilities (saves two softmaxes).
    """
    lp = logits_self.float() if normalized else F.log_softmax(logits_self.float(), -1)
    lq = logits_other.float() if normalized else F.log_softmax(logits_other.float(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).clamp_min(0)
    return (kl * mask).sum(-1)


def reward_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Share of pairs with ``r(chosen) > r(rejected)``; an exact tie counts one half.

    (Counting ties as half makes a constant reward score 0.5, chance level, rather than 0.)
    """
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen but {len(rejected)} rejected scores")
    if not chosen:
        raise ValueError("reward_accuracy needs at least one pair")
    score = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected))
    return score / len(chosen)


def implicit_rewards(logp_num: Sequence[float], logp_den: Sequence[float], beta0: float) -> list[float]:
    """``beta0 * (log pi_num(y|x) - log pi_den(y|x))`` per sequence: the DPO reward
    (num = DPO model, den = reference) or the contrastive reward (den = reverse-DPO model)."""
    return [beta0 * (float(a) - float(b)) for a, b in zip(logp_num, logp_den, strict=True)]


# ---------------------------------------------------------------------------- model passes
@torch.no_grad()
def pair_logps(model, pairs_path: str | os.PathLike, tokenizer, batch_size: int = 16,
               use_chat_template: bool | None = None) -> tuple[list[float], list[float]]:
    """Sequence log-probabilities ``log pi(y|x)`` of the chosen and rejected responses.

    The pairs are tokenised exactly as training does (:func:`aligndistil.data.build_dataset`,
    EOS appended, no truncation). Each prompt is run once for both of its responses
    (:func:`prefill`, :func:`continuation_logits`).
    """
    from aligndistil.data import build_dataset
    from aligndistil.model.sampling import left_pad
    from aligndistil.model.outputs import pad_right

    feats, _ = build_dataset(pairs_path, tokenizer, "pairs", max_length=None, max_prompt_length=None,
                             use_chat_template=use_chat_template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: dict[str, list[float]] = {"chosen_ids": [], "rejected_ids": []}
    for i in range(0, len(feats), batch_size):
        chunk = feats[i:i + batch_size]
        ids, att = left_pad([f["prompt_ids"] for f in chunk], pad)
        cache = prefill(model, ids, att)
        for key in out:
            seqs = [torch.tensor(f[key]) for f in chunk]
            tokens = pad_right(seqs, pad)
            mask = pad_right([torch.ones_like(s) for s in seqs], 0, tokens.shape[1])
            lp = torch.gather(F.log_softmax(continuation_logits(model, ids, att, tokens, mask, cache=cache), -1),
                              -1, tokens[..., None]).squeeze(-1)
            out[key] += (lp * mask).sum(-1).tolist()
    return out["chosen_ids"], out["rejected_ids"]


@torch.no_grad()
def prefill(model, prompt_ids: torch.Tensor, prompt_att: torch.Tensor):
    """Run LEFT-padded prompts once: ``(kv_cache, logits of the first response token)``."""
    pos = (prompt_att.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=prompt_ids, attention_mask=prompt_att, position_ids=pos, use_cache=True, logits_to_keep=1)
    return out.past_key_values, out.logits[:, -1].float()


@torch.no_grad()
def continuation_logits(model, prompt_ids: torch.Tensor, prompt_att: torch.Tensor, tokens: torch.Tensor,
                        mask: torch.Tensor, cache=None) -> torch.Tensor:
    """Logits ``(B, N, V)`` of ``model`` predicting each response token ``tokens[:, t]``.

    Row ``t`` is the distribution of response token ``t`` given the prompt and the earlier
    response tokens (the first row comes from the last prompt position). ``cache`` is an
    optional ``prefill(model, prompt_ids, prompt_att)`` result to reuse across calls (it is
    copied, never modified), so the prompts are run once for any number of responses.
    """
    if cache is None:
        cache = prefill(model, prompt_ids, prompt_att)
    kv, first = cache
    N = tokens.shape[1]
    if N == 1:
        return first[:, None]
    kv = copy.deepcopy(kv)
    start = prompt_att.long().sum(-1)
    pos = start[:, None] + torch.arange(N - 1, device=tokens.device)[None]
    att = torch.cat([prompt_att.long(), mask[:, :-1].long()], dim=1)
    out = model(input_ids=tokens[:, :-1], attention_mask=att, position_ids=pos, past_key_values=kv, use_cache=True)
    return torch.cat([first[:, None], out.logits.float()], dim=1)


# ---------------------------------------------------------------------------- orchestration
def _run_info(path: str) -> dict:
    """What a model folder says about its training run (config.yaml, COMPLETE.json)."""
    info: dict = {}
    p = Path(path)
    cfg = p / "config.yaml"
    if cfg.is_file():
        import yaml

        try:
            c = yaml.safe_load(cfg.read_text()) or {}
            m = c.get("method", {})
            info = {"method": m.get("name"), "beta": m.get("beta"), "reverse": m.get("reverse"),
                    "mode": m.get("mode"), "teacher": m.get("teacher"), "r": m.get("r")}
        except Exception:  # noqa: BLE001 - a broken config only loses the label
            info = {}
    done = p / "COMPLETE.json"
    if done.is_file():
        try:
            d = json.loads(done.read_text())
            info.update(steps=d.get("steps"), train_seconds=d.get("seconds"))
        except json.JSONDecodeError:
            pass
    return {k: v for k, v in info.items() if v is not None}


def _fmt(x, nd=3, sign=False):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if round(x, nd) == 0:
        x = 0.0  # no "-0.00" for a Monte-Carlo estimate that rounds to zero
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def format_table(results: dict) -> str:
    """The Markdown tables of a results dict (models, then held-out reward accuracy)."""
    s = results["settings"]
    lines = [
        f"Ground truth: `{s['reward']}` on {s['n_prompts']} prompts of `{s['prompts']}` x {s['num_samples']} "
        f"sample(s), {s['max_new_tokens']} new tokens, T={s['temperature']}, top-p={s['top_p']}, seed {s['seed']}.",
        "",
        "| model | reward (95% CI) | KL to ref | KL to DPO | length | distinct-2 |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results["models"].items():
        lines.append(
            f"| {name} | {_fmt(r['reward_mean'], sign=True)} ± {_fmt(r['reward_ci95'])} | {_fmt(r.get('kl_ref'), 2)} "
            f"| {_fmt(r.get('kl_dpo'), 2)} | {_fmt(r['length_mean'], 1)} | {_fmt(r['distinct_2'])} |")
    acc = results.get("reward_accuracy")
    if acc:
        lines += ["", f"Reward accuracy on {acc['n_pairs']} held-out pairs (`{acc['pairs']}`):", "",
                  "| reward | accuracy |", "|---|---|"]
        for key, label in (("dpo", "DPO reward β0·log π_dpo/π_ref"), ("contrastive", "contrastive β0·log π_dpo/π_rev"),
                           ("reward_model", f"reward model `{acc.get('reward_model_spec')}`")):
            if acc.get(key) is not None:
                lines.append(f"| {label} | {acc[key]:.3f} |")
    return "\n".join(lines) + "\n"




def evaluate(
    models: dict[str, str],
    *,
    reference: str,
    out_dir: str | os.PathLike,
    dpo_model: str | None = None,
    reverse_dpo_model: str | None = None,
    prompts: str | list[str] = "sentiment:test",
    reward: str = "vader",
    pairs: str | None = None,
    reward_model: str | None = None,
    beta0: float = 0.1,
    max_new_tokens: int = 40,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 1234,
    num_samples: int = 1,
    batch_size: int = 42,
    use_chat_template: bool = True,
    plots: bool = True,
    runs: dict[str, str] | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Evaluate ``models`` (name -> folder / hub id / ``smollm2``) and write the report.

    Args:
        models: the models to evaluate, in table order.
        reference: ``pi_ref`` (KL anchor; its tokenizer renders the prompts).
        out_dir: where results.json, results.md, samples/ and the plots go.
        dpo_model, reverse_dpo_model: ``pi_dpo`` (KL to DPO, DPO reward) and ``pi_rev``
            (contrastive reward); either may be omitted.
        prompts: test prompts (file or shipped set).
        reward: ground-truth reward spec (:func:`aligndistil.rewards.get_reward`).
        pairs: held-out preference pairs (JSONL) for reward accuracy.
        reward_model: a reward spec (e.g. ``bt:<folder>``) whose accuracy on ``pairs`` to report.
        beta0: the DPO models' beta (scales the implicit rewards; accuracy does not depend on it).
        max_new_tokens, temperature, top_p, seed, num_samples, batch_size: generation.
        use_chat_template: render prompts as one user message with the chat template.
        plots: write the PNG plots.
        runs: training-run folders (name -> folder with metrics.jsonl) for the training-curve
            plot; default: the evaluated models' folders that have one.

    Returns:
        The results dict also written to ``results.json``.

    Raises:
        EvalError: a reward failed or returned NaN, or a model's vocabulary does not match
            the reference's (messages name the model); results.json is then not written.
    """
    from tqdm.auto import tqdm

    from aligndistil.model.sampling import _eos_ids, encode_prompts, left_pad, row_seed, sample_with_logprobs
    from aligndistil.model.loading import load_causal_lm, load_tokenizer, resolve_model_path
    from aligndistil.rewards import get_reward
    from aligndistil.data.prompt_sets import load_prompts

    if not models:
        raise ValueError("evaluate needs at least one model")
    if pairs is not None and not Path(pairs).is_file():
        raise FileNotFoundError(f"held-out pairs file not found: {pairs}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").unlink(missing_ok=True)  # never leave an old report beside new samples
    started = time.time()
    prompt_list = load_prompts(prompts) if isinstance(prompts, (str, os.PathLike)) else list(prompts)
    reward_fn = get_reward(reward)
    tok = load_tokenizer(reference)
    pad = tok.pad_token_id
    enc = encode_prompts(tok, prompt_list, use_chat_template)
    rows = [(i, s) for i in range(len(prompt_list)) for s in range(num_samples)]
    batches = []
    for b0 in range(0, len(rows), batch_size):
        chunk = rows[b0:b0 + batch_size]
        ids, att = left_pad([enc[i] for i, _ in chunk], pad)
        batches.append((chunk, ids, att))

    loaded: dict[str, object] = {}

    def _key(path):
        try:
            return os.path.realpath(resolve_model_path(path))
        except Exception:  # noqa: BLE001 - loading will report it
            return str(path)

    def get(path):
        if _key(path) not in loaded:
            loaded[_key(path)] = load_causal_lm(path)
        return loaded[_key(path)]

    ref_lm = get(reference)
    others = {"ref": ref_lm}
    if dpo_model:
        others["dpo"] = get(dpo_model)
    vocab = ref_lm.get_output_embeddings().weight.shape[0]
    caches: dict[tuple[str, int], tuple] = {}
    settings = {"prompts": prompts if isinstance(prompts, str) else f"{len(prompt_list)} prompts",
                "n_prompts": len(prompt_list), "reward": str(reward), "max_new_tokens": max_new_tokens,
                "temperature": temperature, "top_p": top_p, "seed": seed, "num_samples": num_samples,
                "use_chat_template": use_chat_template, "reference": reference, "dpo_model": dpo_model,
                "reverse_dpo_model": reverse_dpo_model, "beta0": beta0,
                "kl_estimator_unbiased": temperature == 1.0 and top_p == 1.0}
    results = {"settings": settings, "models": {}}
    (out_dir / "samples").mkdir(exist_ok=True)
    total = len(models) * len(rows)
    bar = tqdm(total=total, desc="eval", unit="sample", disable=not progress, dynamic_ncols=True)
    for name, path in models.items():
        t0 = time.time()
        lm = get(path)
        v = lm.get_output_embeddings().weight.shape[0]
        if v != vocab:
            raise EvalError(f"model {name!r} ({path}) has a vocabulary of {v} but the reference ({reference}) has "
                            f"{vocab}: KL needs one shared vocabulary")
        eos = _eos_ids(lm, None)
        if tok.eos_token_id is not None and tok.eos_token_id not in eos:
            eos.append(tok.eos_token_id)
        records = []
        bar.set_description(f"eval {name}")
        for bi, (chunk, ids, att) in enumerate(batches):
            g = sample_with_logprobs(lm, ids, att, max_new_tokens=max_new_tokens,
                                     seeds=[row_seed(seed, i, s) for i, s in chunk], temperature=temperature,
                                     top_p=top_p, eos_token_ids=eos, pad_token_id=pad, return_logits=True)
            mask = g["mask"].float()
            lp_self = F.log_softmax(g.pop("logits"), -1)
            terms = {}
            for role, other in others.items():
                if other is lm:
                    z = torch.zeros(mask.shape[0])
                    terms[role], terms[role + "_tokenwise"] = z, z
                    continue
                if (role, bi) not in caches:
                    caches[(role, bi)] = prefill(other, ids, att)
                lq = F.log_softmax(continuation_logits(other, ids, att, g["tokens"], g["mask"],
                                                       cache=caches[(role, bi)]), -1)
                lp_other = torch.gather(lq, -1, g["tokens"][..., None]).squeeze(-1)
                terms[role] = sequence_kl_mc(g["logps"], lp_other * mask, mask)
                terms[role + "_tokenwise"] = sequence_kl_tokenwise(lp_self, lq, mask, normalized=True)
                del lq
            del lp_self
            texts = []
            for b, (i, s) in enumerate(chunk):
                n = int(g["mask"][b].sum())
                ended = bool(g["ended"][b])
                body = g["tokens"][b, : n - 1 if ended else n].tolist()
                texts.append(tok.decode(body, skip_special_tokens=True).strip())
                rec = {"prompt": prompt_list[i], "sample_index": s, "response": texts[-1],
                       "n_tokens": len(body), "ended": ended, "logp": float(g["logps"][b].sum())}
                for key, val in terms.items():
                    rec[f"kl_{key}"] = float(val[b])
                records.append(rec)
            try:
                scores = reward_fn([prompt_list[i] for i, _ in chunk], texts)
            except Exception as e:  # RewardError, or ValueError for NaN / wrong count
                bar.close()
                raise EvalError(f"eval: scoring model {name!r}'s responses failed: {e}; no results.json was written") from e
            for rec, sc in zip(records[-len(chunk):], scores):
                rec["reward"] = sc
            bar.update(len(chunk))
            del g
        mean, half = mean_ci95([r["reward"] for r in records])
        res = {"path": str(path), "n_samples": len(records), "reward_mean": mean, "reward_ci95": half,
               "length_mean": sum(r["n_tokens"] for r in records) / len(records),
               "share_ended": sum(r["ended"] for r in records) / len(records),
               "distinct_2": distinct_n([r["response"] for r in records], 2)}
        for role in others:
            m, h = mean_ci95([r[f"kl_{role}"] for r in records])
            res[f"kl_{role}"], res[f"kl_{role}_ci95"] = m, h
            res[f"kl_{role}_tokenwise"] = mean_ci95([r[f"kl_{role}_tokenwise"] for r in records])[0]
        res["run"] = _run_info(str(path))
        res["seconds"] = round(time.time() - t0, 1)
        results["models"][name] = res
        atomic_write_text(out_dir / "samples" / f"{name}.jsonl",
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        if lm is not ref_lm and not any(lm is o for o in others.values()):
            loaded.pop(_key(path), None)
            del lm
        log(f"[eval] {name}: reward {mean:+.3f} ± {half:.3f}, KL to ref {res['kl_ref']:.2f}"
            + (f", KL to DPO {res['kl_dpo']:.2f}" if "kl_dpo" in res else "")
            + f", length {res['length_mean']:.1f}, distinct-2 {res['distinct_2']:.3f} ({res['seconds']} s)")
    bar.close()
    caches.clear()

    if pairs is not None:
        results["reward_accuracy"] = _pair_accuracy(pairs, tok, ref_lm, get, dpo_model, reverse_dpo_model,
                                                    reward_model, beta0, log)
    results["seconds"] = round(time.time() - started, 1)
    if plots:
        from aligndistil.workflows.plots import plot_frontier, plot_training_curves

        results["plots"] = {"frontier": str(plot_frontier(results, out_dir / "frontier.png"))}
        folders = runs if runs is not None else {n: r["path"] for n, r in results["models"].items()}
        curves = {n: Path(p) / "metrics.jsonl" for n, p in folders.items() if (Path(p) / "metrics.jsonl").is_file()}
        if curves:
            results["plots"]["training_curves"] = str(plot_training_curves(curves, out_dir / "training_curves.png"))
            results["plots"]["training_curve_runs"] = list(curves)
    table = format_table(results)
    atomic_write_text(out_dir / "results.md", table)
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")  # last: marks the report complete
    return results


def _pair_accuracy(pairs, tok, ref_lm, get, dpo_model, reverse_dpo_model, reward_model, beta0, log) -> dict:
    from aligndistil.data import load_records
    from aligndistil.rewards import get_reward

    acc: dict = {"pairs": str(pairs)}
    if dpo_model:
        lp_ref = pair_logps(ref_lm, pairs, tok)
        lp_dpo = pair_logps(get(dpo_model), pairs, tok)
        acc["n_pairs"] = len(lp_ref[0])
        acc["dpo"] = reward_accuracy(implicit_rewards(lp_dpo[0], lp_ref[0], beta0),
                                     implicit_rewards(lp_dpo[1], lp_ref[1], beta0))
        if reverse_dpo_model:
            lp_rev = pair_logps(get(reverse_dpo_model), pairs, tok)
            acc["contrastive"] = reward_accuracy(implicit_rewards(lp_dpo[0], lp_rev[0], beta0),
                                                 implicit_rewards(lp_dpo[1], lp_rev[1], beta0))
    if reward_model:
        rm = get_reward(reward_model)
        recs = load_records(pairs)
        prompts, chosen, rejected = [], [], []
        for r in recs:
            p = r.data.get("prompt")
            prompts.append(p if isinstance(p, str) else (p[-1]["content"] if p else ""))
            chosen.append(r.data["chosen"] if isinstance(r.data["chosen"], str) else r.data["chosen"][-1]["content"])
            rejected.append(r.data["rejected"] if isinstance(r.data["rejected"], str) else r.data["rejected"][-1]["content"])
        try:
            acc["reward_model"] = reward_accuracy(rm(prompts, chosen), rm(prompts, rejected))
        except Exception as e:
            raise EvalError(f"eval: reward model {reward_model!r} failed on the held-out pairs: {e}") from e
        acc["reward_model_spec"] = str(reward_model)
        acc.setdefault("n_pairs", len(recs))
    log("[eval] reward accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items() if isinstance(v, float)))
    return acc
