"""On-policy sampling with vLLM, behind the interface of :func:`aligndistil.model.sampling.sample_responses`.

``method.generation_backend=vllm`` replaces our HF sampling loop by a vLLM engine for the
online methods (AlignDistil on-policy, PPO, RTO, REINFORCE); the rollout, the losses and
the batch layout stay the same. Two modes, as TRL's ``vllm_mode``:

- ``colocate``: an engine in the training process, on the same GPU, holding
  ``method.vllm_gpu_memory_utilization`` of its memory. After every optimizer step the
  engine is marked stale and, before it samples again, the policy's current weights are
  copied into it (for a LoRA policy: the adapter merged into the base, then unmerged).
- ``server``: a separate ``trl vllm-serve`` process at ``method.vllm_server_url``, reached
  with TRL's client, which also pushes the weights (NCCL) after each optimizer step.

Sampling distribution: vLLM applies our temperature and top-p and nothing else (no top-k,
no repetition penalty), stops on the same stop ids as the HF loop, and returns the
log-probability of every sampled token under its own arithmetic (``sampler_logps``).

Importance-sampling correction (``method.vllm_importance_sampling_correction``, PPO and
RTO): the engine's kernels and precision make its probabilities differ slightly from the
trainer's, so its samples come from ``pi_vllm``, not from the ``pi_old`` the PPO ratio
assumes. Each response token's policy loss is weighted by the truncated importance weight
``w_t = min(pi_old(y_t) / pi_vllm(y_t), C)`` (:func:`truncated_is_weight`; ``C`` =
``method.vllm_importance_sampling_cap``), the correction TRL calls
``vllm_importance_sampling_correction``. Truncation bounds the variance a rare token whose
engine probability is far below the trainer's would add.

``vllm`` (and ``trl`` for server mode) are imported only when an engine is built, so this
module imports on any machine; :func:`check_backend` refuses a vLLM run without the package
or without a GPU before anything loads.
"""

from __future__ import annotations

import importlib.util

import torch

from aligndistil.errors import AlignDistilError
from aligndistil.model.outputs import unwrap
from aligndistil.model.sampling import _eos_ids, pack_samples

INSTALL = "pip install 'aligndistil[vllm]'"


class VLLMError(AlignDistilError, ValueError):
    """A vLLM sampler set-up that cannot run (exit code 2); raised before anything loads."""

    label = "config error"
#: The methods whose losses take the importance weight (a per-token policy-gradient loss).
IS_METHODS = ("ppo", "rto")


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def check_backend(cfg, uses_sampling: bool) -> None:
    """Refuse a sampler set-up that cannot run, before any model loads (``cfg``: the method config).

    Raises:
        VLLMError: vLLM options without ``generation_backend=vllm``; vLLM for a method that
            does not sample; the IS correction for a method whose loss does not take it; server
            mode without a URL; the ``vllm`` package (or ``trl`` for server mode) missing; no GPU.
    """
    if cfg.generation_backend != "vllm":
        if cfg.vllm_importance_sampling_correction:
            raise VLLMError("method.vllm_importance_sampling_correction applies only with "
                              "method.generation_backend=vllm (the HF sampler's probabilities are the trainer's)")
        return
    if not uses_sampling:
        raise VLLMError(f"method.generation_backend=vllm: method {cfg.name} trains on fixed data and samples "
                          "nothing (on-policy methods: aligndistil mode=on_policy, ppo, rto, reinforce)")
    if cfg.vllm_importance_sampling_correction and cfg.name not in IS_METHODS:
        raise VLLMError(f"method.vllm_importance_sampling_correction weights a per-token policy-gradient loss "
                          f"({', '.join(IS_METHODS)}); method {cfg.name} does not take it")
    if cfg.vllm_mode == "server" and not cfg.vllm_server_url:
        raise VLLMError("method.vllm_mode=server needs method.vllm_server_url (e.g. http://127.0.0.1:8000, "
                          "where `trl vllm-serve --model ...` listens)")
    if not _installed("vllm"):
        raise VLLMError(f"method.generation_backend=vllm needs the vllm package, which is not installed: {INSTALL} "
                          "(on a machine with a CUDA GPU), or use method.generation_backend=hf")
    if cfg.vllm_mode == "server" and not _installed("trl"):
        raise VLLMError("method.vllm_mode=server talks to `trl vllm-serve` with TRL's client: pip install trl")
    if not torch.cuda.is_available():
        raise VLLMError("method.generation_backend=vllm needs a CUDA GPU and none is visible "
                          "(torch.cuda.is_available() is False); use method.generation_backend=hf")


def truncated_is_weight(trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor,
                        cap: float) -> torch.Tensor:
    """``w_t = min(exp(log pi_trainer(y_t) - log pi_sampler(y_t)), cap)`` on response tokens, 0 elsewhere.

    Args:
        trainer_logps, sampler_logps: ``(B, T)`` log-probabilities of the sampled tokens under the
            trainer's policy and under the engine that sampled them.
        mask: ``(B, T)`` 1 on response tokens.
        cap: ``C >= 1``, the truncation.

    Returns:
        ``(B, T)`` float32 weights, no gradient.
    """
    if trainer_logps.shape != sampler_logps.shape or trainer_logps.shape != mask.shape:
        raise ValueError(f"trainer_logps {tuple(trainer_logps.shape)}, sampler_logps {tuple(sampler_logps.shape)} and "
                         f"mask {tuple(mask.shape)} must have one shape")
    if not cap >= 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    m = mask.float()
    delta = (trainer_logps.detach().float() - sampler_logps.detach().float()) * m
    return torch.exp(delta).clamp(max=float(cap)) * m


def policy_weights(model):
    """``(name, tensor)`` of the policy's current weights as a plain HF model names them; for a
    peft model the caller must have merged the adapter (``merge_adapter``) first."""
    net = unwrap(model)
    if hasattr(net, "peft_config"):
        prefix = "base_model.model."
        for name, p in net.named_parameters():
            if "lora_" in name:
                continue
            name = name[len(prefix):] if name.startswith(prefix) else name
            yield name.replace(".base_layer", ""), p.data
    else:
        yield from ((name, p.data) for name, p in net.named_parameters())


class VLLMSampler:
    """A vLLM engine (colocated or a server) that samples like :func:`aligndistil.model.sampling.sample_responses`.

    Args:
        cfg: the method config (``vllm_*`` keys, sampling settings).
        model_path: the model the engine starts from (the policy's base for LoRA); the first
            sample syncs the policy's weights anyway, so a resumed run starts right.
        dtype: the engine's dtype name (``model.dtype``).
    """

    def __init__(self, cfg, model_path: str, dtype: str = "bfloat16", seed: int = 0, log=print):
        self.cfg, self.stale, self.log = cfg, True, log
        if cfg.vllm_mode == "colocate":
            from vllm import LLM

            self.llm = LLM(model=model_path, dtype=dtype, seed=seed, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                           enable_prefix_caching=True)
            self.client = None
        else:
            from trl.generation.vllm_client import VLLMClient  # noqa: F401 - older trl: trl.extras.vllm_client

            self.client = VLLMClient(base_url=cfg.vllm_server_url, connection_timeout=240.0)
            self.client.init_communicator(device=torch.cuda.current_device())
            self.llm = None
        log(f"[vllm] {cfg.vllm_mode} engine ready ({model_path if self.llm else cfg.vllm_server_url})")

    def mark_stale(self) -> None:
        """The policy took an optimizer step: sync the weights before the next sample."""
        self.stale = True

    def sync(self, model) -> None:
        """Copy the policy's current weights into the engine (merging a LoRA adapter for the copy)."""
        net = unwrap(model)
        peft = hasattr(net, "peft_config")
        if peft:
            net.merge_adapter()
        try:
            with torch.no_grad():
                if self.llm is not None:
                    engine_model = _engine_model(self.llm)
                    engine_model.load_weights(list(policy_weights(net)))
                    self.llm.reset_prefix_cache()
                else:
                    for name, w in policy_weights(net):
                        self.client.update_named_param(name, w)
                    self.client.reset_prefix_cache()
        finally:
            if peft:
                net.unmerge_adapter()
        self.stale = False

    @torch.no_grad()
    def sample_responses(self, model, prompt_input_ids, prompt_attention_mask, *, max_new_tokens: int,
                         temperature: float = 1.0, top_p: float = 1.0, num_samples: int = 1,
                         eos_token_id=None, pad_token_id: int = 0) -> dict:
        """:func:`aligndistil.model.sampling.sample_responses`'s result, sampled by the engine, plus
        ``sampler_logps (B * num_samples, N)``: the engine's log-probability of each sampled token."""
        if self.stale:
            self.sync(model)
        eos = _eos_ids(unwrap(model), eos_token_id)
        prompts = [ids[m.bool()].tolist() for ids, m in zip(prompt_input_ids, prompt_attention_mask)]
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()  # follows train.seed, as the HF loop
        rows = self._generate(prompts, seeds, num_samples, temperature, top_p, max_new_tokens, eos)
        N = max(len(t) for t, _ in rows)
        dev = prompt_input_ids.device
        tokens = torch.full((len(rows), N), int(pad_token_id), dtype=torch.long)
        mask = torch.zeros((len(rows), N), dtype=torch.long)
        logps = torch.zeros((len(rows), N), dtype=torch.float32)
        for i, (t, lp) in enumerate(rows):
            tokens[i, :len(t)] = torch.tensor(t, dtype=torch.long)
            mask[i, :len(t)] = 1
            logps[i, :len(t)] = torch.tensor(lp, dtype=torch.float32)
        ids = prompt_input_ids.repeat_interleave(num_samples, dim=0)
        att = prompt_attention_mask.repeat_interleave(num_samples, dim=0)
        packed = pack_samples(ids, att, tokens.to(dev), mask.to(dev))
        packed["ended"] = torch.tensor([bool(t) and t[-1] in eos for t, _ in rows], device=dev)
        packed["sampler_logps"] = logps.to(dev)
        return packed

    def _generate(self, prompts, seeds, n, temperature, top_p, max_tokens, eos) -> list[tuple[list[int], list[float]]]:
        """``(token ids up to and including the first stop id, their log-probs)`` per sample, grouped per prompt."""
        out = []
        if self.llm is not None:
            from vllm import SamplingParams

            params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=-1, max_tokens=max_tokens,
                                     logprobs=0, seed=s, stop_token_ids=list(eos)) for s in seeds]
            res = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sampling_params=params, use_tqdm=False)
            for r in res:
                for c in r.outputs:
                    toks = list(c.token_ids)
                    out.append(_cut(toks, [c.logprobs[j][t].logprob for j, t in enumerate(toks)], eos))
        else:
            res = self.client.generate(prompts, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                       logprobs=0, generation_kwargs={"stop_token_ids": list(eos)})
            for toks, lps in zip(res["completion_ids"], res["logprobs"]):
                out.append(_cut(list(toks), [x[0] if isinstance(x, list) else x for x in lps], eos))
        return out


def _cut(tokens: list[int], logps: list[float], eos) -> tuple[list[int], list[float]]:
    """Keep tokens up to and including the first stop id (never an empty response)."""
    for j, t in enumerate(tokens):
        if t in eos:
            return tokens[:j + 1], logps[:j + 1]
    return (tokens, logps) if tokens else ([int(next(iter(eos), 0))], [0.0])


def _engine_model(llm):
    """The torch model inside a colocated vLLM engine (its location moved between vLLM versions)."""
    executor = llm.llm_engine.model_executor
    for path in ("driver_worker.model_runner.model", "driver_worker.worker.model_runner.model"):
        obj = executor
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise RuntimeError("this vLLM version hides its model from the process (V1 multiprocessing engine); "
                       "set VLLM_ENABLE_V1_MULTIPROCESSING=0 for colocated weight sync")
