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



def test_load_from_disk(tmp_path, tok_nochat):
    tok = tok_nochat  # raw-text prompts: BOS + the prompt
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


# ---------------------------------------------------------------- issue 10: non-UTF-8 input
def test_non_utf8_line_is_named_by_file_and_line(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')  # Latin-1 e-acute on line 2
    with pytest.raises(DataError, match=r"latin1\.jsonl, line 2: not valid UTF-8 \(byte 16 of the line is 0xe9\)"):
        load_records(p)
    # A UTF-8 byte-order mark on line 1 is not an error.
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n')
    assert load_records(bom)[0].data == {"prompt": "a"}


# ---------------------------------------------------------------- issue 16 item 8: hub datasets
@pytest.fixture()
def data_folder(tmp_path, monkeypatch):
    """A local dataset repository as on the hub: JSONL files and a README declaring two configs."""
    import json

    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    root = tmp_path / "my-prefs"
    for config, n in (("small", 1), ("big", 3)):
        (root / config).mkdir(parents=True)
        for split in ("train", "test"):
            (root / config / f"{split}.jsonl").write_text("".join(
                json.dumps({"prompt": f"{config} {split} {i}", "chosen": "a", "rejected": "b"}) + "\n"
                for i in range(n)))
    lines = ["---", "configs:"]
    for config in ("small", "big"):
        lines += [f"- config_name: {config}", "  data_files:"]
        lines += [f"  - split: {s}\n    path: {config}/{s}.jsonl" for s in ("train", "test")]
    (root / "README.md").write_text("\n".join(lines + ["---", ""]))
    return root


def test_dataset_id_config_and_split_through_load_dataset(data_folder, tok):
    """hub:ID goes through datasets.load_dataset(ID, config, split=split); a local repository
    stands in for the hub (the same call resolves a local folder first)."""
    recs = load_records(f"hub:{data_folder}", split="test", config="big")
    assert [r.data["prompt"] for r in recs] == ["big test 0", "big test 1", "big test 2"]
    assert recs[2].where == f"hub:{data_folder} (config 'big', split 'test'), index 2"
    # A local folder that is not a save_to_disk dataset is read by load_dataset too.
    feats, report = build_dataset(data_folder, tok, "pairs", 64, 32, split="train", config="small")
    assert report.n_read == report.n_kept == 1
    with pytest.raises(DataError, match=r"split 'dev'.*Unknown split"):
        load_records(f"hub:{data_folder}", split="dev", config="big")
    with pytest.raises(DataError, match=r"'nope' not found"):
        load_records(str(data_folder), config="nope")


def test_offline_hub_id_says_save_to_disk_is_the_route(monkeypatch, tmp_path):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    with pytest.raises(DataError) as info:
        load_records("hub:no-such-org/no-such-dataset")
    msg = str(info.value)
    assert msg.startswith("hub:no-such-org/no-such-dataset: cannot load it with datasets.load_dataset")
    assert "the hub is offline" in msg and ".save_to_disk(FOLDER)" in msg and "local JSONL" in msg
    # A missing local file says how a hub dataset is written.
    with pytest.raises(FileNotFoundError, match="hub:ORG/NAME"):
        load_records(tmp_path / "org" / "name.jsonl")


def test_config_accepts_a_hub_dataset(tmp_path):
    from aligndistil.config import RunConfig, apply_overrides, check_paths

    cfg = apply_overrides(RunConfig(), ["data.train_file=hub:org/prefs", "data.dataset_config=default",
                                        "data.split=train_prefs"])
    check_paths(cfg)  # not refused as a missing local path
    assert cfg.data.dataset_config == "default"
    base = RunConfig().fingerprint()
    assert apply_overrides(RunConfig(), ["data.dataset_config=null"]).fingerprint() == base  # unchanged at its default


def test_training_reads_a_hub_dataset_with_its_config(data_folder, tiny_ws, tmp_path):
    """data.train_file=hub:ID with data.dataset_config and data.split reaches load_dataset from a run."""
    import json

    from aligndistil.config import RunConfig, apply_overrides
    from aligndistil.train.loop import Trainer

    cfg = apply_overrides(RunConfig(), [
        f"model.policy={tiny_ws['model']}", f"data.train_file=hub:{data_folder}", "data.dataset_config=big",
        "data.split=test", "data.max_length=64", "data.max_prompt_length=48", f"train.output_dir={tmp_path / 'out'}",
        "train.max_steps=1", "train.per_device_batch_size=3", "train.progress_bar=false", "method.name=sft"])
    out = Trainer(cfg).train()
    assert json.loads((out / "COMPLETE.json").read_text())["data"]["n_read"] == 3  # big/test has 3 records
