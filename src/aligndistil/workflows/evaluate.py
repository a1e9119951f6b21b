"""Evaluation: ground-truth reward, KL, length, diversity and reward accuracy.

This mirrors the papers' controlled experiments: the TDPO / SparsePO reward-vs-KL frontier
(each model's mean ground-truth reward against its sequence KL to the reference) and
AlignDistil's Tables 2-3 (reward accuracy of the DPO reward, the contrastive reward and a
reward model on held-out pairs; KL to the DPO model; response length).

The metrics are pure functions in :mod:`aligndistil.workflows.eval_metrics` (re-exported
here). :func:`evaluate` runs them over a list of models, in stages (per model and batch of
prompts: generate, KL, score; then write):

* generate: every model samples one response per test prompt (per ``num_samples``) with a
  fixed seed, each sample on its own seeded random stream, so all models are compared on
  the same random draws (:func:`aligndistil.model.sampling.sample_with_logprobs`);
* KL: ``KL(pi || pi_other)`` is estimated by Monte Carlo on the model's own samples,
  ``mean_y sum_t [log pi(y_t|s_t) - log pi_other(y_t|s_t)]`` (response tokens up to and
  including EOS), for ``pi_other`` = the reference and the DPO model. ``pi_other`` scores
  the samples through the package's one response-token path (:func:`sample_logits`:
  :func:`aligndistil.model.outputs.response_outputs` on ``[prompt ; sample]``) and the
  per-token maths of :mod:`aligndistil.losses.ops`. The estimate is unbiased only when
  samples are drawn at temperature 1 without top-p, which is the default; results record
  the sampling settings. The exact per-token form,
  ``mean_y sum_t KL(pi(.|s_t) || pi_other(.|s_t))``, estimates the same quantity with less
  variance and is never negative: it is the table's KL column, with the Monte-Carlo one beside
  it (``kl_<role>`` and ``kl_<role>_tokenwise`` in ``results.json`` and the samples);
* score: the ground-truth reward scores each response;
* write: each model's summary and samples; then, on held-out preference pairs, the share
  ranked correctly by the DPO reward ``beta0 log pi_dpo/pi_ref``, the contrastive reward
  ``beta0 log pi_dpo/pi_rev`` and, if given, a reward model; then the report.

Prompts (:func:`aligndistil.data.prompt_sets.read_eval_prompts`) come from a shipped set, a
text file or any training-data file; they are rendered by the rule training uses
(:func:`aligndistil.data.tokenize.resolve_chat_template`: by default the chat template when
the reference's tokenizer has one), stated in the report. Every input is checked and every
model loaded before anything is written.

Outputs in ``out_dir`` (:mod:`aligndistil.workflows.eval_report`): ``results.json``, ``results.md`` (the tables), ``samples/<name>.jsonl``
(every response with its reward and KL terms) and PNG plots (:mod:`aligndistil.workflows.plots`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from aligndistil.errors import AlignDistilError
from aligndistil.fileio import atomic_write_text
from aligndistil.losses.ops import label_logps
from aligndistil.workflows.eval_report import format_table, run_info, write_report
from aligndistil.workflows.eval_metrics import (  # noqa: F401  (re-exported: the judge and tests import them here)
    distinct_n,
    implicit_rewards,
    mean_ci95,
    reward_accuracy,
    sequence_kl_mc,
    sequence_kl_tokenwise,
)

__all__ = [
    "EvalError",
    "mean_ci95",
    "distinct_n",
    "sequence_kl_mc",
    "sequence_kl_tokenwise",
    "reward_accuracy",
    "implicit_rewards",
    "pair_logps",
    "sample_logits",
    "EvalSettings",
    "evaluate",
    "format_table",
]


class EvalError(AlignDistilError, RuntimeError):
    """The evaluation could not be completed (the message says which model and why)."""


# ---------------------------------------------------------------------------- model passes
@torch.no_grad()
def pair_logps(model, pairs_path: str | os.PathLike, tokenizer, batch_size: int = 16,
               use_chat_template: bool | None = None) -> tuple[list[float], list[float]]:
    """Sequence log-probabilities ``log pi(y|x)`` of the chosen and rejected responses.

    The pairs are tokenised and collated exactly as training does
    (:func:`aligndistil.data.build_dataset`, EOS appended, no truncation) and scored by
    training's own forward (:func:`aligndistil.model.outputs.pair_outputs`, chosen and
    rejected in one pass; :func:`aligndistil.losses.ops.label_logps` per token).
    """
    from aligndistil.data import PreferenceCollator, build_dataset
    from aligndistil.model.outputs import pair_outputs

    feats, _ = build_dataset(pairs_path, tokenizer, "pairs", max_length=None, max_prompt_length=None,
                             use_chat_template=use_chat_template)
    collate = PreferenceCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0, "pairs")
    chosen: list[float] = []
    rejected: list[float] = []
    device = next(model.parameters()).device
    for i in range(0, len(feats), batch_size):
        c, r = pair_outputs(model, {k: v.to(device) for k, v in collate(feats[i:i + batch_size]).items()})
        chosen += (label_logps(c.logits.float(), c.labels) * c.mask).sum(-1).tolist()
        rejected += (label_logps(r.logits.float(), r.labels) * r.mask).sum(-1).tolist()
    return chosen, rejected


@torch.no_grad()
def sample_logits(model, prompt_ids: torch.Tensor, prompt_att: torch.Tensor, tokens: torch.Tensor,
                  mask: torch.Tensor):
    """``model``'s outputs on sampled responses, row ``t`` predicting response token ``t``.

    Args:
        prompt_ids, prompt_att: ``(B, Lp)`` the LEFT-padded prompts the samples answer.
        tokens, mask: ``(B, N)`` the samples and their masks, as
            :func:`aligndistil.model.sampling.sample_with_logprobs` returns them.

    Returns:
        :class:`aligndistil.model.outputs.ResponseOutputs` with ``logits (B, N, V)``,
        ``labels (B, N)`` (the sampled ids, 0 where ``mask`` is 0) and ``mask (B, N)``: one
        forward over ``[prompt ; sample]`` through the response-token path training uses
        (:func:`aligndistil.model.outputs.response_outputs`). ``N`` is kept because the
        sampler stops when every row has ended, so the longest row's mask covers every step.
    """
    from aligndistil.model.outputs import response_outputs
    from aligndistil.model.sampling import pack_samples

    return response_outputs(model, **pack_samples(prompt_ids, prompt_att, tokens, mask))


# ---------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class EvalSettings:
    """Everything that decides an evaluation's numbers (the flags of ``aligndistil eval``).

    Attributes:
        reference: ``pi_ref`` (KL anchor; its tokenizer renders the prompts).
        dpo_model, reverse_dpo_model: ``pi_dpo`` (KL to DPO, DPO reward) and ``pi_rev``
            (contrastive reward); either may be None.
        prompts: test prompts: a shipped set, a text file (one per line), a training-data
            file, folder or ``hub:ORG/NAME`` (each record's prompt), or the list itself
            (strings or message lists).
        reward: ground-truth reward spec (:func:`aligndistil.rewards.get_reward`).
        pairs: held-out preference pairs (JSONL) for reward accuracy.
        reward_model: a reward spec (e.g. ``bt:<folder>``) whose accuracy on ``pairs`` to report.
        beta0: the DPO models' beta (scales the implicit rewards; accuracy does not depend on it).
        max_new_tokens, temperature, top_p, seed, num_samples, batch_size: generation.
        use_chat_template: None (auto: the chat template when the reference's tokenizer has
            one, a string prompt as one user message), True or False: training's rule
            (:func:`aligndistil.data.tokenize.resolve_chat_template`).
        plots: write the PNG plots.
        runs: training-run folders (name -> folder with metrics.jsonl) for the training-curve
            plot; default: the evaluated models' folders that have one.
        device: where the models run: ``auto`` (the first CUDA GPU when there is one, else
            the CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: the models' weights, ``float32`` (default) or ``bfloat16`` (faster on a GPU;
            the KL terms are still computed in float32 from its logits).
    """

    reference: str
    dpo_model: str | None = None
    reverse_dpo_model: str | None = None
    prompts: str | list = "sentiment:test"
    reward: str = "vader"
    pairs: str | None = None
    reward_model: str | None = None
    beta0: float = 0.1
    max_new_tokens: int = 40
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 1234
    num_samples: int = 1
    batch_size: int = 42
    use_chat_template: bool | None = None
    plots: bool = True
    runs: dict[str, str] | None = None
    device: str = "auto"
    dtype: str = "float32"

    def record(self, prompt_list: list, chat_template: str = "") -> dict:
        """The ``settings`` section of ``results.json`` (``chat_template``: how prompts were rendered)."""
        return {"chat_template": chat_template,"prompts": self.prompts if isinstance(self.prompts, str) else f"{len(prompt_list)} prompts",
                "n_prompts": len(prompt_list), "reward": str(self.reward), "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                "num_samples": self.num_samples, "use_chat_template": self.use_chat_template,
                "reference": self.reference, "dpo_model": self.dpo_model,
                "reverse_dpo_model": self.reverse_dpo_model, "beta0": self.beta0,
                "device": str(self.device), "dtype": self.dtype,
                "kl_estimator_unbiased": self.temperature == 1.0 and self.top_p == 1.0}


# ---------------------------------------------------------------------------- stages
class _Models:
    """Loads each model once (keyed by its resolved folder) and lets go of those done with."""

    def __init__(self, device=None, dtype=torch.float32):
        self.loaded: dict[str, object] = {}
        self.device, self.dtype = device, dtype

    @staticmethod
    def _key(path) -> str:
        from aligndistil.model.loading import resolve_model_path

        try:
            return os.path.realpath(resolve_model_path(path))
        except Exception:  # noqa: BLE001 - loading will report it
            return str(path)

    def get(self, path):
        from aligndistil.model.loading import load_causal_lm

        if self._key(path) not in self.loaded:
            self.loaded[self._key(path)] = load_causal_lm(path, dtype=self.dtype, device=self.device)
        return self.loaded[self._key(path)]

    def release(self, path) -> None:
        self.loaded.pop(self._key(path), None)


@dataclass
class _Run:
    """What every model's evaluation shares."""

    s: EvalSettings
    prompt_list: list  # strings or message lists
    tok: object
    batches: list  # [(rows [(prompt index, sample index)], ids (B, Lp), att (B, Lp))], LEFT-padded
    reward_fn: object
    others: dict  # KL anchors: role ("ref", "dpo") -> model
    vocab: int
    bar: object


def _prompt_batches(tok, prompt_list: list, s: EvalSettings) -> list:
    from aligndistil.data.collate import pad_with_mask
    from aligndistil.data.tokenize import resolve_chat_template
    from aligndistil.model.sampling import encode_prompts

    chat = resolve_chat_template(tok, s.use_chat_template)
    if not chat and any(not isinstance(p, str) for p in prompt_list):
        raise EvalError("eval: the prompts include message lists, which need the chat template, but "
                        + ("--no-chat-template is set" if s.use_chat_template is False
                           else f"the reference's tokenizer ({s.reference}) has none"))
    enc = encode_prompts(tok, prompt_list, chat)
    rows = [(i, k) for i in range(len(prompt_list)) for k in range(s.num_samples)]
    batches = []
    for b0 in range(0, len(rows), s.batch_size):
        chunk = rows[b0:b0 + s.batch_size]
        ids, att = pad_with_mask([enc[i] for i, _ in chunk], tok.pad_token_id, side="left")
        batches.append((chunk, ids, att))
    return batches


def _generate(lm, run: _Run, chunk, ids, att, eos: list[int]) -> dict:
    """Generate: one sample per row on the row's own seeded stream, with the model's logits."""
    from aligndistil.model.sampling import row_seed, sample_with_logprobs

    s = run.s
    return sample_with_logprobs(lm, ids, att, max_new_tokens=s.max_new_tokens,
                                seeds=[row_seed(s.seed, i, k) for i, k in chunk], temperature=s.temperature,
                                top_p=s.top_p, eos_token_ids=eos, pad_token_id=run.tok.pad_token_id,
                                return_logits=True)


def _kl_terms(lm, run: _Run, ids, att, g: dict) -> dict[str, torch.Tensor]:
    """KL: per-sample terms ``(B,)`` to each anchor, Monte Carlo and ``_tokenwise``."""
    mask = g["mask"].float()
    terms = {}
    for role, other in run.others.items():
        if other is lm:
            z = torch.zeros(mask.shape[0], device=mask.device)
            terms[role], terms[role + "_tokenwise"] = z, z
            continue
        out = sample_logits(other, ids, att, g["tokens"], g["mask"])
        lp_other = label_logps(out.logits.float(), out.labels) * mask
        terms[role] = sequence_kl_mc(g["logps"], lp_other, mask)
        terms[role + "_tokenwise"] = sequence_kl_tokenwise(g["logits"], out.logits, mask)
        del out
    return terms


def _score(run: _Run, name: str, chunk, texts: list[str]) -> list[float]:
    """Score: the ground-truth reward of each response (a failing reward stops the run)."""
    from aligndistil.data.prompt_sets import prompt_text

    try:
        return run.reward_fn([prompt_text(run.prompt_list[i]) for i, _ in chunk], texts)
    except Exception as e:  # RewardError, or ValueError for NaN / wrong count
        run.bar.close()
        raise EvalError(f"eval: scoring model {name!r}'s responses failed: {e}; no results.json was written") from e


@torch.no_grad()  # sampling and scoring only: with autograd on, every step's tensors stayed in a graph
def _evaluate_model(name: str, path: str, lm, run: _Run) -> tuple[dict, list[dict]]:
    """Generate, KL and score every batch for one model: its summary and its sample records."""
    from aligndistil.model.sampling import decode_sample, stop_token_ids

    t0 = time.time()
    v = lm.get_output_embeddings().weight.shape[0]
    if v != run.vocab:
        raise EvalError(f"model {name!r} ({path}) has a vocabulary of {v} but the reference ({run.s.reference}) has "
                        f"{run.vocab}: KL needs one shared vocabulary")
    eos = stop_token_ids(lm, run.tok)
    records = []
    run.bar.set_description(f"eval {name}")
    device = next(lm.parameters()).device
    for chunk, ids, att in run.batches:
        ids, att = ids.to(device), att.to(device)
        g = _generate(lm, run, chunk, ids, att, eos)
        terms = _kl_terms(lm, run, ids, att, g)
        del g["logits"]
        batch = [{"prompt": run.prompt_list[i], "sample_index": k, **decode_sample(run.tok, g, b),
                  **{f"kl_{key}": float(val[b]) for key, val in terms.items()}} for b, (i, k) in enumerate(chunk)]
        for rec, sc in zip(batch, _score(run, name, chunk, [r["response"] for r in batch])):
            rec["reward"] = sc
        records += batch
        run.bar.update(len(chunk))
    return _summarise(path, records, run.others, t0), records


def _summarise(path: str, records: list[dict], roles, t0: float) -> dict:
    """Write (1): one model's line of the table, means and 95% intervals over its samples."""
    mean, half = mean_ci95([r["reward"] for r in records])
    res = {"path": str(path), "n_samples": len(records), "reward_mean": mean, "reward_ci95": half,
           "length_mean": sum(r["n_tokens"] for r in records) / len(records),
           "share_ended": sum(r["ended"] for r in records) / len(records),
           "distinct_2": distinct_n([r["response"] for r in records], 2)}
    for role in roles:
        m, h = mean_ci95([r[f"kl_{role}"] for r in records])
        res[f"kl_{role}"], res[f"kl_{role}_ci95"] = m, h
        res[f"kl_{role}_tokenwise"] = mean_ci95([r[f"kl_{role}_tokenwise"] for r in records])[0]
    res["run"] = run_info(str(path))
    res["seconds"] = round(time.time() - t0, 1)
    return res


def evaluate(models: dict[str, str], settings: EvalSettings | None = None, *, out_dir: str | os.PathLike,
             progress: bool = True, log=print, **fields) -> dict:
    """Evaluate ``models`` (name -> folder / hub id / ``smollm2``) and write the report.

    Args:
        models: the models to evaluate, in table order.
        settings: an :class:`EvalSettings`. Its fields can also be given as keywords
            (``reference=..., max_new_tokens=...``, as the CLI does); they override ``settings``.
        out_dir: where results.json, results.md, samples/ and the plots go.
        progress: show a progress bar; ``log``: where the one-line summaries go.

    Returns:
        The results dict also written to ``results.json``.

    Raises:
        EvalError: a reward failed or returned NaN, a model cannot be loaded, or a model's
            vocabulary does not match the reference's (messages name the model);
            results.json is then not written.
        PromptFileError, DataError, FileNotFoundError: bad prompts or pairs (by file and
            line), raised before any model loads and before ``out_dir`` is created.
        TypeError: a keyword that is not an :class:`EvalSettings` field, or no ``reference``.
    """
    from tqdm.auto import tqdm

    from aligndistil.data import build_dataset
    from aligndistil.data.prompt_sets import read_eval_prompts
    from aligndistil.data.tokenize import chat_template_rule
    from aligndistil.model.loading import load_tokenizer
    from aligndistil.rewards import get_reward

    from aligndistil.model.loading import resolve_device

    s = dataclasses.replace(settings, **fields) if settings is not None else EvalSettings(**fields)
    if not models:
        raise ValueError("evaluate needs at least one model")
    if s.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be float32 or bfloat16, got {s.dtype!r}")
    device = resolve_device(s.device)
    s = dataclasses.replace(s, device=str(device))  # the report records where it ran, not "auto"
    if s.pairs is not None and not Path(s.pairs).is_file():
        raise FileNotFoundError(f"held-out pairs file not found: {s.pairs}")
    # Inputs first, then the models; nothing is written until all of them have loaded.
    started = time.time()
    if isinstance(s.prompts, (str, os.PathLike)):
        prompt_list, note = read_eval_prompts(s.prompts)
        log(f"[eval] prompts: {note}")
    else:
        prompt_list = list(s.prompts)
    reward_fn = get_reward(s.reward)
    tok = load_tokenizer(s.reference)
    batches = _prompt_batches(tok, prompt_list, s)
    if s.pairs is not None:  # the same check the pairs get later, before any model loads
        build_dataset(s.pairs, tok, "pairs", None, None, use_chat_template=s.use_chat_template)
    pool = _Models(device, getattr(torch, s.dtype))
    ref_lm = pool.get(s.reference)
    others = {"ref": ref_lm}
    if s.dpo_model:
        others["dpo"] = pool.get(s.dpo_model)
    _check_loadable({**models, "--reverse-dpo-model": s.reverse_dpo_model})
    rule = chat_template_rule(tok, s.use_chat_template)
    log(f"[eval] prompts: {rule}")
    results = {"settings": s.record(prompt_list, rule), "models": {}}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").unlink(missing_ok=True)  # never leave an old report beside new samples
    (out_dir / "samples").mkdir(exist_ok=True)
    bar = tqdm(total=len(models) * len(prompt_list) * s.num_samples, desc="eval", unit="sample",
               disable=not progress, dynamic_ncols=True)
    run = _Run(s, prompt_list, tok, batches, reward_fn, others, ref_lm.get_output_embeddings().weight.shape[0], bar)
    for name, path in models.items():
        lm = pool.get(path)
        res, records = _evaluate_model(name, path, lm, run)
        results["models"][name] = res
        atomic_write_text(out_dir / "samples" / f"{name}.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        if not any(lm is o for o in others.values()):
            pool.release(path)  # the KL anchors stay loaded for the next model
        del lm
        kl = [f"KL to {r} {res[f'kl_{r}_tokenwise']:.2f} (MC {res[f'kl_{r}']:.2f})" for r in ("ref", "dpo")
              if f"kl_{r}" in res]
        log(f"[eval] {name}: reward {res['reward_mean']:+.3f} ± {res['reward_ci95']:.3f}, " + ", ".join(kl)
            + f", length {res['length_mean']:.1f}, distinct-2 {res['distinct_2']:.3f} ({res['seconds']} s)")
    bar.close()

    if s.pairs is not None:
        results["reward_accuracy"] = _pair_accuracy(s.pairs, tok, ref_lm, pool.get, s.dpo_model, s.reverse_dpo_model,
                                                    s.reward_model, s.beta0, log, s.use_chat_template)
    results["seconds"] = round(time.time() - started, 1)
    write_report(results, out_dir, s.plots, s.runs)
    return results


def _check_loadable(models: dict) -> None:
    """Every model's config can be read (a missing folder or unknown id fails here, before any output)."""
    from transformers import AutoConfig

    from aligndistil.model.loading import DEFAULT_MODEL_NAME, resolve_model_path

    for name, path in models.items():
        if path is None or os.fspath(path) == DEFAULT_MODEL_NAME:  # the embedded model: always there
            continue
        try:
            AutoConfig.from_pretrained(resolve_model_path(path))
        except Exception as e:  # noqa: BLE001 - OSError, ValueError, hub errors: one message
            raise EvalError(f"eval: model {name!r} ({path}) cannot be loaded: {e}") from None


def _pair_accuracy(pairs, tok, ref_lm, get, dpo_model, reverse_dpo_model, reward_model, beta0, log,
                   use_chat_template=None) -> dict:
    from aligndistil.data import load_records
    from aligndistil.data.prompt_sets import prompt_text
    from aligndistil.rewards import get_reward

    acc: dict = {"pairs": str(pairs)}
    if dpo_model:
        lp_ref = pair_logps(ref_lm, pairs, tok, use_chat_template=use_chat_template)
        lp_dpo = pair_logps(get(dpo_model), pairs, tok, use_chat_template=use_chat_template)
        acc["n_pairs"] = len(lp_ref[0])
        acc["dpo"] = reward_accuracy(implicit_rewards(lp_dpo[0], lp_ref[0], beta0),
                                     implicit_rewards(lp_dpo[1], lp_ref[1], beta0))
        if reverse_dpo_model:
            lp_rev = pair_logps(get(reverse_dpo_model), pairs, tok, use_chat_template=use_chat_template)
            acc["contrastive"] = reward_accuracy(implicit_rewards(lp_dpo[0], lp_rev[0], beta0),
                                                 implicit_rewards(lp_dpo[1], lp_rev[1], beta0))
    if reward_model:
        rm = get_reward(reward_model)
        recs = load_records(pairs)
        prompts, chosen, rejected = [], [], []
        for r in recs:
            p = r.data.get("prompt")
            prompts.append(prompt_text(p) if p else "")
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
