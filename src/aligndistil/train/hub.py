"""``train.push_to_hub``: upload the finished output folder to a Hugging Face hub repo.

The upload is the last thing a run does, after ``COMPLETE.json`` is written, on the main
process only, through ``huggingface_hub`` (``HfApi.create_repo`` then ``HfApi.upload_folder``,
one commit). What goes up is what ``from_pretrained`` and a reader need: the model and
tokenizer files, extra modules' safetensors, ``config.yaml``, ``metrics.jsonl``,
``COMPLETE.json`` and the TensorBoard logs; checkpoints (large, for resuming only), wandb's
local files and our lock and temporary files stay local. The token is read by
``huggingface_hub`` itself (``HF_TOKEN`` or a stored ``hf auth login``), never from the config.
"""

from __future__ import annotations

import os
from pathlib import Path

from aligndistil.config import ConfigError, RunConfig
from aligndistil.errors import AlignDistilError

#: Left out of the upload (``upload_folder`` glob patterns, relative to the output folder).
IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "wandb/**", ".*", "**/.*"]


class PushError(AlignDistilError):
    """The upload failed; the trained model is on disk (the message says where and how to upload it)."""

    label = "push to hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_push(cfg: RunConfig) -> None:
    """Refuse up front a push that cannot happen: no ``hub_model_id``, or ``HF_HUB_OFFLINE``
    set (the upload would fail only after the whole run)."""
    if cfg.train.push_to_hub and not cfg.train.hub_model_id:
        raise ConfigError("train.push_to_hub needs train.hub_model_id (the hub repo, ORG/NAME)")
    if cfg.train.push_to_hub and _offline():
        raise ConfigError("train.push_to_hub=true but HF_HUB_OFFLINE is set, so the upload after training would "
                          "fail; unset HF_HUB_OFFLINE or set train.push_to_hub=false (upload the folder later)")


def push_folder(out: Path, repo_id: str, private: bool = False, log=print) -> str:
    """Create ``repo_id`` if needed and upload ``out`` to it in one commit; return the commit URL.

    Raises:
        PushError: the hub refused or could not be reached (the model stays in ``out``).
    """
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(out), repo_id=repo_id, ignore_patterns=IGNORE_PATTERNS,
                                 commit_message=f"aligndistil: upload {Path(out).name}")
    except Exception as e:  # noqa: BLE001 - network, auth and hub errors alike: the run itself is done
        raise PushError(f"training finished and the model is in {out}, but uploading it to {repo_id} failed: "
                        f"{type(e).__name__}: {e}. Upload it later with `hf upload {repo_id} {out} "
                        "--exclude 'checkpoint-*'`") from e
    url = str(getattr(info, "commit_url", info))
    log(f"[hub] pushed {out} to {repo_id}: {url}")
    return url
