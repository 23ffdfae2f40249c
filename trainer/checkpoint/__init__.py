"""Checkpoints: atomic writes with a manifest (io, manifest), and the callback that decides when to save,
restores the full training state and handles preemption and non-finite losses (callback)."""
