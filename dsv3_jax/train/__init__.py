"""Training support: checkpoints, metrics, preemption."""
