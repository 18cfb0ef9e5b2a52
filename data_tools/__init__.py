"""Offline data jobs: demo dataset, latent cache building, loader benchmark, latent statistics."""
