"""Training: the one loop, its objectives, optimizers, time budget, metrics and processes."""
