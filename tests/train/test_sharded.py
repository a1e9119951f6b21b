"""train/sharded.py's decisions, on stand-ins for accelerate's accelerator (the launches
themselves run in test_fsdp.py and test_deepspeed.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from aligndistil.train import sharded as SH
from aligndistil.train.checkpoints import CheckpointError


def _acc(kind: str = "NO", processes: int = 1, zero: int | None = None, fsdp_version: int | None = None):
    ds = None if zero is None else SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": zero}})
    fsdp = None if fsdp_version is None else SimpleNamespace(fsdp_version=fsdp_version)
    return SimpleNamespace(distributed_type=f"DistributedType.{kind}", num_processes=processes,
                           state=SimpleNamespace(deepspeed_plugin=ds, fsdp_plugin=fsdp))


PLAIN, FSDP2, ZERO2, ZERO3 = _acc(), _acc("FSDP", 2, fsdp_version=2), _acc("DEEPSPEED", 2, 2), _acc("DEEPSPEED", 2, 3)


def test_what_each_launch_is():
    assert [SH.is_sharded(a) for a in (PLAIN, FSDP2, ZERO2, ZERO3)] == [False, True, True, True]
    assert [SH.zero_stage(a) for a in (PLAIN, FSDP2, ZERO2, ZERO3)] == [None, None, 2, 3]
    # Every forward is a collective where weights are gathered as the model runs:
    assert [SH.collective_forwards(a) for a in (PLAIN, FSDP2, ZERO2, ZERO3)] == [False, True, False, True]


def test_a_checkpoint_resumes_only_under_the_launch_kind_that_wrote_it():
    SH.check_optimizer_format(PLAIN, {}, None)
    SH.check_optimizer_format(FSDP2, {}, SH.FULL_BY_NAME)
    SH.check_optimizer_format(ZERO3, [{}, {}], SH.PER_RANK)
    with pytest.raises(CheckpointError, match="written under DeepSpeed and this launch runs without FSDP or DeepSpeed"):
        SH.check_optimizer_format(PLAIN, [{}, {}], SH.PER_RANK)
    with pytest.raises(CheckpointError, match="written under FSDP and this launch runs under DeepSpeed"):
        SH.check_optimizer_format(ZERO2, {}, SH.FULL_BY_NAME)
    with pytest.raises(CheckpointError, match="written without FSDP or DeepSpeed and this launch runs under FSDP"):
        SH.check_optimizer_format(FSDP2, {}, None)
    four = _acc("DEEPSPEED", 4, 2)
    with pytest.raises(CheckpointError, match="partitioned over 2 processes; resume it with 2, not 4"):
        SH.check_optimizer_format(four, [{}, {}], SH.PER_RANK)


def test_deepspeed_state_classes_let_its_optimizer_state_through_a_weights_only_load(tmp_path):
    pytest.importorskip("deepspeed")
    import torch
    from deepspeed.runtime.zero.config import ZeroStageEnum

    torch.save({"zero_stage": ZeroStageEnum.weights}, tmp_path / "s.pt")
    with pytest.raises(Exception):
        torch.load(tmp_path / "s.pt", weights_only=True)
    with torch.serialization.safe_globals(list(SH.deepspeed_state_classes())):
        assert torch.load(tmp_path / "s.pt", weights_only=True)["zero_stage"] == ZeroStageEnum.weights
