"""Training: log-probs, megatron schedules, the loop, the reference pass, checkpoints, metrics."""
