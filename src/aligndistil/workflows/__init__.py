"""End-to-end workflows built on training: preference pairs, evaluation, plots, the quickstart and pipelines."""
