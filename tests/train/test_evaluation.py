"""Evaluation during training (data.eval_file / data.eval_split_ratio, train.eval_steps):
the method's loss and metrics on held-out examples, logged under eval/ in metrics.jsonl."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aligndistil.config import ConfigError
from aligndistil.data import DataError
from aligndistil.data.splits import holdout_split
from aligndistil.train.evaluation import _batches, due
from aligndistil.train.loop import Trainer
from test_loop import assert_same_weights, losses
from test_methods import make_cfg

REPO = Path(__file__).resolve().parents[2]
DPO_EVAL_KEYS = {"eval/loss", "eval/rewards/chosen", "eval/rewards/rejected", "eval/rewards/accuracies",
                 "eval/rewards/margins", "eval/logps/chosen", "eval/logps/rejected"}


def rows(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def first_lines(src, dst: Path, n: int) -> str:
    dst.write_text("".join(Path(src).read_text().splitlines(keepends=True)[:n]))
    return str(dst)


# ----------------------------------------------------------------------------- pure parts
def test_holdout_split_is_seeded_disjoint_and_rounds_up():
    train, held = holdout_split(10, 0.25, seed=3)
    assert len(held) == 3  # ceil(0.25 * 10), as datasets' train_test_split rounds a test fraction
    assert sorted(train + held) == list(range(10)) and train == sorted(train) and held == sorted(held)
    assert holdout_split(10, 0.25, seed=3) == (train, held)  # the same on every process and on resume
    assert any(holdout_split(10, 0.25, seed=s)[1] != held for s in range(4, 8))  # the seed picks them
    with pytest.raises(DataError, match="leaves none to train on"):
        holdout_split(1, 0.5, seed=0)  # ceil(0.5) = 1 of 1 held out


def test_every_process_runs_the_same_batches_and_each_example_counts_once():
    n, bs, ws = 5, 2, 2
    per_rank = [list(_batches(n, bs, rank, ws)) for rank in range(ws)]
    assert [len(b) for b in per_rank] == [2, 2]  # ceil(5 / (2 x 2)) rounds on both ranks
    # rank 0: [0, 1], [4, 0*]; rank 1: [2, 3], [1*, 2*]  (* a repeat filling the last round)
    assert per_rank[0] == [([0, 1], [True, True]), ([4, 0], [True, False])]
    assert per_rank[1] == [([2, 3], [True, True]), ([1, 2], [False, False])]
    real = sorted(i for b in per_rank for idx, ok in b for i, r in zip(idx, ok) if r)
    assert real == list(range(n))
    assert list(_batches(5, 4, 0, 1)) == [([0, 1, 2, 3], [True] * 4), ([4], [True])]  # one process: no repeats


def test_eval_steps_and_the_last_step_are_due():
    assert [s for s in range(1, 8) if due(s, 3, 7)] == [3, 6, 7]
    assert [s for s in range(1, 8) if due(s, 0, 7)] == [7]


# ----------------------------------------------------------------------------- in training
def _sequence_logp(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log pi(response | prompt) summed over the response tokens, from full logits."""
    ids = torch.tensor([prompt + response])
    logp = F.log_softmax(model(ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    return logp[len(prompt) - 1:].sum()


def test_dpo_eval_metrics_equal_the_loss_worked_out_on_the_final_model(tiny_ws, tmp_path):
    """eval/* at the last step is DPO's loss and reward metrics of the final weights on the
    eval pairs, recomputed here from full logits: mean of -log sigma(beta (D_pi - D_ref))."""
    from transformers import AutoModelForCausalLM

    from aligndistil import data as D
    from aligndistil.model.loading import load_tokenizer

    eval_file = first_lines(tiny_ws["prefs"], tmp_path / "eval.jsonl", 6)  # batches of 4 and 2
    out = Trainer(make_cfg(tiny_ws, tmp_path / "out", "dpo", [f"data.eval_file={eval_file}", "train.eval_steps=1",
                                                               "train.max_steps=2"])).train()
    got = rows(out)
    assert [r["step"] for r in got] == [1, 2] and all(DPO_EVAL_KEYS <= set(r) for r in got)
    assert got[0]["eval/loss"] != got[1]["eval/loss"]  # scored after each step's update

    tok = load_tokenizer(tiny_ws["model"])
    feats, _ = D.build_dataset(eval_file, tok, "pairs", max_length=64, max_prompt_length=32)
    assert len(feats) == 6
    policy = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ref = AutoModelForCausalLM.from_pretrained(tiny_ws["model"]).eval()
    beta = 0.1
    with torch.no_grad():
        rc = torch.stack([beta * (_sequence_logp(policy, f["prompt_ids"], f["chosen_ids"])
                                  - _sequence_logp(ref, f["prompt_ids"], f["chosen_ids"])) for f in feats])
        rr = torch.stack([beta * (_sequence_logp(policy, f["prompt_ids"], f["rejected_ids"])
                                  - _sequence_logp(ref, f["prompt_ids"], f["rejected_ids"])) for f in feats])
    want = {"eval/loss": float(-F.logsigmoid(rc - rr).mean()), "eval/rewards/chosen": float(rc.mean()),
            "eval/rewards/rejected": float(rr.mean()), "eval/rewards/margins": float((rc - rr).mean()),
            "eval/rewards/accuracies": float((rc > rr).double().mean())}
    for k, v in want.items():
        assert got[-1][k] == pytest.approx(v, abs=2e-5), k


def test_an_eval_set_changes_nothing_in_training(tiny_ws, tmp_path):
    """Scoring draws no random numbers and takes no gradient: the same weights and training
    losses with and without an eval file, and the same config fingerprint."""
    opts = ["train.max_steps=3"]
    with_eval = [*opts, f"data.eval_file={tiny_ws['prefs']}", "train.eval_steps=2"]
    a = Trainer(make_cfg(tiny_ws, tmp_path / "plain", "sparsepo", opts)).train()  # an extra module too
    cfg = make_cfg(tiny_ws, tmp_path / "eval", "sparsepo", with_eval)
    assert cfg.fingerprint() == make_cfg(tiny_ws, tmp_path / "eval", "sparsepo", opts).fingerprint()
    b = Trainer(cfg).train()
    assert_same_weights(a, b, atol=0)
    assert losses(a) == losses(b)
    assert [("eval/loss" in r) for r in rows(b)] == [False, True, True]  # step 2 (eval_steps) and the last
    assert "eval/mask/sparsity" in rows(b)[-1]


@pytest.mark.parametrize("method, keys", [
    ("sft", {"eval/loss", "eval/nll/sequence", "eval/response_length"}),
    ("tdpo2", {"eval/loss", "eval/kl/chosen", "eval/kl/rejected", "eval/rewards/margins"}),
    ("aligndistil", {"eval/loss", "eval/teacher_kl", "eval/alpha/mean"}),
    ("kto", {"eval/loss", "eval/rewards/chosen", "eval/kl"}),
])
def test_token_level_and_unpaired_methods_log_their_own_metrics(tiny_ws, tmp_path, method, keys):
    out = Trainer(make_cfg(tiny_ws, tmp_path / "o", method, ["data.eval_split_ratio=0.25"])).train()
    last = rows(out)[-1]
    assert keys <= set(last), set(last)
    assert all(v == v for k, v in last.items() if k.startswith("eval/"))  # no NaN


def test_sft_eval_loss_is_per_token(tiny_ws, tmp_path):
    """SFT is token-normalised: eval/loss = sum of NLL / response tokens, so it equals
    eval/nll/sequence (mean NLL per sequence) / eval/response_length (mean tokens per sequence)."""
    out = Trainer(make_cfg(tiny_ws, tmp_path / "o", "sft", ["data.eval_split_ratio=0.25"])).train()
    last = rows(out)[-1]
    assert last["eval/loss"] == pytest.approx(last["eval/nll/sequence"] / last["eval/response_length"], rel=1e-6)


def test_eval_split_ratio_holds_out_training_examples(tiny_ws, tmp_path):
    cfg = make_cfg(tiny_ws, tmp_path / "o", "dpo", ["data.eval_split_ratio=0.25", "train.max_steps=0",
                                                     "train.num_epochs=1"])
    assert cfg.fingerprint() != make_cfg(tiny_ws, tmp_path / "o", "dpo", ["train.max_steps=0"]).fingerprint()
    out = Trainer(cfg).train()
    done = json.loads((out / "COMPLETE.json").read_text())
    assert done["data"]["n_used"] == 24 and done["steps"] == 6  # 32 pairs - ceil(8.0) held out; 24 / batch 4
    assert "eval/loss" in rows(out)[-1] and "eval/loss" not in rows(out)[0]  # eval_steps 0: the last step only


@pytest.mark.parametrize("method, extra, says", [
    ("ppo", ["method.max_new_tokens=4"], "samples its responses from the policy every step"),
    ("aligndistil", ["method.mode=on_policy"], "samples its responses from the policy every step"),
    ("dpo", ["train.teacher_cache=CACHE"], "the cache serves the training examples only"),
    ("dpo", ["data.eval_file=MISSING"], "data.eval_file: .*missing.jsonl does not exist"),
    ("dpo", ["data.eval_file=EVAL", "data.eval_split_ratio=0.1"], "each make an eval set"),
])
def test_an_eval_set_the_run_cannot_score_is_refused_before_work(tiny_ws, tmp_path, method, extra, says):
    extra = [x.replace("CACHE", str(tmp_path / "cache")).replace("MISSING", str(tmp_path / "missing.jsonl"))
             .replace("EVAL", tiny_ws["prefs"]) for x in extra]
    if not any(x.startswith("data.eval_file") for x in extra):
        extra.append("data.eval_split_ratio=0.25")
    with pytest.raises(ConfigError, match=says) as e:
        Trainer(make_cfg(tiny_ws, tmp_path / "o", method, extra).validate()).train()
    assert e.value.exit_code == 2
    assert not (tmp_path / "o").exists() and not (tmp_path / "cache").exists()


def test_eval_steps_without_an_eval_set_is_refused(tiny_ws, tmp_path):
    with pytest.raises(ConfigError, match="train.eval_steps=5 needs an eval set: data.eval_file or "
                                          "data.eval_split_ratio"):
        Trainer(make_cfg(tiny_ws, tmp_path / "o", "dpo", ["train.eval_steps=5"]))


def test_an_eval_file_with_no_usable_example_is_a_data_error(tiny_ws, tmp_path):
    empty = tmp_path / "same.jsonl"
    empty.write_text('{"prompt": "p", "chosen": "same", "rejected": "same"}\n')  # identical: skipped
    with pytest.raises(DataError, match="same.jsonl: no usable records left"):
        Trainer(make_cfg(tiny_ws, tmp_path / "o", "dpo", [f"data.eval_file={empty}"])).train()
    assert not (tmp_path / "o" / "config.yaml").exists()


def test_two_processes_score_the_same_eval_set_as_one(tiny_ws, tmp_path):
    """2 gloo processes x batch 2 and 1 process x batch 4 train the same steps; their eval on 5
    pairs (the last round filled with repeats that are not counted) gives the same numbers."""
    eval_file = first_lines(tiny_ws["prefs"], tmp_path / "eval.jsonl", 5)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("{}\n")
    args = [f"model.policy={tiny_ws['model']}", f"data.train_file={tiny_ws['prefs']}", f"data.eval_file={eval_file}",
            "data.max_length=64", "data.max_prompt_length=32", "train.max_steps=2", "train.eval_steps=1",
            "train.learning_rate=1e-2", "train.warmup_ratio=0", "train.progress_bar=false", "method.name=dpo"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "configs" / "accelerate" / "multi_cpu.yaml"),
              "-m", "aligndistil", "train", "-c", str(cfg_file)]
    two = tmp_path / "two"
    res = subprocess.run([*launch, *args, "train.per_device_batch_size=2", f"train.output_dir={two}"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    opts = [f"data.eval_file={eval_file}", "train.eval_steps=1"]
    one = Trainer(make_cfg(tiny_ws, tmp_path / "one", "dpo", opts)).train()
    for a, b in zip(rows(one), rows(two), strict=True):
        for k in DPO_EVAL_KEYS:
            assert b[k] == pytest.approx(a[k], abs=1e-5), k
