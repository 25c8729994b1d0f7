"""LossOutput -> optimiser/EMA -> checkpoint: schedules, optimiser, checkpoints, the loop."""
