"""The one-position shift of aligndistil.model.outputs (the per-token operations are tested in tests/losses/test_ops.py).

For a packed ``[x ; y]`` the logits at input position ``i`` predict token ``i + 1``: the
first response token's distribution comes from the LAST PROMPT position, and the logits at
the last response token's position predict nothing we train on.
"""

from __future__ import annotations

import pytest
import torch

from aligndistil.losses.ops import label_logps
from aligndistil.model.outputs import align_to_response, gather_positions, response_positions
from aligndistil.losses import adaptive_alpha, aligndistil_loss, aligndistil_teacher_logits, tdpo_loss

F64 = torch.float64
PAD = 0


def pack(pairs, side):
    """Pack ``[(prompt, response), ...]`` into ``ids, response_mask`` and the padded index of
    every unpadded position (``where[b][j]``), with ``side`` = "left" or "right" padding."""
    L = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), L), PAD, dtype=torch.long)
    rmask = torch.zeros(len(pairs), L, dtype=torch.long)
    where = []
    for b, (p, r) in enumerate(pairs):
        n = len(p) + len(r)
        off = 0 if side == "right" else L - n
        ids[b, off:off + n] = torch.tensor(p + r)
        rmask[b, off + len(p):off + n] = 1
        where.append(list(range(off, off + n)))
    return ids, rmask, where


def place(per_seq, where, L, V, seed):
    """Put per-sequence values ``(n_b, V)`` at their padded positions; padding gets noise."""
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(len(per_seq), L, V, generator=g, dtype=F64) * 100.0
    for b, u in enumerate(per_seq):
        out[b, where[b]] = u
    return out


PAIRS = [([1, 2], [5, 6, 7]), ([1, 2, 3], [4]), ([3], [7, 2])]
VOCAB = 8


# ---------------------------------------------------------------- alignment and labels


def test_positions_labels_mask_right_padded():
    ids, rmask, _ = pack(PAIRS, "right")
    # row 0: [1 2 5 6 7] -> positions 1, 2, 3 predict 5, 6, 7
    # row 1: [1 2 3 4 0] -> position 2 predicts 4
    # row 2: [3 7 2 0 0] -> positions 0, 1 predict 7, 2
    positions, labels, mask = response_positions(ids, rmask)
    assert labels.tolist() == [[5, 6, 7], [4, 0, 0], [7, 2, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert positions[0].tolist() == [1, 2, 3]
    assert positions[1, 0].item() == 2
    assert positions[2, :2].tolist() == [0, 1]


@pytest.mark.parametrize("side", ["left", "right"])
def test_labels_equal_response_tokens(side):
    ids, rmask, _ = pack(PAIRS, side)
    a = align_to_response(torch.zeros(*ids.shape, VOCAB), ids, rmask)
    for b, (_, r) in enumerate(PAIRS):
        n = len(r)
        assert a.labels[b, :n].tolist() == r
        assert a.mask[b].tolist() == [1.0] * n + [0.0] * (a.mask.shape[1] - n)
        # the row predicting response token t sits one position before that token
        for t in range(n):
            assert ids[b, a.positions[b, t] + 1].item() == r[t]
            assert rmask[b, a.positions[b, t] + 1].item() == 1


def test_left_and_right_padding_give_identical_aligned_values():
    L = max(len(p) + len(r) for p, r in PAIRS)
    g = torch.Generator().manual_seed(0)
    per_seq = [torch.randn(len(p) + len(r), VOCAB, generator=g, dtype=F64) for p, r in PAIRS]
    out = {}
    for side, seed in (("left", 1), ("right", 2)):
        ids, rmask, where = pack(PAIRS, side)
        out[side] = align_to_response(place(per_seq, where, L, VOCAB, seed), ids, rmask)
    left, right = out["left"], out["right"]
    assert torch.equal(left.labels, right.labels)
    assert torch.equal(left.mask, right.mask)
    m = left.mask.bool()
    assert torch.equal(left.values[m], right.values[m])
    # and the aligned row t of sequence b is the unpadded logits row (prompt_len - 1 + t)
    for b, (p, r) in enumerate(PAIRS):
        torch.testing.assert_close(left.values[b, :len(r)], per_seq[b][len(p) - 1:len(p) - 1 + len(r)], rtol=0, atol=0)
    # the losses therefore agree too
    la, _ = aligndistil_loss(left.values, left.values.flip(-1), left.mask, alpha=1.0)
    ra, _ = aligndistil_loss(right.values, right.values.flip(-1), right.mask, alpha=1.0)
    assert torch.equal(la, ra)


def test_gather_positions_hidden_states():
    ids, rmask, _ = pack(PAIRS, "right")
    hidden = torch.arange(ids.numel() * 2, dtype=F64).reshape(*ids.shape, 2)
    a = align_to_response(hidden, ids, rmask)
    assert a.values.shape == (3, 3, 2)
    assert torch.equal(a.values, gather_positions(hidden, a.positions))
    assert a.values[0, 0].tolist() == hidden[0, 1].tolist()


def test_response_at_position_zero_raises():
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="position 0"):
        response_positions(ids, torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="position 0"):
        align_to_response(torch.zeros(1, 3, 4), ids, torch.tensor([[1, 1, 1]]))


def test_row_without_response_raises():
    ids = torch.tensor([[5, 6, 7], [5, 6, 7]])
    with pytest.raises(ValueError, match=r"no response token in batch rows \[1\]"):
        response_positions(ids, torch.tensor([[0, 1, 1], [0, 0, 0]]))


def test_shape_mismatch_raises():
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="input_ids"):
        response_positions(ids, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="values"):
        align_to_response(torch.zeros(1, 4, 2), ids, torch.tensor([[0, 1, 1]]))


# ------------------------------------------------------------------- the shift, via losses


def last_prompt_and_last_response(where, pairs):
    """Padded indices of the last prompt position and of the last response token."""
    return [(where[b][len(p) - 1], where[b][len(p) + len(r) - 1]) for b, (p, r) in enumerate(pairs)]


@pytest.mark.parametrize("side", ["left", "right"])
def test_shift_aligndistil_loss(side):
    ids, rmask, where = pack(PAIRS, side)
    B, L = ids.shape
    g = torch.Generator().manual_seed(3)
    policy, dpo, rev = (torch.randn(B, L, VOCAB, generator=g, dtype=F64) for _ in range(3))

    def loss(policy, dpo):
        p, d, r = (align_to_response(x, ids, rmask) for x in (policy, dpo, rev))
        alpha = adaptive_alpha(d.values, r.values, r=10.0)
        teacher = aligndistil_teacher_logits(d.values, r.values, alpha)
        return aligndistil_loss(p.values, teacher, p.mask, alpha=alpha, beta0=0.1)[0]

    base = loss(policy, dpo)
    bump = torch.linspace(-2.0, 3.0, VOCAB, dtype=F64)
    for b, (last_prompt, last_resp) in enumerate(last_prompt_and_last_response(where, PAIRS)):
        # (a) only the first response token's distribution (last prompt position) differs
        for which in ("policy", "dpo"):
            p2, d2 = policy.clone(), dpo.clone()
            (p2 if which == "policy" else d2)[b, last_prompt] += bump
            changed = loss(p2, d2)
            assert abs(changed[b] - base[b]) > 1e-6, (which, b)
            others = [i for i in range(B) if i != b]
            assert torch.equal(changed[others], base[others])
        # (b) only the position after the response (the last response token's position) differs
        for which in ("policy", "dpo"):
            p3, d3 = policy.clone(), dpo.clone()
            (p3 if which == "policy" else d3)[b, last_resp] += bump
            assert torch.equal(loss(p3, d3), base), (which, b)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("variant", [1, 2])
def test_shift_tdpo_loss(side, variant):
    chosen = PAIRS
    rejected = [(p, r[::-1] + [3]) for p, r in PAIRS]
    ids_c, rm_c, where_c = pack(chosen, side)
    ids_r, rm_r, where_r = pack(rejected, side)
    g = torch.Generator().manual_seed(4)
    pol_c, ref_c = (torch.randn(*ids_c.shape, VOCAB, generator=g, dtype=F64) for _ in range(2))
    pol_r, ref_r = (torch.randn(*ids_r.shape, VOCAB, generator=g, dtype=F64) for _ in range(2))

    def loss(pol_c, ref_c, pol_r, ref_r):
        pc, rc = (align_to_response(x, ids_c, rm_c) for x in (pol_c, ref_c))
        pr, rr = (align_to_response(x, ids_r, rm_r) for x in (pol_r, ref_r))
        return tdpo_loss(pc.values, pr.values, rc.values, rr.values, pc.labels, pr.labels, pc.mask, pr.mask,
                         variant=variant, beta=0.5)[0]

    tensors = {"pol_c": pol_c, "ref_c": ref_c, "pol_r": pol_r, "ref_r": ref_r}
    base = loss(**tensors)
    bump = torch.linspace(-2.0, 3.0, VOCAB, dtype=F64)
    ends = {"c": last_prompt_and_last_response(where_c, chosen), "r": last_prompt_and_last_response(where_r, rejected)}
    for name in tensors:
        for b in range(len(PAIRS)):
            last_prompt, last_resp = ends[name[-1]][b]
            a = {k: v.clone() for k, v in tensors.items()}
            a[name][b, last_prompt] += bump   # (a) first response token's distribution
            assert abs(loss(**a)[b] - base[b]) > 1e-6, (name, b)
            c = {k: v.clone() for k, v in tensors.items()}
            c[name][b, last_resp] += bump     # (b) the position after the response
            assert torch.equal(loss(**c), base), (name, b)


# ---------------------------------------------------------------- with a real causal LM


@pytest.fixture(scope="module")
def tiny_llamas():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    models = [transformers.LlamaForCausalLM(cfg).double().eval() for _ in range(2)]
    return models


LM_PAIRS = [([1, 2, 3], [9, 10, 11]), ([4, 5], [12, 13, 14, 15]), ([6], [7])]


def run(model, ids, rmask):
    attn = torch.ones_like(ids)
    for b, (p, r) in enumerate(LM_PAIRS):
        attn[b, len(p) + len(r):] = 0
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attn).logits


def test_llama_aligned_logps_equal_prefix_by_prefix(tiny_llamas):
    """log pi(y_t | x, y_<t) from one packed forward equals the last-position output of a
    forward on the prefix [x ; y_<t] alone, for every response token (including the first)."""
    model = tiny_llamas[0]
    ids, rmask, _ = pack(LM_PAIRS, "right")
    a = align_to_response(run(model, ids, rmask), ids, rmask)
    got = label_logps(a.values, a.labels)
    for b, (p, r) in enumerate(LM_PAIRS):
        for t in range(len(r)):
            prefix = torch.tensor([p + r[:t]])
            with torch.no_grad():
                last = model(input_ids=prefix).logits[0, -1]
            want = torch.log_softmax(last, -1)[r[t]]
            assert got[b, t].item() == pytest.approx(want.item(), abs=1e-10)


def test_llama_last_response_token_does_not_matter_to_aligndistil(tiny_llamas):
    """Changing the LAST response token's id only changes the logits at its own position (causal),
    which predict nothing we train on: the AlignDistil loss (no labels) is unchanged. Changing the
    last PROMPT token changes the first response token's distribution: the loss changes."""
    policy_model, teacher_model = tiny_llamas
    ids, rmask, where = pack(LM_PAIRS, "right")

    def loss(ids):
        p = align_to_response(run(policy_model, ids, rmask), ids, rmask)
        q = align_to_response(run(teacher_model, ids, rmask), ids, rmask)
        return aligndistil_loss(p.values, q.values, p.mask, alpha=1.0, beta0=0.1)[0]

    base = loss(ids)
    ends = last_prompt_and_last_response(where, LM_PAIRS)
    ids_b = ids.clone()
    ids_a = ids.clone()
    for b, (last_prompt, last_resp) in enumerate(ends):
        ids_b[b, last_resp] = (ids[b, last_resp] + 1) % 16
        ids_a[b, last_prompt] = (ids[b, last_prompt] + 1) % 16
    torch.testing.assert_close(loss(ids_b), base, rtol=0, atol=1e-12)
    assert ((loss(ids_a) - base).abs() > 1e-8).all()


def test_position_ids_count_only_attended_tokens():
    """Left padding does not shift positions: row 0 is row 1 behind two pads; padding after
    the last token repeats its position (it is masked out of attention anyway)."""
    from aligndistil.model.outputs import position_ids_from_mask

    att = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(att).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 2, 3, 4]]
    assert position_ids_from_mask(att.bool()).dtype == torch.long


def test_bf16_autocast_keeps_the_fused_head_path(tiny_ws):
    """Under accelerate's bf16 autocast the model's own logits carry bf16 rounding while the
    head applied to the (fp32-converted) hidden states does not; a 1e-4 check used to call that
    a mismatch and silently switch the run to full logits. Run in a subprocess: accelerate's
    state is process-wide."""
    import subprocess
    import sys

    code = f"""
import torch
from accelerate import Accelerator
from aligndistil.model.loading import load_causal_lm
from aligndistil.model.outputs import response_outputs, uses_linear_head
acc = Accelerator(cpu=True, mixed_precision="bf16")
model = acc.prepare(load_causal_lm({tiny_ws['model']!r}))
ids = torch.tensor([[1, 5, 6, 7, 8, 9]]); att = torch.ones_like(ids); resp = torch.tensor([[0, 0, 0, 1, 1, 1]])
out = response_outputs(model, ids, att, resp, compute_logits=False)
print(uses_linear_head(model), out.head is not None, out.logits is None, out.mask.dtype)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["True", "True", "True", "torch.float32"]


def test_declared_logit_softcapping_is_never_taken_for_a_linear_head(tiny_ws):
    """A cap of 30 changes logits of size ~5 by under 1%, inside any bf16 tolerance: the
    declaration, not the numbers, decides."""
    from aligndistil.model.loading import load_causal_lm
    from aligndistil.model.outputs import _logits_are_linear_head

    model = load_causal_lm(tiny_ws["model"])
    x = torch.randn(2, model.config.vocab_size)
    assert _logits_are_linear_head(model, x, x.clone())
    model.config.final_logit_softcapping = 30.0
    assert not _logits_are_linear_head(model, x, x.clone())


def test_every_layers_hidden_states_are_asked_for_only_when_needed(tiny_llamas):
    """A forward for the final hidden state alone (every frozen teacher's) takes it from the
    decoder's output and does not ask the model for every layer's; SparsePO's
    ``all_hidden`` (and MaPO's activations) still do. Both give the same final rows."""
    from aligndistil.model.outputs import response_outputs

    model = tiny_llamas[1]
    ids, rmask, _ = pack(LM_PAIRS, "right")
    attn = torch.ones_like(ids)
    for b, (p, r) in enumerate(LM_PAIRS):
        attn[b, len(p) + len(r):] = 0
    asked = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: asked.append(kw["output_hidden_states"]), with_kwargs=True)
    try:
        with torch.no_grad():
            lean = response_outputs(model, ids, attn, rmask)
            full = response_outputs(model, ids, attn, rmask, all_hidden=True)
    finally:
        hook.remove()
    assert asked == [False, True]
    assert lean.all_hidden is None and full.all_hidden.shape[0] == 2  # embeddings + 1 layer
    assert torch.equal(lean.hidden, full.hidden) and torch.equal(full.all_hidden[-1], full.hidden)
    assert torch.equal(lean.logits, full.logits)
