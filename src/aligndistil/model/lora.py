"""LoRA on the policy, and frozen roles served by the policy's own base model (``peft``).

With ``model.lora`` set, the policy is its base model wrapped by ``peft`` with one trainable
adapter (peft's ``"default"``): only the adapter's ``A`` and ``B`` matrices train, the base
stays frozen. Every frozen role that is the same base, or a LoRA adapter trained on it, is
then computed by that ONE base model instead of a second copy (:class:`SharedBaseRole`):

- the reference (``model.reference`` unset, the policy's starting weights) is the base with
  the adapters disabled (``PeftModel.disable_adapter``);
- a teacher whose folder is an adapter on the same base (a stage trained with ``model.lora``)
  is loaded once as a NAMED frozen adapter (``PeftModel.load_adapter(path, role)``) and
  switched in for its forward pass (``set_adapter``), then the policy's adapter is switched
  back. Off-policy AlignDistil therefore holds one base plus three small adapters.

A run trained with LoRA saves an adapter folder (``adapter_model.safetensors``,
``adapter_config.json`` whose ``base_model_name_or_path`` records the base, the tokenizer);
:func:`load_merged` turns one into a plain model (``aligndistil merge``, and every loader of
the package through :func:`aligndistil.model.loading.load_causal_lm`).

The adapters train in float32 (the master weights); the trainer loads the frozen base in
float32 too and runs it under the run's autocast. ``peft`` is imported only when LoRA is used.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from aligndistil.errors import AlignDistilError
from aligndistil.model.outputs import unwrap

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: peft's name for the first adapter of a model: the policy's trained adapter.
POLICY_ADAPTER = "default"
#: ``target_modules`` value meaning every linear layer but the output head (peft's spelling).
ALL_LINEAR = "all-linear"
INSTALL = "pip install 'aligndistil[lora]' (or pip install peft)"


class LoraError(AlignDistilError, ValueError):
    """A LoRA set-up that cannot work (missing peft, unknown target modules, an adapter on another base)."""

    label = "lora"


def require_peft():
    try:
        import peft
    except ImportError:
        raise LoraError(f"LoRA (model.lora, or a model folder holding an adapter) needs the peft package: {INSTALL}") from None
    return peft


def is_peft(model) -> bool:
    """True when ``model`` (unwrapped) is a peft model."""
    return hasattr(unwrap(model), "peft_config")


# ----------------------------------------------------------------------------- adapter folders and bases
def is_adapter_folder(path) -> bool:
    """True when ``path`` is a local folder holding a peft adapter (``adapter_config.json``)."""
    if not path:
        return False
    p = Path(os.fspath(path)).expanduser()
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file()


def adapter_base(path) -> str:
    """The base model an adapter folder was trained on, as its ``adapter_config.json`` records it."""
    cfg_path = Path(os.fspath(path)).expanduser() / ADAPTER_CONFIG
    try:
        base = json.loads(cfg_path.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise LoraError(f"{cfg_path} cannot be read: {e}") from None
    if not base:
        raise LoraError(f"{cfg_path} records no base_model_name_or_path: which base the adapter belongs to is unknown")
    return str(base)


def base_identity(name_or_path) -> str:
    """One spelling per base model: the real path of a local folder (``smollm2``: its cache
    folder, without converting it), else the hub id as given."""
    from aligndistil.model.loading import DEFAULT_MODEL_NAME, default_model_cache_dir

    name = os.fspath(name_or_path)
    if name == DEFAULT_MODEL_NAME:
        return os.path.realpath(default_model_cache_dir())
    p = Path(name).expanduser()
    return os.path.realpath(p) if p.exists() else name


def base_of(path) -> str:
    """:func:`base_identity` of the base under ``path``: its adapter's base, or ``path`` itself."""
    return base_identity(adapter_base(path) if is_adapter_folder(path) else path)


def recorded_base(name_or_path) -> str:
    """What an adapter records as its base: a local folder's absolute path (a relative one
    would change meaning with the working directory), else the name as given (``smollm2``,
    a hub id), which resolves on any machine."""
    name = os.fspath(name_or_path)
    p = Path(name).expanduser()
    return os.path.realpath(p) if p.is_dir() else name


def check_adapter_base(role_key: str, path, policy_path, policy_lora: bool) -> None:
    """Refuse an adapter folder ``path`` (``model.<role>``) trained on another base than the policy's,
    naming both bases. Nothing is loaded: the bases are read from ``adapter_config.json``."""
    if not is_adapter_folder(path):
        return
    mine, theirs = base_of(policy_path), base_of(path)
    if mine == theirs:
        return
    kind = "a LoRA policy on" if policy_lora else "a full fine-tune of"
    raise LoraError(
        f"{role_key} ({path}) is a LoRA adapter trained on the base {adapter_base(path)} ({theirs}), but the policy "
        f"({policy_path}) is {kind} the base {mine}: an adapter is a teacher only on the base it was trained from "
        f"(`aligndistil merge {path} --out DIR` makes it a full model)")


# ----------------------------------------------------------------------------- target modules
def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct names (last path component) of the model's ``nn.Linear`` layers, output head excluded."""
    net = unwrap(model)
    head = net.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, m in net.named_modules()
                   if isinstance(m, nn.Linear) and m is not head and name})


def check_target_modules(model: nn.Module, targets: list[str], where: str = "model.lora.target_modules") -> None:
    """Refuse names that are not linear layers of ``model`` (listing those it has), the output
    head (its logits would stop being ``hidden @ W^T``, which the fused losses rely on), and
    ``all-linear`` mixed with names."""
    if ALL_LINEAR in targets:
        if len(targets) > 1:
            raise LoraError(f"{where}: {ALL_LINEAR} stands alone, got {targets}")
        return
    available = linear_module_names(model)
    net = unwrap(model)
    head = net.get_output_embeddings()
    head_names = {n.rsplit(".", 1)[-1] for n, m in net.named_modules() if m is head and n}
    bad_head = [t for t in targets if t in head_names]
    if bad_head:
        raise LoraError(f"{where}: {bad_head} is the output head; adapters go on the transformer's linear layers "
                        f"({', '.join(available)})")
    missing = [t for t in targets if t not in available]
    if missing:
        name = getattr(getattr(net, "config", None), "_name_or_path", "") or type(net).__name__
        raise LoraError(f"{where}: {missing} {'is not a' if len(missing) == 1 else 'are not'} linear module"
                        f"{'' if len(missing) == 1 else 's'} of {name}; its linear modules are: {', '.join(available)} "
                        f"(or use [{ALL_LINEAR}])")


def check_target_modules_early(policy_path, targets: list[str], trust_remote_code: bool = False) -> None:
    """:func:`check_target_modules` on a weightless (meta-device) copy of the policy's
    architecture, so a bad name fails before any weights load. Best effort: when the config
    cannot be read here (a hub id offline, ``smollm2`` not converted yet) the check runs when
    the policy loads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from aligndistil.model.loading import DEFAULT_MODEL_NAME, default_model_cache_dir

    path = adapter_base(policy_path) if is_adapter_folder(policy_path) else os.fspath(policy_path)
    if path == DEFAULT_MODEL_NAME:
        path = str(default_model_cache_dir())
    if not (Path(path).expanduser() / "config.json").is_file():
        return
    try:
        conf = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(conf, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - an architecture that cannot be built empty: checked at load
        return
    check_target_modules(model, targets)


def peft_config(lora) -> object:
    """peft's ``LoraConfig`` for a :class:`aligndistil.config.LoraConfig`."""
    peft = require_peft()
    targets = ALL_LINEAR if list(lora.target_modules) == [ALL_LINEAR] else list(lora.target_modules)
    return peft.LoraConfig(r=int(lora.r), lora_alpha=float(lora.alpha), lora_dropout=float(lora.dropout),
                           target_modules=targets, bias="none", task_type="CAUSAL_LM")


# ----------------------------------------------------------------------------- the policy
def load_policy(path, lora, *, dtype: torch.dtype, trust_remote_code: bool = False, log=print):
    """The LoRA policy: the base (in ``dtype``, frozen) with a trainable float32 adapter ``"default"``
    (:func:`aligndistil.train.frozen.load_policy` passes float32).

    ``path`` is a full model (a fresh adapter from ``lora`` is added) or an adapter folder (a
    resumed checkpoint, or a LoRA stage to continue: its adapter is loaded trainable, with its
    own rank and targets).
    """
    peft = require_peft()
    from aligndistil.model.loading import load_causal_lm

    if is_adapter_folder(path):
        base = load_causal_lm(adapter_base(path), dtype=dtype, trust_remote_code=trust_remote_code)
        model = peft.PeftModel.from_pretrained(base, os.fspath(path), is_trainable=True)
        log(f"[lora] policy: adapter {path} (trainable) on {adapter_base(path)}")
    else:
        base = load_causal_lm(path, dtype=dtype, trust_remote_code=trust_remote_code)
        check_target_modules(base, list(lora.target_modules))
        model = peft.get_peft_model(base, peft_config(lora))
        model.peft_config[POLICY_ADAPTER].base_model_name_or_path = recorded_base(path)
    # The adapter holds the master weights: float32 whatever the base's dtype.
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log(f"[lora] training {n_train:,} of {n_all:,} parameters ({100 * n_train / max(n_all, 1):.2f}%)")
    return model


def enable_gradient_checkpointing(model) -> None:
    """Gradient checkpointing on a (possibly peft) model. With a frozen base the embeddings'
    output does not require grad, so reentrant checkpointing would see no input needing a
    gradient and drop the adapters' gradients; ``enable_input_require_grads`` fixes that."""
    base = unwrap(model)
    # transformers 5.x renamed it (the old name warns and goes away in v6); 4.x has only the old.
    (getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable)()
    if is_peft(model):
        unwrap(model).enable_input_require_grads()


class _AdapterSaver:
    """What the checkpoint writers call ``save_pretrained`` on: only the policy's adapter
    (teachers loaded as named adapters are inputs of the run, not its output)."""

    def __init__(self, model):
        self._model = model

    def save_pretrained(self, folder, **kw):
        self._model.save_pretrained(folder, selected_adapters=[POLICY_ADAPTER], safe_serialization=True)


def saveable(policy):
    """The object to save as the run's model: the policy, or for LoRA its adapter alone."""
    return _AdapterSaver(unwrap(policy)) if is_peft(policy) else policy


class _ModulesSource:
    """The policy as a method's ``make_modules`` sees it. For LoRA, ``base_model`` (the
    transformer body the PPO critic copies) is a plain copy of the body with the policy's
    adapter merged in, so the critic is an ordinary model, not a second peft model."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    @property
    def base_model(self):
        return merged_body_copy(self._model)


def modules_source(policy):
    return _ModulesSource(unwrap(policy)) if is_peft(policy) else policy


def merged_body_copy(model) -> nn.Module:
    """A copy of a peft model's transformer body (``LlamaModel`` ...) with the policy's adapter
    merged into its weights and every adapter layer removed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    body = copy.deepcopy(model.get_base_model().base_model)
    for name, mod in list(body.named_modules()):
        if isinstance(mod, BaseTunerLayer):
            if POLICY_ADAPTER in getattr(mod, "lora_A", {}):
                mod.merge(adapter_names=[POLICY_ADAPTER])
            parent_name, _, child = name.rpartition(".")
            setattr(body.get_submodule(parent_name) if parent_name else body, child, mod.get_base_layer())
    return body


# ----------------------------------------------------------------------------- frozen roles on the shared base
@contextlib.contextmanager
def use_adapter(model, adapter: str | None):
    """Run ``model`` (a peft model) with ``adapter`` active, or with adapters disabled when None,
    in eval mode (a frozen role has no dropout); restores the active adapter, the train/eval
    mode and every ``requires_grad`` flag (peft's ``set_adapter`` and ``disable_adapter``
    toggle them) on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    previous = model.active_adapter
    model.eval()
    try:
        if adapter is None:
            with model.disable_adapter():
                yield
        else:
            model.set_adapter(adapter)
            try:
                yield
            finally:
                model.set_adapter(previous)
    finally:
        model.train(was_training)
        for p, flag in flags:
            p.requires_grad_(flag)


class SharedBaseRole:
    """A frozen role computed by the policy's own peft model: with its named adapter
    ``adapter`` active, or with adapters disabled (``adapter`` None: the base itself).

    It is called like a model. ``module`` is the peft model, so
    :func:`aligndistil.model.outputs.unwrap` reaches it: the fused path and the teacher cache
    read the (shared, frozen) output head from there. It owns no parameters of its own, so
    ``eval``, ``requires_grad_`` and ``to`` leave the policy alone.
    """

    def __init__(self, model, adapter: str | None, path: str):
        self.module = model
        self.adapter = adapter
        self.path = path

    def __call__(self, *args, **kwargs):
        with torch.no_grad(), use_adapter(self.module, self.adapter):
            return self.module(*args, **kwargs)

    @property
    def config(self):
        return self.module.config

    def get_output_embeddings(self):
        return self.module.get_output_embeddings()

    def get_input_embeddings(self):
        return self.module.get_input_embeddings()

    def eval(self):
        return self

    def requires_grad_(self, requires_grad: bool = True):
        return self

    def to(self, *args, **kwargs):
        return self

    def __repr__(self) -> str:
        what = f"adapter {self.adapter!r}" if self.adapter else "adapters disabled"
        return f"SharedBaseRole({self.path}: {what})"


def shared_role(role: str, path, policy, policy_path, *, log=print) -> SharedBaseRole | None:
    """Serve frozen ``role`` (model folder ``path``) from the LoRA ``policy``'s base when it can be:
    an adapter on the same base (loaded as the named adapter ``role``), or the very base the
    policy started from (adapters disabled). None: it needs a model of its own (the policy is
    not LoRA, or ``path`` is another full model)."""
    if not is_peft(policy):
        return None
    net = unwrap(policy)
    if is_adapter_folder(path):
        check_adapter_base(f"model.{role}", path, policy_path, policy_lora=True)
        was_training = net.training
        net.load_adapter(os.fspath(path), adapter_name=role, is_trainable=False)
        net.train(was_training)  # peft's load_adapter puts the whole model in eval mode
        log(f"[lora] model.{role}: adapter {path} loaded on the policy's base (no second copy)")
        return SharedBaseRole(net, role, str(path))
    if base_identity(path) == base_of(policy_path):  # the base itself (path is no adapter here)
        log(f"[lora] model.{role}: the policy's base with its adapter disabled (no second copy)")
        return SharedBaseRole(net, None, str(path))
    return None


# ----------------------------------------------------------------------------- merging
def load_merged(path, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """A plain causal LM: the adapter folder ``path`` merged into its base (``W + (alpha/r) B A``)."""
    peft = require_peft()
    from aligndistil.model.loading import load_causal_lm

    base = load_causal_lm(adapter_base(path), dtype=dtype, trust_remote_code=trust_remote_code)
    model = peft.PeftModel.from_pretrained(base, os.fspath(path), is_trainable=False)
    merged = model.merge_and_unload()
    merged.eval()
    return merged
