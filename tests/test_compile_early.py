"""The UNet's train step compiled during the prepare phase (train/compile_early.py): the shapes
predicted from the images alone are exactly those the run's loader feeds, and a run whose
compiles started while its cache was built never waits for a program once it trains."""
import logging

import pytest
from data_tools.bench_loader import fake_tokenize, pool_encode
from helpers import config, tiny_config

from sdxl_jax import parallel
from sdxl_jax.data import build_cache, make_train_iterator
from sdxl_jax.run_inputs import resolve_run
from sdxl_jax.train import compile_early, compile_pool, prepare
from sdxl_jax.train.compile_ahead import loader_shapes
from sdxl_jax.train.loop import train


def _loader_shapes(cfg, cache_dir, multiple):
    it = make_train_iterator(cfg, cache_dir, fake_tokenize, 0, 1, None, multiple)
    try:
        return loader_shapes(it)
    finally:
        it.close()


@pytest.mark.parametrize("batch", [8, 16])
def test_the_shapes_planned_from_the_images_are_the_ones_the_loader_feeds(demo_images, tmp_path, batch):
    """The demo's settings (three buckets, its held-out share) on the demo images: a batch of 16
    leaves two buckets with fewer training images than one batch, which the loader never feeds."""
    cfg = config("ztsnr:tiny", {"data.images_dir": demo_images, "data.cache_dir": str(tmp_path / "cache"),
                                "train.global_batch_size": batch, "data.val_fraction": 0.1})
    inputs = resolve_run(cfg, str(tmp_path))
    assert compile_early.predictable(cfg, inputs)
    multiple = parallel.ShardingPlan.from_config(cfg.mesh).data_parallel
    planned = compile_early.planned_shapes(cfg, inputs, multiple)
    build_cache(cfg, images_dir=demo_images, out=str(tmp_path / "cache"), encode_fn=pool_encode,
                encoder_fingerprint="pool8", process_index=0, process_count=1, progress=False)
    fed = _loader_shapes(cfg, str(tmp_path / "cache"), multiple)
    assert planned == fed
    # the buckets hold 15, 11 and 17 of the demo images' 43 training images (the loader's count)
    assert len(fed) == {8: 3, 16: 1}[batch]


def test_a_run_compiled_while_its_cache_was_built_never_waits_for_a_program(demo_images, tmp_path,
                                                                            monkeypatch, caplog):
    """prepare_run starts the compiles before the cache build; the loop takes the same pool. A
    prepare phase that outlasts the compiles (the demo's VAE trains for minutes) leaves the loop
    nothing to wait for: 0 s before the first step and 0 s after it, every shape compiled once."""
    cfg = tiny_config(**{"data.images_dir": demo_images, "data.cache_dir": str(tmp_path / "cache"),
                         "data.buckets.min_side": 96, "data.buckets.max_side": 160,
                         "data.buckets.max_ar_error": 0.5, "train.steps": 6,
                         "train.compile_workers": 1})
    order, pools = [], []
    start, build = compile_early.start, prepare._build_missing_caches

    def started(*a):
        pools.append(start(*a))
        order.append("compiles")
        return pools[-1]

    def built(*a):
        order.append("cache")
        out = build(*a)
        pools[0].wait_all()
        return out
    monkeypatch.setattr(compile_early, "start", started)
    monkeypatch.setattr(prepare, "_build_missing_caches", built)
    wd = str(tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="sdxl_jax.train"):
        inputs = prepare.prepare_run(cfg, wd)
        assert order == ["compiles", "cache"] and pools[0] is not None
        planned = list(pools[0].seconds(all_shapes=True))
        summary = train(cfg, wd, inputs)
    assert summary["first_wait_s"] == 0.0 and summary["stall_s"] == 0.0
    assert list(summary["compile_s"]) == planned and len(planned) == 3
    assert summary["compiles"] == 3
    assert "not among the shapes compiled ahead" not in caplog.text
    assert "loop stall waiting for programs after it 0.0 s" in caplog.text
    # the loop closed the prepare phase's pool (other tests' runs may have pools of their own)
    assert pools[0].closed and all(p is not pools[0] for p in compile_pool._POOLS.values())
