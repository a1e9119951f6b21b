"""The evaluation run on the tiny model: scoring samples and pairs, end to end, the CLI.

The pure metrics are tested in ``test_eval_metrics.py``, the sampler in
``tests/model/test_sampling.py``.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap

import pytest
import torch

from aligndistil.data import DataError
from aligndistil.workflows.evaluate import (
    EvalError,
    EvalSettings,
    distinct_n,
    evaluate,
    pair_logps,
    sample_logits,
)

PROMPTS = ["Review the film:", "Review this cafe:", "Review my phone:", "Review the park:", "Review that song:"]


# ---------------------------------------------------------------------------- model passes
@pytest.fixture(scope="module")
def tiny(tiny_ws):
    from aligndistil.model.loading import load_causal_lm, load_tokenizer

    return load_causal_lm(tiny_ws["model"]), load_tokenizer(tiny_ws["model"])


def test_sample_logits_equal_the_samplers_own_logits(tiny):
    """The other model's pass over samples (one forward over [prompt ; sample]) and the KV-cache
    sampling loop agree on the sampler's own samples: a model's KL to itself is 0."""
    from aligndistil.data.collate import pad_with_mask
    from aligndistil.model.sampling import encode_prompts, sample_with_logprobs

    model, tok = tiny
    ids, att = pad_with_mask(encode_prompts(tok, PROMPTS), tok.pad_token_id, side="left")
    # EOS = a frequent character, so some rows end early and are padded after it
    g = sample_with_logprobs(model, ids, att, max_new_tokens=12, seeds=list(range(len(PROMPTS))),
                             eos_token_ids=[tok.convert_tokens_to_ids("e")], pad_token_id=tok.pad_token_id,
                             return_logits=True)
    out = sample_logits(model, ids, att, g["tokens"], g["mask"])
    assert out.logits.shape == g["logits"].shape  # N kept: the longest row covers every step
    assert torch.equal(out.mask.long(), g["mask"]) and torch.equal(out.labels, g["tokens"] * g["mask"])
    m = g["mask"].bool()
    torch.testing.assert_close(out.logits[m], g["logits"][m], atol=1e-4, rtol=0)


def test_pair_logps_match_a_teacher_forced_forward(tiny_ws, tiny):
    """Pair scoring in batches of 5 equals log pi(y|x) from one padded forward over all pairs, and,
    for the first pairs, the sum over response tokens of log_softmax(logits at the position
    before the token) from a forward over the unpadded [prompt ; response] alone."""
    from aligndistil.data import PreferenceCollator, build_dataset
    from aligndistil.losses.ops import label_logps
    from aligndistil.model.outputs import pair_outputs

    model, tok = tiny
    chosen, rejected = pair_logps(model, tiny_ws["prefs"], tok, batch_size=5)
    feats, _ = build_dataset(tiny_ws["prefs"], tok, "pairs", max_length=None, max_prompt_length=None)
    assert len(chosen) == len(rejected) == len(feats) == 32
    batch = PreferenceCollator(tok.pad_token_id, "pairs")(feats)
    with torch.no_grad():
        c, r = pair_outputs(model, batch)
        want_c = (label_logps(c.logits, c.labels) * c.mask).sum(-1)
        want_r = (label_logps(r.logits, r.labels) * r.mask).sum(-1)
    assert chosen == pytest.approx(want_c.tolist(), abs=1e-3)
    assert rejected == pytest.approx(want_r.tolist(), abs=1e-3)
    for i, f in enumerate(feats[:4]):
        for key, got in (("chosen_ids", chosen[i]), ("rejected_ids", rejected[i])):
            seq = torch.tensor([f["prompt_ids"] + f[key]])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=seq).logits[0].float(), -1)
            P = len(f["prompt_ids"])
            by_hand = sum(float(logp[P + t - 1, y]) for t, y in enumerate(f[key]))
            assert got == pytest.approx(by_hand, abs=1e-3)


def test_reward_accuracy_of_implicit_rewards_on_known_pairs(tiny_ws, tmp_path, tiny):
    """Order each pair by model2's log-ratio against model: its DPO reward is then right on all of
    them (accuracy 1), and wrong on all of them once swapped (accuracy 0)."""
    from aligndistil.model.loading import load_causal_lm

    model, tok = tiny
    other = load_causal_lm(tiny_ws["model2"])
    raw = [json.loads(line) for line in open(tiny_ws["prefs"])][:8]
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in raw))
    lp_m, lp_o = pair_logps(model, src, tok), pair_logps(other, src, tok)
    ordered = []
    for i, r in enumerate(raw):
        r_c = lp_o[0][i] - lp_m[0][i]
        r_r = lp_o[1][i] - lp_m[1][i]
        if r_c < r_r:
            r = {**r, "chosen": r["rejected"], "rejected": r["chosen"]}
        ordered.append(r)
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in ordered))
    bad.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n" for r in ordered))
    for pairs, want in ((good, 1.0), (bad, 0.0)):
        res = evaluate({"m": tiny_ws["model"]}, reference=tiny_ws["model"], dpo_model=tiny_ws["model2"],
                       reverse_dpo_model=tiny_ws["model"], prompts=PROMPTS[:2], pairs=str(pairs),
                       out_dir=tmp_path / f"ev-{want}", max_new_tokens=4, plots=False, progress=False, log=lambda *a: None)
        acc = res["reward_accuracy"]
        assert acc["n_pairs"] == 8
        assert acc["dpo"] == want
        assert acc["contrastive"] == want  # pi_rev = pi_ref here, so both rewards agree


@pytest.fixture()
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "qs_rewards.py").write_text(textwrap.dedent("""
        def vowels(prompts, responses):
            return [float(sum(c in "aeiou" for c in r)) for r in responses]
        def nan(prompts, responses):
            return [float("nan")] * len(responses)
        def boom(prompts, responses):
            raise RuntimeError("scorer offline")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("qs_rewards", None)
    return "qs_rewards"


def test_evaluate_end_to_end_self_kl_is_zero(tiny_ws, tmp_path, reward_module):
    copy_dir = tmp_path / "model_copy"
    shutil.copytree(tiny_ws["model"], copy_dir)
    out = tmp_path / "eval"
    res = evaluate({"initial": tiny_ws["model"], "other": tiny_ws["model2"]}, reference=tiny_ws["model"],
                   dpo_model=str(copy_dir), prompts=PROMPTS, reward=f"{reward_module}:vowels",
                   out_dir=out, max_new_tokens=10, num_samples=2, batch_size=4, progress=False, log=lambda *a: None)
    ini, oth = res["models"]["initial"], res["models"]["other"]
    assert ini["kl_ref"] == 0.0 and ini["kl_ref_tokenwise"] == 0.0  # the reference itself
    # the same weights loaded separately: computed through the cached path, still 0
    assert abs(ini["kl_dpo"]) < 1e-4 and abs(ini["kl_dpo_tokenwise"]) < 1e-4
    assert oth["kl_ref_tokenwise"] > 0.01
    assert ini["n_samples"] == 10
    samples = [json.loads(x) for x in (out / "samples" / "initial.jsonl").read_text().splitlines()]
    assert len(samples) == 10
    vowels = [sum(c in "aeiou" for c in s["response"]) for s in samples]
    assert ini["reward_mean"] == pytest.approx(sum(vowels) / 10)
    assert ini["length_mean"] == pytest.approx(sum(s["n_tokens"] for s in samples) / 10)
    assert ini["distinct_2"] == pytest.approx(distinct_n([s["response"] for s in samples], 2))
    assert json.loads((out / "results.json").read_text())["models"].keys() == {"initial", "other"}
    md = (out / "results.md").read_text()
    assert "| initial |" in md and "| other |" in md and "KL to DPO" in md
    for png in ("frontier.png",):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluation_runs_every_forward_without_autograd(tiny_ws, tmp_path, reward_module, monkeypatch):
    """Sampling and the KL forwards need no graph; with autograd on (the loaded weights
    require grad) every sampling step's full-vocabulary tensors were kept alive."""
    import torch.nn as nn

    seen = []
    real = nn.Module.__call__

    def spy(self, *a, **k):
        if type(self).__name__.endswith("ForCausalLM"):
            seen.append(torch.is_grad_enabled())
        return real(self, *a, **k)

    monkeypatch.setattr(nn.Module, "__call__", spy)
    evaluate({"other": tiny_ws["model2"]}, reference=tiny_ws["model"], prompts=PROMPTS[:2],
             reward=f"{reward_module}:vowels", out_dir=tmp_path / "e", max_new_tokens=4, batch_size=4,
             progress=False, log=lambda *a: None)
    assert seen and not any(seen)


@pytest.mark.parametrize("fn, pattern", [("nan", "non-finite"), ("boom", "scorer offline")])
def test_evaluate_reports_a_failing_reward(tiny_ws, tmp_path, reward_module, fn, pattern):
    out = tmp_path / "eval"
    with pytest.raises(EvalError, match=pattern) as info:
        evaluate({"m": tiny_ws["model"]}, reference=tiny_ws["model"], prompts=PROMPTS[:2],
                 reward=f"{reward_module}:{fn}", out_dir=out, max_new_tokens=3, progress=False, log=lambda *a: None)
    assert "'m'" in str(info.value)
    assert not (out / "results.json").exists()


def test_eval_cli(tiny_ws, tmp_path, reward_module, capsys):
    from aligndistil.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS[:3]) + "\n")
    out = tmp_path / "ev"
    rc = main(["eval", "--models", f"initial={tiny_ws['model']}", tiny_ws["model2"], "--reference", tiny_ws["model"],
               "--dpo-model", tiny_ws["model2"], "--prompts", str(prompts), "--reward", f"{reward_module}:vowels",
               "--max-new-tokens", "4", "--no-progress", "--no-plots", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| initial |" in printed and "| model2 |" in printed
    rc = main(["eval", "--models", tiny_ws["model"], "--reference", tiny_ws["model"], "--prompts", str(prompts),
               "--reward", f"{reward_module}:nan", "--max-new-tokens", "3", "--no-progress", "--out", str(tmp_path / "e2")])
    assert rc == 2
    assert "non-finite" in capsys.readouterr().err
    assert not (tmp_path / "e2" / "results.json").exists()


def test_settings_as_keywords_or_dataclass(tmp_path):
    """The CLI passes settings as keywords, the quickstart as an EvalSettings: both are checked
    before any model is loaded."""
    with pytest.raises(TypeError, match="bogus"):
        evaluate({"m": "x"}, reference="x", out_dir=tmp_path, bogus=1)
    with pytest.raises(TypeError, match="reference"):
        evaluate({"m": "x"}, out_dir=tmp_path)
    with pytest.raises(ValueError, match="at least one model"):
        evaluate({}, EvalSettings(reference="x"), out_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):  # a keyword overrides the dataclass
        evaluate({"m": "x"}, EvalSettings(reference="x"), out_dir=tmp_path, pairs=str(tmp_path / "nope.jsonl"))
    s = EvalSettings(reference="r", prompts=["a", "b"], temperature=0.7)
    rec = s.record(["a", "b"])
    assert rec["prompts"] == "2 prompts" and rec["n_prompts"] == 2 and rec["kl_estimator_unbiased"] is False



# ---------------------------------------------------------------- issue 16 items 5-7, issue 10
def test_table_shows_tokenwise_kl_with_the_monte_carlo_estimate_beside():
    from aligndistil.workflows.eval_report import KL_FOOTER, format_table

    settings = EvalSettings(reference="r", prompts="p.txt").record(["a", "b"], "chat template applied to every prompt")
    model = {"reward_mean": 0.5, "reward_ci95": 0.1, "length_mean": 7.0, "distinct_2": 0.9,
             "kl_ref": -0.06, "kl_ref_tokenwise": 0.0412, "kl_dpo": 0.31, "kl_dpo_tokenwise": 0.2}
    md = format_table({"settings": settings, "models": {"m": model}})
    assert "| model | reward (95% CI) | KL to ref | (MC) | KL to DPO | (MC) | length | distinct-2 |" in md
    assert "| m | +0.500 ± 0.100 | 0.04 | -0.06 | 0.20 | 0.31 | 7.0 | 0.900 |" in md
    assert KL_FOOTER in md and "never negative" in KL_FOOTER and "can come out negative" in KL_FOOTER
    assert "Prompts: chat template applied to every prompt; training follows the same rule" in md


def test_eval_checks_inputs_and_models_before_writing_anything(tiny_ws, tmp_path, reward_module):
    out = tmp_path / "never"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    kw = dict(reference=tiny_ws["model"], reward=f"{reward_module}:vowels", out_dir=out, max_new_tokens=3,
              progress=False, log=lambda *a: None)
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: field 'prompt' is missing"):
        evaluate({"m": tiny_ws["model"]}, prompts=str(bad), **kw)
    with pytest.raises(EvalError, match=r"model 'gone' \(.*missing_model\) cannot be loaded"):
        evaluate({"m": tiny_ws["model"], "gone": str(tmp_path / "missing_model")}, prompts=PROMPTS[:2], **kw)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "p", "chosen": "a"}\n')
    with pytest.raises(DataError, match=r"pairs\.jsonl, line 1: field 'rejected' is missing"):
        evaluate({"m": tiny_ws["model"]}, prompts=PROMPTS[:2], pairs=str(pairs), dpo_model=tiny_ws["model"], **kw)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: this machine has no CUDA GPU"):
            evaluate({"m": tiny_ws["model"]}, prompts=PROMPTS[:2], device="cuda", **kw)
    with pytest.raises(ValueError, match="--dtype must be float32 or bfloat16"):
        evaluate({"m": tiny_ws["model"]}, prompts=PROMPTS[:2], dtype="float16", **kw)
    assert not out.exists()


def test_eval_device_and_dtype_are_applied_and_recorded(tiny_ws, tmp_path, reward_module):
    """``device`` and ``dtype`` reach the loaded models (bf16 here: every forward's weights)
    and the report's settings; ``auto`` is this machine's GPU if it has one, else the CPU."""
    import torch.nn as nn

    seen = set()
    real = nn.Module.__call__

    def spy(self, *a, **k):
        if type(self).__name__.endswith("ForCausalLM"):
            seen.add((next(self.parameters()).dtype, next(self.parameters()).device.type))
        return real(self, *a, **k)

    nn.Module.__call__ = spy
    try:
        res = evaluate({"other": tiny_ws["model2"]}, reference=tiny_ws["model"], prompts=PROMPTS[:2],
                       reward=f"{reward_module}:vowels", out_dir=tmp_path / "e", max_new_tokens=3, batch_size=4,
                       dtype="bfloat16", progress=False, log=lambda *a: None)
    finally:
        nn.Module.__call__ = real
    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert seen == {(torch.bfloat16, here)}
    assert res["settings"]["device"] == here and res["settings"]["dtype"] == "bfloat16"
    assert res["models"]["other"]["kl_ref_tokenwise"] > 0


def test_eval_takes_training_data_prompts_rendered_by_the_training_rule(tiny_ws, tmp_path, reward_module):
    """`--prompts pairs.jsonl` evaluates each record's prompt (not the raw JSON line), rendered
    exactly as training renders it under the default rule, which the report states."""
    from aligndistil.data import build_dataset
    from aligndistil.model.loading import load_tokenizer
    from aligndistil.workflows.evaluate import _prompt_batches

    tok = load_tokenizer(tiny_ws["model"])
    train_feats, _ = build_dataset(tiny_ws["prefs"], tok, "prompt", None, None)  # the training default
    prompts = [json.loads(x)["prompt"] for x in open(tiny_ws["prefs"]) if x.strip()]
    unique = list(dict.fromkeys(prompts))
    s = EvalSettings(reference=tiny_ws["model"], prompts=unique, batch_size=len(unique))
    (chunk, ids, att), = _prompt_batches(tok, unique, s)
    first = {p: i for i, p in reversed(list(enumerate(prompts)))}
    for row, (i, _) in enumerate(chunk):
        got = ids[row][att[row].bool()].tolist()
        assert got == train_feats[first[unique[i]]]["prompt_ids"]
    out = tmp_path / "ev"
    res = evaluate({"m": tiny_ws["model"]}, reference=tiny_ws["model"], prompts=str(tiny_ws["prefs"]),
                   reward=f"{reward_module}:vowels", out_dir=out, max_new_tokens=3, plots=False,
                   progress=False, log=lambda *a: None)
    assert res["settings"]["n_prompts"] == len(unique)
    assert res["settings"]["chat_template"].startswith("chat template applied to every prompt (use_chat_template=auto")
    samples = [json.loads(x) for x in (out / "samples" / "m.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in samples] == unique
    assert "Prompts: chat template applied" in (out / "results.md").read_text()
