"""Training with model.lora: every method through the CLI, adapter stages as teachers on the
policy's one base (the same loss as merged full-model teachers), and bad input refused
before anything loads. Tiny random models, 1 step per run."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft", reason="the lora extra (peft) is not installed")

from safetensors.torch import load_file  # noqa: E402

from aligndistil.cli import main  # noqa: E402
from aligndistil.config import RunConfig, apply_overrides  # noqa: E402
from aligndistil.model import lora as LR  # noqa: E402
from aligndistil.model.loading import load_causal_lm  # noqa: E402
from aligndistil.model.outputs import unwrap  # noqa: E402
from aligndistil.train.loop import Trainer  # noqa: E402
from aligndistil.train.methods import METHOD_NAMES  # noqa: E402

QUIET = "train.progress_bar=false"


def base_overrides(ws, out, method, *extra):
    data = ws["kto"] if method == "kto" else ws["prefs"]
    return [f"model.policy={ws['model']}", f"data.train_file={data}", "data.max_length=64", "data.max_prompt_length=32",
            f"train.output_dir={out}", "train.max_steps=1", "train.per_device_batch_size=4",
            "train.learning_rate=1e-2", "train.warmup_ratio=0", QUIET, f"method.name={method}", "model.lora.r=4",
            *extra]


@pytest.fixture(scope="module")
def stages(tiny_ws, tmp_path_factory):
    """DPO and reverse-DPO stages trained with LoRA on the tiny base (adapter folders), and the
    same two merged into full models (``aligndistil merge``)."""
    root = tmp_path_factory.mktemp("lora_stages")
    out = {}
    for name, extra in (("dpo", []), ("rev", ["method.reverse=true"])):
        cfg = apply_overrides(RunConfig(), base_overrides(tiny_ws, root / name, "dpo", "train.max_steps=3", *extra))
        Trainer(cfg).train()
        assert main(["merge", str(root / name), "--out", str(root / f"{name}_merged")]) == 0
        out[name], out[f"{name}_merged"] = str(root / name), str(root / f"{name}_merged")
    return out


# Every registered method (and the on-policy AlignDistil), its teachers the LoRA stages.
CASES = [(m, []) for m in METHOD_NAMES if m != "aligndistil"] + [
    ("aligndistil", ["method.mode=off_policy"]),
    ("aligndistil", ["method.mode=on_policy", "method.max_new_tokens=4"]),
]
# The tiny model's samples score 0 on every reward, so PPO's signal comes from the EOS penalty.
ONLINE = ["method.max_new_tokens=4", "method.ppo_epochs=1", "method.reward=_online_rewards:zero",
          "method.missing_eos_penalty=1.0"]


def test_every_registered_method_is_covered():
    assert {m for m, _ in CASES} == set(METHOD_NAMES)


@pytest.mark.parametrize("method, extra", CASES, ids=lambda c: c if isinstance(c, str) else "-".join(c))
def test_lora_training_through_the_cli(tiny_ws, stages, tmp_path, method, extra):
    out = tmp_path / "out"
    teachers = [f"model.dpo_model={stages['dpo']}", f"model.reverse_dpo_model={stages['rev']}"]
    online = ONLINE if method in ("ppo", "rto", "reinforce") else []
    assert main(["train", "-c", str(_empty_yaml(tmp_path)),
                 *base_overrides(tiny_ws, out, method, *teachers, *online, *extra)]) == 0
    # The run's model is an adapter on the tiny base, with the tokenizer: no full weights written.
    assert (out / LR.ADAPTER_WEIGHTS).is_file() and (out / "tokenizer_config.json").is_file()
    assert not (out / "model.safetensors").exists()
    assert LR.base_of(out) == LR.base_of(tiny_ws["model"])
    saved = load_file(str(out / LR.ADAPTER_WEIGHTS))
    assert saved and all("lora_" in k for k in saved)
    assert not any(role in k for k in saved for role in ("dpo_model", "reverse_dpo_model")), "teachers saved as output"
    # B starts at zero (peft's init), so a non-zero B means the adapter trained.
    assert max(float(v.abs().max()) for k, v in saved.items() if "lora_B" in k) > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and math.isfinite(rows[0]["loss"])


def _empty_yaml(tmp_path: Path) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text("{}\n")
    return p


def _step_losses(cfg):
    """The per-sequence losses of step 1's first micro-batch (set-up reads, writes nothing)."""
    tr = Trainer(cfg)
    tr.setup()
    ctx = tr._context()
    batch = tr._micro_batches(0)[0]
    losses, _ = tr.method.loss(ctx, batch)
    return tr, losses.detach()


@pytest.mark.parametrize("path", ["fused", "plain"])
@pytest.mark.parametrize("teacher", ["adaptive", "contrastive"])
def test_adapter_teachers_give_the_loss_of_merged_full_teachers(tiny_ws, stages, tmp_path, path, teacher):
    """One base + named adapters (switched per forward) = three separately loaded full models."""
    common = base_overrides(tiny_ws, tmp_path / "o", "aligndistil", f"train.loss_path={path}",
                            f"method.teacher={teacher}")
    shared, a = _step_losses(apply_overrides(RunConfig(), common + [
        f"model.dpo_model={stages['dpo']}", f"model.reverse_dpo_model={stages['rev']}"]))
    full, b = _step_losses(apply_overrides(RunConfig(), common + [
        f"model.dpo_model={stages['dpo_merged']}", f"model.reverse_dpo_model={stages['rev_merged']}"]))
    policy = unwrap(shared.policy)
    assert all(isinstance(m, LR.SharedBaseRole) and m.module is policy for m in shared.frozen.values())
    assert not any(isinstance(m, LR.SharedBaseRole) for m in full.frozen.values())
    # The teachers really differ from the base (else the test proves nothing).
    assert not torch.allclose(a, torch.zeros_like(a))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # The optimizer holds only the policy's adapter, never a teacher's.
    opt = {id(p) for g in shared.optimizer.param_groups for p in g["params"]}
    named = {id(p): n for n, p in policy.named_parameters()}
    assert opt and all(".default." in named[i] for i in opt)


def test_the_reference_is_the_base_with_the_adapter_disabled(tiny_ws, tmp_path):
    """TDPO with the adapter-disabled base as reference = TDPO with a separately loaded copy."""
    copy = tmp_path / "base_copy"
    shutil.copytree(tiny_ws["model"], copy)
    common = base_overrides(tiny_ws, tmp_path / "o", "tdpo2")
    shared, a = _step_losses(apply_overrides(RunConfig(), common))
    full, b = _step_losses(apply_overrides(RunConfig(), common + [f"model.reference={copy}"]))
    assert isinstance(shared.frozen["reference"], LR.SharedBaseRole) and shared.frozen["reference"].adapter is None
    assert not isinstance(full.frozen["reference"], LR.SharedBaseRole)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_teacher_cache_serves_adapter_teachers(tiny_ws, stages, tmp_path):
    common = base_overrides(tiny_ws, tmp_path / "o", "aligndistil", f"model.dpo_model={stages['dpo']}",
                            f"model.reverse_dpo_model={stages['rev']}")
    _, a = _step_losses(apply_overrides(RunConfig(), common))
    cached, b = _step_losses(apply_overrides(RunConfig(), common + [f"train.teacher_cache={tmp_path / 'cache'}"]))
    assert cached.frozen == {} and cached.cache is not None
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert set(manifest["fingerprint"]["weights"]["dpo_model"]) == {"adapter", "base"}
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_lora_resume_continues_from_the_checkpointed_adapter(tiny_ws, tmp_path):
    out = tmp_path / "o"
    over = base_overrides(tiny_ws, out, "dpo", "train.max_steps=2", "train.save_steps=1")
    Trainer(apply_overrides(RunConfig(), over)).train()
    straight = load_file(str(out / LR.ADAPTER_WEIGHTS))
    assert (out / "checkpoint-1" / "model" / LR.ADAPTER_CONFIG).is_file()
    out2 = tmp_path / "o2"
    over2 = base_overrides(tiny_ws, out2, "dpo", "train.max_steps=2", "train.save_steps=1")
    Trainer(apply_overrides(RunConfig(), over2)).train()
    (out2 / "COMPLETE.json").unlink()
    for f in (out2 / LR.ADAPTER_WEIGHTS, out2 / LR.ADAPTER_CONFIG):
        f.unlink()
    Trainer(apply_overrides(RunConfig(), over2), resume=True).train()
    resumed = load_file(str(out2 / LR.ADAPTER_WEIGHTS))
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], atol=1e-6, rtol=1e-6)


def test_bad_lora_input_is_refused_before_anything_is_written(tiny_ws, stages, tmp_path):
    """Unknown target modules, an adapter teacher from another base (LoRA or full policy): exit 2,
    the message names what is wrong, no output folder."""
    other = tmp_path / "other_base_adapter"
    base = peft.get_peft_model(load_causal_lm(tiny_ws["model2"]), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    base.peft_config["default"].base_model_name_or_path = LR.recorded_base(tiny_ws["model2"])
    base.save_pretrained(other)
    cases = [
        (["model.lora.target_modules=[q_proj,qkv]", f"model.dpo_model={stages['dpo']}",
          f"model.reverse_dpo_model={stages['rev']}"], "qkv"),
        ([f"model.dpo_model={other}", f"model.reverse_dpo_model={stages['rev']}"], tiny_ws["model2"]),
    ]
    for extra, needle in cases:
        out = tmp_path / "never"
        with pytest.raises(LR.LoraError, match=needle.replace("[", r"\[")):
            Trainer(apply_overrides(RunConfig(), base_overrides(tiny_ws, out, "aligndistil", *extra)))
        assert not out.exists()
    # A full fine-tuned policy (no model.lora) with an adapter teacher of another base: refused too.
    over = [o for o in base_overrides(tiny_ws, tmp_path / "never", "aligndistil") if not o.startswith("model.lora")]
    code = main(["train", "-c", str(_empty_yaml(tmp_path)), *over, f"model.dpo_model={other}",
                 f"model.reverse_dpo_model={tiny_ws['model']}"])
    assert code == 2 and not (tmp_path / "never").exists()


def test_gradient_checkpointing_trains_the_adapter(tiny_ws, stages, tmp_path):
    """With a frozen base, reentrant checkpointing would drop the adapters' gradients unless the
    embeddings' output requires grad (enable_input_require_grads)."""
    out = tmp_path / "gc"
    Trainer(apply_overrides(RunConfig(), base_overrides(tiny_ws, out, "aligndistil", "train.gradient_checkpointing=true",
                                                        f"model.dpo_model={stages['dpo']}",
                                                        f"model.reverse_dpo_model={stages['rev']}"))).train()
    saved = load_file(str(out / LR.ADAPTER_WEIGHTS))
    assert max(float(v.abs().max()) for k, v in saved.items() if "lora_B" in k) > 0


def test_the_readme_larger_models_commands_are_valid_configs():
    """Every `aligndistil train` line of README "Larger models" loads and validates as written."""
    import re
    import shlex

    from aligndistil.config import load_config

    readme = Path(__file__).resolve().parents[2] / "README.md"
    text = readme.read_text()
    section = text[text.index("\n## Larger models\n"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    lines = [ln for ln in block.splitlines() if ln.startswith("aligndistil train")]
    assert len(lines) == 4
    for ln in lines:
        args = shlex.split(ln.split("#")[0])[2:]
        cfg = load_config(readme.parent / args[1], args[2:])
        assert cfg.model.lora is not None or cfg.method.generation_backend == "vllm"
