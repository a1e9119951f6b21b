"""The online methods (PPO, RTO, REINFORCE, on-policy AlignDistil) in the one training loop.

The formulas are tested in tests/losses (test_online.py, test_ppo.py, test_reinforce.py); here:
each method trains the tiny model through the command line, PPO's rollout/update wiring
(ratio 1 on the first pass, the number of optimizer updates, exact resume with the critic),
the reward's text, and bad input: each a clear error with exit code 2 and nothing finished
or checkpointed on disk.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aligndistil import losses as L
from aligndistil.config import MethodConfig, RunConfig, apply_overrides
from aligndistil.train.loop import Trainer

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TINY = REPO / "configs" / "tiny"
# The subprocess imports the test rewards (_online_rewards.py) as module:function specs.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
VOWELS = "method.reward=_online_rewards:vowels"


def paths(ws, out) -> list[str]:
    return [f"model.policy={ws['model']}", f"model.dpo_model={ws['model2']}", f"model.reverse_dpo_model={ws['model']}",
            f"data.train_file={ws['prefs']}", f"train.output_dir={out}", "train.progress_bar=false"]


def cli(config: str, ws, out, *extra):
    return subprocess.run([sys.executable, "-m", "aligndistil", "train", "-c", str(TINY / f"{config}.yaml"),
                           *paths(ws, out), *extra], capture_output=True, text=True, env=ENV, timeout=600)


def rows(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


ROLLOUT = {"rollout/ended", "response_length"}
PPO = ROLLOUT | {"policy/clipfrac", "policy/approx_kl", "policy/ratio", "value/clipfrac", "value/mean", "value/error",
                 "reward/score", "reward/kl_penalty", "reward/total", "kl/ref"}
CASES = [
    ("ppo", [VOWELS, "method.log_reward=vader"], PPO | {"rollout/reward"}),
    ("rto", [VOWELS], PPO | {"reward/dense"}),
    ("rto", ["method.rto_recipe=aligndistil", "method.kl_coef=0.1"], PPO | {"reward/dense"}),
    ("reinforce_sequence", [], ROLLOUT | {"reward/contrastive_per_token", "kl/dpo_logratio", "rollout/reward"}),
    ("reinforce_token", ["method.baseline=loo", "method.num_samples=2"],
     ROLLOUT | {"reward/contrastive_per_token", "kl/dpo", "rollout/reward"}),
    # The convergence study's AlignDistil: on-policy, static alpha = beta0 / beta.
    ("aligndistil_constant", ["method.mode=on_policy", "method.alpha=1.25", "method.beta=0.08",
                              "method.max_new_tokens=12", "method.log_reward=vader"],
     {"teacher_kl", "reward/contrastive_per_token", "rollout/reward", "rollout/ended"}),
]


@pytest.mark.parametrize("config, extra, metrics", CASES, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_online_method_trains_the_tiny_model_through_the_cli(tiny_ws, tmp_path, config, extra, metrics):
    out = tmp_path / "out"
    res = cli(config, tiny_ws, out, *extra)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    got = rows(out)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in got)
    assert metrics <= set(got[-1]), sorted(set(got[-1]))
    before, after = load_file(f"{tiny_ws['model']}/model.safetensors"), load_file(str(out / "model.safetensors"))
    assert sum(float((before[k] - after[k]).abs().max()) for k in before) > 0, "no parameter changed"
    assert (out / "COMPLETE.json").is_file()
    assert (out / "critic.safetensors").is_file() == config.startswith(("ppo", "rto"))


def ppo_cfg(ws, out, *extra):
    return apply_overrides(RunConfig(), [*paths(ws, out), "method.name=ppo", VOWELS, "method.max_new_tokens=8",
                                         "train.per_device_batch_size=4", "train.learning_rate=1e-2",
                                         "train.warmup_ratio=0", *extra])


def test_ppo_first_pass_is_on_policy_and_each_step_takes_epochs_x_mini_batches_updates(tiny_ws, tmp_path):
    """With one epoch of one mini-batch the update's forward equals the rollout's: ratio 1, nothing
    clipped. With 2 epochs x 2 mini-batches a step is 4 optimizer updates and one scheduler step."""
    one = Trainer(ppo_cfg(tiny_ws, tmp_path / "one", "method.ppo_epochs=1", "method.num_mini_batches=1",
                          "train.max_steps=3"))
    one.train()
    for r in rows(tmp_path / "one"):
        assert r["policy/ratio"] == pytest.approx(1.0, abs=1e-5) and r["policy/clipfrac"] == 0.0
        assert r["policy/approx_kl"] == pytest.approx(0.0, abs=1e-9)
    four = Trainer(ppo_cfg(tiny_ws, tmp_path / "four", "method.ppo_epochs=2", "method.num_mini_batches=2",
                           "train.max_steps=2"))
    four.train()
    state = four.optimizer.state_dict()["state"]
    assert {int(s["step"]) for s in state.values()} == {8}  # policy and critic groups: 2 steps x 4 updates
    assert four.scheduler.last_epoch == 2
    assert len(four.optimizer.param_groups) == 2 and four.optimizer.param_groups[1]["weight_decay"] == 0.0
    r = rows(tmp_path / "four")[-1]
    assert r["policy/ratio"] != pytest.approx(1.0, abs=1e-6)  # later updates see a moved policy


def test_ppo_resume_is_exact_critic_and_rollout_rng_included(tiny_ws, tmp_path):
    """4 steps straight == 2 steps, a crash, and --resume: the rollouts (sampling noise and the
    mini-batch shuffle), the critic and its optimizer state all come back from the checkpoint."""
    opts = ["train.max_steps=4", "train.save_steps=2", "method.ppo_epochs=2", "method.num_mini_batches=2",
            "method.critic_learning_rate=5e-3"]
    full = Trainer(ppo_cfg(tiny_ws, tmp_path / "full", *opts)).train()
    died = tmp_path / "died"
    died.mkdir()
    shutil.copytree(full / "checkpoint-2", died / "checkpoint-2")
    (died / "metrics.jsonl").write_text("".join(x + "\n" for x in (full / "metrics.jsonl").read_text().splitlines()[:2]))
    resumed = Trainer(ppo_cfg(tiny_ws, died, *opts), resume=True).train()
    for name in ("model.safetensors", "critic.safetensors"):
        a, b = load_file(str(full / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=f"{name}: {k}")
    assert [r["loss"] for r in rows(resumed)] == pytest.approx([r["loss"] for r in rows(full)], abs=1e-6)
    assert [r["reward/score"] for r in rows(resumed)] == pytest.approx([r["reward/score"] for r in rows(full)], abs=1e-7)


def test_two_processes_equal_one_does_not_hold_for_online_methods_by_design():
    pytest.skip("each process samples with its own seed (train.seed + rank, so that ranks draw different "
                "responses), so a 2-process online run samples other responses than a 1-process one and their "
                "weights differ by design; tests/train/test_loop.py checks the per-rank seeds and a 2-process "
                "on-policy resume, and the normalisation over processes is the loop's, shared with every method")


# ----------------------------------------------------------------------------- pieces
def test_the_reward_sees_the_prompt_and_the_response_before_eos(tiny_ws):
    from aligndistil.model.loading import load_tokenizer
    from aligndistil.train.online import rollout_texts

    tok = load_tokenizer(tiny_ws["model"])
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    pad, eos, bos = tok.pad_token_id, tok.eos_token_id, tok.bos_token_id
    # row 0: left-padded prompt, response "ok" + EOS; row 1: response cut without EOS
    p0, p1 = [pad, bos] + enc("Hi:"), [bos] + enc("Yo!:")
    r0, r1 = enc("ok") + [eos, pad], enc("bad ")
    batch = {"input_ids": torch.tensor([p0 + r0, p1 + r1]),
             "attention_mask": torch.tensor([[0] + [1] * (len(p0) - 1) + [1, 1, 1, 0], [1] * (len(p1) + 4)]),
             "response_mask": torch.tensor([[0] * len(p0) + [1, 1, 1, 0], [0] * len(p1) + [1] * 4]),
             "ended": torch.tensor([True, False])}
    assert rollout_texts(tok, batch) == (["Hi:", "Yo!:"], ["ok", "bad"])


def test_ppo_updates_cut_each_micro_batch_into_mini_batches_every_epoch():
    from aligndistil.train.online import ppo_updates

    def micro(offset):
        ids = torch.arange(offset, offset + 5)[:, None].repeat(1, 3)
        return {"input_ids": ids, "advantages": torch.ones(5, 2), "rollout_mask": torch.ones(5, 2)}

    class Ctx:
        cfg = MethodConfig(name="ppo", ppo_epochs=3, num_mini_batches=2, whiten_advantages=False)

    torch.manual_seed(0)
    ups = ppo_updates(Ctx(), [micro(0), micro(10)])
    assert len(ups) == 6 and all(len(u) == 2 for u in ups)
    for epoch in range(3):
        for m, offset in ((0, 0), (1, 10)):
            seen = sorted(int(x) for u in ups[2 * epoch:2 * epoch + 2] for x in u[m]["input_ids"][:, 0])
            assert seen == list(range(offset, offset + 5))  # every row once per epoch
            assert sorted(len(u[m]["input_ids"]) for u in ups[2 * epoch:2 * epoch + 2]) == [2, 3]


def test_the_studys_static_alpha_is_the_contrastive_teacher_at_beta():
    """teacher=constant with alpha = beta0/beta (0.1/0.08) is Eq. 15's teacher with weight beta."""
    from aligndistil.train.methods import teacher_alpha

    cfg = MethodConfig(name="aligndistil", mode="on_policy", teacher="constant", alpha=0.1 / 0.08, beta=0.08)
    alpha, _ = teacher_alpha(cfg)
    assert alpha == pytest.approx(L.contrastive_alpha(0.1, 0.08)) == pytest.approx(1.25)
    kl, mask = torch.tensor([[0.5, 1.5]]), torch.ones(1, 2)
    losses, _ = L.aligndistil_loss_from_stats(kl, mask, alpha=alpha, beta0=0.1)
    assert float(losses[0]) == pytest.approx(0.08 * (0.5 + 1.5) / 2)  # beta_t = beta0 / alpha = beta


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("spec, says", [
    ("_online_rewards:nan", "non-finite score"),
    ("_online_rewards:not_a_number", "expected a float"),
    ("_online_rewards:one_short", "returned 3 scores for 4 responses"),
])
def test_a_bad_reward_stops_the_run_with_exit_2(tiny_ws, tmp_path, spec, says):
    out = tmp_path / "out"
    res = cli("ppo", tiny_ws, out, f"method.reward={spec}", "train.save_steps=1")
    assert res.returncode == 2, res.stderr[-2000:]
    assert says in res.stderr and spec in res.stderr, res.stderr[-2000:]
    assert not (out / "COMPLETE.json").exists() and not list(out.glob("checkpoint-*"))


@pytest.mark.parametrize("extra, says", [
    (["method.reward=vadr"], "unknown reward 'vadr'"),
    (["method.reward=_online_rewards:nope"], "has no attribute 'nope'"),
    (["method.reward=bt:/nonexistent/rm"], "not a complete reward model"),
    (["method.name=reinforce", "method.baseline=loo"], "needs method.num_samples >= 2"),
])
def test_a_bad_online_config_stops_before_the_output_folder_is_touched(tiny_ws, tmp_path, extra, says):
    out = tmp_path / "out"
    res = cli("ppo", tiny_ws, out, *extra)
    assert res.returncode == 2 and says in res.stderr, res.stderr[-2000:]
    assert not out.exists() or not any(out.iterdir())


def test_an_empty_prompt_set_is_a_clear_error(tiny_ws, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    res = cli("reinforce_token", tiny_ws, tmp_path / "out", f"data.train_file={empty}")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "no records" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _reward_model_with_another_tokenizer(ws, folder: Path) -> Path:
    """A Bradley-Terry reward-model folder on the tiny body whose tokenizer swaps two tokens' ids."""
    from aligndistil.model.loading import load_tokenizer
    from aligndistil.rewards.bradley_terry import BTRewardModel, _load_body, _write_folder

    torch.manual_seed(0)
    rm = BTRewardModel(_load_body(ws["model"]))
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True)
    _write_folder(rm, load_tokenizer(ws["model"]), [{"step": 1, "loss": 0.7}],
                  {"use_chat_template": False, "max_length": 64, "final": {"loss": 0.7}}, tmp, folder)
    tj = json.loads((folder / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    return folder


def test_a_reward_model_with_another_tokenizer(tiny_ws, tmp_path):
    """As the reward it is fine (it is given text and tokenises it itself); as the critic's
    initialisation it is refused (the critic reads the policy's token ids)."""
    rm = _reward_model_with_another_tokenizer(tiny_ws, tmp_path / "rm")
    ok = cli("ppo", tiny_ws, tmp_path / "as_reward", f"method.reward=bt:{rm}", "train.max_steps=2")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert {r["step"] for r in rows(tmp_path / "as_reward")} == {1, 2}
    bad = cli("ppo", tiny_ws, tmp_path / "as_critic", VOWELS, f"method.critic_init=bt:{rm}")
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "method.critic_init" in bad.stderr and "differ" in bad.stderr, bad.stderr[-2000:]
    assert not (tmp_path / "as_critic").exists() or not any((tmp_path / "as_critic").iterdir())


@pytest.mark.parametrize("penalty", [None, 0.5])
def test_a_response_cut_by_max_new_tokens_is_scored_as_it_is_unless_missing_eos_penalty(tiny_ws, tmp_path, penalty):
    """With a reward of 0 for everything, PPO's sequence score is exactly 0 (a response cut
    without EOS is scored as it is), or ``-penalty`` on each cut response: the step's mean
    score is ``-penalty * (1 - share ended)``."""
    extra = ["method.reward=_online_rewards:zero", "method.max_new_tokens=3", "method.ppo_epochs=1",
             "train.max_steps=3"] + ([] if penalty is None else [f"method.missing_eos_penalty={penalty}"])
    Trainer(ppo_cfg(tiny_ws, tmp_path / "out", *extra)).train()
    got = rows(tmp_path / "out")
    assert any(r["rollout/ended"] < 1.0 for r in got)  # 3 tokens of a random model: most rows are cut
    for r in got:
        want = 0.0 if penalty is None else -penalty * (1.0 - r["rollout/ended"])
        assert r["reward/score"] == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("loss_path", ["fused", "plain"])
def test_on_policy_aligndistil_reports_the_contrastive_reward_of_its_samples(tiny_ws, loss_path):
    """``reward/contrastive`` = beta0 * sum_t log pi_dpo(y_t|s_t)/pi_rev(y_t|s_t) of each sample,
    read from the teachers' outputs the loss computes anyway (no extra forward), equals each row
    run ALONE (unpadded) through both teachers with full logits."""
    from aligndistil.model.loading import load_causal_lm, load_tokenizer
    from aligndistil.train.methods import StepContext, get_method

    tok = load_tokenizer(tiny_ws["model"])
    policy, dpo, rev = (load_causal_lm(tiny_ws[k]) for k in ("model", "model2", "model"))
    cfg = MethodConfig(name="aligndistil", mode="on_policy", teacher="constant", alpha=1.25, beta=0.08, beta0=0.1,
                       max_new_tokens=6)
    method = get_method(cfg)
    ctx = StepContext(policy=policy, frozen={"dpo_model": dpo, "reverse_dpo_model": rev}, cfg=cfg,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, loss_path=loss_path, tokenizer=tok)
    torch.manual_seed(0)
    pad = tok.pad_token_id
    prompts = {"prompt_input_ids": torch.tensor([[pad, pad, 5, 6], [7, 8, 9, 10], [pad, 11, 12, 13]]),
               "prompt_attention_mask": torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])}
    batch = method.prepare(ctx, prompts)
    _, metrics = method.loss(ctx, batch)

    def logp_alone(model, b):
        keep = batch["attention_mask"][b].bool()
        ids, resp = batch["input_ids"][b][keep], batch["response_mask"][b][keep].bool()
        with torch.no_grad():
            lp = model(ids[None]).logits[0].double().log_softmax(-1)
        return sum(float(lp[j - 1, ids[j]]) for j in range(1, len(ids)) if resp[j])

    for b in range(3):
        want = 0.1 * (logp_alone(dpo, b) - logp_alone(rev, b))
        n = int(batch["response_mask"][b].sum())
        assert float(metrics["reward/contrastive"][b]) == pytest.approx(want, abs=1e-4)
        assert float(metrics["reward/contrastive_per_token"][b]) == pytest.approx(want / n, abs=1e-4)
