"""``aligndistil merge``: a LoRA stage (an adapter folder) as a plain Hugging Face model folder.

The adapter is merged into the base it records (``W + (alpha / r) B A`` in every adapted
layer, :func:`aligndistil.model.lora.load_merged`) and saved with safetensors, with the
stage's tokenizer (else the base's). The folder is written under a temporary name and
renamed, so it is whole or absent; every argument is checked before the base is loaded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from aligndistil.config import DTYPES
from aligndistil.model import lora as LR


def merge_adapter(adapter_dir: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "float32",
                  overwrite: bool = False, log=print) -> Path:
    """Write ``adapter_dir`` merged into its base to ``out``; returns ``out``.

    Raises:
        LoraError: ``adapter_dir`` is not an adapter folder, its base is unknown, or peft is missing;
            ``out`` exists and is not empty (without ``overwrite``); an unknown ``dtype``.
    """
    from aligndistil.model.loading import ModelLoadError, load_tokenizer

    src, out = Path(adapter_dir), Path(out)
    if not LR.is_adapter_folder(src):
        raise LR.LoraError(f"{src} is not a LoRA adapter folder (no {LR.ADAPTER_CONFIG}): give the output folder "
                           "of a run trained with model.lora")
    if dtype not in DTYPES:
        raise LR.LoraError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if out.resolve() == src.resolve():
        raise LR.LoraError(f"--out {out} is the adapter folder itself; give a new folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise LR.LoraError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
    LR.require_peft()
    base = LR.adapter_base(src)
    log(f"[merge] {src} onto its base {base} ({dtype})")
    model = LR.load_merged(src, dtype=getattr(torch, dtype))
    try:
        tokenizer = load_tokenizer(src)
    except (ModelLoadError, OSError, ValueError):
        tokenizer = load_tokenizer(base)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"[merge] wrote {out}")
    return out
