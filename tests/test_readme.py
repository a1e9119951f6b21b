"""The README's Python example runs as written (on tiny random models)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_loss_example_runs(tiny_ws):
    from transformers import AutoModelForCausalLM

    block = re.search(r"## Using the losses directly\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    torch.manual_seed(0)
    ids = torch.randint(4, 60, (2, 10))
    response_mask = torch.zeros_like(ids)
    response_mask[:, 6:] = 1
    scope = {
        "policy": AutoModelForCausalLM.from_pretrained(tiny_ws["model"]),
        "dpo_model": AutoModelForCausalLM.from_pretrained(tiny_ws["model2"]),
        "reverse_dpo_model": AutoModelForCausalLM.from_pretrained(tiny_ws["model"]),
        "ids": ids, "att": torch.ones_like(ids), "response_mask": response_mask, "global_batch_size": 2,
    }
    exec(block, scope)
    loss = scope["loss"]
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert scope["policy"].lm_head.weight.grad is not None
