"""Causal LMs: loading, outputs aligned to response tokens, sampling."""
