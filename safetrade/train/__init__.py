"""Training: losses, the pure train step (composed from safetrade/tradeoff's strategy pieces), the loop, jobs."""
