"""Answers of the compared models to a question set, cached on disk and resumable.

A model is named ``NAME=SPEC`` on the command line. ``SPEC`` is a local model folder, a hub
id, ``smollm2`` (the embedded default), ``stage:STAGE`` (the folder of a pipeline stage,
under ``--pipeline-dir``) or ``api:MODEL`` (a model answering through the OpenAI-compatible
server at ``--answer-base-url``). Local models answer turn by turn with their own chat
template: turn ``t`` of a question sees the user's turns ``0..t`` and the model's own
earlier answers, as in MT-Bench's multi-turn setting.

Caching. Answers go to ``answers/<NAME>-<fingerprint>.jsonl``, one line per (question,
turn), appended as each batch finishes, so a crash loses at most one batch. The file name's
fingerprint covers what determines the answers: the model (its path and the size and
modification time of its weight and config files, so a retrained folder gets new answers)
and the generation settings. Each line also records a hash of the question's turns, so an
edited question is answered again. Sampling gives every (question, turn) its own seed
(:func:`aligndistil.model.sampling.row_seed` of the question's place in the full set), so
an answer does not depend on which other questions share its batch or run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from aligndistil.errors import AlignDistilError
from aligndistil.workflows.judge.questions import Question

__all__ = ["AnswerSettings", "AnswerError", "ModelSpec", "answer_all", "conversation", "describe_template",
           "parse_model_spec", "prepare_model"]

API_PREFIX, STAGE_PREFIX = "api:", "stage:"


class AnswerError(AlignDistilError, ValueError):
    """A model cannot answer: a bad ``NAME=SPEC``, a missing folder, a stage without a pipeline folder."""


@dataclass(frozen=True)
class AnswerSettings:
    """How answers are generated (all of it goes into the cache fingerprint)."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int = 0
    use_chat_template: bool = True


@dataclass
class ModelSpec:
    """A compared model: ``name``, what was given (``spec``), where it resolves to
    (``source``: a folder/hub id, or the API model name), ``kind`` (``local`` / ``api``),
    and once prepared its chat ``template`` description and cache ``fingerprint``."""

    name: str
    spec: str
    source: str
    kind: str
    template: str = ""
    fingerprint: str = ""
    tokenizer: object = None


def parse_model_spec(item: str, pipeline_dir: str | os.PathLike | None = None) -> ModelSpec:
    """``NAME=SPEC`` (or ``SPEC``; the name is then its last path part) -> :class:`ModelSpec`."""
    name, sep, spec = item.partition("=")
    if not sep:
        spec = item
        name = Path(item.rstrip("/")).name or item
        for prefix in (API_PREFIX, STAGE_PREFIX):
            if item.startswith(prefix):
                name = item[len(prefix):]
    if not name or not spec:
        raise AnswerError(f"model {item!r} must look like NAME=SPEC")
    if any(c in name for c in "/\\") or name.startswith("."):
        raise AnswerError(f"model name {name!r} must not contain a slash or start with a dot (it names files)")
    if spec.startswith(API_PREFIX):
        if not spec[len(API_PREFIX):]:
            raise AnswerError(f"model {item!r}: give the served model, e.g. api:gpt-4o-mini")
        return ModelSpec(name, spec, spec[len(API_PREFIX):], "api")
    if spec.startswith(STAGE_PREFIX):
        if pipeline_dir is None:
            raise AnswerError(f"model {item!r} names a pipeline stage; pass --pipeline-dir (the pipeline's output_dir)")
        folder = Path(pipeline_dir) / spec[len(STAGE_PREFIX):]
        if not folder.is_dir():
            raise AnswerError(f"model {item!r}: the stage folder {folder} does not exist (has the stage run?)")
        return ModelSpec(name, spec, str(folder), "local")
    return ModelSpec(name, spec, spec, "local")


def describe_template(tokenizer) -> str:
    """A short name of the tokenizer's chat template and the start of its hash.

    Shown in the report so that a comparison between models with different templates is
    visible (fine, but worth knowing: the judge sees answers, not templates).
    """
    tpl = getattr(tokenizer, "chat_template", None)
    if not tpl:
        return "none (raw text)"
    if isinstance(tpl, dict):  # several named templates: the default one is used
        tpl = tpl.get("default") or next(iter(tpl.values()))
    family = "custom"
    for marker, label in (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama-3"), ("[INST]", "llama-2/mistral"),
                          ("<start_of_turn>", "gemma"), ("<|user|>", "zephyr/phi")):
        if marker in tpl:
            family = label
            break
    return f"{family} (sha256 {hashlib.sha256(tpl.encode()).hexdigest()[:8]})"


def _model_identity(source: str) -> dict:
    from aligndistil.model.loading import resolve_model_path

    path = resolve_model_path(source)
    files = {}
    if os.path.isdir(path):
        for p in sorted(Path(path).iterdir()):
            if p.suffix in (".safetensors", ".json") and p.is_file():
                st = p.stat()
                files[p.name] = [st.st_size, st.st_mtime_ns]
    return {"path": os.path.abspath(path) if os.path.isdir(path) else path, "files": files}


def prepare_model(m: ModelSpec, settings: AnswerSettings, answer_base_url: str | None = None) -> ModelSpec:
    """Check that ``m`` can answer and fill in its template and fingerprint (cheap: the
    tokenizer only, so every model is checked before any work is done)."""
    from aligndistil.model.loading import load_tokenizer

    if m.kind == "api":
        if not answer_base_url:
            raise AnswerError(f"model {m.name!r} answers through a server ({m.spec}); pass --answer-base-url "
                              "or --judge-base-url")
        m.template = "the server's own"
        ident = {"api": m.source, "base_url": answer_base_url}
    else:
        m.tokenizer = load_tokenizer(m.source)
        m.template = describe_template(m.tokenizer) if settings.use_chat_template else "none (raw text)"
        ident = _model_identity(m.source)
    blob = json.dumps({"model": ident, "settings": asdict(settings)}, sort_keys=True)
    m.fingerprint = hashlib.sha256(blob.encode()).hexdigest()[:10]
    return m


def conversation(q: Question, answers: list[str], upto: int) -> list[dict]:
    """The chat messages before the model's answer to turn ``upto`` (0-based)."""
    msgs: list[dict] = []
    for t in range(upto):
        msgs += [{"role": "user", "content": q.turns[t]}, {"role": "assistant", "content": answers[t]}]
    return msgs + [{"role": "user", "content": q.turns[upto]}]


def _plain(msgs: list[dict]) -> str:
    # Without a chat template a multi-turn prompt is a plain transcript.
    if len(msgs) == 1:
        return msgs[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in msgs) + "\n\nAssistant:"


def _qhash(q: Question, turn: int) -> str:
    return hashlib.sha256(json.dumps(list(q.turns[: turn + 1])).encode()).hexdigest()[:12]


class _Store:
    """The append-only answers file of one model."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[tuple[str, int], dict] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    r = json.loads(line)
                    self.rows[(r["question_id"], int(r["turn"]))] = r
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a crash: its answer is generated again

    def get(self, q: Question, turn: int) -> dict | None:
        r = self.rows.get((q.qid, turn))
        return r if r is not None and r.get("qhash") == _qhash(q, turn) else None

    def add(self, rows: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
                self.rows[(r["question_id"], r["turn"])] = r
            f.flush()
            os.fsync(f.fileno())


def _local_batch(model, tok, convs: list[list[dict]], seeds: list[int], s: AnswerSettings) -> list[dict]:
    from aligndistil.data.collate import pad_with_mask
    from aligndistil.model.sampling import decode_sample, encode_prompts, sample_with_logprobs, stop_token_ids

    prompts = convs if s.use_chat_template else [_plain(c) for c in convs]
    enc = encode_prompts(tok, prompts, s.use_chat_template)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, att = pad_with_mask(enc, pad, side="left")
    device = next(model.parameters()).device
    out = sample_with_logprobs(model, ids.to(device), att.to(device), max_new_tokens=s.max_new_tokens, seeds=seeds,
                               temperature=s.temperature, top_p=s.top_p, eos_token_ids=stop_token_ids(model, tok),
                               pad_token_id=pad)
    res = []
    for b in range(len(convs)):
        d = decode_sample(tok, out, b)
        res.append({"answer": d["response"], "n_tokens": d["n_tokens"], "ended": d["ended"]})
    return res


def answer_all(m: ModelSpec, questions: list[Question], out_dir: str | os.PathLike, settings: AnswerSettings, *,
               batch_size: int = 8, client=None, progress: bool = False) -> dict[str, list[str]]:
    """Every question's answers by model ``m``: ``{question_id: [answer of turn 0, ...]}``.

    Cached answers are reused; the model is loaded only if something is missing.
    ``client`` (a :class:`~aligndistil.workflows.judge.client.ChatClient`) answers for
    ``api:`` models.
    """
    from tqdm.auto import tqdm

    from aligndistil.model.sampling import row_seed

    store = _Store(Path(out_dir) / "answers" / f"{m.name}-{m.fingerprint}.jsonl")
    model = None
    total = sum(len(q.turns) for q in questions)
    done = sum(1 for q in questions for t in range(len(q.turns)) if store.get(q, t))
    with tqdm(total=total, initial=done, desc=f"answers {m.name}", unit="turn", disable=not progress,
              dynamic_ncols=True) as bar:
        for turn in range(max(len(q.turns) for q in questions)):
            todo = [q for q in questions if turn < len(q.turns) and store.get(q, turn) is None]
            if todo and m.kind == "local" and model is None:
                from aligndistil.model.loading import load_causal_lm

                model = load_causal_lm(m.source)
            step = batch_size if m.kind == "local" else max(1, len(todo))
            for start in range(0, len(todo), step):
                chunk = todo[start:start + step]
                convs = [conversation(q, [store.get(q, t)["answer"] for t in range(turn)], turn) for q in chunk]
                seeds = [row_seed(settings.seed, q.index, turn) for q in chunk]
                if m.kind == "local":
                    outs = _local_batch(model, m.tokenizer, convs, seeds, settings)
                else:
                    texts = client.map(lambda a: client.complete(a[0], temperature=settings.temperature,
                                                                 max_tokens=settings.max_new_tokens, seed=a[1]),
                                       list(zip(convs, seeds)))
                    outs = [{"answer": t.strip(), "n_tokens": None, "ended": None} for t in texts]
                store.add([{"question_id": q.qid, "turn": turn, "qhash": _qhash(q, turn), **o}
                           for q, o in zip(chunk, outs)])
                bar.update(len(chunk))
    return {q.qid: [store.get(q, t)["answer"] for t in range(len(q.turns))] for q in questions}
