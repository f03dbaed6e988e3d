"""Layer 3: the one training loop and what it owns (noise, loss weighting, optimizers, schedules, checkpoints)."""
