"""Who may write a run's output folder, and when a run may start changing it.

Three rules keep an output folder from ever misrepresenting finished work:

1. One writer. A run holds ``<output_dir>/.aligndistil.lock`` (created with ``O_EXCL``,
   holding pid, host and start time) while it runs; a second run on the same folder is
   refused. A lock whose process is gone (same host, pid dead or reused) is stale: a run
   killed with ``kill -9`` leaves one, and the next run takes it over with a message.
2. No foreign work overwritten. A fresh run writes only into a folder that is empty or holds
   a run of the same config (finished, or with checkpoints to resume); anything else needs
   ``train.overwrite_output_dir`` / ``--overwrite``.
3. Checks before changes. Until :func:`begin` is called, after the config, data, models and
   checkpoint have all been read successfully, nothing of the folder is modified: a failed
   re-run or ``--resume`` leaves a finished run's ``COMPLETE.json`` in place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

from aligndistil.train import checkpoints as CK
from aligndistil.train.checkpoints import OutputFolderError

LOCK = ".aligndistil.lock"
#: Temporary names our own writers use; leftovers of a killed run, never the user's files.
_OURS_TMP = re.compile(r"\..*\.(tmp|old)")


def _proc_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), to tell a live run from
    a new process that reuses a dead run's pid; None where /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else fields[19]  # a zombie has exited: not a live holder


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    now = _proc_start(pid)
    if Path("/proc/self/stat").exists() and now is None:
        return False  # a zombie
    return started is None or now is None or now == started


class RunLock:
    """The one-writer lock of an output folder (use on the main process only)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / LOCK
        self.held = False
        self.created_folder = False

    def acquire(self, log=print) -> None:
        """Create the folder if needed and take the lock, or raise :class:`OutputFolderError`."""
        self.created_folder = not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputFolderError(f"cannot create the output folder {self.out}: {e.strerror or e}") from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _proc_start(os.getpid()),
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None:
                    raise OutputFolderError(
                        f"{self.out} is in use by another run ({holder}): two runs writing one folder would mix "
                        f"their metrics and checkpoints. Wait for it, or use another train.output_dir; if no run "
                        f"is using it, delete {self.path}") from None
                log(f"[output] {self.out}: taking over the lock of a run that is no longer running")
                self.path.unlink(missing_ok=True)
                continue
            except OSError as e:
                self._drop_created_folder()
                raise OutputFolderError(f"cannot write to the output folder {self.out}: {e.strerror or e}") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise OutputFolderError(f"{self.out}: could not take the lock {self.path} (another run keeps taking it)")

    def _holder(self) -> str | None:
        """Who holds the existing lock, or None when it is stale."""
        try:
            info = json.loads(self.path.read_text())
            pid, host = int(info["pid"]), str(info["host"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            # Unreadable: a run killed between creating and filling it, or one doing so now.
            age = time.time() - self.path.stat().st_mtime if self.path.exists() else 1e9
            return None if age > 10 else "a run that is starting"
        who = f"pid {pid} on {host}, started {info.get('started', '?')}"
        if host != socket.gethostname():
            return who  # cannot check a process on another machine: assume it runs
        return who if _alive(pid, info.get("proc_start")) else None

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        self._drop_created_folder()

    def _drop_created_folder(self) -> None:
        # A run that failed its checks leaves no empty folder behind.
        if self.created_folder and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()


def _config_fingerprint(out: Path) -> str | None:
    """The fingerprint of the ``config.yaml`` a run saved in ``out`` (None if absent/unreadable)."""
    from aligndistil.config import ConfigError, from_dict, load_yaml

    p = out / "config.yaml"
    if not p.is_file():
        return None
    try:
        return from_dict(load_yaml(p), str(p)).fingerprint()
    except (ConfigError, OSError, ValueError):
        return None


def check_folder(out: Path, config_fp: str, run_fp: str, resume: bool, overwrite: bool, log=print) -> str:
    """Decide, reading only, what a run may do with ``out``.

    Args:
        config_fp: the run config's fingerprint (what checkpoints and ``config.yaml`` carry).
        run_fp: what ``COMPLETE.json`` records (a pipeline's covers upstream stages too).

    Returns:
        ``"done"``: ``--resume`` of a run that already finished (nothing to do);
        ``"resume"``: continue from a checkpoint; ``"fresh"``: start from step 0.

    Raises:
        OutputFolderError: a fresh run into a folder that holds something else, without ``overwrite``.
    """
    out = Path(out)
    done = CK.read_complete(out)
    if resume:
        return "done" if done is not None and done.get("fingerprint") == run_fp else "resume"
    entries = sorted(p for p in out.iterdir() if p.name != LOCK and not _OURS_TMP.fullmatch(p.name)) if out.is_dir() else []
    if not entries:
        return "fresh"
    ckpts = CK.numbered_checkpoints(out)
    mine = (done is not None and done.get("fingerprint") == run_fp) or _config_fingerprint(out) == config_fp \
        or any(CK.checkpoint_fingerprint(p) == config_fp for _, p in ckpts)
    if mine:
        return "fresh"
    what = []
    if done is not None:
        what.append(f"a finished run of another config ({CK.COMPLETE})")
    if ckpts:
        what.append("checkpoints of another config (" + ", ".join(p.name for _, p in ckpts[:3]) + ")")
    others = [p.name for p in entries if p.name != CK.COMPLETE and all(p != c for _, c in ckpts)]
    if others:
        what.append(f"{len(others)} other entries (" + ", ".join(others[:3]) + (", ..." if len(others) > 3 else "") + ")")
    if overwrite:
        log(f"[output] {out} holds {'; '.join(what)}; writing over it (overwrite_output_dir)")
        return "fresh"
    raise OutputFolderError(
        f"{out} is not empty: it holds {'; '.join(what)}, not a run of this config. Use another "
        "train.output_dir, --resume to continue a run of this config, or --overwrite "
        "(train.overwrite_output_dir=true) to write here anyway")


def begin(out: Path, config_fp: str, fresh: bool, log=print) -> None:
    """Mark the folder as a run in progress; call it only once every check has passed.

    Removes ``COMPLETE.json`` (the folder no longer holds a finished run), our temporary
    leftovers of a killed run, and, for a fresh run, this config's earlier checkpoints
    (the new run writes its own; mixing two attempts would make ``--resume`` pick the
    wrong one). Other configs' checkpoints are never touched.
    """
    out = Path(out)
    (out / CK.COMPLETE).unlink(missing_ok=True)
    for p in out.iterdir():
        if _OURS_TMP.fullmatch(p.name) and p.name != LOCK:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    if fresh:
        old = [p for _, p in CK.numbered_checkpoints(out) if CK.checkpoint_fingerprint(p) == config_fp]
        if old:
            log(f"[output] a fresh run: removing {', '.join(p.name for p in old)} of an earlier run of this config "
                "(--resume continues from a checkpoint instead)")
        for p in old:
            shutil.rmtree(p)
