"""Judging behaviour, not loss: fixed-eval-set metrics, checkpoint evaluation and comparison reports."""
