"""LoRA building blocks (aligndistil.model.lora): target-module checks, the base an adapter
belongs to, adapter switching on one base, merging. Tiny random models, offline."""

from __future__ import annotations

import json

import pytest
import torch

peft = pytest.importorskip("peft", reason="the lora extra (peft) is not installed")

from aligndistil.model import lora as LR  # noqa: E402
from aligndistil.model.loading import load_causal_lm  # noqa: E402

# The tiny Llama's linear layers (aligndistil.model.tiny), output head excluded.
TINY_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def save_adapter(base_path, out, *, seed=0, r=4, targets=("q_proj", "v_proj")):
    """A peft adapter on ``base_path`` with random (non-zero) A and B, saved as a training run saves one."""
    torch.manual_seed(seed)
    base = load_causal_lm(base_path)
    model = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=8, target_modules=list(targets),
                                                      init_lora_weights=False))
    model.peft_config["default"].base_model_name_or_path = LR.recorded_base(base_path)
    model.save_pretrained(out, safe_serialization=True)
    return out


def test_linear_module_names_are_the_models_linear_layers_without_the_head(tiny_ws):
    assert LR.linear_module_names(load_causal_lm(tiny_ws["model"])) == TINY_LINEAR


def test_an_unknown_target_module_is_an_error_listing_the_available_names(tiny_ws):
    model = load_causal_lm(tiny_ws["model"])
    with pytest.raises(LR.LoraError) as e:
        LR.check_target_modules(model, ["q_proj", "c_attn"])
    msg = str(e.value)
    assert "['c_attn'] is not a linear module" in msg and "model.lora.target_modules" in msg
    assert ", ".join(TINY_LINEAR) in msg
    with pytest.raises(LR.LoraError, match="output head"):
        LR.check_target_modules(model, ["lm_head"])
    with pytest.raises(LR.LoraError, match="stands alone"):
        LR.check_target_modules(model, ["all-linear", "q_proj"])
    LR.check_target_modules(model, ["q_proj", "down_proj"])  # fine
    LR.check_target_modules(model, ["all-linear"])
    # The early check reads only config.json (a weightless copy): same verdict before any weight loads.
    with pytest.raises(LR.LoraError, match="c_attn"):
        LR.check_target_modules_early(tiny_ws["model"], ["c_attn"])


def test_the_base_of_an_adapter_is_recorded_and_compared_by_real_path(tiny_ws, tmp_path):
    ad = save_adapter(tiny_ws["model"], tmp_path / "ad")
    assert LR.is_adapter_folder(ad) and not LR.is_adapter_folder(tiny_ws["model"])
    assert json.loads((ad / LR.ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == str(
        __import__("os").path.realpath(tiny_ws["model"]))
    assert LR.base_of(ad) == LR.base_of(tiny_ws["model"]) != LR.base_of(tiny_ws["model2"])
    LR.check_adapter_base("model.dpo_model", ad, tiny_ws["model"], policy_lora=True)  # same base: fine


@pytest.mark.parametrize("policy_lora", [True, False])
def test_an_adapter_from_another_base_is_refused_naming_both_bases(tiny_ws, tmp_path, policy_lora):
    other = save_adapter(tiny_ws["model2"], tmp_path / "other")
    with pytest.raises(LR.LoraError) as e:
        LR.check_adapter_base("model.dpo_model", other, tiny_ws["model"], policy_lora=policy_lora)
    msg = str(e.value)
    assert "model.dpo_model" in msg and tiny_ws["model2"] in msg and tiny_ws["model"] in msg
    assert ("a LoRA policy on" if policy_lora else "a full fine-tune of") in msg
    assert "aligndistil merge" in msg


def test_merge_round_trip_gives_the_adapter_models_logits(tiny_ws, tmp_path):
    """W + (alpha/r) B A in a plain folder: logits equal those of base + adapter (peft)."""
    from aligndistil.workflows.merge import merge_adapter

    ad = save_adapter(tiny_ws["model"], tmp_path / "ad", targets=("q_proj", "v_proj", "down_proj"))
    out = merge_adapter(ad, tmp_path / "merged", log=lambda *_: None)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not (out / LR.ADAPTER_CONFIG).exists()
    ids = torch.randint(3, 60, (2, 9))
    with torch.no_grad():
        adapter_model = peft.PeftModel.from_pretrained(load_causal_lm(tiny_ws["model"]), str(ad)).eval()
        want = adapter_model(input_ids=ids).logits
        got = load_causal_lm(out)(input_ids=ids).logits
        base = load_causal_lm(tiny_ws["model"])(input_ids=ids).logits
        via_loader = load_causal_lm(ad)(input_ids=ids).logits  # every loader merges an adapter folder
    assert not torch.allclose(want, base, atol=1e-4), "the adapter should change the logits"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(via_loader, want, atol=1e-5, rtol=1e-5)


def test_merge_refuses_bad_arguments_before_loading_anything(tiny_ws, tmp_path):
    from aligndistil.cli import main

    ad = save_adapter(tiny_ws["model"], tmp_path / "ad")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep me")
    assert main(["merge", tiny_ws["model"], "--out", str(tmp_path / "m")]) == 2  # not an adapter
    assert main(["merge", str(ad), "--out", str(tmp_path / "full")]) == 2  # not empty
    assert (tmp_path / "full" / "x.txt").read_text() == "keep me"
    assert main(["merge", str(ad), "--out", str(tmp_path / "m"), "--dtype", "int8"]) == 2
    assert not (tmp_path / "m").exists()
    assert main(["merge", str(ad), "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_shared_roles_switch_adapters_and_restore_the_policy(tiny_ws, tmp_path):
    """A named frozen adapter and the adapter-disabled base, run on the policy's own base, give the
    logits of separately loaded models; afterwards the policy's adapter is active, trainable and in
    train mode again."""
    from aligndistil.config import LoraConfig

    teacher = save_adapter(tiny_ws["model"], tmp_path / "teacher", seed=3)
    torch.manual_seed(0)
    policy = LR.load_policy(tiny_ws["model"], LoraConfig(r=4), dtype=torch.float32, log=lambda *_: None)
    policy.train()
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    role = LR.shared_role("dpo_model", teacher, policy, tiny_ws["model"], log=lambda *_: None)
    ref = LR.shared_role("reference", tiny_ws["model"], policy, tiny_ws["model"], log=lambda *_: None)
    assert role.adapter == "dpo_model" and ref.adapter is None
    assert LR.shared_role("reference", tiny_ws["model2"], policy, tiny_ws["model"]) is None  # another full model
    ids = torch.randint(3, 60, (2, 7))
    with torch.no_grad():
        want_teacher = load_causal_lm(teacher)(input_ids=ids).logits
        want_base = load_causal_lm(tiny_ws["model"])(input_ids=ids).logits
    torch.testing.assert_close(role(input_ids=ids).logits, want_teacher, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref(input_ids=ids).logits, want_base, atol=1e-5, rtol=1e-5)
    assert policy.active_adapter == "default" and policy.training
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable
    # The teacher's weights stay frozen; eval/requires_grad_/to on the role leave the policy alone.
    role.eval().requires_grad_(False).to("cpu")
    assert policy.training and {n for n, p in policy.named_parameters() if p.requires_grad} == trainable
