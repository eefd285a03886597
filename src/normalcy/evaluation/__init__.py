"""Evaluation: metrics, model selection, plots."""
