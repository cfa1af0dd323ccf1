"""Pretraining: checkpoints (pure torch), the plain in-process runner and the Ray Train layer."""
