"""What a run leaves on disk: checkpoints to resume from, the final model, the COMPLETE mark.

Layout of ``train.output_dir``: ``checkpoint-<step>/`` (``model/``, an HF model folder;
``trainer_state.pt``: optimizer, scheduler, extra modules, every process's RNG states, step,
config fingerprint; ``manifest.json``: the step, the fingerprint and the size and sha256 of
every other file, written last); after the last step the model folder itself, one
``<name>.safetensors`` per extra trainable module, and ``COMPLETE.json``.

Every write goes to a temporary name first and is renamed, so a checkpoint or model file is
either whole or absent; a write that fails (a full disk) removes its temporary folder and
leaves the earlier checkpoints as they were. The manifest catches what renaming cannot: a
file truncated or overwritten afterwards is found on resume, named, and the previous good
checkpoint is used instead. Rotation (``save_total_limit``) deletes only numbered
``checkpoint-<N>`` folders whose manifest carries this run's fingerprint.

These functions touch the file system only: the trainer decides on which process and when
(:mod:`aligndistil.train.loop`); who may write a folder at all is
:mod:`aligndistil.train.run_folder`'s.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from aligndistil.errors import AlignDistilError
from aligndistil.fileio import atomic_write_text
from aligndistil.model.outputs import unwrap

COMPLETE = "COMPLETE.json"
TRAINER_STATE = "trainer_state.pt"
MANIFEST = "manifest.json"
_NUMBERED = re.compile(r"checkpoint-(\d+)")


class OutputFolderError(AlignDistilError):
    """The output folder cannot be written (full disk, no permission) or is not this run's to write."""

    label = "output folder"


class CheckpointError(AlignDistilError, ValueError):
    """No checkpoint to resume from: none there, all damaged, or made with another config."""

    label = "checkpoint"


def _write_error(e: BaseException) -> bool:
    """True for a failed write (full disk, file-size limit, no permission) as raised by
    Python (OSError), torch.save (RuntimeError "file write failed") or safetensors."""
    if isinstance(e, OSError):
        return True
    text = str(e).lower()
    return isinstance(e, Exception) and any(w in text for w in ("write", "i/o", "ioerror", "os error", "no space", "too large"))


def _save_pretrained(model, tokenizer, folder: Path, state_dict: dict | None = None) -> None:
    # ``state_dict``: the full weights gathered beforehand on every process when the model is
    # sharded (aligndistil.train.sharded); None: the model's own parameters are whole here.
    kw = {} if state_dict is None else {"state_dict": state_dict}
    unwrap(model).save_pretrained(folder, safe_serialization=True, **kw)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_model_folder(model, tokenizer, out_dir: Path, state_dict: dict | None = None) -> None:
    """Save an HF model folder (safetensors) atomically per file: temp folder, then rename.
    On failure the temp folder is removed and :class:`OutputFolderError` names the folder.
    ``state_dict``: the gathered weights of a sharded model (else the model's own)."""
    tmp = out_dir / ".saving.tmp"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        _save_pretrained(model, tokenizer, tmp, state_dict)
        for f in tmp.iterdir():
            os.replace(f, out_dir / f.name)
        tmp.rmdir()
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _write_error(e):
            raise OutputFolderError(f"could not write the model to {out_dir}: {e}") from e
        raise


def is_complete(output_dir: str | Path, fingerprint: str | None = None) -> bool:
    """True if ``output_dir`` holds a finished run (of this config fingerprint, if given)."""
    done = read_complete(output_dir)
    return done is not None and (fingerprint is None or done.get("fingerprint") == fingerprint)


def read_complete(output_dir: str | Path) -> dict | None:
    """The ``COMPLETE.json`` of ``output_dir``, or None when absent or unreadable."""
    p = Path(output_dir) / COMPLETE
    try:
        done = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return done if isinstance(done, dict) else None


# ----------------------------------------------------------------------------- manifest
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, step: int, fingerprint: str) -> None:
    """Record size and sha256 of every file in ``folder``; call it after the last file."""
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    atomic_write_text(folder / MANIFEST, json.dumps({"step": step, "fingerprint": fingerprint, "files": files}, indent=1))


def checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with checkpoint ``folder`` (a missing, truncated or altered file), or
    None when every file matches its manifest. A checkpoint written before manifests
    existed passes if it has its ``trainer_state.pt``."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return None if (folder / TRAINER_STATE).is_file() else f"it has no {MANIFEST} (an unfinished checkpoint)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {MANIFEST} is unreadable ({e})"
    for name, want in files.items():
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        size = p.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size} bytes but the manifest says {want['bytes']} (truncated or replaced)"
        if _sha256(p) != want["sha256"]:
            return f"{name} differs from its manifest (sha256): the file was damaged after it was written"
    return None


def checkpoint_fingerprint(folder: Path) -> str | None:
    """The config fingerprint a checkpoint was written under (None if unreadable)."""
    try:
        return json.loads((folder / MANIFEST).read_text())["fingerprint"]
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:  # a checkpoint from before manifests
        return torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)["fingerprint"]
    except Exception:  # noqa: BLE001 - any unreadable state means "unknown"
        return None


def numbered_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``checkpoint-<N>`` folder (digits only), oldest first;
    anything else named ``checkpoint-*`` (``checkpoint-7x``, a user's copy) is not one."""
    found = []
    for p in Path(out).glob("checkpoint-*"):
        m = _NUMBERED.fullmatch(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_resume_checkpoint(out: Path, fingerprint: str, log=print) -> Path:
    """The newest checkpoint of this config that passes its manifest check.

    Damaged checkpoints are skipped with a message naming what is wrong, so a run falls back
    to the previous good one; checkpoints of another config are never used.

    Raises:
        CheckpointError: no usable checkpoint (the message lists why each was refused).
    """
    problems, foreign = [], []
    for step, folder in reversed(numbered_checkpoints(out)):
        fp = checkpoint_fingerprint(folder)
        if fp is not None and fp != fingerprint:
            foreign.append(folder.name)
            continue
        problem = checkpoint_problem(folder)
        if problem is None and fp is None:
            problem = f"its {TRAINER_STATE} is unreadable"
        if problem is None:
            if problems:
                log(f"[resume] using {folder.name} instead")
            return folder
        problems.append(f"{folder.name}: {problem}")
        log(f"[resume] skipping {folder.name}: {problem}")
    if not problems and foreign:
        raise CheckpointError(f"--resume: {out / foreign[0]} was made with a different config; refusing to mix runs "
                              f"(no checkpoint of this config in {out})")
    if not problems:
        raise CheckpointError(f"--resume: no checkpoint in {out} (train without --resume to start)")
    raise CheckpointError(f"--resume: no usable checkpoint in {out}: " + "; ".join(problems))


# ----------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """This process's RNG states (torch CPU, Python, and the current CUDA device's when there
    is one), as :func:`restore_rng` takes them: on-policy sampling draws from them, so an
    exact resume must restore them on every process."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(saved: dict, rank: int = 0, world_size: int = 1) -> bool:
    """Restore process ``rank``'s states from a checkpoint's ``rng`` entry (``{"ranks":
    [state per process]}``; an older single ``state`` is rank 0's). Returns False, and
    restores nothing, when the checkpoint was written by another number of processes."""
    ranks = saved["ranks"] if "ranks" in saved else [saved]
    if len(ranks) != world_size:
        return False
    s = ranks[rank]
    torch.set_rng_state(s["torch"])
    random.setstate((3, tuple(s["python"]), s["python_pos"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    return True


# ----------------------------------------------------------------------------- writing
def should_save(strategy: str, save_steps: int, step: int, steps_per_epoch: int, total_steps: int) -> bool:
    """Whether ``checkpoint-<step>`` is written after optimizer step ``step`` (1-based).

    ``train.save_strategy``: ``steps`` every ``save_steps`` steps (0: never), ``epoch`` at
    the end of every epoch, ``no`` never. The last step writes the final model instead, so
    it never gets a checkpoint.
    """
    if step >= total_steps or strategy == "no":
        return False
    if strategy == "epoch":
        return step % steps_per_epoch == 0
    return bool(save_steps) and step % save_steps == 0


def save_checkpoint(out: Path, step: int, model, tokenizer, state: dict, keep: int, fingerprint: str,
                    state_dict: dict | None = None) -> Path:
    """Write ``checkpoint-<step>`` (model folder, ``state`` as ``trainer_state.pt``, manifest
    last) and keep only the ``keep`` newest checkpoints of ``fingerprint``. Call it on one
    process; ``state_dict``: the gathered weights of a sharded model (else the model's own). A failed write removes the temporary folder and raises :class:`OutputFolderError`;
    the earlier checkpoints are untouched."""
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    old = out / f".checkpoint-{step}.old"
    try:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)
        _save_pretrained(model, tokenizer, tmp / "model", state_dict)
        torch.save(state, tmp / TRAINER_STATE)
        write_manifest(tmp, step, fingerprint)
        if final.exists():  # a resumed run writing a step again: swap, never a moment without one
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.replace(old, final)
        if _write_error(e):
            raise OutputFolderError(f"could not write {final.name} in {out}: {e}") from e
        raise
    rotate(out, fingerprint, keep, upto=step)
    return final


def rotate(out: Path, fingerprint: str, keep: int, upto: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints of ``fingerprint`` up to step ``upto``;
    return what was deleted. Other runs' checkpoints, unnumbered folders and steps past
    ``upto`` (left by an attempt this run resumed from an earlier step) are kept."""
    if keep < 1:
        raise ValueError(f"train.save_total_limit must be >= 1, got {keep}")
    mine = [p for step, p in numbered_checkpoints(out) if step <= upto and checkpoint_fingerprint(p) == fingerprint]
    gone = mine[: max(0, len(mine) - keep)]
    for p in gone:
        shutil.rmtree(p)
    return gone


def load_trainer_state(ckpt: Path, fingerprint: str, trusted: tuple = ()) -> dict:
    """``trainer_state.pt`` of ``ckpt``, refused unless it was written by a run of this config.

    It is read with ``weights_only=True`` (tensors and plain data, never code); ``trusted``
    names the few classes besides those that may appear (DeepSpeed's optimizer state holds some).
    """
    try:
        with torch.serialization.safe_globals(list(trusted)):
            state = torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a damaged file
        raise CheckpointError(f"--resume: {ckpt / TRAINER_STATE} cannot be read: {e}") from e
    if state["fingerprint"] != fingerprint:
        raise CheckpointError(f"--resume: {ckpt} was made with a different config; refusing to mix runs")
    return state


def truncate_metrics(path: Path, step: int, log=print) -> None:
    """``metrics.jsonl`` on (re)start: on resume, drop logged steps after the checkpoint's
    ``step`` (the resumed run logs them again); on a fresh run (``step`` 0), start empty.

    A torn last line (the run was killed while appending it) is dropped; an unreadable line
    before the last one is an error naming the file and line.
    """
    if not path.exists():
        return
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()] if step else []
    keep = []
    for i, ln in enumerate(lines):
        try:
            rec = json.loads(ln)
            at = int(rec["step"])
        except (ValueError, KeyError, TypeError) as e:
            if i == len(lines) - 1:
                log(f"[resume] {path}: dropped a torn last line ({i + 1}), as a killed run can leave one")
                break
            raise OutputFolderError(f"{path}: line {i + 1} is not a metrics record ({e}); "
                                    "repair or delete the file to resume") from None
        if at <= step:
            keep.append(ln)
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def save_final(out: Path, model, tokenizer, modules: dict, complete: dict, state_dict: dict | None = None) -> None:
    """The finished run: the model folder, each extra module as ``<name>.safetensors``, and
    last ``COMPLETE.json`` holding ``complete`` (a folder without it is not a finished run).
    ``modules``: name -> state dict of each extra trainable module; ``state_dict``: the
    gathered weights of a sharded model (else the model's own)."""
    from safetensors.torch import save_file

    save_model_folder(model, tokenizer, out, state_dict)
    try:
        for name, sd in modules.items():
            tmp = out / f".{name}.safetensors.tmp"
            save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp))
            os.replace(tmp, out / f"{name}.safetensors")
        atomic_write_text(out / COMPLETE, json.dumps(complete, indent=2))
    except BaseException as e:
        for leftover in out.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
        if _write_error(e):
            raise OutputFolderError(f"could not write the final model to {out}: {e}") from e
        raise
