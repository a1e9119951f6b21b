"""The one training loop, for every method, on ``accelerate``.

What the loop owns (and methods never do): devices and processes, data order, the
optimizer step, normalisation over the whole step, logging, checkpoints and resume (the
files themselves: :mod:`aligndistil.train.checkpoints`). It knows methods only through
their :class:`~aligndistil.train.methods.Method` declarations, never by name.

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

Order of a run (:meth:`Trainer.train`): every config value is checked when the trainer is
built; then the output folder is locked and inspected, the data, models and checkpoint are
read, and only when all of that succeeded is the folder marked as a run in progress
(:mod:`aligndistil.train.run_folder`). A failure before that point changes nothing on disk.
Precision, DeepSpeed and per-process seeds: :mod:`aligndistil.train.accel`.
Evaluation on held-out examples: :mod:`~aligndistil.train.evaluation`; metrics.jsonl and the
loggers: :mod:`~aligndistil.train.reporting`; ``push_to_hub``: :mod:`~aligndistil.train.hub`.
"""

from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path

import torch
from aligndistil.config import ConfigError, RunConfig, check_paths, dump_config, parse_chunk_size
from aligndistil.fileio import atomic_write_text
from aligndistil.losses import sequence_mean
from aligndistil.train import accel as A
from aligndistil.train import checkpoints as CK
from aligndistil.train import evaluation as EV
from aligndistil.train import frozen as FR
from aligndistil.train import hub as HUB
from aligndistil.train import reporting as R
from aligndistil.train import run_folder as RF
from aligndistil.train import sharded as SH
from aligndistil.train import teacher_cache as TC
from aligndistil.train.checkpoints import COMPLETE, OutputFolderError, is_complete, save_model_folder  # noqa: F401 (re-exported)
from aligndistil.train.methods import Method, StepContext, get_method
from aligndistil.errors import EXIT_DIVERGED, AlignDistilError

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C


class TrainingError(AlignDistilError, RuntimeError):
    exit_code = EXIT_DIVERGED
    label = "training stopped"
    """Training stopped (for example on a non-finite loss); the message says where."""


class Interrupted(AlignDistilError):
    """Ctrl-C (SIGINT): the message names the last checkpoint to ``--resume`` from."""

    exit_code = EXIT_INTERRUPTED
    label = "interrupted"


# ----------------------------------------------------------------------------- small helpers
def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch: a permutation that depends only on seed and epoch."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """Train one :class:`~aligndistil.config.RunConfig`.

    Args:
        cfg: the run configuration.
        resume: continue from the latest good checkpoint in ``cfg.train.output_dir``.
        accelerator: an ``accelerate.Accelerator`` (created from ``cfg`` if None).
        fingerprint: what ``COMPLETE.json`` records (default: the config's); a pipeline
            passes one that also covers its upstream stages.
        overwrite: let a fresh run write into a folder holding something else (as
            ``train.overwrite_output_dir``).
    """

    def __init__(self, cfg: RunConfig, resume: bool = False, accelerator=None, fingerprint: str | None = None,
                 overwrite: bool = False):
        self.cfg = cfg.validate()  # every value in range before anything is loaded or written
        self.fingerprint = fingerprint or cfg.fingerprint()
        self.resume = resume
        self.overwrite = overwrite or cfg.train.overwrite_output_dir
        self.method: Method = get_method(cfg.method)
        precision_note = None
        if accelerator is None:
            accelerator, precision_note = A.make_accelerator(cfg)
        self.accelerator = accelerator
        self.out = Path(cfg.train.output_dir)
        self.ckpt: Path | None = None  # the checkpoint a resumed run starts from
        self.last_checkpoint: Path | None = None
        self.step = 0
        self._validate()
        if precision_note:
            self._log(f"[precision] {precision_note}")

    def _validate(self) -> None:
        """What the config's own ranges cannot say: required keys, paths, method needs."""
        c = self.cfg
        if not c.model.policy:
            raise ConfigError("model.policy is required (a local HF folder, a hub id, or smollm2)")
        if not c.data.train_file:
            raise ConfigError("data.train_file is required")
        self.chunk_size = parse_chunk_size(c.train.chunk_size)  # parsed once; "auto" or rows per chunk
        if c.train.teacher_cache:
            TC.check_supported(self.method)
        for role in self.method.frozen:
            if role != "reference" and not getattr(c.model, role):
                raise ConfigError(f"method {self.method.name} needs model.{role}")
        check_paths(c, roles=self.method.frozen)
        from aligndistil.model.locate import check_model_path  # NAME, ORG/NAME: hub ids, unless offline and uncached

        for k in ("policy", "tokenizer", *self.method.frozen):
            if getattr(c.model, k):
                check_model_path(getattr(c.model, k), f"model.{k}")
        FR.check_setup(c, self.method, self.accelerator)  # LoRA and the on-policy sampler
        R.check_available(c.train.report_to)
        EV.check_config(c, self.method)
        HUB.check_push(c)
        if (A.uses_deepspeed(self.accelerator) or SH.is_fsdp(self.accelerator)) and self.method.make_modules:
            raise ConfigError(f"method {self.method.name} trains a second module beside the policy, which this trainer "
                              "does not support under DeepSpeed or FSDP (one engine, or with FSDP2 one model, per "
                              "launch); use DDP or one process")

    # ------------------------------------------------------------------ set-up
    def _log(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            print(msg, flush=True)

    def setup(self) -> None:
        """Read everything the run needs (data, models, the checkpoint ``self.ckpt``); writes nothing."""
        from aligndistil import data as D
        from aligndistil.model.loading import load_tokenizer

        cfg, acc = self.cfg, self.accelerator
        torch.manual_seed(cfg.train.seed)  # the same on every process: identical initial modules
        random.seed(cfg.train.seed)
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.policy,
                                        trust_remote_code=cfg.model.trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.features, self.report = D.build_dataset(
            cfg.data.train_file, self.tokenizer, self.method.batch,
            max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length,
            use_chat_template=cfg.data.use_chat_template, split=cfg.data.split,
            config=cfg.data.dataset_config,
        )
        self.features, self.eval_features = EV.split_features(cfg, self.tokenizer, self.method.batch, self.features,
                                                              log=self._log)
        self.n_used = len(self.features)
        note = ""
        if cfg.data.max_examples is not None and cfg.data.max_examples < len(self.features):
            self.features = self.features[: cfg.data.max_examples]
            self.n_used = len(self.features)
            note = f"; training on the first {self.n_used} (data.max_examples)"
        self._log(f"[data] {cfg.data.train_file}: {self.report.summary()}{note}")
        self.collator = D.PreferenceCollator(self.tokenizer.pad_token_id, self.method.batch)

        dtype = getattr(torch, cfg.model.dtype)  # the frozen models'; the policy trains in float32 (accel.py)
        # DeepSpeed cannot size its batch without a DataLoader; resolved before any model is
        # loaded, since under ZeRO-3 the frozen models get engines of their own from this config.
        A.apply_deepspeed_config(acc, cfg)
        self.start_step = 0
        ckpt = self.ckpt
        policy_path = str(ckpt / "model") if ckpt else cfg.model.policy
        self.policy = FR.load_policy(cfg, policy_path, gradient_checkpointing=cfg.train.gradient_checkpointing,
                                     log=self._log)
        self.frozen = {}
        self.cache = self._teacher_cache(dtype) if cfg.train.teacher_cache else None
        for role in self.method.frozen:
            if self.cache is not None and self.cache.has(role):
                continue  # served from the cache: the model is not loaded
            self.frozen[role] = self._load_frozen(role, dtype)
        self.modules = self.method.make_modules(FR.modules_source(self.policy), cfg.method) if self.method.make_modules else {}
        self.sampler = FR.make_sampler(cfg, self.method, log=self._log)  # None: the HF sampling loop

        t = cfg.train
        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad], "weight_decay": t.weight_decay}]
        for mod in self.modules.values():
            # A module may carry its own group options (PPO's critic); else SparsePO's mask options.
            opts = getattr(mod, "optimizer_options", None) or {
                "weight_decay": cfg.method.mask_weight_decay, "lr": cfg.method.mask_learning_rate or t.learning_rate}
            groups.append({"params": list(mod.parameters()), **opts})
        if t.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(groups, lr=t.learning_rate, betas=tuple(t.adam_betas))
        else:  # "sgd"; the config allows nothing else
            self.optimizer = torch.optim.SGD(groups, lr=t.learning_rate)

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
        self.deepspeed = A.uses_deepspeed(acc)
        # The optimizer goes last: accelerate moves an optimizer's state (a resumed run's
        # AdamW moments) to the device when it prepares it, so every module it holds
        # parameters of must already be there (on a GPU, a mask network prepared after the
        # optimizer kept its resumed moments on the CPU).
        prepared = acc.prepare(self.policy, *self.modules.values(), self.optimizer)
        self.policy, self.optimizer = prepared[0], prepared[-1]
        self.modules = dict(zip(self.modules, prepared[1:-1]))
        if getattr(self, "_optimizer_to_load", None) is not None:
            st = self._optimizer_to_load
            SH.load_optimizer_state(acc, self.policy, self.modules, self.optimizer, st["optimizer"],
                                    st.get("optimizer_format"))
        self.policy.train()

    def _load_frozen(self, role: str, dtype, shard: bool = True):
        with contextlib.nullcontext() if shard else SH.loaded_whole(self.accelerator):
            m = FR.load_frozen(self.cfg, role, dtype, policy=self.policy, tokenizer=self.tokenizer,
                               device=self.accelerator.device, log=self._log)
        return SH.shard_frozen(self.accelerator, m, f"model.{role}", log=self._log) if shard else m

    def _teacher_cache(self, dtype):
        return FR.open_teacher_cache(self.cfg, self.method, self.accelerator, features=self.features,
                                     collator=self.collator, policy=self.policy, chunk_size=self.chunk_size,
                                     load=lambda role: self._load_frozen(role, dtype, shard=False), log=self._log)

    # ------------------------------------------------------------------ checkpoints
    def _load_trainer_state(self, ckpt: Path) -> None:
        state = CK.load_trainer_state(ckpt, self.cfg.fingerprint(), trusted=SH.deepspeed_state_classes())
        if SH.is_sharded(self.accelerator) or state.get("optimizer_format"):
            SH.check_optimizer_format(self.accelerator, state["optimizer"], state.get("optimizer_format"))
            self._optimizer_to_load = state  # sharded: only after prepare (train/sharded.py)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for name, mod in self.modules.items():
            mod.load_state_dict(state["modules"][name])
        self.start_step = int(state["step"])
        self._rng_to_restore = state["rng"]
        self._log(f"[resume] from {ckpt} at step {self.start_step}")

    def save_checkpoint(self, step: int) -> None:
        """``checkpoint-<step>`` with every process's RNG states (gathered to the main process)."""
        from accelerate.utils import gather_object

        acc = self.accelerator
        rng = CK.rng_state()
        ranks = gather_object([rng]) if acc.num_processes > 1 else [rng]
        # Gathering a sharded model's or optimizer's state is a collective: every process, here.
        weights = SH.model_state(acc, self.policy)
        opt_state, opt_format = SH.optimizer_state(acc, self.policy, self.modules, self.optimizer)
        modules = SH.module_states(acc, self.modules)
        acc.wait_for_everyone()
        A.on_main(self.accelerator, lambda: CK.save_checkpoint(self.out, step, FR.saveable(self.policy), self.tokenizer, {
            "step": step,
            "fingerprint": self.cfg.fingerprint(),
            "optimizer": opt_state, "optimizer_format": opt_format,
            "scheduler": self.scheduler.state_dict(),
            "modules": modules,
            "rng": {"ranks": ranks},
        }, keep=self.cfg.train.save_total_limit, fingerprint=self.cfg.fingerprint(), state_dict=weights))
        self.last_checkpoint = self.out / f"checkpoint-{step}"
        acc.wait_for_everyone()

    # ------------------------------------------------------------------ the loop
    def _micro_batches(self, step: int) -> list[dict]:
        """This process's micro-batches of optimizer step ``step``, collated and on the device.

        While a teacher cache is in use each batch also carries :data:`TC.INDEX_KEY`: the
        examples' indices in ``self.features``, by which the cache finds their stored rows.
        """
        t, acc = self.cfg.train, self.accelerator
        cache = getattr(self, "cache", None)
        epoch, k = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.features), t.seed, epoch)
        gb = order[k * self.global_batch:(k + 1) * self.global_batch].tolist()
        bs, ws, rank = t.per_device_batch_size, acc.num_processes, acc.process_index
        out = []
        for m in range(t.gradient_accumulation_steps):
            chunk = gb[m * bs * ws:(m + 1) * bs * ws]
            mine = chunk[rank * bs:(rank + 1) * bs]
            batch = self.collator([self.features[i] for i in mine])
            if cache is not None:
                batch[TC.INDEX_KEY] = torch.tensor(mine, dtype=torch.long)
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
            cache=getattr(self, "cache", None), tokenizer=self.tokenizer, sampler=getattr(self, "sampler", None),
            all_done=self._all_done if SH.collective_forwards(acc) else None,
        )

    def _all_done(self, mine: bool) -> bool:
        """Whether every process's samples have ended (a sharded policy's processes sample together)."""
        n = self.accelerator.reduce(torch.tensor(float(not mine), device=self.accelerator.device), reduction="sum")
        return float(n) == 0

    def train_step(self, step: int) -> dict:
        """One step; returns the step's metrics (averaged over the global batch and its updates).

        A step is one optimizer update, unless the method's ``updates`` turns the step's batch
        into several (PPO: epochs x mini-batches over one rollout batch), each normalised on
        its own; the learning-rate schedule advances once per step either way.
        """
        acc = self.accelerator
        ctx = self._context()
        micro = self._micro_batches(step)
        if self.method.prepare:
            micro = [self.method.prepare(ctx, b) for b in micro]
        sums = R.StepMetrics(acc.device)
        done = [self._update(ctx, u, step, sums) for u in (self.method.updates(ctx, micro) if self.method.updates
                                                            else [micro])]
        self.scheduler.step()
        out = {"loss": sum(loss for loss, _ in done) / len(done)}
        out.update(sums.means((lambda x: acc.reduce(x, reduction="sum")) if acc.num_processes > 1 else None))
        norms = [g for _, g in done if g is not None]
        if norms:
            out["grad_norm"] = sum(norms) / len(norms)
        out["learning_rate"] = self.scheduler.get_last_lr()[0]
        return out

    def _update(self, ctx: StepContext, micro: list[dict], step: int, sums) -> tuple[float, float | None]:
        """One optimizer update over this process's ``micro`` batches; returns (loss, grad norm)
        and adds the metrics to ``sums`` (:class:`~aligndistil.train.reporting.StepMetrics`)."""
        acc, t = self.accelerator, self.cfg.train
        local = torch.tensor(float(sum(self.method.count(b) for b in micro)), device=acc.device)
        n_global = acc.reduce(local, reduction="sum") if acc.num_processes > 1 else local
        step_loss = torch.zeros((), device=acc.device)
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            sync = contextlib.nullcontext() if last or acc.num_processes == 1 else acc.no_sync(self.policy)
            with sync:
                losses, metrics = self.method.loss(ctx, batch)
                loss = sequence_mean(losses, n_global, acc.num_processes)
                if getattr(self, "deepspeed", False):
                    if not A.deepspeed_backward(acc, loss, step_loss + loss.detach(), last):
                        raise TrainingError(f"non-finite loss at step {step + 1}")  # before the engine stepped
                else:
                    acc.backward(loss)
            step_loss += loss.detach()
            sums.add(metrics)
        step_loss = acc.reduce(step_loss, reduction="mean") if acc.num_processes > 1 else step_loss
        if not torch.isfinite(step_loss):
            raise TrainingError(f"non-finite loss at step {step + 1}")
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = acc.clip_grad_norm_(params, t.max_grad_norm) if t.max_grad_norm > 0 else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if getattr(self, "sampler", None) is not None:
            self.sampler.mark_stale()  # the engine's weights are synced before it samples again
        return float(step_loss), (None if grad_norm is None else float(grad_norm))

    def train(self) -> Path:
        """Run the loop to the end; returns the output folder (an HF model folder).

        Raises:
            OutputFolderError: the folder is another run's, locked, or cannot be written.
            CheckpointError: ``--resume`` found no usable checkpoint of this config.
            TrainingError: a step failed (non-finite loss); Interrupted: Ctrl-C.
        """
        acc, cfg_fp = self.accelerator, self.cfg.fingerprint()
        lock = RF.RunLock(self.out) if acc.is_main_process else None
        with A.progress_bars(self.cfg.train.progress_bar):
            try:
                A.on_main(acc, lambda: lock.acquire(self._log))
                plan = A.on_main(acc, lambda: RF.check_folder(self.out, cfg_fp, self.fingerprint, self.resume,
                                                              self.overwrite, self._log))
                if plan == "done":
                    self._log(f"[resume] {self.out} already holds the finished run of this config: nothing to do")
                    return self.out
                if plan == "resume":
                    self.ckpt = A.on_main(acc, lambda: CK.find_resume_checkpoint(self.out, cfg_fp, self._log))
                    self.last_checkpoint = self.ckpt
                self.setup()
                # Every check passed: only now may the folder stop looking like what it was.
                A.on_main(acc, lambda: RF.begin(self.out, cfg_fp, fresh=plan == "fresh", log=self._log))
                return self._run()
            except KeyboardInterrupt:
                raise Interrupted(self._stopped_at()) from None
            finally:
                if lock is not None:
                    lock.release()

    def _stopped_at(self) -> str:
        if not getattr(self, "total_steps", None) or self.step == 0 and self.last_checkpoint is None:
            return f"stopped by Ctrl-C before the first step; {self._resume_hint()}"
        return f"stopped by Ctrl-C during step {self.step + 1} of {self.total_steps}; {self._resume_hint()}"

    def _resume_hint(self) -> str:
        if self.last_checkpoint is not None:
            return f"last checkpoint: {self.last_checkpoint} (continue from it with --resume)"
        return "no checkpoint was written, so a rerun starts from step 0 (train.save_steps sets how often one is)"

    def _run(self) -> Path:
        from tqdm.auto import tqdm

        acc, t = self.accelerator, self.cfg.train
        rng = getattr(self, "_rng_to_restore", None)
        if rng is None:
            A.seed_sampling(t.seed, acc.process_index)
        elif not CK.restore_rng(rng, acc.process_index, acc.num_processes):
            self._log("[resume] the checkpoint was written by another number of processes: sampling noise is "
                      "reseeded, so on-policy samples will differ from an uninterrupted run")
            A.seed_sampling(t.seed * 1_000_003 + self.start_step, acc.process_index)
        reporter = done = None
        try:
            if acc.is_main_process:
                atomic_write_text(self.out / "config.yaml", dump_config(self.cfg))
                CK.truncate_metrics(self.out / "metrics.jsonl", self.start_step, log=self._log)
            reporter = R.Reporter(self.out, t.report_to, self.cfg.to_dict(), active=acc.is_main_process)
            bar = tqdm(total=self.total_steps, initial=self.start_step, desc=f"train {self.method.name}",
                       disable=not (t.progress_bar and acc.is_main_process), dynamic_ncols=True)
            done = self._loop(bar, reporter)
        except OSError as e:  # a write the checkpoint savers do not wrap: metrics.jsonl, config.yaml
            raise OutputFolderError(f"cannot write to {self.out}: {e}; {self._resume_hint()}") from e
        finally:
            if reporter is not None:
                reporter.close(failed=done is None)
        if t.push_to_hub:  # last: the folder is complete and the loggers' files are closed
            A.on_main(acc, lambda: HUB.push_folder(self.out, t.hub_model_id, t.hub_private_repo, log=self._log))
        return done

    def _loop(self, bar, reporter: R.Reporter) -> Path:
        acc, t = self.accelerator, self.cfg.train
        started = time.time()
        for step in range(self.start_step, self.total_steps):
            self.step = step
            try:
                m = self.train_step(step)
            except (TrainingError, ValueError) as e:
                bar.close()
                where = (f"last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint
                         else "no checkpoint was written")
                raise TrainingError(f"step {step + 1}: {e}; {where}; nothing of this step was saved") from e
            if step == self.start_step:
                self.loss_path = self._loss_path_in_use()
                self._log(f"[loss path] {self.loss_path}")
            m["step"] = step + 1
            m["epoch"] = (step + 1) / self.steps_per_epoch
            evaluated = getattr(self, "eval_features", None) is not None and EV.due(step + 1, t.eval_steps,
                                                                                     self.total_steps)
            if evaluated:  # on every process: the eval sums are reduced over them
                m.update(EV.evaluate(self.method, self._context(), self.eval_features, self.collator, acc,
                                     t.per_device_batch_size, self.modules))
            if evaluated or (step + 1) % t.logging_steps == 0 or step + 1 == self.total_steps:
                reporter.log(m)  # main process only
            bar.set_postfix(loss=f"{m['loss']:.4f}")
            bar.update(1)
            if CK.should_save(t.save_strategy, t.save_steps, step + 1, self.steps_per_epoch, self.total_steps):
                self.save_checkpoint(step + 1)
        self.step = self.total_steps
        bar.close()
        acc.wait_for_everyone()
        weights, modules = SH.model_state(acc, self.policy), SH.module_states(acc, self.modules)  # collectives
        A.on_main(self.accelerator, lambda: CK.save_final(self.out, FR.saveable(self.policy), self.tokenizer, modules, {
            "fingerprint": self.fingerprint, "method": self.method.name, "steps": self.total_steps,
            "seconds": round(time.time() - started, 1), "data": {**vars(self.report), "n_used": self.n_used},
            "loss_path": getattr(self, "loss_path", self.cfg.train.loss_path),
        }, state_dict=weights))
        self._log(f"[done] {self.method.name}: {self.total_steps} steps in {time.time() - started:.1f}s -> {self.out}")
        acc.wait_for_everyone()
        return self.out

    def _loss_path_in_use(self) -> str:
        """What the first step really ran: ``fused``, ``plain``, or ``plain (fallback: ...)``
        naming every model whose logits are not ``lm_head(hidden)`` (soft-capping, a wrapped
        head). A fallback from the fused path is never silent: it is logged at the first step
        and recorded in COMPLETE.json."""
        from aligndistil.model.outputs import uses_linear_head

        if self.cfg.train.loss_path != "fused":
            return self.cfg.train.loss_path
        models = {"policy": self.policy, **self.frozen}
        off = [role for role, m in models.items() if uses_linear_head(m) is False]
        return f"plain (fallback: the logits of {', '.join(off)} are not lm_head(hidden))" if off else "fused"


def train(cfg: RunConfig, resume: bool = False, fingerprint: str | None = None, overwrite: bool = False) -> Path:
    """Train ``cfg`` and return the output folder (see :class:`Trainer` for the arguments)."""
    return Trainer(cfg, resume=resume, fingerprint=fingerprint, overwrite=overwrite).train()
