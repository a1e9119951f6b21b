"""aligndistil.data.collate: the padding helpers and PreferenceCollator (its doctest runs here)."""

from __future__ import annotations

import doctest

import pytest
import torch

from _toy_tokenizer import write_jsonl
from aligndistil.data import PreferenceCollator, build_dataset
from aligndistil.data import collate
from aligndistil.data.collate import pad_right, pad_with_mask
from aligndistil.model.outputs import response_positions

DOC_FEATURES = [
    {"prompt_ids": [1, 5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 2]},
    {"prompt_ids": [1, 5], "chosen_ids": [10, 11, 12, 2], "rejected_ids": [13, 2]},
]


# ------------------------------------------------------------------------------ padding
def test_pad_with_mask_right_and_left():
    seqs = [[7, 8, 9], [5]]
    ids, mask = pad_with_mask(seqs, 0, side="right")
    assert ids.tolist() == [[7, 8, 9], [5, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
    ids, mask = pad_with_mask(seqs, 0, side="left")
    assert ids.tolist() == [[7, 8, 9], [0, 0, 5]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    # The mask comes from the lengths: a real token equal to the pad id is still attended.
    ids, mask = pad_with_mask([[2, 2], [2]], 2, side="left")
    assert ids.tolist() == [[2, 2], [2, 2]] and mask.tolist() == [[1, 1], [0, 1]]
    # A fixed width wider than the longest sequence.
    ids, mask = pad_with_mask([[1], [1, 2]], 9, side="right", length=4)
    assert ids.tolist() == [[1, 9, 9, 9], [1, 2, 9, 9]] and mask.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0]]
    with pytest.raises(ValueError, match="side"):
        pad_with_mask(seqs, 0, side="middle")
    with pytest.raises(ValueError, match="no sequences"):
        pad_with_mask([], 0)


def test_pad_right_keeps_tensor_dtype_and_length():
    seqs = [torch.tensor([3, 4], dtype=torch.int32), torch.tensor([5], dtype=torch.int32)]
    out = pad_right(seqs, -1)
    assert out.dtype == torch.int32 and out.tolist() == [[3, 4], [5, -1]]
    assert pad_right(seqs, 0, 3).tolist() == [[3, 4, 0], [5, 0, 0]]
    floats = pad_right([torch.ones(1), torch.ones(3)], 0)
    assert floats.dtype == torch.float32 and floats.tolist() == [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]


# ---------------------------------------------------------------------------- collating
def test_collator_docstring_example_runs():
    finder = doctest.DocTestFinder()
    tests = finder.find(PreferenceCollator, "PreferenceCollator", globs=vars(collate).copy())
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
    feats, report = build_dataset(write_jsonl(tmp_path, rows), tok, "pairs", 40, 20)
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
