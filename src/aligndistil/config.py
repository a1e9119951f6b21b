"""Typed run configuration: dataclasses, YAML files and ``key=value`` overrides.

A run is described by one :class:`RunConfig` with four sections (``model``, ``data``,
``train``, ``method``), each a dataclass whose fields carry a docstring-like ``help``
string. YAML files are read with ``yaml.safe_load``; unknown keys are errors that name the
file and the key (a typo such as ``betta: 0.2`` must not silently train with the default).
Command-line overrides use dotted paths (``train.learning_rate=1e-5``) and are parsed with
the field's type, so ``method.beta=0.2`` becomes a float and ``train.report_to=[]`` a list.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A bad configuration file, key or value; the message names where it came from."""


def _f(default, help: str, **kw):
    """A dataclass field with a help string (shown by ``aligndistil train --help-config``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    """Which models play which role. Paths are local HF folders, hub ids, or ``smollm2``."""

    policy: str = _f("", "Model to train (pi_theta), initialised from this checkpoint.")
    reference: Optional[str] = _f(None, "Reference model pi_ref; defaults to `policy`.")
    dpo_model: Optional[str] = _f(None, "DPO-trained model pi_dpo (AlignDistil teachers).")
    reverse_dpo_model: Optional[str] = _f(None, "Reverse-DPO model pi_rev (contrastive/adaptive teachers).")
    tokenizer: Optional[str] = _f(None, "Tokenizer to use; defaults to the policy's.")
    dtype: str = _f("float32", "Parameter dtype: float32 (use on CPU), bfloat16 or float16.")
    trust_remote_code: bool = _f(False, "Allow model code from the checkpoint (off unless you trust it).")


@dataclass
class DataConfig:
    """Training data and tokenisation."""

    train_file: str = _f("", "JSONL file or `datasets` folder saved with save_to_disk.")
    split: str = _f("train", "Split to use when `train_file` is a DatasetDict folder.")
    max_length: int = _f(512, "Maximum prompt+response tokens; longer responses are cut.")
    max_prompt_length: int = _f(256, "Maximum prompt tokens; longer prompts keep their END.")
    use_chat_template: Optional[bool] = _f(None, "Wrap string prompts with the tokenizer's chat template (None: only for message lists).")
    max_examples: Optional[int] = _f(None, "Use only the first N examples (quick runs).")


@dataclass
class TrainConfig:
    """The optimisation loop."""

    output_dir: str = _f("outputs/run", "Folder for the final model, metrics.jsonl and checkpoints.")
    seed: int = _f(0, "Seed for initialisation, data order and sampling.")
    learning_rate: float = _f(1e-6, "Peak learning rate of the policy.")
    optimizer: str = _f("adamw", "adamw, or sgd (plain SGD: updates are linear in the gradient, which the exactness tests rely on).")
    weight_decay: float = _f(0.0, "AdamW weight decay of the policy.")
    adam_betas: list = _f([0.9, 0.999], "AdamW betas.")
    lr_scheduler: str = _f("linear", "transformers scheduler name: linear, cosine, constant, constant_with_warmup ...")
    warmup_ratio: float = _f(0.1, "Share of steps for linear warm-up.")
    per_device_batch_size: int = _f(4, "Examples (pairs for pairwise methods) per process per micro-batch.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    num_epochs: float = _f(1.0, "Passes over the data (ignored when max_steps > 0).")
    max_steps: int = _f(0, "Optimizer steps to run; 0 means derive from num_epochs.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).")
    logging_steps: int = _f(1, "Write metrics every N optimizer steps.")
    save_steps: int = _f(0, "Checkpoint every N optimizer steps (0: only the final model).")
    save_total_limit: int = _f(2, "Keep only the last K checkpoints.")
    report_to: list = _f([], "Extra loggers: [tensorboard].")
    progress_bar: bool = _f(True, "Show a progress bar with loss and time left.")
    gradient_checkpointing: bool = _f(False, "Trade compute for activation memory in the policy.")
    loss_path: str = _f("fused", "fused: token-level losses computed in row chunks from final hidden states, never B x T x V; plain: full logits (the reference implementation).")
    chunk_size: str = _f("auto", "fused path: response rows per chunk, a positive integer, or auto (as many rows as keep the chunk's full-vocabulary fp32 buffers within 128 MiB: 224 rows for AlignDistil at V=49,152, 64 at V=151,936). Larger chunks are faster and use more memory.")
    compile_loss: bool = _f(False, "fused path: torch.compile the element-wise chunk body (see BENCHMARKS.md for when it pays).")
    teacher_cache: Optional[str] = _f(None, "Folder of an exact teacher cache (final hidden states + alpha inputs of the frozen models, off-policy aligndistil and tdpo1/2); built on first use, refused if stale. The frozen models are then not loaded.")
    teacher_cache_dtype: str = _f("float32", "Dtype of cached hidden states: float32 (exact) or bfloat16 (half the disk, approximate teacher logits).")


@dataclass
class MethodConfig:
    """The method and its hyper-parameters; names follow SPEC.md's symbols."""

    name: str = _f("dpo", "sft, dpo, ipo, simpo, dpop, kto, tdpo1, tdpo2, sparsepo, mapo, aligndistil.")
    beta: float = _f(0.1, "KL / temperature coefficient beta (dpo family, tdpo, sparsepo, aligndistil's RLHF beta).")
    reverse: bool = _f(False, "dpo: swap chosen and rejected (train the reverse-DPO model).")
    gamma: float = _f(5.0, "simpo: target margin gamma.")
    lambda_: float = _f(50.0, "dpop: penalty weight lambda.")
    alpha: float = _f(0.5, "tdpo2: weight of delta2; aligndistil teacher=constant: the constant alpha.")
    desirable_weight: float = _f(1.0, "kto: lambda_D.")
    undesirable_weight: float = _f(1.0, "kto: lambda_U.")
    mask_shared: bool = _f(True, "sparsepo: one mask for reward and KL (m_u = m_d) or two.")
    lambda_u: float = _f(1e-3, "sparsepo: L1 weight of the reward mask.")
    lambda_d: float = _f(1e-3, "sparsepo: L1 weight of the KL mask.")
    mask_learning_rate: Optional[float] = _f(None, "sparsepo: learning rate of the mask network (default: the policy's).")
    mask_weight_decay: float = _f(0.01, "sparsepo: weight decay of the mask network.")
    mode: str = _f("off_policy", "aligndistil: off_policy (prompt + chosen) or on_policy (sampled).")
    teacher: str = _f("adaptive", "aligndistil: vanilla, contrastive, adaptive or constant.")
    beta0: float = _f(0.1, "aligndistil: the beta of the DPO models that make the teacher.")
    r: float = _f(10.0, "aligndistil adaptive: alpha_t = r * TVD + eps.")
    eps: float = _f(1e-3, "aligndistil adaptive: floor of alpha_t.")
    weighting: str = _f("beta_t", "aligndistil: per-token weight beta0/alpha_t (beta_t) or uniform.")
    temperature: float = _f(1.0, "on-policy sampling temperature.")
    top_p: float = _f(1.0, "on-policy nucleus sampling.")
    max_new_tokens: int = _f(64, "on-policy: tokens sampled per response.")
    num_samples: int = _f(1, "on-policy: responses sampled per prompt.")


@dataclass
class RunConfig:
    """One training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """A stable hash of every setting except where outputs go and how they are shown."""
        d = self.to_dict()
        for k in ("output_dir", "progress_bar", "report_to", "logging_steps", "save_steps", "save_total_limit"):
            d["train"].pop(k, None)
        # Performance settings that leave the results equal (to float tolerance) are not part of
        # the fingerprint; an approximate (bf16) teacher cache is.
        for k in ("loss_path", "chunk_size", "compile_loss", "teacher_cache"):
            d["train"].pop(k, None)
        if not self.train.teacher_cache or self.train.teacher_cache_dtype == "float32":
            d["train"].pop("teacher_cache_dtype", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def parse_chunk_size(value) -> int | str:
    """``train.chunk_size`` as the fused path takes it: ``"auto"`` or a positive int."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        rows = int(str(value).strip())
    except ValueError:
        rows = 0
    if isinstance(value, bool) or rows <= 0 or str(rows) != str(value).strip():
        raise ValueError(f"train.chunk_size must be a positive integer (rows per chunk) or auto, got {value!r}")
    return rows


SECTIONS = {f.name: f.type for f in fields(RunConfig)}


def _section_class(name: str):
    return {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "method": MethodConfig}[name]


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML or command-line value to a field type, or raise ConfigError."""
    if isinstance(tp, str):
        tp = eval(tp, vars(typing))  # field types are strings under `from __future__ import annotations`
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    if tp is list or origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(d: dict, source: str = "<dict>") -> RunConfig:
    """Build a RunConfig from a nested dict, refusing unknown sections and keys."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections {list(SECTIONS)}")
    cfg = RunConfig()
    for sec, values in d.items():
        if sec not in SECTIONS:
            raise ConfigError(f"{source}: unknown section {sec!r} (expected one of {list(SECTIONS)})")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {sec!r} must be a mapping")
        obj = getattr(cfg, sec)
        known = {f.name: f for f in fields(obj)}
        for k, v in values.items():
            if k not in known:
                raise ConfigError(f"{source}: unknown key {sec}.{k} (known: {', '.join(sorted(known))})")
            setattr(obj, k, _coerce(v, known[k].type, f"{source}: {sec}.{k}"))
    return cfg


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping with ``safe_load``; errors name the file (and line, when YAML knows it)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    return data or {}


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``section.key=value`` strings (values parsed as YAML scalars, then typed)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        path, raw = item.split("=", 1)
        parts = path.strip().split(".")
        if len(parts) != 2 or parts[0] not in SECTIONS:
            raise ConfigError(f"override {item!r}: key must be one of {list(SECTIONS)} followed by .name")
        sec, key = parts
        obj = getattr(cfg, sec)
        known = {f.name: f for f in fields(obj)}
        if key not in known:
            raise ConfigError(f"override {item!r}: unknown key {sec}.{key} (known: {', '.join(sorted(known))})")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if known[key].type in ("str", "Optional[str]") and value is not None and not isinstance(value, str):
            value = raw  # keep "1e-3"-like strings for string fields as typed
        setattr(obj, key, _coerce(value, known[key].type, f"override {item!r}"))
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML run config and apply command-line overrides."""
    cfg = from_dict(load_yaml(path), str(path)) if path else RunConfig()
    return apply_overrides(cfg, overrides or [])


def dump_config(cfg: RunConfig) -> str:
    """The config as YAML text (what is saved beside every output)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def help_text() -> str:
    """Every config key with its default and help string, for ``--help-config``."""
    lines = []
    for sec in SECTIONS:
        cls = _section_class(sec)
        lines.append(f"[{sec}]  {cls.__doc__.strip()}")
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {sec}.{f.name} = {default!r}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)
