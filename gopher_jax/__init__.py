"""gopher_jax: the Gopher language model family (Rae et al. 2021) in JAX / Flax NNX."""

__version__ = "0.1.0"
