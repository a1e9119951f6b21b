"""A tiny random model, tokenizer and preference set, built offline in a second.

Tests, the test-sized demo and the ``tiny`` configs need a causal LM and data without any
download. This module builds a 2-layer Llama with a character-level tokenizer (so any
text round-trips) and a chat template, and writes a small synthetic preference set whose
chosen responses are "positive" words and rejected ones "negative" words. The model is
random, so what it learns proves only that the machinery runs end to end, not that a
method works: that is what the embedded SmolLM2 task is for.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import string
from pathlib import Path

from aligndistil.fileio import atomic_write_text

CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + " .,!?'-:\n"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def build_tokenizer():
    """Character-level ``PreTrainedTokenizerFast`` with pad/bos/eos and a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(out_dir: str | os.PathLike, seed: int = 0, hidden_size: int = 32, num_layers: int = 2) -> Path:
    """Write a random tiny Llama + tokenizer as an HF folder (safetensors) and return it."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tok = build_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


POSITIVE = ["great", "lovely", "superb", "happy", "fine", "good", "nice", "bright"]
NEGATIVE = ["awful", "bad", "dull", "sad", "poor", "grim", "ugly", "weak"]
SUBJECTS = ["the film", "this cafe", "my phone", "the book", "our trip", "the park", "that song", "the game"]


def write_tiny_prefs(path: str | os.PathLike, n: int = 32, seed: int = 0, chat: bool = False) -> Path:
    """Write ``n`` synthetic ``{prompt, chosen, rejected}`` lines (atomically) and return the path."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        subject = SUBJECTS[i % len(SUBJECTS)]
        prompt = f"Review {subject}:"
        chosen = f"It was {rng.choice(POSITIVE)}."
        rejected = f"It was {rng.choice(NEGATIVE)}."
        if chat:
            rec = {"prompt": [{"role": "user", "content": prompt}], "chosen": chosen, "rejected": rejected}
        else:
            rec = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        lines.append(json.dumps(rec))
    return atomic_write_text(path, "\n".join(lines) + "\n")


def write_tiny_kto(path: str | os.PathLike, n: int = 32, seed: int = 0) -> Path:
    """Write ``n`` synthetic unpaired ``{prompt, completion, label}`` lines and return the path."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        good = i % 2 == 0
        word = rng.choice(POSITIVE if good else NEGATIVE)
        lines.append(json.dumps({"prompt": f"Review {SUBJECTS[i % len(SUBJECTS)]}:",
                                 "completion": f"It was {word}.", "label": good}))
    return atomic_write_text(path, "\n".join(lines) + "\n")


def make_tiny_workspace(root: str | os.PathLike, seed: int = 0) -> dict:
    """Build ``root/model``, ``root/prefs.jsonl``, ``root/kto.jsonl`` (the tiny configs' inputs)."""
    root = Path(root)
    return {
        "model": str(build_tiny_model(root / "model", seed=seed)),
        "prefs": str(write_tiny_prefs(root / "prefs.jsonl", seed=seed)),
        "kto": str(write_tiny_kto(root / "kto.jsonl", seed=seed)),
    }
