"""Training: losses, safety-aware strategies (sft, Case I, Case II), the pure train step, and the loop."""
