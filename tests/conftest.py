"""Test-wide setup: 8 simulated CPU devices (before JAX is imported), quiet HF libraries."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One persistent XLA cache for the whole suite and its subprocesses: the same train step compiled
# by several tests (or a restarted training subprocess) is compiled once.
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "sdxl_jax_test_xla_cache"))
