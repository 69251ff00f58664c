"""Evaluation: safety (refusals, attack success) and utility (losses, task accuracy)."""
