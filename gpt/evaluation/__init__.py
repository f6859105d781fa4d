"""Measuring a model: whole-split loss, perplexity and bits per byte; multiple-choice accuracy."""
