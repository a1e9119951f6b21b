"""aligndistil.data.records: loading files, detecting formats, validating records, reporting.

Everything is offline; the tokenizer (for the checks that go through ``build_dataset``) is
the in-memory character tokenizer of ``_toy_tokenizer``.
"""

from __future__ import annotations

import pytest

from _toy_tokenizer import enc, write_jsonl
from aligndistil.data import DataError, DataReport, build_dataset, detect_format, load_records, parse_record
from aligndistil.data.records import as_messages


def test_formats_detected_and_parsed(tmp_path):
    cases = {
        "pairs": {"prompt": "p", "chosen": "a", "rejected": "b"},
        "unpaired": {"prompt": "p", "completion": "a", "label": False},
        "prompt_completion": {"prompt": "p", "completion": "a"},
        "prompt": {"prompt": "p"},
    }
    for fmt, row in cases.items():
        recs = load_records(write_jsonl(tmp_path, [row, "", row], f"{fmt}.jsonl"))
        assert len(recs) == 2  # the blank line is skipped
        assert recs[1].where.endswith("line 3")
        assert detect_format(recs) == fmt
        ex = parse_record(recs[0], fmt)
        assert ex.prompt == "p" and not ex.is_chat
    ex = parse_record(load_records(write_jsonl(tmp_path, [cases["unpaired"]]))[0], "unpaired")
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
    for rec in load_records(write_jsonl(tmp_path, rows)):
        ex = parse_record(rec, "pairs")
        assert ex.is_chat and ex.prompt == [user]
        assert (ex.chosen, ex.rejected) == ("A", "B")



def test_malformed_json_names_file_and_line(tmp_path):
    p = write_jsonl(tmp_path, [{"prompt": "a"}, "", '{"prompt": "b",'])
    with pytest.raises(DataError, match=rf"{p.name}, line 3: invalid JSON"):
        load_records(p)
    p2 = write_jsonl(tmp_path, ["[1, 2]"], "arr.jsonl")
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
    p = write_jsonl(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "b"}, bad])
    with pytest.raises(DataError, match=msg):
        build_dataset(p, tok, "pairs", 64, 32)



def test_unpaired_errors_and_kind_mismatch(tmp_path, tok):
    p = write_jsonl(tmp_path, [{"prompt": "p", "completion": "a", "label": True},
                          {"prompt": "p", "completion": "  ", "label": True}])
    with pytest.raises(DataError, match="line 2: field 'completion' is empty"):
        build_dataset(p, tok, "unpaired", 64, 32)
    p = write_jsonl(tmp_path, [{"prompt": "p", "completion": "a", "label": 1}])
    with pytest.raises(DataError, match="line 1: field 'label' must be true or false"):
        build_dataset(p, tok, "unpaired", 64, 32)
    p = write_jsonl(tmp_path, [{"prompt": "p"}])
    with pytest.raises(DataError, match="'pairs' training needs pairs records"):
        build_dataset(p, tok, "pairs", 64, 32)



def test_load_from_disk(tmp_path, tok):
    import datasets

    rows = {"prompt": ["p1", "p2"], "chosen": ["a", "c"], "rejected": ["b", "d"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    feats, report = build_dataset(tmp_path / "ds", tok, "pairs", 64, 32)
    assert report.n_kept == 2
    assert feats[1]["prompt_ids"] == [tok.bos_token_id] + enc(tok, "p2")
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)}).save_to_disk(
        str(tmp_path / "dd"))
    recs = load_records(tmp_path / "dd", split="test")
    assert recs[1].data["chosen"] == "c" and recs[1].where.endswith("(split 'test'), index 1")
    with pytest.raises(DataError, match="split 'train' not found"):
        load_records(tmp_path / "dd")



def test_report_summary_defaults():
    r = DataReport(n_read=3, n_kept=3)
    assert r.summary().startswith("read 3 records, kept 3")


def test_as_messages():
    assert as_messages("hi") == [{"role": "user", "content": "hi"}]
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert as_messages(msgs) is msgs
