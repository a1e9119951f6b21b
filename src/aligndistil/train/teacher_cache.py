"""An exact on-disk cache of the frozen models' outputs for off-policy training.

Off-policy AlignDistil distils toward teachers that never change, on responses that never
change; TDPO and the DPO family compare against a reference that never changes. Running
those frozen models at every step repeats the same forward passes epoch after epoch. This
module runs them once per dataset and stores, for every response token, what the fused
losses need from them:

- each frozen model's FINAL HIDDEN STATE at the position that predicts the token (``d``
  numbers, ``d << V``; float32, exact, or bfloat16, half the disk and approximate), and its
  LM head weights, so the logits ``hidden @ W^T + b`` are recomputed exactly in the loss;
- for AlignDistil's adaptive teacher, ``TVD(pi_dpo, pi_rev)`` per token (float32), so
  ``alpha_t = r * TVD + eps`` needs neither teacher (and ``r``, ``eps`` may change freely).

This is not top-k caching of teacher probabilities (an approximation): with float32
hidden states the losses and gradients equal those of a run with the teachers loaded.
Which methods it can serve, and which TVD it stores, each method declares
(``Method.uncacheable``, ``Method.tvd_roles`` in :mod:`aligndistil.train.methods`).

A cache is a folder with a ``manifest.json`` that records a FINGERPRINT: content hashes of
every cached model's files (config and weights) and the dtype it is loaded in, a hash of
the tokenised dataset (ids of every prompt and response, in order, which covers the data
file, tokenizer, chat template and truncation), the tokenisation settings, and the stored
dtype. A cache whose fingerprint differs from the run's is refused with a message naming
what changed; it is never silently rebuilt or reused.

Layout: ``manifest.json``; ``head.<role>.safetensors`` (``weight``, optional ``bias``);
``<role>.<stream>.bin`` (row-major ``(rows, d)``, stored dtype) and ``tvd.<stream>.bin``
(float32); a stream is ``response`` (prompt + response data) or ``chosen``/``rejected``
(pairs). Rows of example ``i`` are ``offsets[stream][i]:offsets[stream][i+1]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from aligndistil.model.outputs import ResponseOutputs, concat_pairs, linear_head, pair_outputs, response_outputs
from aligndistil.model.outputs import response_positions
from aligndistil.errors import AlignDistilError

VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"float32": (torch.float32, np.float32), "bfloat16": (torch.bfloat16, np.uint16)}

#: The batch key the cache looks rows up by: ``(B,)`` long, each example's index in the
#: training features (the order :func:`build` stored them in). The trainer's micro-batch
#: builder adds it to every batch while a cache is in use; nothing else reads it.
INDEX_KEY = "example_index"


class TeacherCacheError(AlignDistilError, ValueError):
    """A teacher cache that cannot be used: stale, incomplete, or for an unsupported setup."""


# ----------------------------------------------------------------------------- fingerprints
_FILE_HASHES: dict[tuple, str] = {}


def hash_model_files(path: str | os.PathLike) -> str:
    """sha256 over a model folder's ``config.json`` and weight files (names and contents)."""
    from aligndistil.model.loading import resolve_model_path

    folder = Path(resolve_model_path(str(path)))
    if not folder.is_dir():
        raise TeacherCacheError(f"teacher cache: {path} is not a local model folder; cannot fingerprint its weights")
    files = sorted([folder / "config.json"] + list(folder.glob("*.safetensors")))
    files = [f for f in files if f.is_file()]
    if not any(f.suffix == ".safetensors" for f in files):
        raise TeacherCacheError(f"teacher cache: {folder} holds no .safetensors weights")
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                while block := fh.read(1 << 22):
                    h.update(block)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


def hash_features(features: Iterable[dict]) -> str:
    """sha256 over the tokenised dataset: every example's prompt and response ids, in order."""
    h = hashlib.sha256()
    for f in features:
        row = {k: f[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids", "completion_ids") if k in f}
        h.update(json.dumps(row, sort_keys=True, separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()


def fingerprint(cfg, roles: dict[str, str], features: list[dict], kind: str) -> dict:
    """What a cache depends on: model files per role, load dtype, data, tokenisation, stored dtype."""
    d = cfg.data
    return {
        "version": VERSION,
        "kind": kind,
        "weights": {role: hash_model_files(path) for role, path in sorted(roles.items())},
        "model_dtype": cfg.model.dtype,
        "data": hash_features(features),
        "n_examples": len(features),
        "tokenisation": {
            "tokenizer": str(cfg.model.tokenizer or cfg.model.policy),
            "max_length": d.max_length, "max_prompt_length": d.max_prompt_length,
            "use_chat_template": d.use_chat_template, "split": d.split, "max_examples": d.max_examples,
        },
        "stored_dtype": cfg.train.teacher_cache_dtype,
    }


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            def short(x):
                return x[:12] + "..." if isinstance(x, str) and len(x) == 64 else x
            out.append(f"{prefix}{k}: cache has {short(a)!r}, this run has {short(b)!r}")
    return out


def check_supported(method) -> None:
    """Refuse a :class:`~aligndistil.train.methods.Method` whose frozen outputs the cache
    cannot hold, quoting the reason its declaration (``uncacheable``) gives."""
    if method.uncacheable is not None:
        raise TeacherCacheError(f"train.teacher_cache is not supported for {method.name}: {method.uncacheable}")


# ----------------------------------------------------------------------------- building
@dataclass
class Ranks:
    """The processes that build one cache together, each over its own share of the examples.

    Every process runs the frozen models over a contiguous slice of the examples (process
    ``k`` of ``n`` takes ``[k N / n, (k+1) N / n)``) and writes its rows straight into the
    shared files at offsets known before anything runs (they follow from the token counts).
    ``agree`` is a barrier that also hands every process the others' errors: it takes this
    process's error message (None: fine) and returns all of them, so a failure on one
    process stops all of them with its message instead of leaving them waiting.
    """

    rank: int = 0
    world: int = 1
    agree: Callable[[str | None], list] = lambda err: [err]

    def check(self, err: str | None) -> None:
        """Wait for every process; raise (on all of them) if any reported an error."""
        errs = [e for e in self.agree(err) if e]
        if errs:
            raise TeacherCacheError(f"teacher cache: building failed: {errs[0]}")


def _streams(kind: str) -> dict[str, str]:
    return {"response": "completion_ids"} if kind == "sft" else {"chosen": "chosen_ids", "rejected": "rejected_ids"}


def build(folder: str | os.PathLike, *, models: dict, features: list[dict], collator, kind: str, fp: dict,
          tvd_roles: tuple[str, str] | None = None, batch_size: int = 8, chunk_size: int | str = "auto",
          device: torch.device | str = "cpu", log=print, ranks: Ranks | None = None) -> Path:
    """Run the frozen ``models`` (role -> model) once over ``features`` and write a cache.

    With several processes every one of them calls this with the same arguments and its
    :class:`Ranks`: each computes its share of the rows, the main process (rank 0) creates
    the files first and publishes the cache last.

    Args:
        folder: where the cache goes; must not exist yet or be empty. Written to a
            temporary sibling first and renamed, so a cache is complete or absent.
        features, collator, kind: the training features (in their order: rows are looked
            up by :data:`INDEX_KEY`) and the collator that batches them; kind ``sft`` or ``pairs``.
        fp: :func:`fingerprint` of this run, recorded in the manifest.
        tvd_roles: ``(base_role, negative_role)`` to also store their ``TVD`` per token
            (the method's ``Method.tvd_roles``).
        ranks: this process among those building the cache (default: the only one).
    """
    ranks = ranks or Ranks()
    main = ranks.rank == 0
    folder = Path(folder)
    dtype_name = fp["stored_dtype"]
    if dtype_name not in DTYPES:
        raise TeacherCacheError(f"train.teacher_cache_dtype must be one of {sorted(DTYPES)}, got {dtype_name!r}")
    tdt, ndt = DTYPES[dtype_name]
    # One temporary name for every process (they write into the same files); a leftover of a
    # killed build is removed by the main process before it creates the files afresh.
    tmp = folder.with_name(f".{folder.name}.building")
    started = time.time()
    streams = _streams(kind)
    offsets = {s: np.concatenate([[0], np.cumsum([len(f[key]) for f in features])]).astype(np.int64)
               for s, key in streams.items()}
    heads = {}
    for role, model in models.items():
        lin = linear_head(model)
        if lin is None:
            raise TeacherCacheError(
                f"teacher cache: the {role} model's logits are not a plain linear map of its final hidden state "
                "(a wrapped or soft-capped head); its outputs cannot be cached as hidden states")
        heads[role] = lin
    dims = {w.shape[1] for w, _ in heads.values()}
    if len(dims) != 1:
        raise TeacherCacheError(f"teacher cache: frozen models have different hidden sizes {sorted(dims)}")
    d = dims.pop()
    vocab = {w.shape[0] for w, _ in heads.values()}.pop()
    shapes = {(role, s): ((max(int(offsets[s][-1]), 1), d), ndt) for role in models for s in streams}
    if tvd_roles:
        shapes.update({("tvd", s): ((max(int(offsets[s][-1]), 1),), np.float32) for s in streams})

    def path(name, s):
        return tmp / f"{name}.{s}.bin"

    err = None
    if main:  # create every file at its full size; the others open them once this is done
        try:
            if folder.exists() and any(folder.iterdir()):
                raise TeacherCacheError(f"{folder} exists and is not empty; refusing to write a teacher cache into it")
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            from safetensors.torch import save_file
            for role, (weight, bias) in heads.items():
                tensors = {"weight": weight.detach().to("cpu").contiguous()}
                if bias is not None:
                    tensors["bias"] = bias.detach().to("cpu").contiguous()
                save_file(tensors, str(tmp / f"head.{role}.safetensors"))
            for (name, s), (shape, dt) in shapes.items():
                np.memmap(path(name, s), dtype=dt, mode="w+", shape=shape).flush()
        except (OSError, TeacherCacheError) as e:
            err = str(e)
    ranks.check(err)
    files = {key: np.memmap(path(*key), dtype=dt, mode="r+", shape=shape) for key, (shape, dt) in shapes.items()}

    def write(name, s, start_example, rows, mask):
        arr = files[(name, s)]
        rows = rows.detach().to("cpu")  # the whole batch at once, not a device copy per example
        bf16 = name != "tvd" and tdt == torch.bfloat16  # stored as its raw 16 bits
        rows = (rows.to(tdt).view(torch.uint16) if bf16 else rows.float()).numpy()
        for b in range(rows.shape[0]):
            i = start_example + b
            n = int(mask[b].sum())
            lo = int(offsets[s][i])
            if n != offsets[s][i + 1] - lo:
                raise TeacherCacheError(f"teacher cache: example {i} has {n} response rows, expected {offsets[s][i + 1] - lo}")
            arr[lo:lo + n] = rows[b, :n]

    share = range(ranks.rank * len(features) // ranks.world, (ranks.rank + 1) * len(features) // ranks.world)
    err = None
    try:
        _run_share(models, features, share, collator, batch_size, kind, streams, tvd_roles, chunk_size, device,
                   write)
        for arr in files.values():
            arr.flush()
    except (OSError, TeacherCacheError, RuntimeError, ValueError) as e:
        err = f"process {ranks.rank}: {type(e).__name__}: {e}"
    del files
    ranks.check(err)
    if main:
        try:
            manifest = {
                "fingerprint": fp, "roles": sorted(models), "streams": {s: offsets[s].tolist() for s in streams},
                "hidden_size": d, "vocab_size": vocab, "tvd": list(tvd_roles) if tvd_roles else None,
                "built_seconds": round(time.time() - started, 1), "built_by_processes": ranks.world,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest))
            if folder.exists():
                folder.rmdir()
            os.replace(tmp, folder)
        except OSError as e:
            err = str(e)
    ranks.check(err)
    log(f"[teacher cache] wrote {folder} ({', '.join(sorted(models))}; {len(features)} examples, "
        f"{sum(int(o[-1]) for o in offsets.values())} rows, {dtype_name}, {ranks.world} process(es)) "
        f"in {time.time() - started:.1f}s")
    return folder


def _run_share(models, features, share, collator, batch_size, kind, streams, tvd_roles, chunk_size, device,
               write) -> None:
    """Run the frozen models over the examples of ``share`` (a range) and ``write`` their rows."""
    from aligndistil.losses import fused as FL

    with torch.no_grad():
        for start in range(share.start, share.stop, batch_size):
            batch = collator(features[start:min(start + batch_size, share.stop)])
            batch = {k: v.to(device) for k, v in batch.items()}
            outs = {}
            for role, model in models.items():
                if kind == "sft":
                    o = response_outputs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                                         compute_logits=False)
                    outs[role] = {"response": o}
                else:
                    c, r = pair_outputs(model, batch, compute_logits=False)
                    outs[role] = {"chosen": c, "rejected": r}
                for s, o in outs[role].items():
                    write(role, s, start, o.hidden, o.mask)
            if tvd_roles:
                a, b = tvd_roles
                for s in streams:
                    oa, ob = outs[a][s], outs[b][s]
                    tvd = FL.teacher_tvd(FL.HeadRows(oa.hidden, *oa.head), FL.HeadRows(ob.hidden, *ob.head), oa.mask,
                                         chunk_size=chunk_size)
                    write("tvd", s, start, tvd, oa.mask)


# ----------------------------------------------------------------------------- reading
# A damaged cache (a run killed while copying it, a full disk, a file cut short or edited) is
# refused with the file it concerns, never read as if whole: sizes and structure are checked
# on every open; the contents are not hashed (a cache can be many gigabytes), so a same-size
# overwrite of hidden states is not noticed here (unless it makes the loss non-finite).
def _rebuild_hint(folder: Path) -> str:
    return f"Delete {folder} (it is rebuilt on the next run) or point train.teacher_cache elsewhere"


def _damaged(folder: Path, what: str) -> TeacherCacheError:
    return TeacherCacheError(f"teacher cache {folder} is damaged: {what}. {_rebuild_hint(folder)}.")


def _read_manifest(folder: Path) -> dict:
    """``manifest.json`` parsed and checked for the keys a reader needs."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(folder, f"{folder / MANIFEST} is not valid JSON ({e})") from None
    need = {"fingerprint": dict, "roles": list, "streams": dict, "hidden_size": int, "vocab_size": int}
    if not isinstance(manifest, dict):
        raise _damaged(folder, f"{folder / MANIFEST} is not a JSON object")
    for key, kind in need.items():
        if not isinstance(manifest.get(key), kind):
            raise _damaged(folder, f"{folder / MANIFEST} has no valid {key!r}")
    return manifest


def _open_rows(path: Path, dtype, shape: tuple) -> np.memmap:
    """A read-only memmap of ``path``, after checking it holds exactly ``shape`` of ``dtype``
    (``np.memmap`` itself fails with an unnamed "mmap length" error on a short file)."""
    want = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if not path.is_file():
        raise _damaged(path.parent, f"{path.name} is missing")
    have = path.stat().st_size
    if have != want:
        raise _damaged(path.parent, f"{path.name} has {have} bytes, the manifest implies {want} "
                                    f"({' x '.join(map(str, shape))} values of {np.dtype(dtype).name})")
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


def _load_head(path: Path, shape: tuple[int, int], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight (V, d), bias (V,) or None)`` of one cached LM head, checked against the manifest."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise _damaged(path.parent, f"{path.name} is missing")
    try:
        t = load_file(str(path), device="cpu")  # safetensors refuses "cpu:0" (a gloo process's device)
    except Exception as e:  # safetensors raises its own error type for a cut or garbled file
        raise _damaged(path.parent, f"{path.name} cannot be read ({type(e).__name__}: {e})") from None
    weight = t.get("weight")
    if weight is None or tuple(weight.shape) != tuple(shape):
        got = None if weight is None else tuple(weight.shape)
        raise _damaged(path.parent, f"{path.name} holds a weight of shape {got}, the manifest implies {tuple(shape)}")
    bias = t.get("bias")
    return weight.to(device), None if bias is None else bias.to(device)


class TeacherCache:
    """A built cache, checked against this run's fingerprint, serving frozen outputs.

    Raises:
        TeacherCacheError: the folder is no complete cache, or it was built for other
            weights, data, tokenisation or stored dtype (the message lists what differs),
            or a file of it is cut short, missing or unreadable (the message names it).
    """

    def __init__(self, folder: str | os.PathLike, fp: dict, device: torch.device | str = "cpu"):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise TeacherCacheError(f"{self.folder} is not a complete teacher cache (no {MANIFEST})")
        self.manifest = _read_manifest(self.folder)
        diffs = _differences(self.manifest["fingerprint"], fp)
        if diffs:
            raise TeacherCacheError(
                f"teacher cache {self.folder} is stale: it was built for other weights, data or settings:\n  "
                + "\n  ".join(diffs) + f"\n{_rebuild_hint(self.folder)}.")
        self.device = torch.device(device)
        self.kind = fp["kind"]
        self.roles = tuple(self.manifest["roles"])
        self.dtype, ndt = DTYPES[fp["stored_dtype"]]
        d = self.manifest["hidden_size"]
        try:
            self.offsets = {s: np.asarray(o, dtype=np.int64) for s, o in self.manifest["streams"].items()}
        except (TypeError, ValueError):
            raise _damaged(self.folder, f"{MANIFEST} holds malformed row offsets") from None
        for s, off in self.offsets.items():
            if off.shape != (fp["n_examples"] + 1,) or off[0] != 0 or bool((np.diff(off) < 0).any()):
                raise _damaged(self.folder, f"{MANIFEST} holds malformed row offsets for stream {s!r}")
        self._rows = {}
        for role in self.roles:
            for s, off in self.offsets.items():
                self._rows[(role, s)] = _open_rows(self.folder / f"{role}.{s}.bin", ndt, (max(int(off[-1]), 1), d))
        self.has_tvd = bool(self.manifest.get("tvd"))
        if self.has_tvd:
            for s, off in self.offsets.items():
                self._rows[("tvd", s)] = _open_rows(self.folder / f"tvd.{s}.bin", np.float32, (max(int(off[-1]), 1),))
        self.heads = {role: _load_head(self.folder / f"head.{role}.safetensors", (self.vocab_size, d), self.device)
                      for role in self.roles}

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    def has(self, role: str) -> bool:
        return role in self.roles

    def _gather(self, name: str, stream: str, index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, T, d)`` (or ``(B, T)`` for tvd) rows of examples ``index``, left-justified like ``mask``."""
        arr = self._rows[(name, stream)]
        off = self.offsets[stream]
        B, T = mask.shape
        shape = (B, T) if name == "tvd" else (B, T, arr.shape[1])
        out = torch.zeros(shape, dtype=torch.float32 if name == "tvd" else self.dtype)
        counts = mask.sum(-1).to("cpu")
        for b, i in enumerate(index.tolist()):
            if not 0 <= i < len(off) - 1:
                raise TeacherCacheError(f"teacher cache {self.folder}: example index {i} is outside the cached dataset")
            lo, hi = int(off[i]), int(off[i + 1])
            if hi - lo != int(counts[b]):
                raise TeacherCacheError(
                    f"teacher cache {self.folder} is stale: example {i} has {int(counts[b])} response tokens in this "
                    f"batch but {hi - lo} in the cache")
            x = torch.from_numpy(np.array(arr[lo:hi]))
            if self.dtype == torch.bfloat16 and name != "tvd":
                x = x.view(torch.bfloat16)
            out[b, : hi - lo] = x
        return out.to(self.device)

    def _index(self, batch: dict) -> torch.Tensor:
        if INDEX_KEY not in batch:
            raise TeacherCacheError(f"teacher cache: the batch carries no {INDEX_KEY} (is it a trainer batch?)")
        return batch[INDEX_KEY]

    def _out(self, role, stream, index, labels, mask) -> ResponseOutputs:
        hidden = self._gather(role, stream, index, mask)
        return ResponseOutputs(logits=None, labels=labels, mask=mask, hidden=hidden, head=self.heads[role])

    def outputs(self, role: str, batch: dict, pair: bool):
        """The cached ``role`` outputs for ``batch``, shaped as :func:`response_outputs` (or
        :func:`pair_outputs` with ``pair``) would return them, with ``logits=None``."""
        index = self._index(batch)
        if not pair:
            if self.kind != "sft":
                raise TeacherCacheError("teacher cache was built for pairs, not prompt + response batches")
            _, labels, mask = response_positions(batch["input_ids"], batch["response_mask"])
            return self._out(role, "response", index, labels, mask)
        if self.kind != "pairs":
            raise TeacherCacheError("teacher cache was built for prompt + response batches, not pairs")
        ids, _, resp = concat_pairs(batch)  # one (2B, T) layout, as pair_outputs makes it
        _, labels, mask = response_positions(ids, resp)
        B = batch["chosen_input_ids"].shape[0]
        return (self._out(role, "chosen", index, labels[:B], mask[:B]),
                self._out(role, "rejected", index, labels[B:], mask[B:]))

    def tvd(self, batch: dict, mask: torch.Tensor) -> torch.Tensor:
        """Cached ``TVD(pi_dpo, pi_rev)`` per token, ``(B, T)`` like ``mask`` (prompt + response batches)."""
        return self._gather("tvd", "response", self._index(batch), mask).to(mask.dtype)
