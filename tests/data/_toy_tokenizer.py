"""A character-level tokenizer built in memory, and a JSONL writer, for the data tests.

The tokenizer is a BPE with no merges over ``string.printable``, with BOS/EOS/PAD and a
tiny Jinja chat template, so every expected id sequence can be read off character by
character.
"""

from __future__ import annotations

import json
import string

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


def make_tokenizer(chat: bool = True, bos: bool = True, adds_bos: bool = False):
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


def enc(tok, text):
    """Ids of ``text`` without special tokens."""
    return tok.encode(text, add_special_tokens=False)


def write_jsonl(tmp_path, rows, name="d.jsonl"):
    """Write ``rows`` (dicts, or raw strings for malformed lines) one per line."""
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p
