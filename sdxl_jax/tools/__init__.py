"""Command-line tools (python -m sdxl_jax.tools.<name>): memory report, benchmarks, checks.

Nothing here is imported by the training path; each tool sets up its own environment (e.g.
XLA_FLAGS for simulated devices) before importing JAX.
"""
