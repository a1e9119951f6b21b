"""Evaluation metrics on hand-made cases, and the evaluation run on the tiny model."""

from __future__ import annotations

import json
import math
import shutil
import sys
import textwrap

import pytest
import torch

from aligndistil.workflows.evaluate import (
    EvalError,
    continuation_logits,
    distinct_n,
    evaluate,
    implicit_rewards,
    mean_ci95,
    pair_logps,
    reward_accuracy,
    sequence_kl_mc,
    sequence_kl_tokenwise,
)

PROMPTS = ["Review the film:", "Review this cafe:", "Review my phone:", "Review the park:", "Review that song:"]


# ---------------------------------------------------------------------------- pure metrics
def test_mean_ci95_formula():
    mean, half = mean_ci95([1.0, 2.0, 3.0, 4.0])
    assert mean == pytest.approx(2.5)
    # sample sd = sqrt(5/3); half = 1.96 * sd / sqrt(4)
    assert half == pytest.approx(1.959963984540054 * math.sqrt(5 / 3) / 2)
    assert mean_ci95([3.0, 3.0, 3.0]) == (3.0, 0.0)
    m, h = mean_ci95([0.7])
    assert m == 0.7 and math.isnan(h)
    with pytest.raises(ValueError):
        mean_ci95([])
    with pytest.raises(ValueError, match="non-finite"):
        mean_ci95([1.0, float("nan")])


def test_distinct_n_hand_made():
    # bigrams: (a,b) (b,c) | (a,b) (b,d) -> 3 unique of 4
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(0.75)
    # n-grams do not cross texts: "c" + "a" is not a bigram
    assert distinct_n(["a b c", "a"], 2) == pytest.approx(1.0)
    assert distinct_n(["x x x x"], 2) == pytest.approx(1 / 3)
    assert distinct_n(["a b a"], 1) == pytest.approx(2 / 3)
    assert distinct_n(["one", ""], 2) == 0.0
    with pytest.raises(ValueError):
        distinct_n(["a b"], 0)


def test_reward_accuracy_known_answers():
    assert reward_accuracy([1.0, 2.0, 3.0], [0.0, 1.0, 2.0]) == 1.0
    assert reward_accuracy([0.0, 1.0], [1.0, 2.0]) == 0.0
    # a win, a loss and a tie (half)
    assert reward_accuracy([1.0, 2.0, 3.0], [0.0, 3.0, 3.0]) == pytest.approx(0.5)
    assert reward_accuracy([5.0] * 4, [5.0] * 4) == 0.5  # a constant reward is at chance
    with pytest.raises(ValueError):
        reward_accuracy([1.0], [])


def test_implicit_rewards():
    assert implicit_rewards([-1.0, -2.0], [-3.0, -2.0], 0.1) == pytest.approx([0.2, 0.0])
    with pytest.raises(ValueError):
        implicit_rewards([1.0], [1.0, 2.0], 0.1)


def test_sequence_kl_mc_hand_made():
    lp_self = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    lp_other = torch.tensor([[-2.0, -2.5, -9.0], [-1.0, -0.1, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    out = sequence_kl_mc(lp_self, lp_other, mask)
    assert out.tolist() == pytest.approx([1.0 + 0.5, 0.5 - 0.4])  # masked position ignored
    assert sequence_kl_mc(lp_self, lp_self, mask).tolist() == [0.0, 0.0]


def test_sequence_kl_tokenwise_hand_made():
    p = torch.tensor([0.5, 0.5]).log()
    q = torch.tensor([0.9, 0.1]).log()
    logits_self = torch.stack([p, p])[None]  # (1, 2, 2)
    logits_other = torch.stack([q, p])[None]
    mask = torch.tensor([[1.0, 1.0]])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # second position: KL(p||p) = 0
    assert sequence_kl_tokenwise(logits_self, logits_other, mask).item() == pytest.approx(expected, rel=1e-5)
    assert sequence_kl_tokenwise(logits_self, logits_self, mask).item() == pytest.approx(0.0, abs=1e-7)


# ---------------------------------------------------------------------------- model passes
@pytest.fixture(scope="module")
def tiny(tiny_ws):
    from aligndistil.model.loading import load_causal_lm, load_tokenizer

    return load_causal_lm(tiny_ws["model"]), load_tokenizer(tiny_ws["model"])


def test_sampling_logps_and_continuation_match_a_full_forward(tiny):
    """The cached, left-padded paths give the same log-probs as one teacher-forced forward."""
    from aligndistil.model.sampling import encode_prompts, left_pad, sample_with_logprobs
    from aligndistil.losses.ops import label_logps
    from aligndistil.model.outputs import response_outputs

    model, tok = tiny
    ids, att = left_pad(encode_prompts(tok, PROMPTS), tok.pad_token_id)
    # EOS = a frequent character, so some rows end early and are padded after it
    g = sample_with_logprobs(model, ids, att, max_new_tokens=12, seeds=list(range(len(PROMPTS))),
                             eos_token_ids=[tok.convert_tokens_to_ids("e")], pad_token_id=tok.pad_token_id,
                             return_logits=True)
    full_ids = torch.cat([ids, g["tokens"]], 1)
    full_att = torch.cat([att, g["mask"]], 1)
    resp = torch.cat([torch.zeros_like(att), g["mask"]], 1)
    ref = response_outputs(model, full_ids, full_att, resp)
    T = ref.logits.shape[1]
    with torch.no_grad():
        lp_ref = label_logps(ref.logits, ref.labels) * ref.mask
    torch.testing.assert_close(g["logps"][:, :T], lp_ref, atol=1e-4, rtol=0)
    cont = continuation_logits(model, ids, att, g["tokens"], g["mask"])
    m = g["mask"][:, :T].bool()
    torch.testing.assert_close(cont[:, :T][m], ref.logits[m], atol=1e-4, rtol=0)
    torch.testing.assert_close(g["logits"][:, :T][m], ref.logits[m], atol=1e-4, rtol=0)


def test_pair_logps_match_a_teacher_forced_forward(tiny_ws, tiny):
    """The prompt-cached pair scoring equals log pi(y|x) from one forward over [prompt ; response]."""
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


def test_generation_is_reproducible_across_batch_sizes(tiny):
    from aligndistil.model.sampling import generate_texts

    model, tok = tiny
    a = generate_texts(model, tok, PROMPTS, num_samples=2, max_new_tokens=8, seed=3, batch_size=10)
    b = generate_texts(model, tok, PROMPTS, num_samples=2, max_new_tokens=8, seed=3, batch_size=3)
    c = generate_texts(model, tok, PROMPTS, num_samples=2, max_new_tokens=8, seed=4, batch_size=10)
    assert [r["response"] for r in a] == [r["response"] for r in b]
    assert [r["response"] for r in a] != [r["response"] for r in c]
    assert [(r["prompt_index"], r["sample_index"]) for r in a] == [(i, s) for i in range(5) for s in range(2)]


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
