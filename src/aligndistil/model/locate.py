"""Where a model path points: the embedded default, a local folder, or a hub id.

transformers sends every string that is not an existing folder to the hub, so a missing
local folder such as ``./outputs/dpo`` used to surface as the hub's "Repo id must be in the
form ..." and a missing ``outputs/dpo`` as a failed download. A model path is read by one
rule, stated in the errors too (:func:`check_model_path`, which a run applies to its model
keys before it starts, and :func:`locate_model`, which every load goes through):

1. ``smollm2`` is the embedded default model; anything that exists on disk is a local path;
2. a string that cannot be a hub id (hub ids are ``NAME`` or ``ORG/NAME``: no ``./``,
   ``../``, ``/`` or ``~`` in front, no second ``/``; huggingface_hub's own check) is a
   local folder, so when it is absent that is the error;
3. ``NAME`` or ``ORG/NAME`` not on disk is a hub id and is handed to transformers, so hub
   models keep working for users with a hub; but while the hub is offline
   (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``) with no cached copy of it, neither
   reading can load, and the error says both.
"""

from __future__ import annotations

import os

from aligndistil.model.loading import DEFAULT_MODEL_NAME, ModelLoadError, resolve_model_path

#: The rule as the error messages state it.
RULE = ("a path that starts with ./, ../, / or ~ or holds more than one '/' is read as a local folder; "
        "NAME or ORG/NAME not found on disk is read as a hub id")


def hub_offline() -> bool:
    """Whether transformers may not reach the hub (either library's offline switch is on)."""
    from huggingface_hub import constants

    flags = (os.environ.get(v, "").strip().upper() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(f in {"1", "ON", "YES", "TRUE"} for f in flags)


def in_hub_cache(repo_id: str) -> bool:
    """Whether the local hub cache holds a model or tokenizer config of ``repo_id``."""
    from huggingface_hub import try_to_load_from_cache

    for name in ("config.json", "tokenizer_config.json"):
        try:
            if isinstance(try_to_load_from_cache(repo_id, name), str):
                return True
        except (ValueError, OSError):
            return False
    return False


def is_hub_id(name: str) -> bool:
    """``NAME`` or ``ORG/NAME`` as the hub accepts them (huggingface_hub's ``validate_repo_id``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _where(key: str | None) -> str:
    return f"{key}: " if key else "model path "


def check_model_path(name_or_path: str | os.PathLike, key: str | None = None) -> None:
    """Refuse a model path that can be neither a local folder nor a hub model (the rule in
    the module docstring), without loading or converting anything: what a run checks
    before it starts.

    Args:
        name_or_path: a local folder, a hub id (``NAME`` or ``ORG/NAME``), or ``"smollm2"``.
        key: the config key it came from (``model.dpo_model``), named in the error.

    Raises:
        ModelLoadError: a missing local folder, or a hub id not on disk while the hub is
            offline with no cached copy; the message names the key, the path and the rule.
    """
    path = os.fspath(name_or_path)
    if path == DEFAULT_MODEL_NAME or os.path.exists(os.path.expanduser(path)):
        return
    full = os.path.abspath(os.path.expanduser(path))
    if not is_hub_id(path):
        raise ModelLoadError(f"{_where(key)}{path} does not exist (no folder {full}); {RULE}")
    if hub_offline() and not in_hub_cache(path):
        raise ModelLoadError(
            f"{_where(key)}{path} is not a local folder (no {full}) and, read as a hub id, has no cached copy "
            f"while the hub is offline (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set); {RULE}")


def locate_model(name_or_path: str | os.PathLike, key: str | None = None) -> str:
    """What to hand to transformers: the embedded default's folder (converted on first use), a
    local path (``~`` expanded), or a hub id; :func:`check_model_path` refuses the rest first."""
    check_model_path(name_or_path, key)
    path = resolve_model_path(name_or_path)
    expanded = os.path.expanduser(path)
    return expanded if os.path.exists(expanded) else path


def not_found(path: str, key: str | None, exc: Exception) -> ModelLoadError:
    """transformers' failure on a hub id that is not on disk, said as both readings."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    full = os.path.abspath(os.path.expanduser(path))
    return ModelLoadError(f"{_where(key)}{path} is not a local folder (no {full}) and could not be loaded as a "
                          f"hub id ({type(exc).__name__}: {first}); {RULE}")
