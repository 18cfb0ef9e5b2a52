"""The fit check (sdxl_jax.fit): XLA's per-device bytes of a compiled program against a limit,
one message with the numbers and the fix; `train.fit_check` values. Small jitted functions."""
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from sdxl_jax import fit

N = 1024  # float32 elements: 4096 bytes


@pytest.fixture(scope="module")
def doubled():
    """x ↦ 2x on 4096 bytes, not donated: argument 4096 + output 4096 bytes, nothing aliased."""
    return jax.jit(lambda x: 2 * x).lower(jax.ShapeDtypeStruct((N,), jnp.float32)).compile()


def test_figures_are_xla_buffers(doubled):
    stats = fit.compiled_memory(doubled)
    assert (stats["argument_bytes"], stats["output_bytes"], stats["alias_bytes"]) == (4 * N, 4 * N, 0)
    assert fit.needed_bytes(stats) == 8 * N + stats["temp_bytes"]
    donated = jax.jit(lambda x: 2 * x, donate_argnums=0).lower(
        jax.ShapeDtypeStruct((N,), jnp.float32)).compile()
    d = fit.compiled_memory(donated)
    assert (d["argument_bytes"], d["output_bytes"], d["alias_bytes"]) == (4 * N, 4 * N, 4 * N)
    assert fit.needed_bytes(d) == 4 * N + d["temp_bytes"]  # updated in place: counted once


def test_too_small_limit_stops_with_one_message(doubled):
    need = fit.needed_bytes(fit.compiled_memory(doubled))
    with pytest.raises(fit.FitError) as e:
        fit.check_fit(doubled, jax.devices()[:1], limit_bytes=need - 1,
                      suggestions=["model.remat=blocks"])
    msg = str(e.value)
    assert "\n" not in msg
    assert f"({need} bytes) per device" in msg and f"allows {(need - 1) / 2 ** 20:.2f} MiB ({need - 1} bytes)" in msg
    assert "to fit, try: model.remat=blocks." in msg and "train.fit_check=off" in msg


def test_enough_memory_passes_and_cpu_without_limit_is_a_no_op(doubled):
    need = fit.needed_bytes(fit.compiled_memory(doubled))
    report = fit.check_fit(doubled, jax.devices()[:1], limit_bytes=need)
    assert (report.needed, report.available) == (need, need)
    assert jax.devices()[0].memory_stats() is None  # CPU: no allocator limit reported
    assert fit.device_limit(jax.devices()) is None
    report = fit.check_fit(doubled, jax.devices())
    assert report.available is None and report.needed == need


class _Device:
    def __init__(self, limit):
        self._stats = {"bytes_limit": limit, "bytes_in_use": 0}

    def memory_stats(self):
        return self._stats


def test_device_limit_is_the_smallest_bytes_limit(doubled):
    assert fit.device_limit([_Device(3 << 30), _Device(2 << 30)]) == 2 << 30
    with pytest.raises(fit.FitError, match="the device's bytes_limit allows"):
        fit.check_fit(doubled, [_Device(100)])


@pytest.mark.parametrize("value,want", [
    ("auto", "auto"), ("OFF", "off"), ("16GiB", 16 * 2 ** 30), ("80GB", 80 * 10 ** 9),
    ("1.5GiB", 3 * 2 ** 29), ("512 MiB", 2 ** 29), ("17179869184", 17179869184), (4096, 4096)])
def test_parse_fit_check(value, want):
    assert fit.parse_fit_check(value) == want


@pytest.mark.parametrize("value", ["16 gigs", "16G", "-1GiB", "0", 0, True, None, "on"])
def test_parse_fit_check_rejects_with_the_key(value):
    with pytest.raises(ValueError, match=r"train.fit_check=.*expected 'auto', 'off' or a positive byte size"):
        fit.parse_fit_check(value)


def _cfg(**train):
    c = ml_collections.ConfigDict()
    c.train = {"per_device_batch_size": 4, "fit_check": "auto", **train}
    c.model = dict(remat="none", attention="standard")
    return c


def test_suggestions_estimate_the_batch_that_fits():
    g = fit.GIB
    stats = dict(argument_bytes=10 * g, output_bytes=2 * g, alias_bytes=2 * g, temp_bytes=12 * g)
    tips = fit.suggestions(_cfg(), stats, 16 * g, {"data": 4, "fsdp": 2})
    # state 10 GiB + activations 12 GiB at batch 4 (3 GiB each): 16 GiB holds batch 2
    assert tips[0].startswith("train.per_device_batch_size=2 (≈16.00 GiB;")
    assert tips[1].startswith("model.remat=blocks") and tips[2].startswith("model.attention=auto")
    assert tips[3].startswith("model.ff_chunks=4")
    assert tips[4].startswith("mesh.fsdp=-1 with mesh.data=1") and "all 8 devices instead of 2" in tips[4]
    assert len(tips) == 5
    chunked = _cfg()
    chunked.model["ff_chunks"] = 4
    assert not any(t.startswith("model.ff_chunks") for t in fit.suggestions(chunked, stats, 16 * g))
    state_bound = fit.suggestions(_cfg(), stats, 9 * g, {"data": 1, "fsdp": 8})
    assert state_bound[0].startswith("train.per_device_batch_size=1")
    assert "arguments alone" in state_bound[-1] and "10.00 GiB" in state_bound[-1]


def test_check_step_fit_reads_train_fit_check(doubled):
    need = fit.needed_bytes(fit.compiled_memory(doubled))
    assert fit.check_step_fit(doubled, jax.devices(), _cfg(fit_check="off")) is None
    assert fit.check_step_fit(doubled, jax.devices(), _cfg()).available is None  # auto on CPU
    with pytest.raises(fit.FitError, match=r"train.fit_check allows .*model.remat=blocks"):
        fit.check_step_fit(doubled, jax.devices(), _cfg(fit_check=str(need - 1)),
                           mesh_shape={"data": 1, "fsdp": 8})
