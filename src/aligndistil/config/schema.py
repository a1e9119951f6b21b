"""The run configuration's schema: four typed sections, each field's help and allowed range.

A run is described by one :class:`RunConfig` with four sections (``model``, ``data``,
``train``, ``method``), each a dataclass whose fields carry a ``help`` string and, where a
value can be out of range, a ``check``. A run checks every value (:func:`validate`) before
it loads a model or touches its output folder, so ``method.beta=0`` fails in a second with
the key's name instead of at step 1 inside the loss. Reading configs from YAML files and
``key=value`` overrides: :mod:`aligndistil.config.files`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

from aligndistil.errors import AlignDistilError


class ConfigError(AlignDistilError, ValueError):
    label = "config error"
    """A bad configuration file, key or value; the message names where it came from."""


class Check(NamedTuple):
    """An allowed range: ``ok(value)`` and how the error message says it (``"> 0"``)."""

    ok: Callable[[Any], bool]
    says: str


def _gt(x) -> Check:
    return Check(lambda v: v > x, f"> {x}")


def _ge(x) -> Check:
    return Check(lambda v: v >= x, f">= {x}")


def _within(lo, hi, lo_open=False) -> Check:
    return Check(lambda v: (lo < v if lo_open else lo <= v) and v <= hi, f"in {'(' if lo_open else '['}{lo}, {hi}]")


def _one_of(*names: str) -> Check:
    return Check(lambda v: v in names, " or ".join(names) if len(names) == 2 else "one of " + ", ".join(names))


#: ``model.dtype`` values: the dtypes a checkpoint is loaded in (torch attribute names).
DTYPES = ("float32", "bfloat16", "float16")
#: ``train.report_to`` values (none, jsonl: metrics.jsonl only, which is always written).
LOGGERS = ("none", "jsonl", "tensorboard", "wandb")


def _f(default, help: str, check: Check | None = None, **kw):
    """A dataclass field with a help string (shown by ``aligndistil config-help``) and an
    optional allowed range (enforced by :func:`validate`; None values are never checked)."""
    meta = {"help": help, "check": check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on the policy: only they train, the base stays frozen (docs/lora-vllm.md)."""

    r: int = _f(16, "Rank of each adapter's update B @ A.", _ge(1))
    alpha: float = _f(32.0, "Scale: the update is (alpha / r) * B @ A.", _gt(0))
    dropout: float = _f(0.0, "Dropout on the adapters' input while training.", Check(lambda v: 0 <= v < 1, "in [0, 1)"))
    target_modules: list = _f(["all-linear"], "Linear modules that get adapters, by name (q_proj, v_proj ...), or [all-linear] (every linear layer but the output head). A name the model lacks is an error listing the names it has.", Check(lambda v: len(v) > 0 and all(isinstance(x, str) and x for x in v), "a non-empty list of module names"))


@dataclass
class ModelConfig:
    """Which models play which role. Paths are local HF folders, hub ids, or ``smollm2``."""

    policy: str = _f("", "Model to train (pi_theta), initialised from this checkpoint.")
    reference: Optional[str] = _f(None, "Reference model pi_ref; defaults to `policy`.")
    dpo_model: Optional[str] = _f(None, "DPO-trained model pi_dpo (AlignDistil teachers).")
    reverse_dpo_model: Optional[str] = _f(None, "Reverse-DPO model pi_rev (contrastive/adaptive teachers).")
    tokenizer: Optional[str] = _f(None, "Tokenizer to use; defaults to the policy's.")
    dtype: str = _f("float32", "Dtype of the frozen models (reference, teachers) and of the policy's forward under autocast: float32 (use on CPU), bfloat16 or float16. The trained policy itself always holds float32 master weights.", _one_of(*DTYPES))
    trust_remote_code: bool = _f(False, "Allow model code from the checkpoint (off unless you trust it).")
    lora: Optional[LoraConfig] = _f(None, "Train LoRA adapters instead of every weight: {r, alpha, dropout, target_modules} (model.lora.r=8 on the command line; model.lora=true for the defaults). The reference is the base with the adapter disabled; adapter teachers on the same base share it. null: full fine-tuning.")


@dataclass
class DataConfig:
    """Training data and tokenisation."""

    train_file: str = _f("", "JSONL file, `datasets` folder saved with save_to_disk, local folder of data files, or hub:ORG/NAME (a dataset id, read with datasets.load_dataset).")
    dataset_config: Optional[str] = _f(None, "Configuration name of a hub:ORG/NAME dataset or data folder (datasets.load_dataset's name; TRL's dataset_config); null: the default.")
    split: str = _f("train", "Split to use (a DatasetDict folder, a data folder or a hub dataset; TRL's dataset_train_split).")
    max_length: int = _f(512, "Maximum prompt+response tokens; longer responses are cut.", _ge(2))
    max_prompt_length: int = _f(256, "Maximum prompt tokens; longer prompts keep their END.", _ge(1))
    use_chat_template: Optional[bool] = _f(None, "Render prompts with the tokenizer's chat template, a string prompt as one user message: null (auto) when the tokenizer has one, true always, false never. `eval` follows the same rule; long chat prompts are cut inside the last user message, keeping the template's framing.")
    max_examples: Optional[int] = _f(None, "Use only the first N usable examples (quick runs); null: all.", _ge(1))
    eval_file: Optional[str] = _f(None, "Held-out data scored during training (train.eval_steps, and after the last step): same formats as train_file, read with the same dataset_config, max_length and chat-template rule; null: none. Not with eval_split_ratio.")
    eval_split: str = _f("test", "Split of eval_file when it is a DatasetDict folder, a data folder or a hub dataset (TRL's dataset_test_split).")
    eval_split_ratio: float = _f(0.0, "Hold out this fraction of the usable training examples as the eval set: ceil(ratio x N) of them, chosen by train.seed (applied before max_examples); 0: none.", Check(lambda v: 0 <= v < 1, "in [0, 1)"))


@dataclass
class TrainConfig:
    """The optimisation loop."""

    output_dir: str = _f("outputs/run", "Folder for the final model, metrics.jsonl and checkpoints.")
    seed: int = _f(0, "Seed for initialisation and data order; process k samples with seed + k.", _ge(0))
    learning_rate: float = _f(1e-6, "Peak learning rate of the policy.", _gt(0))
    optimizer: str = _f("adamw", "adamw, or sgd (plain SGD: updates are linear in the gradient, which the exactness tests rely on).", _one_of("adamw", "sgd"))
    weight_decay: float = _f(0.0, "AdamW weight decay of the policy.", _ge(0))
    adam_betas: list = _f([0.9, 0.999], "AdamW betas.", Check(lambda v: len(v) == 2 and all(_number(b) and 0 <= b < 1 for b in v), "two numbers in [0, 1)"))
    lr_scheduler: str = _f("linear", "transformers scheduler name: linear, cosine, constant, constant_with_warmup ...")
    warmup_ratio: float = _f(0.1, "Share of steps for linear warm-up.", _within(0, 1))
    per_device_batch_size: int = _f(4, "Examples (pairs for pairwise methods) per process per micro-batch.", _ge(1))
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.", _ge(1))
    num_epochs: float = _f(1.0, "Passes over the data (ignored when max_steps > 0).", _gt(0))
    max_steps: int = _f(0, "Optimizer steps to run; 0 means derive from num_epochs.", _ge(0))
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).", _ge(0))
    logging_steps: int = _f(1, "Write metrics every N optimizer steps.", _ge(1))
    save_steps: int = _f(0, "Checkpoint every N optimizer steps (0: only the final model).", _ge(0))
    save_strategy: str = _f("steps", "When to write checkpoint-N folders: steps (every save_steps), epoch (at the end of every epoch), no (never). The final model is always written.", _one_of("steps", "epoch", "no"))
    eval_steps: int = _f(0, "With an eval set (data.eval_file or data.eval_split_ratio): evaluate every N optimizer steps; 0: only after the last step, which is always evaluated.", _ge(0))
    save_total_limit: int = _f(2, "Keep only the last K checkpoints of this run (other runs' checkpoints are never deleted).", _ge(1))
    overwrite_output_dir: bool = _f(False, "Let a fresh run write into an output_dir that holds another run or other files (what is there may be overwritten); `train --overwrite` sets it too.")
    report_to: list = _f([], "Loggers beside the always-written metrics.jsonl: tensorboard (output_dir/tensorboard), wandb (output_dir/wandb; WANDB_PROJECT, WANDB_MODE=offline ... from the environment); none or jsonl: metrics.jsonl only. Main process only; needs the `loggers` extra.")
    push_to_hub: bool = _f(False, "After the last step, upload the output folder (model, tokenizer, config.yaml, metrics, COMPLETE.json; not checkpoints or logger folders) to the hub repo train.hub_model_id, from the main process; the token comes from the environment (HF_TOKEN) or `hf auth login`.")
    hub_model_id: Optional[str] = _f(None, "push_to_hub: the hub repo, ORG/NAME (created if missing).", Check(lambda v: v.count("/") <= 1 and all(v.split("/")), "ORG/NAME or NAME"))
    hub_private_repo: bool = _f(False, "push_to_hub: create the repo as private.")
    ddp_timeout: int = _f(1800, "Seconds a process waits for the others in a collective before the job fails (the process group's timeout): raise it when one process does long work the others wait for.", _ge(1))
    progress_bar: bool = _f(True, "Show a progress bar with loss and time left.")
    gradient_checkpointing: bool = _f(False, "Trade compute for activation memory in the policy.")
    loss_path: str = _f("fused", "fused: token-level losses computed in row chunks from final hidden states, never B x T x V; plain: full logits (the reference implementation).", _one_of("fused", "plain"))
    chunk_size: str = _f("auto", "fused path: response rows per chunk, a positive integer, or auto (as many rows as keep the chunk's full-vocabulary fp32 buffers within 128 MiB: 224 rows for AlignDistil at V=49,152, 64 at V=151,936). Larger chunks are faster and use more memory.", Check(lambda v: _chunk_ok(v), "a positive integer (rows per chunk) or auto"))
    compile_loss: bool = _f(False, "fused path: torch.compile the element-wise chunk body (see BENCHMARKS.md for when it pays).")
    teacher_cache: Optional[str] = _f(None, "Folder of an exact teacher cache (final hidden states + alpha inputs of the frozen models, off-policy aligndistil and tdpo1/2); built on first use, refused if stale. The frozen models are then not loaded.")
    teacher_cache_dtype: str = _f("float32", "Dtype of cached hidden states: float32 (exact) or bfloat16 (half the disk, approximate teacher logits).", _one_of("float32", "bfloat16"))


@dataclass
class MethodConfig:
    """The method and its hyper-parameters; names follow the papers' symbols (docs/math.md)."""

    name: str = _f("dpo", "sft, dpo, ipo, simpo, dpop, kto, tdpo1, tdpo2, sparsepo, mapo, aligndistil, ppo, rto, reinforce.")
    beta: float = _f(0.1, "KL / temperature coefficient beta (dpo family, tdpo, sparsepo, aligndistil's RLHF beta).", _gt(0))
    reverse: bool = _f(False, "dpo: swap chosen and rejected (train the reverse-DPO model).")
    ipo_logps: str = _f("sum", "ipo: log pi(y|x) inside h as the sum over response tokens (sum: the IPO paper's formula read literally) or their mean (mean: TRL's ipo loss).", _one_of("sum", "mean"))
    gamma: float = _f(5.0, "simpo: target margin gamma.", _ge(0))
    lambda_: float = _f(50.0, "dpop: penalty weight lambda.", _ge(0))
    alpha: float = _f(0.5, "tdpo2: weight of delta2; aligndistil teacher=constant: the constant alpha.", _ge(0))
    desirable_weight: float = _f(1.0, "kto: lambda_D.", _gt(0))
    undesirable_weight: float = _f(1.0, "kto: lambda_U.", _gt(0))
    mask_shared: bool = _f(True, "sparsepo: one mask for reward and KL (m_u = m_d) or two.")
    lambda_u: float = _f(1e-3, "sparsepo: L1 weight of the reward mask (the loss's default, losses.sparsepo.L1_WEIGHT).", _ge(0))
    lambda_d: float = _f(1e-3, "sparsepo: L1 weight of the KL mask (the loss's default, losses.sparsepo.L1_WEIGHT).", _ge(0))
    mask_learning_rate: Optional[float] = _f(None, "sparsepo: learning rate of the mask network (default: the policy's).", _gt(0))
    mask_weight_decay: float = _f(0.01, "sparsepo: weight decay of the mask network.", _ge(0))
    mode: str = _f("off_policy", "aligndistil: off_policy (prompt + chosen) or on_policy (sampled).")
    teacher: str = _f("adaptive", "aligndistil: vanilla, contrastive, adaptive or constant.")
    beta0: float = _f(0.1, "aligndistil: the beta of the DPO models that make the teacher.", _gt(0))
    r: float = _f(10.0, "aligndistil adaptive: alpha_t = r * TVD + eps.", _ge(0))
    eps: float = _f(1e-3, "aligndistil adaptive: floor of alpha_t.", _gt(0))
    weighting: str = _f("beta_t", "aligndistil: per-token weight beta0/alpha_t (beta_t) or uniform.")
    temperature: float = _f(1.0, "on-policy sampling temperature.", _gt(0))
    top_p: float = _f(1.0, "on-policy nucleus sampling.", _within(0, 1, lo_open=True))
    max_new_tokens: int = _f(64, "on-policy: tokens sampled per response.", _ge(1))
    num_samples: int = _f(1, "on-policy: responses sampled per prompt.", _ge(1))
    # On-policy sampler (docs/lora-vllm.md); TRL's names where it has them.
    generation_backend: str = _f("hf", "on-policy sampler: hf (our own sampling loop on the policy) or vllm (a vLLM engine; needs the `vllm` extra and a CUDA GPU).", _one_of("hf", "vllm"))
    vllm_mode: str = _f("colocate", "generation_backend=vllm: colocate (an engine in this process, weights synced after every optimizer step) or server (a `trl vllm-serve` server at vllm_server_url).", _one_of("colocate", "server"))
    vllm_server_url: Optional[str] = _f(None, "vllm_mode=server: the server's base URL, e.g. http://127.0.0.1:8000.")
    vllm_gpu_memory_utilization: float = _f(0.3, "vllm_mode=colocate: share of the GPU's memory the engine may take (the trainer needs the rest).", _within(0, 1, lo_open=True))
    vllm_importance_sampling_correction: bool = _f(False, "generation_backend=vllm: weight each response token's loss by min(pi_trainer / pi_vllm, cap) of the sampled token, correcting the mismatch between the engine's and the trainer's probabilities (TRL's vllm_importance_sampling_correction).")
    vllm_importance_sampling_cap: float = _f(2.0, "the cap C of that truncated importance weight.", _ge(1))
    # Online RL (ppo, rto, reinforce; docs/online-rl.md). TRL / OpenRLHF names where they exist.
    reward: str = _f("vader", "ppo, rto (rto_recipe=rto): the sequence reward put on the last response token: vader, bt:DIR (a reward model from `aligndistil train-rm`) or module:function (prompts, responses) -> floats. It is given text: the prompt as the policy saw it and the response up to EOS, decoded.")
    log_reward: Optional[str] = _f(None, "on-policy methods (ppo, rto, reinforce, aligndistil on_policy): a reward spec (as method.reward) scored on every rollout and logged as rollout/reward, never trained on; null: none.")
    missing_eos_penalty: Optional[float] = _f(None, "ppo, rto: subtracted from the score of a response that hit max_new_tokens without EOS (TRL's missing_eos_penalty); null: such a response is scored as it is.", _ge(0))
    kl_coef: float = _f(0.05, "ppo, rto: coefficient of the per-token KL penalty to the reference inside the reward (TRL kl_coef, OpenRLHF init_kl_coef); rto_recipe=aligndistil: the paper's beta2.", _ge(0))
    kl_estimator: str = _f("k1", "ppo, rto: per-token KL estimator of that penalty: k1 (log-ratio) or k3 (exp(-d) + d - 1, never negative).", _one_of("k1", "k3"))
    discount: float = _f(1.0, "ppo, rto: GAE discount gamma (TRL/OpenRLHF `gamma`; method.gamma is SimPO's margin).", _within(0, 1))
    lam: float = _f(0.95, "ppo, rto: GAE lambda (TRL lam, OpenRLHF lambd).", _within(0, 1))
    cliprange: float = _f(0.2, "ppo, rto: clip range eps of the policy ratio (TRL cliprange, OpenRLHF eps_clip).", _gt(0))
    cliprange_value: Optional[float] = _f(0.2, "ppo, rto: clip range of the value around its rollout value (TRL cliprange_value, OpenRLHF value_clip); null: no value clipping.", _gt(0))
    vf_coef: float = _f(0.1, "ppo, rto: weight of the value loss beside the policy loss (TRL vf_coef).", _ge(0))
    ppo_epochs: int = _f(4, "ppo, rto: passes over each rollout batch (TRL num_ppo_epochs); one loop step = one rollout batch = ppo_epochs x num_mini_batches optimizer updates.", _ge(1))
    num_mini_batches: int = _f(1, "ppo, rto: mini-batches per pass over the rollout batch (TRL num_mini_batches); each process splits its own rollout rows.", _ge(1))
    whiten_advantages: bool = _f(True, "ppo, rto: whiten the advantages over each process's rollout batch (TRL always does).")
    critic_init: str = _f("policy", "ppo, rto: the value model's initial weights: policy (the policy's body and a zero scalar head) or bt:DIR (a reward model's body and head, as OpenRLHF initialises its critic).")
    critic_learning_rate: Optional[float] = _f(None, "ppo, rto: learning rate of the value model (default: the policy's).", _gt(0))
    beta1: float = _f(0.05, "rto: scale beta1 of the DPO token reward beta1 * log pi_dpo(y_t)/pi_ref(y_t).", _gt(0))
    rto_clip: Optional[float] = _f(0.05, "rto: the DPO token reward is clipped to [-c, c]; null: not clipped.", _gt(0))
    rto_recipe: str = _f("rto", "rto: rto (the RTO authors': DPO token reward plus method.reward on the last token) or aligndistil (the AlignDistil paper's: DPO token reward only, kl_coef = beta2).", _one_of("rto", "aligndistil"))
    level: str = _f("token", "reinforce: token (AlignDistil App. E Eq. 43: returns of the token contrastive reward, KL to pi_dpo per position) or sequence (Eq. 42: the contrastive reward of the whole response).", _one_of("sequence", "token"))
    baseline: Optional[str] = _f(None, "reinforce: null (Eq. 42/43 as printed), mean (the prompt group's mean) or loo (leave-one-out, RLOO; needs num_samples >= 2).", _one_of("mean", "loo"))


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
        for k in ("output_dir", "progress_bar", "report_to", "logging_steps", "save_steps", "save_total_limit",
                  "overwrite_output_dir", "save_strategy", "eval_steps", "push_to_hub", "hub_model_id",
                  "hub_private_repo"):
            d["train"].pop(k, None)
        # An eval file is only scored, never trained on; a held-out ratio removes training data.
        for k in ("eval_file", "eval_split") + (("eval_split_ratio",) if not self.data.eval_split_ratio else ()):
            d["data"].pop(k, None)
        # Performance settings that leave the results equal (to float tolerance) are not part of
        # the fingerprint; an approximate (bf16) teacher cache is.
        for k in ("loss_path", "chunk_size", "compile_loss", "teacher_cache", "ddp_timeout"):
            d["train"].pop(k, None)
        if not self.train.teacher_cache or self.train.teacher_cache_dtype == "float32":
            d["train"].pop("teacher_cache_dtype", None)
        # Settings added later are left out at their defaults, so earlier runs keep their fingerprints.
        for sec, k in (("model", "lora"), ("data", "dataset_config")):
            if d[sec].get(k) is None:
                d[sec].pop(k, None)
        if d["method"].get("generation_backend", "hf") == "hf":
            for k in [k for k in d["method"] if k == "generation_backend" or k.startswith("vllm_")]:
                d["method"].pop(k)
        if d["method"].get("ipo_logps") == "sum":
            d["method"].pop("ipo_logps")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def validate(self) -> "RunConfig":
        """Refuse any value outside its field's allowed range (see :func:`validate`)."""
        validate(self)
        return self


#: The config's sections, in order: name -> its dataclass.
SECTIONS = {f.name: f.type for f in fields(RunConfig)}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _chunk_ok(value) -> bool:
    try:
        parse_chunk_size(value)
    except ValueError:
        return False
    return True


def validate(cfg: "RunConfig", where: str = "") -> None:
    """Check every set value against its field's ``check`` and every float for finiteness;
    raise :class:`ConfigError` naming the first bad key, its value and what is allowed.

    Only ranges that hold for every method are checked here; which names a method accepts
    (``method.teacher``, ``method.mode`` ...) its declaration checks
    (:func:`aligndistil.train.methods.get_method`).
    """
    prefix = f"{where}: " if where else ""
    stack = [(sec, getattr(cfg, sec)) for sec in SECTIONS]
    while stack:
        sec, obj = stack.pop(0)
        for f in fields(obj):
            v = getattr(obj, f.name)
            if v is None:
                continue
            if dataclasses.is_dataclass(v):  # a nested section such as model.lora
                stack.append((f"{sec}.{f.name}", v))
                continue
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{prefix}{sec}.{f.name} must be a finite number, got {v!r}")
            check = f.metadata.get("check")
            if check is None:
                continue
            try:
                ok = bool(check.ok(v))
            except TypeError:  # a value of the wrong type (set in Python, not through YAML)
                ok = False
            if not ok:
                raise ConfigError(f"{prefix}{sec}.{f.name} must be {check.says}, got {v!r}")
    unknown = [x for x in cfg.train.report_to if x not in LOGGERS]
    if unknown:  # named, not the whole list
        raise ConfigError(f"{prefix}train.report_to: unknown logger {unknown[0]!r} (known: {', '.join(LOGGERS)})")


def _looks_local(path: str) -> bool:
    """A path, not a hub id (``org/name``) nor the embedded ``smollm2``."""
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") >= 2


def check_paths(cfg: "RunConfig", roles=("reference", "dpo_model", "reverse_dpo_model")) -> None:
    """Refuse a local model path (of the policy, tokenizer and the given frozen ``roles``) or
    a ``data.train_file`` that does not exist, naming the key, before anything is loaded;
    a path under a tiny workspace that was never made says how to make it."""
    paths = {f"model.{k}": getattr(cfg.model, k) for k in ("policy", "tokenizer", *roles)}
    paths["data.train_file"] = cfg.data.train_file
    for key, path in paths.items():
        if not path or (key != "data.train_file" and not _looks_local(path)) or path.startswith("hub:") or Path(path).expanduser().exists():
            continue
        hint = ""
        for parent in Path(path).expanduser().parents:
            if parent.name == "tiny" and not (parent / "model").exists():
                hint = f" (the tiny configs read {parent}: run `aligndistil make-tiny --out {parent}` first)"
                break
        else:
            if key in ("model.dpo_model", "model.reverse_dpo_model"):
                hint = " (the train.output_dir of a DPO run: train that run first)"
        raise ConfigError(f"{key}: {path} does not exist{hint}")


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
