"""gaze-jax: Gaze Attention for multimodal LLMs in JAX / Flax NNX."""

__version__ = "0.1.0"
