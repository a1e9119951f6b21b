"""aligndistil.model.sampling on the tiny random model: packing, EOS masking, per-row seeds.

The tiny model (``tiny_ws``) is a random 2-layer Llama over a character vocabulary, so a
frequent character can stand in for EOS and some rows end early while others run to
``max_new_tokens``: every masking rule below is exercised on both kinds of row.
"""

from __future__ import annotations

import pytest
import torch

from aligndistil.data.collate import pad_with_mask
from aligndistil.losses.ops import label_logps
from aligndistil.model.outputs import response_outputs
from aligndistil.model.sampling import (
    decode_sample,
    encode_prompts,
    generate_texts,
    pack_samples,
    row_seed,
    sample_responses,
    sample_with_logprobs,
    stop_token_ids,
)

PROMPTS = ["Review the film:", "Review this cafe:", "Review my phone:", "Review the park:", "Review that song:"]


@pytest.fixture(scope="module")
def tiny(tiny_ws):
    from aligndistil.model.loading import load_causal_lm, load_tokenizer

    return load_causal_lm(tiny_ws["model"]), load_tokenizer(tiny_ws["model"])


def _prompts(tok, prompts=PROMPTS):
    return pad_with_mask(encode_prompts(tok, prompts), tok.pad_token_id, side="left")


def _sample(model, tok, ids, att, seeds, **kw):
    kw.setdefault("eos_token_ids", [tok.convert_tokens_to_ids("e")])  # frequent: some rows end early
    return sample_with_logprobs(model, ids, att, max_new_tokens=12, seeds=seeds, pad_token_id=tok.pad_token_id, **kw)


# ------------------------------------------------------------------- pure helpers
def test_pack_samples_hand_made():
    ids = torch.tensor([[0, 5, 6], [4, 5, 6]])  # row 0 left-padded
    att = torch.tensor([[0, 1, 1], [1, 1, 1]])
    tokens = torch.tensor([[7, 2, 0], [8, 9, 3]])  # row 0 ended with EOS (2), then padding
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    b = pack_samples(ids, att, tokens, mask)
    assert b["input_ids"].tolist() == [[0, 5, 6, 7, 2, 0], [4, 5, 6, 8, 9, 3]]
    assert b["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert b["response_mask"].tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]]


def test_decode_sample_drops_the_eos_only_when_the_row_ended(tiny):
    _, tok = tiny
    a, b, eos = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b"), tok.eos_token_id
    out = {"tokens": torch.tensor([[a, b, eos, tok.pad_token_id], [b, b, a, a]]),
           "mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
           "ended": torch.tensor([True, False]),
           "logps": torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, -1.0, -1.0]])}
    assert decode_sample(tok, out, 0) == {"response": "ab", "n_tokens": 2, "ended": True, "logp": -3.5}
    assert decode_sample(tok, out, 1) == {"response": "bbaa", "n_tokens": 4, "ended": False, "logp": -4.0}


def test_stop_token_ids_adds_the_tokenizer_eos_once(tiny):
    model, tok = tiny
    assert stop_token_ids(model, tok) == [tok.eos_token_id]  # config and tokenizer agree: listed once
    old = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = [7]
        assert stop_token_ids(model, tok) == [7, tok.eos_token_id]
    finally:
        model.generation_config.eos_token_id = old


def test_row_seeds_are_distinct():
    seeds = {row_seed(s, i, k) for s in range(3) for i in range(50) for k in range(4)}
    assert len(seeds) == 3 * 50 * 4


def test_encode_prompts_chat_and_raw(tiny):
    _, tok = tiny
    chat = encode_prompts(tok, ["hi"])
    assert chat[0] == tok(tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                                  tokenize=False), add_special_tokens=False)["input_ids"]
    raw = encode_prompts(tok, ["hi"], use_chat_template=False)
    assert raw[0] == [tok.bos_token_id] + tok("hi", add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------- sample_with_logprobs
def test_eos_masking_and_padding_after_eos(tiny):
    model, tok = tiny
    e = tok.convert_tokens_to_ids("e")
    ids, att = _prompts(tok)
    g = _sample(model, tok, ids, att, list(range(len(PROMPTS))))
    N = g["tokens"].shape[1]
    assert g["ended"].any() and not g["ended"].all(), "the test needs rows that end and rows that do not"
    assert N == 12  # some row ran to max_new_tokens
    for b in range(len(PROMPTS)):
        row, m = g["tokens"][b].tolist(), g["mask"][b].tolist()
        if g["ended"][b]:
            first = row.index(e)
            assert m == [1] * (first + 1) + [0] * (N - first - 1)  # up to AND including the EOS
            assert row[first + 1:] == [tok.pad_token_id] * (N - first - 1)
            assert e not in row[:first]
        else:
            assert m == [1] * N and e not in row
        assert all(lp == 0.0 for lp, k in zip(g["logps"][b].tolist(), m) if not k)
        assert all(lp < 0.0 for lp, k in zip(g["logps"][b].tolist(), m) if k)


def test_logps_and_logits_match_a_teacher_forced_forward(tiny):
    """The cached, left-padded sampling loop gives the log-probs and logits of one forward over
    [prompt ; sample] (the training path)."""
    model, tok = tiny
    ids, att = _prompts(tok)
    g = _sample(model, tok, ids, att, list(range(len(PROMPTS))), return_logits=True)
    full_ids = torch.cat([ids, g["tokens"]], 1)
    full_att = torch.cat([att, g["mask"]], 1)
    resp = torch.cat([torch.zeros_like(att), g["mask"]], 1)
    with torch.no_grad():
        ref = response_outputs(model, full_ids, full_att, resp)
        lp_ref = label_logps(ref.logits, ref.labels) * ref.mask
    T = ref.logits.shape[1]
    torch.testing.assert_close(g["logps"][:, :T], lp_ref, atol=1e-4, rtol=0)
    m = g["mask"][:, :T].bool()
    torch.testing.assert_close(g["logits"][:, :T][m], ref.logits[m], atol=1e-4, rtol=0)


def test_each_row_depends_only_on_its_seed(tiny):
    """A row's sample is the same alone or in a batch (with other left padding), and changes
    with its seed."""
    model, tok = tiny
    ids, att = _prompts(tok)
    seeds = [row_seed(5, i) for i in range(len(PROMPTS))]
    batch = _sample(model, tok, ids, att, seeds)
    again = _sample(model, tok, ids, att, seeds)
    assert torch.equal(batch["tokens"], again["tokens"])
    for b in (0, 3):
        one_ids, one_att = _prompts(tok, [PROMPTS[b]])
        alone = _sample(model, tok, one_ids, one_att, [seeds[b]])
        n = int(alone["mask"][0].sum())
        assert int(batch["mask"][b].sum()) == n
        assert batch["tokens"][b, :n].tolist() == alone["tokens"][0, :n].tolist()
    other = _sample(model, tok, ids, att, [s + 1 for s in seeds])
    assert not torch.equal(batch["tokens"], other["tokens"])


def test_tiny_top_p_is_greedy(tiny):
    """With a nucleus of (almost) zero mass only the most likely token is left: every sampled
    token is the argmax of the model's logits at that step."""
    model, tok = tiny
    ids, att = _prompts(tok)
    g = _sample(model, tok, ids, att, [1, 2, 3, 4, 5], top_p=1e-9, return_logits=True)
    m = g["mask"].bool()
    assert torch.equal(g["tokens"][m], g["logits"].argmax(-1)[m])
    with pytest.raises(ValueError, match="top_p"):
        _sample(model, tok, ids, att, [1] * 5, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        _sample(model, tok, ids, att, [1] * 5, temperature=0.0)
    with pytest.raises(ValueError, match="seeds"):
        _sample(model, tok, ids, att, [1])


def test_generation_is_reproducible_across_batch_sizes(tiny):
    model, tok = tiny
    a = generate_texts(model, tok, PROMPTS, num_samples=2, max_new_tokens=8, seed=3, batch_size=10)
    b = generate_texts(model, tok, PROMPTS, num_samples=2, max_new_tokens=8, seed=3, batch_size=3)
    c = generate_texts(model, tok, PROMPTS, num_samples=2, max_new_tokens=8, seed=4, batch_size=10)
    assert [r["response"] for r in a] == [r["response"] for r in b]
    assert [r["response"] for r in a] != [r["response"] for r in c]
    assert [(r["prompt_index"], r["sample_index"]) for r in a] == [(i, s) for i in range(5) for s in range(2)]


def test_generate_texts_builds_no_autograd_graph(tiny):
    """make-prefs and eval sample through generate_texts from models whose weights require
    grad; with autograd on, every step's full-vocabulary tensors stayed alive in the graph
    (a 24 GiB machine ran out of memory in the frontier study's held-out make-prefs)."""
    model, tok = tiny
    assert any(p.requires_grad for p in model.parameters())
    seen = []
    hook = model.register_forward_hook(lambda m, i, o: seen.append((torch.is_grad_enabled(), o.logits.requires_grad)))
    try:
        generate_texts(model, tok, PROMPTS[:2], num_samples=2, max_new_tokens=4, seed=0)
    finally:
        hook.remove()
    assert seen and not any(grad or req for grad, req in seen)
    assert torch.is_grad_enabled()  # the caller's setting is restored


# ------------------------------------------------------------ sample_responses
def test_sample_responses_packs_a_training_batch(tiny):
    """On-policy packing: rows grouped per prompt, the response mask starts right after the
    prompt and stops at the first EOS (included), nothing after it is attended."""
    model, tok = tiny
    e = tok.convert_tokens_to_ids("e")
    ids, att = _prompts(tok, PROMPTS[:3])
    torch.manual_seed(1)  # a seed whose draws give both kinds of row (ended, cut)
    out = sample_responses(model, ids, att, max_new_tokens=10, num_samples=2, eos_token_id=e,
                           pad_token_id=tok.pad_token_id)
    Lp = ids.shape[1]
    assert out["input_ids"].shape[0] == 6
    assert torch.equal(out["input_ids"][:, :Lp], ids.repeat_interleave(2, dim=0))  # [p0 s0, p0 s1, p1 s0, ...]
    assert torch.equal(out["attention_mask"][:, :Lp], att.repeat_interleave(2, dim=0))
    assert not out["response_mask"][:, :Lp].any()
    gen, rmask = out["input_ids"][:, Lp:], out["response_mask"][:, Lp:]
    assert torch.equal(out["attention_mask"][:, Lp:], rmask)
    ended = 0
    for b in range(6):
        row, m = gen[b].tolist(), rmask[b].tolist()
        assert m[0] == 1  # never an empty response
        if e in row:
            ended += 1
            first = row.index(e)
            assert m == [1] * (first + 1) + [0] * (len(row) - first - 1)
            assert row[first + 1:] == [tok.pad_token_id] * (len(row) - first - 1)
        else:
            assert all(m)
    assert ended > 0
    with torch.no_grad():  # the packed batch is a valid input of the training forward
        res = response_outputs(model, out["input_ids"], out["attention_mask"], out["response_mask"])
    assert torch.equal(res.mask.sum(-1).long(), rmask.sum(-1))


def test_sample_responses_ignores_the_checkpoints_generation_config(tiny):
    """On-policy samples come from the model's own softmax: a repetition penalty, suppressed
    tokens, top_k and a no-repeat n-gram size in its generation_config change nothing. Greedy
    (do_sample=False) makes that exact: every sampled token is the argmax of a teacher-forced
    forward, repeats included, while HF generate under that config would avoid them."""
    model, tok = tiny
    ids, att = _prompts(tok, PROMPTS[:3])
    gc = model.generation_config
    saved = {k: getattr(gc, k, None) for k in ("repetition_penalty", "suppress_tokens", "top_k", "no_repeat_ngram_size")}
    try:
        gc.repetition_penalty, gc.no_repeat_ngram_size, gc.top_k = 50.0, 1, 2
        gc.suppress_tokens = [tok.convert_tokens_to_ids("e")]
        out = sample_responses(model, ids, att, max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
        with torch.no_grad():
            ref = response_outputs(model, out["input_ids"], out["attention_mask"], out["response_mask"])
        m = ref.mask.bool()
        assert torch.equal(ref.labels[m], ref.logits.argmax(-1)[m])
        repeats = sum(len(set(row[mk.bool()].tolist())) < int(mk.sum()) for row, mk in zip(ref.labels, ref.mask))
        assert repeats > 0, "the test needs a greedy sample that repeats a token"
        hf = model.generate(input_ids=ids, attention_mask=att, do_sample=False, max_new_tokens=10,
                            pad_token_id=tok.pad_token_id)
        assert not torch.equal(hf[:, ids.shape[1]:], out["input_ids"][:, ids.shape[1]:ids.shape[1] + hf.shape[1] - ids.shape[1]])
    finally:
        for k, v in saved.items():
            setattr(gc, k, v)


def _misfits(model, batch, steps: int, z: float = 5.0) -> list[str]:
    """Where a batch of samples of ONE prompt departs from the model's own softmax: at each of
    the first ``steps`` response positions, the count of every token against its expectation
    given each row's own prefix (the sum over live rows of ``p(v | prefix)``), off by more
    than ``z`` standard deviations (+1). Empty when the samples are draws from the model."""
    with torch.no_grad():
        r = response_outputs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    probs = torch.softmax(r.logits.float(), dim=-1)
    bad = []
    for t in range(steps):
        live = r.mask[:, t].bool()
        p = probs[live, t].double()  # (rows, V)
        seen = torch.bincount(r.labels[live, t], minlength=p.shape[-1]).double()
        want, sd = p.sum(0), (p * (1 - p)).sum(0).sqrt()
        for v in ((seen - want).abs() > z * sd + 1).nonzero().flatten().tolist():
            bad.append(f"step {t} token {v}: {int(seen[v])} drawn, {float(want[v]):.1f} +- {float(sd[v]):.1f} expected")
    return bad


def test_on_policy_samples_are_draws_from_the_models_softmax_whatever_its_generation_config(tiny_ws):
    """With do_sample (the on-policy path), a generation_config that suppresses the model's
    favourite first token, penalises repeats (x50, prompt tokens included), forbids repeated
    tokens, keeps the top 2 and sets temperature 0.1 changes nothing: 2000 samples of one prompt
    match the model's own softmax, token by token, at the first two response positions. The
    same check on HF generate under that config fails, so it would catch a sampler that used it."""
    from aligndistil.model.loading import load_causal_lm, load_tokenizer
    from aligndistil.model.sampling import response_mask_after_eos

    model, tok = load_causal_lm(tiny_ws["model"]), load_tokenizer(tiny_ws["model"])
    with torch.no_grad():  # a peaked softmax (the random head is near uniform): the favourite matters
        model.lm_head.weight.mul_(20.0)
    ids, att = _prompts(tok, PROMPTS[:1])
    with torch.no_grad():
        first = torch.softmax(model(input_ids=ids, attention_mask=att).logits[0, -1].float(), dim=-1)
    fav = int(first.argmax())
    assert first[fav] > 0.2, "the test needs a favourite token that suppressing it would visibly remove"
    gc = model.generation_config
    gc.suppress_tokens, gc.repetition_penalty, gc.no_repeat_ngram_size = [fav], 50.0, 1
    gc.top_k, gc.temperature, gc.do_sample = 2, 0.1, True
    n, steps, eos = 2000, 2, tok.eos_token_id
    torch.manual_seed(0)
    ours = sample_responses(model, ids, att, max_new_tokens=steps, num_samples=n, eos_token_id=eos,
                            pad_token_id=tok.pad_token_id)
    assert _misfits(model, ours, steps) == []


    def hf_generate(**settings):
        torch.manual_seed(0)
        gen = model.generate(input_ids=ids.repeat(n, 1), attention_mask=att.repeat(n, 1), do_sample=True,
                             temperature=1.0, top_p=1.0, max_new_tokens=steps, min_new_tokens=steps,
                             pad_token_id=tok.pad_token_id, **settings)[:, ids.shape[1]:]
        return pack_samples(ids.repeat(n, 1), att.repeat(n, 1), gen, response_mask_after_eos(gen, [eos]))

    assert any(m.startswith(f"step 0 token {fav}: 0 drawn") for m in _misfits(model, hf_generate(), steps))
    # The repetition penalty alone (prompt tokens penalised too) is caught as well.
    gc.suppress_tokens, gc.no_repeat_ngram_size, gc.top_k = None, 0, 0
    assert _misfits(model, hf_generate(), steps) != []


def test_sample_responses_follow_the_global_seed_and_report_eos(tiny):
    """Seeds come from torch's global generator (what a checkpoint saves): the same seed gives
    the same samples; ``ended`` says which rows emitted EOS."""
    model, tok = tiny
    e = tok.convert_tokens_to_ids("e")
    ids, att = _prompts(tok)
    torch.manual_seed(3)
    a = sample_responses(model, ids, att, max_new_tokens=8, eos_token_id=e, pad_token_id=tok.pad_token_id)
    torch.manual_seed(3)
    b = sample_responses(model, ids, att, max_new_tokens=8, eos_token_id=e, pad_token_id=tok.pad_token_id)
    assert all(torch.equal(a[k], b[k]) for k in a)
    last = a["input_ids"].gather(1, (a["response_mask"].cumsum(1).argmax(1, keepdim=True)))[:, 0]
    assert a["ended"].tolist() == (last == e).tolist()


def test_a_sharded_policy_samples_until_every_process_has_ended(tiny):
    """With ``all_done`` (FSDP, ZeRO-3: every forward is a collective) a process whose rows
    have all ended keeps stepping, with padding, until the others have ended too; its
    samples are the ones it would have drawn alone. Every token is EOS here, so this
    process's rows all end at the first token."""
    model, tok = tiny
    ids, att = _prompts(tok, PROMPTS[:2])
    every = list(range(model.config.vocab_size))
    alone = _sample(model, tok, ids, att, [1, 2], eos_token_ids=every)
    assert alone["tokens"].shape[1] == 1 and alone["ended"].all()
    asked = []

    def others_end_after_four(mine: bool) -> bool:  # the other process's rows end at its 4th token
        asked.append(mine)
        return mine and len(asked) >= 4

    synced = _sample(model, tok, ids, att, [1, 2], eos_token_ids=every, all_done=others_end_after_four)
    assert asked == [True] * 4  # asked once per step, this process done from the first
    assert synced["tokens"].shape[1] == 4
    assert torch.equal(synced["tokens"][:, :1], alone["tokens"])
    assert (synced["tokens"][:, 1:] == tok.pad_token_id).all()
    assert synced["mask"].tolist() == [[1, 0, 0, 0]] * 2
    assert torch.equal(synced["logps"][:, :1], alone["logps"]) and (synced["logps"][:, 1:] == 0).all()
