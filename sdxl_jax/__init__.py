"""sdxl_jax: SDXL training with the NovelAI Diffusion V3 recipe in JAX/Flax."""
__version__ = "0.1.0"
