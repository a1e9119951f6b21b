"""The fused, chunked losses equal the plain path: loss, metrics and every gradient.

The project's rule (docs/math.md, "Fused (chunked) computation"): a fused or chunked path
must match the plain path to float tolerance, by test. Each method's loss runs twice on the same tiny models and padded
batch, once with ``loss_path="plain"`` (full logits) and once fused, for several chunk
sizes (1, 3, 7 — which divides no row count here — and one larger than every batch), with
tied and untied embeddings; losses, metrics and the gradients of every policy parameter
(the LM head / tied embedding included) and of the SparsePO mask network must agree.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aligndistil.config import MethodConfig
from aligndistil.data import PreferenceCollator
from aligndistil.losses.ops import label_logps, token_kl, token_tvd
from aligndistil import losses as L
from aligndistil.losses import fused as FL
from aligndistil.train.methods import StepContext, get_method
from aligndistil.model.outputs import response_outputs

V, D = 37, 16
CHUNKS = [1, 3, 7, 4096, "auto"]


def tiny_lm(seed: int, tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied, pad_token_id=0)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger logits than the default init, so the distributions differ visibly
        m.get_output_embeddings().weight.mul_(20.0)
    return m.eval()


def features(kind: str, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(1, V, (n,), generator=g).tolist()

    out = []
    for i, (p, a, b) in enumerate([(3, 5, 2), (1, 1, 6), (4, 7, 7), (2, 3, 1)]):  # padding everywhere
        f = {"prompt_ids": ids(p)}
        if kind == "pairs":
            f.update(chosen_ids=ids(a), rejected_ids=ids(b))
        else:
            f["completion_ids"] = ids(a)
            if kind == "unpaired":
                f["label"] = i % 2 == 0
        out.append(f)
    return out


METHODS = [
    ("sft", {}), ("dpo", {}), ("dpo", {"reverse": True}), ("ipo", {}), ("ipo", {"ipo_logps": "mean"}), ("dpop", {}), ("simpo", {}), ("kto", {}),
    ("tdpo1", {}), ("tdpo2", {}), ("sparsepo", {}), ("sparsepo", {"mask_shared": False}), ("mapo", {}),
    ("aligndistil", {"teacher": "adaptive"}), ("aligndistil", {"teacher": "contrastive"}),
    ("aligndistil", {"teacher": "vanilla", "beta": 0.05}), ("aligndistil", {"teacher": "constant", "alpha": 2.0}),
    ("aligndistil", {"teacher": "adaptive", "weighting": "uniform"}),
]


def assert_grad_close(got, ref, tol=2e-5, msg=""):
    """Agreement to ``tol`` relative to the tensor's largest entry: sums of the same terms in
    another order differ by a few ulps of the largest TERM, so a small entry that is a
    difference of large terms carries an error relative to the large ones, not to itself."""
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    torch.testing.assert_close(got, ref, rtol=0, atol=tol * scale + 1e-12, msg=msg)


def _id(case):
    name, kw = case
    return "-".join([name, *(f"{k}={v}" for k, v in kw.items())])


def run_step(method_cfg, policy, frozen, modules, batch, loss_path, chunk_size, seq_weights=None, compile_loss=False):
    method = get_method(method_cfg)
    ctx = StepContext(policy=policy, frozen=frozen, cfg=method_cfg, modules=modules, pad_token_id=0,
                      loss_path=loss_path, chunk_size=chunk_size, compile_loss=compile_loss)
    params = [p for p in policy.parameters()] + [p for m in modules.values() for p in m.parameters()]
    for p in params:
        p.grad = None
    losses, metrics = method.loss(ctx, batch)
    w = torch.full_like(losses, 1.0 / losses.numel()) if seq_weights is None else seq_weights
    (losses * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    for mname, m in modules.items():
        grads.update({f"{mname}.{n}": p.grad.clone() for n, p in m.named_parameters()})
    return losses.detach(), {k: v.detach() for k, v in metrics.items()}, grads


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def models(request):
    tied = request.param
    return {"policy": tiny_lm(0, tied), "reference": tiny_lm(1, tied), "dpo_model": tiny_lm(2, tied),
            "reverse_dpo_model": tiny_lm(3, tied)}


@pytest.fixture(scope="module")
def models64(models):
    """The same models in float64, where both paths are exact to ~1e-12 and any
    difference in the mathematics (not the rounding) shows."""
    import copy
    return {k: copy.deepcopy(m).double() for k, m in models.items()}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", METHODS, ids=_id)
def test_fused_equals_plain(models, models64, case, dtype):
    if dtype == "float64":
        models, tol = models64, 1e-9
    else:
        tol = 2e-5
    name, kw = case
    cfg = MethodConfig(name=name, **kw)
    method = get_method(cfg)
    batch = PreferenceCollator(0, method.batch)(features(method.batch))
    policy = models["policy"]
    frozen = {r: models[r] for r in method.frozen}
    torch.manual_seed(5)
    modules = method.make_modules(policy, cfg) if method.make_modules else {}
    modules = {k: m.to(policy.dtype) for k, m in modules.items()}
    if name == "sparsepo":  # spread the mask so some entries are 0 and the L1 term matters
        with torch.no_grad():
            for m in modules.values():
                m.layer_weight.normal_(std=0.5)
    ref_losses, ref_metrics, ref_grads = run_step(cfg, policy, frozen, modules, batch, "plain", 8)
    assert all(g.abs().sum() > 0 for n, g in ref_grads.items() if "lm_head" in n or "embed" in n)
    for chunk in CHUNKS:
        losses, metrics, grads = run_step(cfg, policy, frozen, modules, batch, "fused", chunk)
        assert_grad_close(losses, ref_losses, tol, msg=f"loss, chunk {chunk}")
        assert metrics.keys() == ref_metrics.keys()
        for k in metrics:
            assert_grad_close(metrics[k], ref_metrics[k], tol, msg=f"{k}, chunk {chunk}")
        assert grads.keys() == ref_grads.keys()
        for k in grads:
            assert_grad_close(grads[k], ref_grads[k], tol, msg=f"grad {k}, chunk {chunk}")


@pytest.mark.parametrize("kw", [{"teacher": "adaptive"}, {"teacher": "contrastive"}, {"teacher": "constant", "alpha": 2.0},
                                {"teacher": "adaptive", "weighting": "uniform"}], ids=str)
def test_compiled_chunk_body_equals_plain(kw):
    """``train.compile_loss``: the torch.compile'd element-wise body of the AlignDistil chunk
    computes the same loss, metrics and gradients as the plain path (the switch changes
    speed, never the loss). Untied head, float32, a chunk size that divides nothing."""
    models = {"policy": tiny_lm(0, False), "dpo_model": tiny_lm(2, False), "reverse_dpo_model": tiny_lm(3, False),
              "reference": tiny_lm(1, False)}
    cfg = MethodConfig(name="aligndistil", **kw)
    batch = PreferenceCollator(0, "sft")(features("sft", seed=3))
    frozen = {r: models[r] for r in get_method(cfg).frozen}
    ref_losses, ref_metrics, ref_grads = run_step(cfg, models["policy"], frozen, {}, batch, "plain", 8)
    for chunk in (3, 4096):
        losses, metrics, grads = run_step(cfg, models["policy"], frozen, {}, batch, "fused", chunk, compile_loss=True)
        assert_grad_close(losses, ref_losses, msg=f"loss, chunk {chunk}")
        for k in ref_metrics:
            assert_grad_close(metrics[k], ref_metrics[k], msg=f"{k}, chunk {chunk}")
        for k in ref_grads:
            assert_grad_close(grads[k], ref_grads[k], msg=f"grad {k}, chunk {chunk}")


@pytest.mark.parametrize("teacher", ["adaptive", "constant"])
def test_aligndistil_gradient_shortcut_and_its_fallback(models, teacher):
    """The forward precomputes AlignDistil's gradients for the linear loss; an upstream gradient
    that is not proportional to the row weights (here: per-sequence weights) is recomputed."""
    cfg = MethodConfig(name="aligndistil", teacher=teacher, alpha=1.5)
    batch = PreferenceCollator(0, "sft")(features("sft", seed=3))
    frozen = {r: models[r] for r in get_method(cfg).frozen}
    sw = torch.tensor([0.3, -1.0, 2.0, 0.7])
    for weights in (None, sw):
        ref = run_step(cfg, models["policy"], frozen, {}, batch, "plain", 1, weights)
        before = dict(FL.STATS)
        got = run_step(cfg, models["policy"], frozen, {}, batch, "fused", 3, weights)
        used = "rescaled" if weights is None else "recomputed"
        assert FL.STATS[used] == before[used] + 1, (FL.STATS, before)
        for k in ref[2]:
            assert_grad_close(got[2][k], ref[2][k], msg=k)


def _heads(seed=0, bias=True, N=(3, 6)):
    g = torch.Generator().manual_seed(seed)
    B, T = N
    h = torch.randn(B, T, D, generator=g, requires_grad=True)
    W = (3 * torch.randn(V, D, generator=g)).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_() if bias else None
    mask = torch.ones(B, T)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    labels = torch.randint(0, V, (B, T), generator=g) * mask.long()
    return h, W, b, mask, labels


@pytest.mark.parametrize("chunk", CHUNKS)
def test_functions_with_a_biased_head(chunk):
    """The functions on their own, with a head bias (which HF causal LMs rarely have)."""
    h, W, b, mask, labels = _heads()
    hr = torch.randn(*h.shape[:2], D)
    Wr = 3 * torch.randn(V, D)
    z = FL.HeadRows(h, W, b)
    plain = label_logps(torch.nn.functional.linear(h, W, b), labels) * mask
    fused = FL.label_logps(z, labels, mask, chunk_size=chunk)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    up = torch.randn(mask.shape)
    ga = torch.autograd.grad((fused * up).sum(), (h, W, b))
    gb = torch.autograd.grad((plain * up).sum(), (h, W, b))
    for x, y in zip(ga, gb):
        assert_grad_close(x, y)
    # forward KL(ref || theta) per token, with an arbitrary upstream gradient on every output
    _, _, _, _, klc, _ = FL.token_level_stats(z, z, FL.HeadRows(hr, Wr), FL.HeadRows(hr, Wr), labels, labels, mask, mask,
                                              chunk_size=chunk)
    kl_plain = token_kl(hr @ Wr.t(), torch.nn.functional.linear(h, W, b)) * mask
    ga = torch.autograd.grad((klc * up).sum(), (h, W, b))
    gb = torch.autograd.grad((kl_plain * up).sum(), (h, W, b))
    torch.testing.assert_close(klc, kl_plain, rtol=1e-5, atol=1e-5)
    for x, y in zip(ga, gb):
        assert_grad_close(x, y)


@pytest.mark.parametrize("chunk", [1, 4, "auto"])
@pytest.mark.parametrize("teacher", ["adaptive", "cached_tvd", "per_token", "float"])
def test_aligndistil_producers_agree(chunk, teacher):
    """FL.aligndistil_token_stats returns what L.aligndistil_token_stats returns on full logits:
    kl (and its gradient for any upstream gradient), alpha and tvd."""
    h, W, b, mask, _ = _heads()
    g = torch.Generator().manual_seed(1)
    hb, hn = (torch.randn(*h.shape, generator=g) for _ in range(2))
    Wb, Wn = (3 * torch.randn(V, D, generator=g) for _ in range(2))
    kw = {"adaptive": {"r": 10.0}, "cached_tvd": {"r": 10.0, "tvd": torch.rand(mask.shape, generator=g)},
          "per_token": {"alpha": 0.5 + torch.rand(mask.shape, generator=g)}, "float": {"alpha": 1.5}}[teacher]
    plain = L.aligndistil_token_stats(torch.nn.functional.linear(h, W, b), hb @ Wb.t(), hn @ Wn.t(), mask, **kw)
    fused = FL.aligndistil_token_stats(FL.HeadRows(h, W, b), FL.HeadRows(hb, Wb), FL.HeadRows(hn, Wn), mask,
                                       chunk_size=chunk, **kw)
    assert_grad_close((fused[0] * mask).detach(), (plain[0] * mask).detach(), msg="kl")
    for name, x, y in (("alpha", fused[1], plain[1]), ("tvd", fused[2], plain[2])):
        assert (x is None) == (y is None), name
        if isinstance(x, torch.Tensor):
            assert_grad_close(x * mask, y * mask, msg=name)
        else:
            assert x == y, name
    up = torch.randn(mask.shape, generator=g) * mask
    ga = torch.autograd.grad((fused[0] * up).sum(), (h, W, b))
    gb = torch.autograd.grad((plain[0] * up).sum(), (h, W, b))
    for x, y in zip(ga, gb):
        assert_grad_close(x, y)


@pytest.mark.parametrize("chunk", [1, 4, "auto"])
def test_teacher_tvd_equals_token_tvd(chunk):
    """The teacher cache's fused TVD equals ops.token_tvd on the masked rows, 0 elsewhere."""
    h, W, b, mask, _ = _heads()
    hn, Wn = torch.randn(*h.shape[:2], D), 3 * torch.randn(V, D)
    got = FL.teacher_tvd(FL.HeadRows(h, W, b), FL.HeadRows(hn, Wn), mask, chunk_size=chunk)
    want = token_tvd(torch.nn.functional.linear(h, W, b), hn @ Wn.t()) * mask
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not got.requires_grad


def test_half_precision_head_is_computed_in_fp32():
    """A bf16 head (upcast to fp32 on a CPU without fast bf16) equals the fp32 plain result."""
    h, W, b, mask, labels = _heads(bias=False)
    Wb = W.detach().to(torch.bfloat16).requires_grad_()
    hb = h.detach().to(torch.bfloat16).requires_grad_()
    fused = FL.label_logps(FL.HeadRows(hb, Wb), labels, mask, chunk_size=4)
    plain = label_logps(hb.float() @ Wb.float().t(), labels) * mask
    torch.testing.assert_close(fused, plain, rtol=1e-2, atol=1e-2)
    fused.sum().backward()
    assert hb.grad.dtype == torch.bfloat16 and Wb.grad.dtype == torch.bfloat16


def test_no_grad_calls_build_no_graph():
    h, W, b, mask, labels = _heads()
    with torch.no_grad():
        out = FL.label_logps(FL.HeadRows(h, W, b), labels, mask, chunk_size=2)
    assert not out.requires_grad


def test_compute_logits_false_returns_hidden_and_head():
    m = tiny_lm(0, tied=True)
    batch = PreferenceCollator(0, "sft")(features("sft"))
    full = response_outputs(m, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    lazy = response_outputs(m, batch["input_ids"], batch["attention_mask"], batch["response_mask"], compute_logits=False)
    assert lazy.logits is None and lazy.head[0] is m.get_output_embeddings().weight
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight  # tied
    torch.testing.assert_close(lazy.head_logits(), full.logits)


def test_a_head_that_is_not_linear_falls_back_to_full_logits():
    """Logit soft-capping (or a wrapped head) is not hidden @ W^T: the plain path is used."""

    class Capped(torch.nn.Linear):
        def forward(self, x):
            return 5.0 * torch.tanh(super().forward(x) / 5.0)

    m = tiny_lm(0, tied=False)
    old = m.lm_head
    m.lm_head = Capped(D, V, bias=False)
    m.lm_head.weight = old.weight
    cfg = MethodConfig(name="dpo")
    batch = PreferenceCollator(0, "pairs")(features("pairs"))
    ref = tiny_lm(1, tied=False)
    a = run_step(cfg, m, {"reference": ref}, {}, batch, "plain", 8)
    b = run_step(cfg, m, {"reference": ref}, {}, batch, "fused", 8)
    torch.testing.assert_close(a[0], b[0])
    out = response_outputs(m, batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_response_mask"],
                           compute_logits=False)
    assert out.logits is not None and out.head is None


# ----------------------------------------------------------------------------- bad input
def test_auto_chunk_rows_fit_the_budget():
    """``chunk_size="auto"``: rows = 128 MiB // (buffers x V x 4 bytes), rounded down to a
    multiple of 16, within [16, 4096]. By hand: 134,217,728 // (3 * 49,152 * 4 = 589,824)
    = 227 -> 224; // (3 * 151,936 * 4 = 1,823,232) = 73 -> 64; // (1 * 49,152 * 4) = 682 -> 672;
    a huge vocabulary still gets 16 rows, a tiny one at most 4096."""
    assert FL.auto_chunk_rows(3, 49152) == 224
    assert FL.auto_chunk_rows(3, 151936) == 64
    # On a GPU the budget is 1 GiB: 2**30 // (3 * 151936 * 4) = 589 -> 576; with a bf16 head's
    # extra buffer 2**30 // (4 * 151936 * 4) = 441 -> 432.
    assert FL.auto_chunk_rows(3, 151936, device_type="cuda") == 576
    assert FL.auto_chunk_rows(4, 151936, device_type="cuda") == 432
    assert FL.auto_chunk_rows(1, 49152) == 672
    assert FL.auto_chunk_rows(4, 10**7) == 16
    assert FL.auto_chunk_rows(3, V) == 4096


@pytest.mark.parametrize("chunk", [0, -3, 2.5, True, None, "big"])
def test_bad_chunk_size(chunk):
    h, W, b, mask, labels = _heads()
    with pytest.raises(ValueError, match="chunk_size must be a positive integer .*or 'auto'"):
        FL.label_logps(FL.HeadRows(h, W, b), labels, mask, chunk_size=chunk)


def test_hidden_size_that_does_not_match_the_head():
    h, W, b, mask, labels = _heads()
    with pytest.raises(ValueError, match=r"hidden size 16 does not match the LM head, which takes 15"):
        FL.label_logps(FL.HeadRows(h, W[:, :15], b), labels, mask)
    z = FL.HeadRows(h, W, b)
    with pytest.raises(ValueError, match="base: hidden size 16 does not match"):
        FL.aligndistil_token_stats(z, FL.HeadRows(h.detach(), W.detach()[:, :15]), z, mask, alpha=1.0)


def test_teacher_with_another_vocabulary_or_rows():
    h, W, b, mask, labels = _heads()
    z = FL.HeadRows(h, W, b)
    with pytest.raises(ValueError, match="vocabulary of 30 but the policy has 37"):
        FL.aligndistil_token_stats(z, FL.HeadRows(h.detach(), W.detach()[:30]), z, mask, alpha=1.0)
    with pytest.raises(ValueError, match="rows"):
        FL.aligndistil_token_stats(z, FL.HeadRows(h.detach()[:, :3], W.detach()), z, mask, alpha=1.0)
    with pytest.raises(ValueError, match="outside"):
        FL.label_logps(z, labels + V, mask)


def test_trainer_refuses_bad_fused_settings(tiny_ws, tmp_path):
    from aligndistil.config import RunConfig, apply_overrides
    from aligndistil.train.loop import Trainer

    def make_cfg(ws, out, method, extra):
        return apply_overrides(RunConfig(), [
            f"model.policy={ws['model']}", f"data.train_file={ws['prefs']}", f"train.output_dir={out}",
            "train.max_steps=1", "train.progress_bar=false", f"method.name={method}", *extra])

    for bad in ("0", "-2", "1.5", "big"):
        with pytest.raises(ValueError, match="train.chunk_size must be a positive integer .* or auto"):
            Trainer(make_cfg(tiny_ws, tmp_path / "a", "dpo", [f"train.chunk_size={bad}"]))
    with pytest.raises(ValueError, match="train.loss_path must be fused or plain"):
        Trainer(make_cfg(tiny_ws, tmp_path / "b", "dpo", ["train.loss_path=fast"]))


def test_the_fp32_out_addmm_is_probed_checked_and_falls_back(monkeypatch):
    """The head-weight gradient of a bf16 head accumulates ``G^T @ h`` into fp32 with
    ``addmm(out_dtype=fp32)`` where the device has that kernel (CUDA). Its wiring, run here
    with the CPU let in: where the kernel is missing (this CPU build) the probe fails and the
    two-step product is used; a kernel that works is checked once against the two-step
    product and then used; one that returns a wrong sum is switched off after its first
    call, whose result is replaced by the two-step one."""
    from aligndistil.losses.fused import engine as E

    torch.manual_seed(0)
    a, b = torch.randn(6, 5).bfloat16(), torch.randn(5, 4).bfloat16()
    start = torch.randn(6, 4)
    two_step = start + torch.mm(a, b).float()  # the bf16 product (rounded), then added in fp32
    exact = start + torch.mm(a.float(), b.float())  # what a kernel accumulating in fp32 gives
    monkeypatch.setattr(E, "ADDMM_DEVICES", ("cpu",))

    monkeypatch.setattr(E, "_FP32_ADDMM_OK", {})
    acc = start.clone()
    if not E.fp32_out_addmm(acc, a, b):  # no CPU kernel: refused, acc untouched
        assert torch.equal(acc, start) and E._FP32_ADDMM_OK == {"cpu": False}
        assert not E.fp32_out_addmm(acc, a, b)  # not probed again

    def kernel(shift):
        def addmm(inp, m1, m2, out_dtype=None, out=None):
            res = inp + torch.mm(m1.float(), m2.float()) + shift
            return out.copy_(res) if out is not None else res
        return addmm

    for shift, trusted in ((0.0, True), (5.0, False)):
        monkeypatch.setattr(E, "_FP32_ADDMM_OK", {})
        monkeypatch.setattr(E.torch, "addmm", kernel(shift))
        acc = start.clone()
        assert E.fp32_out_addmm(acc, a, b)
        # right either way: the kernel's fp32 sum, or a bad kernel's sum replaced by the two-step one
        torch.testing.assert_close(acc, exact if trusted else two_step, rtol=1e-6, atol=1e-6)
        assert E._FP32_ADDMM_OK == {"cpu": trusted}
        acc = start.clone()
        assert E.fp32_out_addmm(acc, a, b) == trusted  # afterwards used, or refused
        torch.testing.assert_close(acc, exact if trusted else start, rtol=1e-6, atol=1e-6)
