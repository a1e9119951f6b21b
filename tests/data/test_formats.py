"""Tests for aligndistil.data: loading, formats, tokenisation, truncation, collation.

Everything is offline: the tokenizer is a character-level BPE (no merges) built in
memory, with BOS/EOS/PAD and a tiny Jinja chat template.
"""

from __future__ import annotations

import doctest
import json
import string

import pytest
import torch

from aligndistil.data import formats as data
from aligndistil.data import (
    DataError,
    DataReport,
    PreferenceCollator,
    build_dataset,
    detect_format,
    load_records,
    parse_record,
)
from aligndistil.model.outputs import response_positions

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


def _make_tokenizer(chat: bool = True, bos: bool = True, adds_bos: bool = False):
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for c in string.printable:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(SPECIALS)
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
        )
    kwargs = {"bos_token": "<s>"} if bos else {}
    t = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", **kwargs
    )
    if chat:
        t.chat_template = CHAT_TEMPLATE
    return t


@pytest.fixture(scope="module")
def tok():
    return _make_tokenizer()


@pytest.fixture(scope="module")
def tok_nochat():
    return _make_tokenizer(chat=False)


def _enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def _write(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


# ------------------------------------------------------------------ loading / formats


def test_formats_detected_and_parsed(tmp_path):
    cases = {
        "pairs": {"prompt": "p", "chosen": "a", "rejected": "b"},
        "unpaired": {"prompt": "p", "completion": "a", "label": False},
        "prompt_completion": {"prompt": "p", "completion": "a"},
        "prompt": {"prompt": "p"},
    }
    for fmt, row in cases.items():
        recs = load_records(_write(tmp_path, [row, "", row], f"{fmt}.jsonl"))
        assert len(recs) == 2  # the blank line is skipped
        assert recs[1].where.endswith("line 3")
        assert detect_format(recs) == fmt
        ex = parse_record(recs[0], fmt)
        assert ex.prompt == "p" and not ex.is_chat
    ex = parse_record(load_records(_write(tmp_path, [cases["unpaired"]]))[0], "unpaired")
    assert ex.completion == "a" and ex.label is False


def test_chat_pair_forms(tmp_path):
    user = {"role": "user", "content": "hi"}
    rows = [
        # prompt messages + assistant message lists
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "A"}],
         "rejected": "B"},
        # implicit prompt: full conversations sharing the prompt
        {"chosen": [user, {"role": "assistant", "content": "A"}],
         "rejected": [user, {"role": "assistant", "content": "B"}]},
        # string prompt + full conversations (UltraFeedback style)
        {"prompt": "hi", "chosen": [user, {"role": "assistant", "content": "A"}],
         "rejected": [user, {"role": "assistant", "content": "B"}]},
    ]
    for rec in load_records(_write(tmp_path, rows)):
        ex = parse_record(rec, "pairs")
        assert ex.is_chat and ex.prompt == [user]
        assert (ex.chosen, ex.rejected) == ("A", "B")


def test_malformed_json_names_file_and_line(tmp_path):
    p = _write(tmp_path, [{"prompt": "a"}, "", '{"prompt": "b",'])
    with pytest.raises(DataError, match=rf"{p.name}, line 3: invalid JSON"):
        load_records(p)
    p2 = _write(tmp_path, ["[1, 2]"], "arr.jsonl")
    with pytest.raises(DataError, match="line 1: expected a JSON object"):
        load_records(p2)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_records(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    "bad,msg",
    [
        ({"prompt": "p", "chosen": "a"}, r"line 2: field 'rejected' is missing"),
        ({"prompt": "p", "chosen": "", "rejected": "b"}, r"line 2: field 'chosen' is empty"),
        ({"chosen": "a", "rejected": "b"}, r"line 2: field 'prompt' is missing"),
        ({"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
         r"line 2: field 'chosen' must end with an assistant message"),
    ],
)
def test_record_errors_name_line_and_field(tmp_path, tok, bad, msg):
    p = _write(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "b"}, bad])
    with pytest.raises(DataError, match=msg):
        build_dataset(p, tok, "pairs", 64, 32)


def test_unpaired_errors_and_kind_mismatch(tmp_path, tok):
    p = _write(tmp_path, [{"prompt": "p", "completion": "a", "label": True},
                          {"prompt": "p", "completion": "  ", "label": True}])
    with pytest.raises(DataError, match="line 2: field 'completion' is empty"):
        build_dataset(p, tok, "unpaired", 64, 32)
    p = _write(tmp_path, [{"prompt": "p", "completion": "a", "label": 1}])
    with pytest.raises(DataError, match="line 1: field 'label' must be true or false"):
        build_dataset(p, tok, "unpaired", 64, 32)
    p = _write(tmp_path, [{"prompt": "p"}])
    with pytest.raises(DataError, match="'pairs' training needs pairs records"):
        build_dataset(p, tok, "pairs", 64, 32)


def test_identical_pair_skipped_and_counted(tmp_path, tok):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": "same", "rejected": "same"}]
    feats, report = build_dataset(_write(tmp_path, rows), tok, "pairs", 64, 32)
    assert len(feats) == 1
    assert (report.n_read, report.n_kept, report.n_skipped_identical) == (2, 1, 1)
    assert "1 identical" in report.summary()


def test_load_from_disk(tmp_path, tok):
    import datasets

    rows = {"prompt": ["p1", "p2"], "chosen": ["a", "c"], "rejected": ["b", "d"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    feats, report = build_dataset(tmp_path / "ds", tok, "pairs", 64, 32)
    assert report.n_kept == 2
    assert feats[1]["prompt_ids"] == [tok.bos_token_id] + _enc(tok, "p2")
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)}).save_to_disk(
        str(tmp_path / "dd"))
    recs = load_records(tmp_path / "dd", split="test")
    assert recs[1].data["chosen"] == "c" and recs[1].where.endswith("(split 'test'), index 1")
    with pytest.raises(DataError, match="split 'train' not found"):
        load_records(tmp_path / "dd")


# ------------------------------------------------------------------------ tokenising


def test_plain_strings_bos_and_eos(tmp_path, tok):
    feats, _ = build_dataset(
        _write(tmp_path, [{"prompt": "Q: x\nA:", "completion": " yes"}]), tok, "sft", 64, 32)
    f = feats[0]
    assert f["prompt_ids"] == [tok.bos_token_id] + _enc(tok, "Q: x\nA:")
    assert f["completion_ids"] == _enc(tok, " yes") + [tok.eos_token_id]
    # A tokenizer that adds BOS itself still gets exactly one BOS.
    tok_b = _make_tokenizer(adds_bos=True)
    assert tok_b.encode("a")[0] == tok_b.bos_token_id
    feats, _ = build_dataset(
        _write(tmp_path, [{"prompt": "Q", "completion": "y"}]), tok_b, "sft", 64, 32)
    assert feats[0]["prompt_ids"] == [tok_b.bos_token_id] + _enc(tok_b, "Q")
    # No BOS and an empty prompt: no position would predict the first response token.
    tok_nb = _make_tokenizer(bos=False)
    with pytest.raises(DataError, match="line 1: the prompt tokenises to no tokens"):
        build_dataset(_write(tmp_path, [{"prompt": "", "completion": "y"}]),
                      tok_nb, "sft", 64, 32)


def test_chat_template_applied(tmp_path, tok):
    rows = [{"prompt": [{"role": "user", "content": "hi"}],
             "chosen": [{"role": "assistant", "content": "yo"}], "rejected": "no"}]
    feats, _ = build_dataset(_write(tmp_path, rows), tok, "pairs", 64, 32)
    f = feats[0]
    assert f["prompt_ids"] == _enc(tok, "<|user|>\nhi<|end|>\n<|assistant|>\n")
    header = _enc(tok, "<|assistant|>\n")
    assert f["prompt_ids"][-len(header):] == header
    assert f["chosen_ids"] == _enc(tok, "yo") + [tok.eos_token_id]
    assert f["rejected_ids"][-1] == tok.eos_token_id
    # use_chat_template=True wraps a string prompt as one user message.
    feats, _ = build_dataset(_write(tmp_path, [{"prompt": "hi"}]), tok, "prompt", None, None,
                             use_chat_template=True)
    assert feats[0]["prompt_ids"] == f["prompt_ids"]


def test_chat_data_without_template_errors(tmp_path, tok, tok_nochat):
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "completion": "yo"}]
    with pytest.raises(ValueError, match="has no chat_template"):
        build_dataset(_write(tmp_path, rows), tok_nochat, "sft", 64, 32)
    with pytest.raises(DataError, match="use_chat_template=False"):
        build_dataset(_write(tmp_path, rows), tok, "sft", 64, 32, use_chat_template=False)


def test_truncation_keeps_prompt_end_and_counts(tmp_path, tok):
    rows = [
        {"prompt": "abcdefghij", "chosen": "0123456789", "rejected": "xy"},  # both cut
        {"prompt": "abc", "chosen": "k", "rejected": "l"},  # nothing cut
    ]
    feats, report = build_dataset(_write(tmp_path, rows), tok, "pairs", 8, 5)
    f = feats[0]
    # BOS kept, then the END of the prompt.
    assert f["prompt_ids"] == [tok.bos_token_id] + _enc(tok, "ghij")
    assert f["chosen_ids"] == _enc(tok, "012")  # right-truncated: EOS is lost
    assert f["rejected_ids"] == _enc(tok, "xy") + [tok.eos_token_id]
    assert feats[1]["prompt_ids"] == [tok.bos_token_id] + _enc(tok, "abc")
    assert (report.n_prompt_truncated, report.n_response_truncated) == (1, 1)
    # Without max_prompt_length a prompt filling max_length leaves no response: skipped.
    feats, report = build_dataset(_write(tmp_path, rows), tok, "pairs", 8, None)
    assert report.n_skipped_too_long == 1 and report.n_kept == 1
    with pytest.raises(ValueError, match="must be smaller than max_length"):
        build_dataset(_write(tmp_path, rows), tok, "pairs", 8, 8)


# ------------------------------------------------------------------------- collating


DOC_FEATURES = [
    {"prompt_ids": [1, 5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 2]},
    {"prompt_ids": [1, 5], "chosen_ids": [10, 11, 12, 2], "rejected_ids": [13, 2]},
]


def test_collator_docstring_example_runs():
    finder = doctest.DocTestFinder()
    tests = finder.find(PreferenceCollator, "PreferenceCollator", globs=vars(data).copy())
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    n = 0
    for t in tests:
        n += len(t.examples)
        runner.run(t)
    assert n > 0 and runner.failures == 0


def test_collator_pairs_exact_tensors():
    batch = PreferenceCollator(pad_token_id=0, kind="pairs")(DOC_FEATURES)
    expected = {
        "chosen_input_ids": [[1, 5, 6, 7, 2, 0], [1, 5, 10, 11, 12, 2]],
        "chosen_attention_mask": [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]],
        "chosen_response_mask": [[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1]],
        "rejected_input_ids": [[1, 5, 6, 8, 9, 2], [1, 5, 13, 2, 0, 0]],
        "rejected_attention_mask": [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]],
        "rejected_response_mask": [[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]],
        "prompt_input_ids": [[1, 5, 6], [0, 1, 5]],
        "prompt_attention_mask": [[1, 1, 1], [0, 1, 1]],
    }
    assert list(batch) == list(expected)
    for k, v in expected.items():
        assert batch[k].dtype == torch.long
        assert torch.equal(batch[k], torch.tensor(v)), k


def test_collator_sft_unpaired_prompt_kinds():
    feats = [{"prompt_ids": [1, 4], "completion_ids": [5, 2], "label": True},
             {"prompt_ids": [1, 4, 6, 7], "completion_ids": [2], "label": False}]
    # pad == eos (2): masks must come from lengths, not from id comparison.
    b = PreferenceCollator(pad_token_id=2, kind="unpaired")(feats)
    assert list(b) == ["input_ids", "attention_mask", "response_mask",
                       "prompt_input_ids", "prompt_attention_mask", "label"]
    assert b["input_ids"].tolist() == [[1, 4, 5, 2, 2], [1, 4, 6, 7, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert b["response_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]
    assert b["prompt_input_ids"].tolist() == [[2, 2, 1, 4], [1, 4, 6, 7]]
    assert b["prompt_attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert b["label"].dtype == torch.bool and b["label"].tolist() == [True, False]
    s = PreferenceCollator(pad_token_id=0, kind="sft")(feats)
    assert "label" not in s and torch.equal(s["response_mask"], b["response_mask"])
    p = PreferenceCollator(pad_token_id=0, kind="prompt")(feats)
    assert list(p) == ["prompt_input_ids", "prompt_attention_mask"]
    assert p["prompt_input_ids"].tolist() == [[0, 0, 1, 4], [1, 4, 6, 7]]
    with pytest.raises(ValueError, match="pad_token_id must be an int"):
        PreferenceCollator(pad_token_id=None, kind="sft")
    with pytest.raises(ValueError, match="feature 0 has no 'chosen_ids'"):
        PreferenceCollator(0, "pairs")([{"prompt_ids": [1], "chosen_ids": []}])


def test_end_to_end_shift_matches_response_ids(tmp_path, tok):
    rows = [
        {"prompt": "hello", "chosen": " world", "rejected": " there!"},
        {"prompt": [{"role": "user", "content": "q"}], "chosen": "long answer here",
         "rejected": "no"},
        {"prompt": "a much longer prompt than the others", "chosen": "z", "rejected": "zz"},
    ]
    feats, report = build_dataset(_write(tmp_path, rows), tok, "pairs", 40, 20)
    assert report.n_kept == 3
    batch = PreferenceCollator(tok.pad_token_id, "pairs")(feats)
    for side in ("chosen", "rejected"):
        _, labels, mask = response_positions(
            batch[f"{side}_input_ids"], batch[f"{side}_response_mask"])
        for b, f in enumerate(feats):
            n = int(mask[b].sum())
            assert labels[b, :n].tolist() == f[f"{side}_ids"]
    # A DataLoader over the plain list with the collator works as the trainer uses it.
    loader = torch.utils.data.DataLoader(
        feats, batch_size=2, collate_fn=PreferenceCollator(tok.pad_token_id, "pairs"))
    assert next(iter(loader))["chosen_input_ids"].shape[0] == 2


def test_report_summary_defaults():
    r = DataReport(n_read=3, n_kept=3)
    assert r.summary().startswith("read 3 records, kept 3")
