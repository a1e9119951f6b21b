"""Fixtures of the data tests: the in-memory character tokenizer, with and without a chat template."""

from __future__ import annotations

import pytest

from _toy_tokenizer import make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def tok_nochat():
    return make_tokenizer(chat=False)
