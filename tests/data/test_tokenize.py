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



def test_plain_strings_bos_and_eos(tmp_path, tok):
    feats, _ = build_dataset(
        write_jsonl(tmp_path, [{"prompt": "Q: x\nA:", "completion": " yes"}]), tok, "sft", 64, 32)
    f = feats[0]
    assert f["prompt_ids"] == [tok.bos_token_id] + enc(tok, "Q: x\nA:")
    assert f["completion_ids"] == enc(tok, " yes") + [tok.eos_token_id]
    # A tokenizer that adds BOS itself still gets exactly one BOS.
    tok_b = make_tokenizer(adds_bos=True)
    assert tok_b.encode("a")[0] == tok_b.bos_token_id
    feats, _ = build_dataset(
        write_jsonl(tmp_path, [{"prompt": "Q", "completion": "y"}]), tok_b, "sft", 64, 32)
    assert feats[0]["prompt_ids"] == [tok_b.bos_token_id] + enc(tok_b, "Q")
    # No BOS and an empty prompt: no position would predict the first response token.
    tok_nb = make_tokenizer(bos=False)
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



def test_truncation_keeps_prompt_end_and_counts(tmp_path, tok):
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
