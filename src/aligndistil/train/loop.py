"""The one training loop, for every method, on ``accelerate``.

What the loop owns (and methods never do): devices and processes, data order, the
optimizer step, normalisation over the whole step, logging, checkpoints and resume.

Normalisation. Each optimizer step takes ``gradient_accumulation_steps`` micro-batches on
each of ``world_size`` processes. All micro-batches of the step are built first (for
on-policy methods that includes sampling), their sequence or token counts are summed over
processes, and every micro-batch then contributes ``sum(losses) * world_size / N``
(:func:`aligndistil.losses.sequence_mean`). Summed over micro-batches and averaged over
ranks by DDP, that is exactly the mean over the global batch, so one process with batch 8
and two processes with batch 4 take the same step.

Data order is a seeded permutation per epoch (``seed + epoch``), sliced into global
batches; rank ``k`` takes its own slice of each micro-batch. The order therefore depends
only on the seed and the step number, which is what makes ``--resume`` exact.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from pathlib import Path

import torch
from aligndistil.config import RunConfig, dump_config, parse_chunk_size
from aligndistil.fileio import atomic_write_text
from aligndistil.losses import sequence_mean
from aligndistil.train.methods import Method, StepContext, get_method
from aligndistil.model.outputs import unwrap


class TrainingError(RuntimeError):
    """Training stopped (for example on a non-finite loss); the message says where."""


COMPLETE = "COMPLETE.json"


# ----------------------------------------------------------------------------- small helpers
def save_model_folder(model, tokenizer, out_dir: Path) -> None:
    """Save an HF model folder (safetensors) atomically per file: temp folder, then rename."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".saving.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    unwrap(model).save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for f in tmp.iterdir():
        os.replace(f, out_dir / f.name)
    tmp.rmdir()


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch: a permutation that depends only on seed and epoch."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def is_complete(output_dir: str | Path, fingerprint: str | None = None) -> bool:
    """True if ``output_dir`` holds a finished run (of this config fingerprint, if given)."""
    p = Path(output_dir) / COMPLETE
    if not p.is_file():
        return False
    if fingerprint is None:
        return True
    try:
        return json.loads(p.read_text()).get("fingerprint") == fingerprint
    except json.JSONDecodeError:
        return False


def _cpu_only_multiprocess() -> bool:
    """True when launched as several processes (torchrun / accelerate launch --multi_gpu) on a
    machine without a GPU: accelerate then needs ``cpu=True`` to set up gloo data parallelism
    (its own ``--cpu`` launcher starts several processes only through MPI)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """Train one :class:`~aligndistil.config.RunConfig`.

    Args:
        cfg: the run configuration.
        resume: continue from the latest checkpoint in ``cfg.train.output_dir``.
        accelerator: an ``accelerate.Accelerator`` (created if None).
    """

    def __init__(self, cfg: RunConfig, resume: bool = False, accelerator=None, fingerprint: str | None = None):
        from accelerate import Accelerator

        self.cfg = cfg
        # What COMPLETE.json records; a pipeline passes one that also covers upstream stages.
        self.fingerprint = fingerprint or cfg.fingerprint()
        self.resume = resume
        self.accelerator = accelerator or Accelerator(cpu=_cpu_only_multiprocess())
        self.method: Method = get_method(cfg.method)
        self.out = Path(cfg.train.output_dir)
        self._validate()

    def _validate(self) -> None:
        t, c = self.cfg.train, self.cfg
        if not c.model.policy:
            raise ValueError("model.policy is required (a local HF folder, a hub id, or smollm2)")
        if not c.data.train_file:
            raise ValueError("data.train_file is required")
        for name in ("per_device_batch_size", "gradient_accumulation_steps"):
            if getattr(t, name) <= 0:
                raise ValueError(f"train.{name} must be > 0")
        if t.loss_path not in ("fused", "plain"):
            raise ValueError(f"train.loss_path must be fused or plain, got {t.loss_path!r}")
        self.chunk_size = parse_chunk_size(t.chunk_size)  # parsed once; "auto" or rows per chunk
        if t.teacher_cache:
            from aligndistil.train import teacher_cache as TC

            TC.check_supported(c.method)
            if t.teacher_cache_dtype not in TC.DTYPES:
                raise ValueError(f"train.teacher_cache_dtype must be one of {sorted(TC.DTYPES)}, got {t.teacher_cache_dtype!r}")
        if t.learning_rate <= 0:
            raise ValueError("train.learning_rate must be > 0")
        for role in self.method.frozen:
            if role != "reference" and not getattr(c.model, role):
                raise ValueError(f"method {self.method.name} needs model.{role}")

    # ------------------------------------------------------------------ set-up
    def _log(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            print(msg, flush=True)

    def setup(self) -> None:
        from aligndistil import data as D
        from aligndistil.model.loading import load_causal_lm, load_tokenizer

        cfg, acc = self.cfg, self.accelerator
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.policy,
                                        trust_remote_code=cfg.model.trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.features, self.report = D.build_dataset(
            cfg.data.train_file, self.tokenizer, self.method.batch,
            max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length,
            use_chat_template=cfg.data.use_chat_template, split=cfg.data.split,
        )
        if cfg.data.max_examples:
            self.features = self.features[: cfg.data.max_examples]
        self._log(f"[data] {cfg.data.train_file}: {self.report.summary()}")
        self.collator = D.PreferenceCollator(self.tokenizer.pad_token_id, self.method.batch)

        dtype = getattr(torch, cfg.model.dtype)
        self.start_step = 0
        ckpt = self.latest_checkpoint() if self.resume else None
        policy_path = str(ckpt / "model") if ckpt else cfg.model.policy
        self.policy = load_causal_lm(policy_path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
        if cfg.train.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
        self.policy.config.use_cache = False
        self.frozen = {}
        self.cache = self._teacher_cache(dtype) if cfg.train.teacher_cache else None
        for role in self.method.frozen:
            if self.cache is not None and self.cache.has(role):
                continue  # served from the cache: the model is not loaded
            self.frozen[role] = self._load_frozen(role, dtype)
        self.modules = self.method.make_modules(self.policy, cfg.method) if self.method.make_modules else {}

        t = cfg.train
        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad], "weight_decay": t.weight_decay}]
        for mod in self.modules.values():
            groups.append({"params": list(mod.parameters()), "weight_decay": cfg.method.mask_weight_decay,
                           "lr": cfg.method.mask_learning_rate or t.learning_rate})
        if t.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(groups, lr=t.learning_rate, betas=tuple(t.adam_betas))
        elif t.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=t.learning_rate)
        else:
            raise ValueError(f"train.optimizer must be adamw or sgd, got {t.optimizer!r}")

        ws = acc.num_processes
        self.global_batch = t.per_device_batch_size * ws * t.gradient_accumulation_steps
        self.steps_per_epoch = len(self.features) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{cfg.data.train_file}: {len(self.features)} usable examples are fewer than one global batch "
                f"({t.per_device_batch_size} per device x {ws} processes x {t.gradient_accumulation_steps} accumulation)"
            )
        self.total_steps = t.max_steps if t.max_steps > 0 else max(1, int(t.num_epochs * self.steps_per_epoch))
        from transformers import get_scheduler

        self.scheduler = get_scheduler(t.lr_scheduler, self.optimizer,
                                       num_warmup_steps=int(t.warmup_ratio * self.total_steps),
                                       num_training_steps=self.total_steps)
        if ckpt:
            self._load_trainer_state(ckpt)
        prepared = acc.prepare(self.policy, self.optimizer, *self.modules.values())
        self.policy, self.optimizer = prepared[0], prepared[1]
        self.modules = dict(zip(self.modules, prepared[2:]))
        self.policy.train()

    def _load_frozen(self, role: str, dtype):
        from aligndistil.model.loading import load_causal_lm

        cfg = self.cfg
        path = getattr(cfg.model, role) or cfg.model.policy
        m = load_causal_lm(path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
        self._check_vocab(role, path, m)
        m.eval().requires_grad_(False)
        return m.to(self.accelerator.device)

    def _teacher_cache(self, dtype):
        """Open (building it on first use) the teacher cache; refuse a stale one."""
        from aligndistil.train import teacher_cache as TC

        cfg, acc = self.cfg, self.accelerator
        TC.check_supported(cfg.method)
        roles = {r: getattr(cfg.model, r) or cfg.model.policy for r in self.method.frozen}
        fp = TC.fingerprint(cfg, roles, self.features, self.method.batch)
        folder = Path(cfg.train.teacher_cache)
        with acc.main_process_first():
            if not (folder / TC.MANIFEST).is_file() and acc.is_main_process:
                self._log(f"[teacher cache] building {folder} (the frozen models run once over the data)")
                models = {r: self._load_frozen(r, dtype) for r in roles}
                tvd = ("dpo_model", "reverse_dpo_model") if {"dpo_model", "reverse_dpo_model"} <= set(roles) else None
                TC.build(folder, models=models, features=self.features, collator=self.collator,
                         kind=self.method.batch, fp=fp, tvd_roles=tvd, batch_size=cfg.train.per_device_batch_size,
                         chunk_size=self.chunk_size, device=acc.device, log=self._log)
                del models
            cache = TC.TeacherCache(folder, fp, device=acc.device)
        pv = self.policy.get_output_embeddings().weight.shape[0]
        if cache.vocab_size != pv:
            raise ValueError(f"teacher cache {folder} has a vocabulary of {cache.vocab_size} but the policy has {pv}")
        self._log(f"[teacher cache] using {folder} for {', '.join(cache.roles)}")
        return cache

    def _check_vocab(self, role: str, path: str, model) -> None:
        """Refuse a frozen model whose vocabulary is not the policy's: token-level losses compare
        distributions id by id. The head sizes must match; when the model's folder has a
        tokenizer, its token-to-id map must equal the policy tokenizer's too (a head of the
        right size over another tokenizer would otherwise train silently on nonsense)."""
        from aligndistil.model.loading import ModelLoadError, check_same_vocab, load_tokenizer

        pv = self.policy.get_output_embeddings().weight.shape[0]
        mv = model.get_output_embeddings().weight.shape[0]
        if pv != mv:
            raise ValueError(
                f"model.{role} ({path}) has a vocabulary of {mv} but the policy ({self.cfg.model.policy}) has {pv}: "
                "teachers and reference must share the policy's tokenizer and vocabulary"
            )
        if str(path) == str(self.cfg.model.policy):
            return
        try:
            tok = load_tokenizer(path, trust_remote_code=self.cfg.model.trust_remote_code)
        except (ModelLoadError, OSError, ValueError):
            self._log(f"[vocab] model.{role} ({path}) has no tokenizer; checked the head size only")
            return
        check_same_vocab(self.tokenizer, tok, name_a="policy", name_b=f"model.{role}")

    # ------------------------------------------------------------------ checkpoints
    def latest_checkpoint(self) -> Path | None:
        ckpts = sorted(self.out.glob("checkpoint-[0-9]*"), key=lambda p: int(p.name.split("-")[1]))
        ckpts = [c for c in ckpts if (c / "trainer_state.pt").is_file()]
        if not ckpts:
            raise FileNotFoundError(f"--resume: no complete checkpoint in {self.out}")
        return ckpts[-1]

    def _load_trainer_state(self, ckpt: Path) -> None:
        state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
        if state["fingerprint"] != self.cfg.fingerprint():
            raise ValueError(f"--resume: {ckpt} was made with a different config; refusing to mix runs")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for name, mod in self.modules.items():
            mod.load_state_dict(state["modules"][name])
        self.start_step = int(state["step"])
        self._rng_to_restore = state["rng"]
        self._log(f"[resume] from {ckpt} at step {self.start_step}")

    def save_checkpoint(self, step: int) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            final = self.out / f"checkpoint-{step}"
            tmp = self.out / f".checkpoint-{step}.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            save_model_folder(self.policy, self.tokenizer, tmp / "model")
            torch.save({
                "step": step,
                "fingerprint": self.cfg.fingerprint(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "modules": {k: unwrap(m).state_dict() for k, m in self.modules.items()},
                "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
                        "python_pos": random.getstate()[2]},
            }, tmp / "trainer_state.pt")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            ckpts = sorted(self.out.glob("checkpoint-[0-9]*"), key=lambda p: int(p.name.split("-")[1]))
            for old in ckpts[: max(0, len(ckpts) - self.cfg.train.save_total_limit)]:
                shutil.rmtree(old)
        acc.wait_for_everyone()

    def _restore_rng(self) -> None:
        rng = getattr(self, "_rng_to_restore", None)
        if rng:
            torch.set_rng_state(rng["torch"])
            random.setstate((3, tuple(rng["python"]), rng["python_pos"]))

    # ------------------------------------------------------------------ the loop
    def _micro_batches(self, step: int) -> list[dict]:
        t, acc = self.cfg.train, self.accelerator
        epoch, k = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.features), t.seed, epoch)
        gb = order[k * self.global_batch:(k + 1) * self.global_batch].tolist()
        bs, ws, rank = t.per_device_batch_size, acc.num_processes, acc.process_index
        out = []
        for m in range(t.gradient_accumulation_steps):
            chunk = gb[m * bs * ws:(m + 1) * bs * ws]
            mine = chunk[rank * bs:(rank + 1) * bs]
            batch = self.collator([self.features[i] for i in mine])
            batch["example_index"] = torch.tensor(mine, dtype=torch.long)  # rows of the teacher cache
            out.append({k: v.to(acc.device) for k, v in batch.items()})
        return out

    def _context(self) -> StepContext:
        acc = self.accelerator
        return StepContext(
            policy=self.policy, frozen=self.frozen, cfg=self.cfg.method, modules=self.modules,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
            all_mean=lambda x: acc.reduce(x.detach().clone(), reduction="mean") if acc.num_processes > 1 else x,
            loss_path=self.cfg.train.loss_path, chunk_size=self.chunk_size,
            compile_loss=self.cfg.train.compile_loss,
            cache=getattr(self, "cache", None),
        )

    def train_step(self, step: int) -> dict:
        """One optimizer step; returns the step's metrics (averaged over the global batch)."""
        acc, t = self.accelerator, self.cfg.train
        ctx = self._context()
        micro = self._micro_batches(step)
        if self.method.prepare:
            micro = [self.method.prepare(ctx, b) for b in micro]
        local = torch.tensor(float(sum(self.method.count(b) for b in micro)), device=acc.device)
        n_global = acc.reduce(local, reduction="sum") if acc.num_processes > 1 else local
        step_loss = torch.zeros((), device=acc.device)
        sums: dict[str, list[float]] = {}
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            sync = contextlib.nullcontext() if last or acc.num_processes == 1 else acc.no_sync(self.policy)
            with sync:
                losses, metrics = self.method.loss(ctx, batch)
                loss = sequence_mean(losses, n_global, acc.num_processes)
                acc.backward(loss)
            step_loss += loss.detach()
            for k, v in metrics.items():
                v = v.detach().float().reshape(-1)
                s = sums.setdefault(k, [0.0, 0.0])
                s[0] += float(v.sum()) if v.numel() else 0.0
                s[1] += v.numel()
        step_loss = acc.reduce(step_loss, reduction="mean") if acc.num_processes > 1 else step_loss
        if not torch.isfinite(step_loss):
            raise TrainingError(f"non-finite loss at step {step + 1}")
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = acc.clip_grad_norm_(params, t.max_grad_norm) if t.max_grad_norm > 0 else None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = {"loss": float(step_loss)}
        for k, (s, n) in sums.items():
            pair = torch.tensor([s, n], device=acc.device, dtype=torch.float64)
            if acc.num_processes > 1:
                pair = acc.reduce(pair, reduction="sum")
            if pair[1] > 0:
                out[k] = float(pair[0] / pair[1])
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        out["learning_rate"] = self.scheduler.get_last_lr()[0]
        return out

    def train(self) -> Path:
        """Run the loop to the end; returns the output folder (an HF model folder)."""
        from tqdm.auto import tqdm

        acc, t = self.accelerator, self.cfg.train
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / COMPLETE).unlink(missing_ok=True)
        self.setup()
        self._restore_rng()
        metrics_path = self.out / "metrics.jsonl"
        writer = self._tensorboard()
        if acc.is_main_process:
            atomic_write_text(self.out / "config.yaml", dump_config(self.cfg))
            self._truncate_metrics(metrics_path, self.start_step)
        bar = tqdm(total=self.total_steps, initial=self.start_step, desc=f"train {self.method.name}",
                   disable=not (t.progress_bar and acc.is_main_process), dynamic_ncols=True)
        started = time.time()
        last_good = None
        for step in range(self.start_step, self.total_steps):
            try:
                m = self.train_step(step)
            except (TrainingError, ValueError) as e:
                bar.close()
                where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written"
                raise TrainingError(f"step {step + 1}: {e}; {where}; nothing of this step was saved") from e
            m["step"] = step + 1
            m["epoch"] = (step + 1) / self.steps_per_epoch
            if acc.is_main_process and ((step + 1) % t.logging_steps == 0 or step + 1 == self.total_steps):
                with metrics_path.open("a") as f:
                    f.write(json.dumps(m) + "\n")
                if writer:
                    for k, v in m.items():
                        if k != "step":
                            writer.add_scalar(k, v, step + 1)
            bar.set_postfix(loss=f"{m['loss']:.4f}")
            bar.update(1)
            if t.save_steps and (step + 1) % t.save_steps == 0 and step + 1 < self.total_steps:
                self.save_checkpoint(step + 1)
                last_good = self.out / f"checkpoint-{step + 1}"
        bar.close()
        acc.wait_for_everyone()
        if acc.is_main_process:
            save_model_folder(self.policy, self.tokenizer, self.out)
            for name, mod in self.modules.items():
                from safetensors.torch import save_file
                save_file(unwrap(mod).state_dict(), str(self.out / f"{name}.safetensors"))
            atomic_write_text(self.out / COMPLETE, json.dumps({
                "fingerprint": self.fingerprint, "method": self.method.name, "steps": self.total_steps,
                "seconds": round(time.time() - started, 1), "data": vars(self.report),
            }, indent=2))
            self._log(f"[done] {self.method.name}: {self.total_steps} steps in {time.time() - started:.1f}s -> {self.out}")
        if writer:
            writer.close()
        acc.wait_for_everyone()
        return self.out

    def _tensorboard(self):
        if "tensorboard" not in self.cfg.train.report_to or not self.accelerator.is_main_process:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ValueError("train.report_to includes tensorboard but the tensorboard package is missing: pip install tensorboard") from e
        return SummaryWriter(str(self.out / "tensorboard"))

    @staticmethod
    def _truncate_metrics(path: Path, step: int) -> None:
        """On resume, drop logged steps after the checkpoint; on a fresh run, start empty."""
        if not path.exists():
            return
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and step and json.loads(ln)["step"] <= step]
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def train(cfg: RunConfig, resume: bool = False, fingerprint: str | None = None) -> Path:
    """Train ``cfg`` and return the output folder."""
    return Trainer(cfg, resume=resume, fingerprint=fingerprint).train()
