"""aligndistil.data.tokenize: prompt rendering, BOS/EOS placement, truncation, build_dataset counts.

Everything is offline: the tokenizer is the in-memory character tokenizer of
``_toy_tokenizer``, so every expected id list can be read off the text.
"""

from __future__ import annotations

import pytest

from _toy_tokenizer import enc, make_tokenizer, write_jsonl
from aligndistil.data import DataError, build_dataset


def test_identical_pair_skipped_and_counted(tmp_path, tok):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": "same", "rejected": "same"}]
    feats, report = build_dataset(write_jsonl(tmp_path, rows), tok, "pairs", 64, 32)
    assert len(feats) == 1
    assert (report.n_read, report.n_kept, report.n_skipped_identical) == (2, 1, 1)
    assert "1 identical" in report.summary()



def test_plain_strings_bos_and_eos(tmp_path, tok_nochat):
    tok = tok_nochat  # no chat template: string prompts are raw text after BOS
    feats, _ = build_dataset(
        write_jsonl(tmp_path, [{"prompt": "Q: x\nA:", "completion": " yes"}]), tok, "sft", 64, 32)
    f = feats[0]
    assert f["prompt_ids"] == [tok.bos_token_id] + enc(tok, "Q: x\nA:")
    assert f["completion_ids"] == enc(tok, " yes") + [tok.eos_token_id]
    # A tokenizer that adds BOS itself still gets exactly one BOS.
    tok_b = make_tokenizer(chat=False, adds_bos=True)
    assert tok_b.encode("a")[0] == tok_b.bos_token_id
    feats, _ = build_dataset(
        write_jsonl(tmp_path, [{"prompt": "Q", "completion": "y"}]), tok_b, "sft", 64, 32)
    assert feats[0]["prompt_ids"] == [tok_b.bos_token_id] + enc(tok_b, "Q")
    # No BOS and an empty prompt: no position would predict the first response token.
    tok_nb = make_tokenizer(chat=False, bos=False)
    with pytest.raises(DataError, match="line 1: the prompt tokenises to no tokens"):
        build_dataset(write_jsonl(tmp_path, [{"prompt": "", "completion": "y"}]),
                      tok_nb, "sft", 64, 32)



def test_chat_template_applied(tmp_path, tok):
    rows = [{"prompt": [{"role": "user", "content": "hi"}],
             "chosen": [{"role": "assistant", "content": "yo"}], "rejected": "no"}]
    feats, _ = build_dataset(write_jsonl(tmp_path, rows), tok, "pairs", 64, 32)
    f = feats[0]
    assert f["prompt_ids"] == enc(tok, "<|user|>\nhi<|end|>\n<|assistant|>\n")
    header = enc(tok, "<|assistant|>\n")
    assert f["prompt_ids"][-len(header):] == header
    assert f["chosen_ids"] == enc(tok, "yo") + [tok.eos_token_id]
    assert f["rejected_ids"][-1] == tok.eos_token_id
    # use_chat_template=True wraps a string prompt as one user message.
    feats, _ = build_dataset(write_jsonl(tmp_path, [{"prompt": "hi"}]), tok, "prompt", None, None,
                             use_chat_template=True)
    assert feats[0]["prompt_ids"] == f["prompt_ids"]



def test_chat_data_without_template_errors(tmp_path, tok, tok_nochat):
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "completion": "yo"}]
    with pytest.raises(ValueError, match="has no chat_template"):
        build_dataset(write_jsonl(tmp_path, rows), tok_nochat, "sft", 64, 32)
    with pytest.raises(DataError, match="use_chat_template=False"):
        build_dataset(write_jsonl(tmp_path, rows), tok, "sft", 64, 32, use_chat_template=False)



def test_truncation_keeps_prompt_end_and_counts(tmp_path, tok_nochat):
    tok = tok_nochat  # raw-text prompts: cut from the left, BOS kept
    rows = [
        {"prompt": "abcdefghij", "chosen": "0123456789", "rejected": "xy"},  # both cut
        {"prompt": "abc", "chosen": "k", "rejected": "l"},  # nothing cut
    ]
    feats, report = build_dataset(write_jsonl(tmp_path, rows), tok, "pairs", 8, 5)
    f = feats[0]
    # BOS kept, then the END of the prompt.
    assert f["prompt_ids"] == [tok.bos_token_id] + enc(tok, "ghij")
    assert f["chosen_ids"] == enc(tok, "012")  # right-truncated: EOS is lost
    assert f["rejected_ids"] == enc(tok, "xy") + [tok.eos_token_id]
    assert feats[1]["prompt_ids"] == [tok.bos_token_id] + enc(tok, "abc")
    assert (report.n_prompt_truncated, report.n_response_truncated) == (1, 1)
    # Without max_prompt_length a prompt filling max_length leaves no response: skipped.
    feats, report = build_dataset(write_jsonl(tmp_path, rows), tok, "pairs", 8, None)
    assert report.n_skipped_too_long == 1 and report.n_kept == 1
    with pytest.raises(ValueError, match="must be smaller than max_length"):
        build_dataset(write_jsonl(tmp_path, rows), tok, "pairs", 8, 8)


# ---------------------------------------------------------------- issue 16 item 5: one chat rule
def test_one_chat_template_rule_auto_always_never(tmp_path, tok, tok_nochat):
    """use_chat_template=None (auto) renders a STRING prompt with the template whenever the
    tokenizer has one (as eval does), and says so in the report; False, or no template, is raw
    text after BOS."""
    from aligndistil.data import resolve_chat_template

    p = write_jsonl(tmp_path, [{"prompt": "hi", "chosen": "a", "rejected": "b"}])
    feats, report = build_dataset(p, tok, "pairs", 64, 32)
    assert feats[0]["prompt_ids"] == enc(tok, "<|user|>\nhi<|end|>\n<|assistant|>\n")
    assert "chat template applied to every prompt (use_chat_template=auto" in report.summary()
    for t, setting in ((tok_nochat, None), (tok, False)):
        feats, report = build_dataset(p, t, "pairs", 64, 32, use_chat_template=setting)
        assert feats[0]["prompt_ids"] == [t.bos_token_id] + enc(t, "hi")
        assert report.chat_template.startswith("no chat template")
    assert resolve_chat_template(tok, None) is True and resolve_chat_template(tok_nochat, None) is False
    assert resolve_chat_template(tok_nochat, True) is True and resolve_chat_template(tok, False) is False
    with pytest.raises(ValueError, match="has no chat_template"):  # always, without a template
        build_dataset(p, tok_nochat, "pairs", 64, 32, use_chat_template=True)


def test_long_chat_prompt_is_cut_inside_the_user_message(tmp_path, tok):
    """A chat prompt over max_prompt_length loses the START of its last user message; the
    system message, role headers and assistant header stay whole. Counted by kind."""
    head = "<|system|>\nBe kind.<|end|>\n<|user|>\n"  # 1 + 1 + 8 + 1 + 1 + 1 + 1 = 14 tokens
    tail = "<|end|>\n<|assistant|>\n"  # 4 tokens
    assert (len(enc(tok, head)), len(enc(tok, tail))) == (14, 4)
    long_system = {"role": "system", "content": "x" * 30}  # its framing alone is 36 > 22 tokens
    rows = [
        {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "abcdefghij"}],
         "chosen": "yes", "rejected": "no"},
        {"prompt": "0123456789abcdefghijklmnop", "chosen": "yes", "rejected": "no"},  # a string: templated too
        {"prompt": [long_system, {"role": "user", "content": "hello"}], "chosen": "yes", "rejected": "no"},
        {"prompt": "short", "chosen": "yes", "rejected": "no"},  # 2 + 5 + 4 = 11 tokens: not cut
    ]
    feats, report = build_dataset(write_jsonl(tmp_path, rows), tok, "pairs", 40, 22)
    # 22 - 14 - 4 = 4 content tokens kept: the END of the user message.
    assert feats[0]["prompt_ids"] == enc(tok, head) + enc(tok, "ghij") + enc(tok, tail)
    # "<|user|>\n" is 2 tokens: 22 - 2 - 4 = 16 content tokens, the last 16 of 26 characters.
    assert feats[1]["prompt_ids"] == enc(tok, "<|user|>\n") + enc(tok, "abcdefghijklmnop") + enc(tok, tail)
    # The framing does not fit: cut from the left of the whole prompt (no BOS in this template).
    full = enc(tok, f"<|system|>\n{'x' * 30}<|end|>\n<|user|>\nhello<|end|>\n<|assistant|>\n")
    assert feats[2]["prompt_ids"] == full[-22:]
    assert feats[3]["prompt_ids"] == enc(tok, "<|user|>\nshort<|end|>\n<|assistant|>\n")
    assert (report.n_prompt_truncated, report.n_prompt_truncated_in_content) == (3, 2)
    assert ("truncated 3 prompts (2 inside the last user message, keeping the chat template's framing; "
            "1 from the left, keeping BOS)") in report.summary()


# ---------------------------------------------------------------- issue 16 item 11: KTO on pairs
def test_kto_takes_preference_pairs_one_desirable_one_undesirable(tmp_path, tok_nochat):
    tok = tok_nochat
    bos, eos = tok.bos_token_id, tok.eos_token_id
    rows = [{"prompt": "p1", "chosen": "good", "rejected": "bad"},
            {"prompt": "p2", "chosen": "same", "rejected": "same"},  # no preference: skipped
            {"prompt": "p3", "chosen": "yes", "rejected": "no"}]
    feats, report = build_dataset(write_jsonl(tmp_path, rows), tok, "unpaired", 64, 32)
    got = [(f["prompt_ids"], f["completion_ids"], f["label"]) for f in feats]
    assert got == [
        ([bos] + enc(tok, "p1"), enc(tok, "good") + [eos], True),
        ([bos] + enc(tok, "p1"), enc(tok, "bad") + [eos], False),
        ([bos] + enc(tok, "p3"), enc(tok, "yes") + [eos], True),
        ([bos] + enc(tok, "p3"), enc(tok, "no") + [eos], False),
    ]
    r = report
    assert (r.n_read, r.n_unpaired, r.n_kept, r.n_skipped_identical, r.n_desirable, r.n_undesirable) == (3, 2, 4, 1, 2, 2)
    assert r.n_read + r.n_unpaired == r.n_kept + r.n_skipped_identical + r.n_skipped_too_long
    assert ("unpaired 2 preference pairs into one desirable (chosen) and one undesirable (rejected) "
            "example each; 2 desirable and 2 undesirable examples") in r.summary()
    # Unpaired records are still read as they are, and counted by label.
    p = write_jsonl(tmp_path, [{"prompt": "p", "completion": "a", "label": True},
                               {"prompt": "p", "completion": "b", "label": False},
                               {"prompt": "q", "completion": "c", "label": False}], "kto.jsonl")
    feats, r = build_dataset(p, tok, "unpaired", 64, 32)
    assert [f["label"] for f in feats] == [True, False, False]
    assert (r.n_unpaired, r.n_desirable, r.n_undesirable) == (0, 1, 2)


def test_kto_trains_on_preference_pairs(tiny_ws, tmp_path):
    """The KTO method runs on the pairs file the other methods train on (2 steps, tiny model)."""
    import json

    from aligndistil.config import RunConfig, apply_overrides
    from aligndistil.train.loop import Trainer

    cfg = apply_overrides(RunConfig(), [
        f"model.policy={tiny_ws['model']}", f"data.train_file={tiny_ws['prefs']}", "data.max_length=64",
        "data.max_prompt_length=48", f"train.output_dir={tmp_path / 'kto'}", "train.max_steps=2",
        "train.per_device_batch_size=4", "train.progress_bar=false", "method.name=kto"])
    out = Trainer(cfg).train()
    done = json.loads((out / "COMPLETE.json").read_text())
    n_pairs = sum(1 for line in open(tiny_ws["prefs"]) if line.strip())
    assert done["data"]["n_unpaired"] == n_pairs - done["data"]["n_skipped_identical"]
    assert done["data"]["n_desirable"] == done["data"]["n_undesirable"] == done["data"]["n_unpaired"]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# ---------------------------------------------------------------- issue 10: empty datasets
def test_empty_dataset_names_the_file(tmp_path, tok):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: the dataset has no records"):
        build_dataset(empty, tok, "pairs", 64, 32)
    p = write_jsonl(tmp_path, [{"prompt": "p", "chosen": "same", "rejected": "same"}], "same.jsonl")
    with pytest.raises(DataError, match=r"same\.jsonl: no usable records left \(read 1 records, kept 0; "
                                        r"skipped 1 identical"):
        build_dataset(p, tok, "pairs", 64, 32)
