"""Scale features: UNet remat / attention variants (same parameters, same loss and gradients) and
the memory-report helpers. Tiny UNet in float32, batch 2 of 32×32 latents; three compiles."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdxl_jax import models
from sdxl_jax.models import presets
from sdxl_jax.models.attention import ATTENTION_MODES
from sdxl_jax.models.build import build_unet, build_unet_from_config
from sdxl_jax.models.unet import REMAT_MODES, UNet2DConditionModel, dummy_inputs
from sdxl_jax.tools import memory_report

from helpers import TWO_LEVEL, two_level_params

PRESET = "tiny"
# every remat mode and every attention option at least once (each is a field of the UNet's
# modules: none may change the parameter tree)
# (the blocks variant also chunks the feed-forward: model.ff_chunks)
VARIANTS = [("none", "standard", False, 1), ("blocks", "memory_efficient", False, 2), ("dots", "standard", True, 1)]
assert {v[0] for v in VARIANTS} == set(REMAT_MODES) and {v[1] for v in VARIANTS} <= set(ATTENTION_MODES)


@pytest.mark.parametrize("remat,attention,split,ff_chunks", VARIANTS)
def test_variant_parameter_tree_is_identical(remat, attention, split, ff_chunks):
    unet = build_unet(PRESET, "float32", remat=remat, attention=attention, split_head_dim=split,
                      ff_chunks=ff_chunks)
    assert isinstance(unet, UNet2DConditionModel)
    got = jax.eval_shape(lambda: unet.init(jax.random.key(0), *dummy_inputs(presets.unet_config(PRESET))))["params"]
    want = models.abstract_params("unet", PRESET)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(got)] == \
        [(x.shape, x.dtype) for x in jax.tree.leaves(want)]


@pytest.fixture(scope="module")
def problem():
    """TWO_LEVEL params and one fixed batch of 2 (16×16 latents, 77 context tokens)."""
    params = two_level_params()
    k = jax.random.split(jax.random.key(1), 4)
    batch = 2
    inputs = dict(
        z=jax.random.normal(k[0], (batch, 16, 16, 4)), t=jnp.array([10.0, 700.0]),
        context=jax.random.normal(k[1], (batch, 77, TWO_LEVEL["cross_attention_dim"])),
        pooled=jax.random.normal(k[2], (batch, presets.text_g_config(PRESET)["projection_dim"])),
        time_ids=jnp.tile(jnp.array([[128.0, 128, 0, 0, 128, 128]]), (batch, 1)))
    target = jax.random.normal(k[3], (batch, 16, 16, 4))
    return params, inputs, target


def _loss_fn(unet, inputs, target):
    def loss(params):
        out = models.unet_apply(unet, params, inputs["z"], inputs["t"], inputs["context"],
                                inputs["pooled"], inputs["time_ids"])
        return jnp.mean((out - target) ** 2)
    return loss


def _value_and_grad(problem, **variant):
    params, inputs, target = problem
    unet = build_unet(TWO_LEVEL, "float32", **variant)
    return jax.jit(jax.value_and_grad(_loss_fn(unet, inputs, target)))(params)


@pytest.fixture(scope="module")
def reference(problem):
    return _value_and_grad(problem)


# Each remat mode is paired with one attention option (and blocks with the chunked feed-forward),
# so three compiles cover every choice: if a variant matches the plain model, each of its changes
# preserves the computation.
@pytest.mark.parametrize("variant", [
    dict(remat="blocks", attention="memory_efficient", ff_chunks=2),
    dict(remat="dots", split_head_dim=True),
])
def test_variant_objective_and_gradients_match_plain_model(problem, reference, variant):
    loss_ref, grads_ref = reference
    loss, grads = _value_and_grad(problem, **variant)
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-6)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_ref))
    assert scale > 0
    assert jax.tree.structure(grads) == jax.tree.structure(grads_ref)
    for (path, g), g_ref in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                                jax.tree.leaves(grads_ref)):
        assert float(jnp.max(jnp.abs(g_ref))) > 0, f"{jax.tree_util.keystr(path)}: zero gradient"
        err = float(jnp.max(jnp.abs(g - g_ref)))
        assert err <= 1e-5 * scale, f"{jax.tree_util.keystr(path)}: |Δgrad| {err:.3g}"


def _checkpoints(jaxpr):
    """Top-level jax.checkpoint equations ("remat2" in this JAX, "checkpoint" in others)."""
    return [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("remat2", "checkpoint")]


def test_remat_modes_put_the_unet_under_checkpoint(problem):
    """The remat modes really change the program: 'blocks' checkpoints each resnet and each
    transformer layer with the save-nothing policy, 'dots' the whole UNet once with the dots
    policy, 'none' nothing; memory-efficient attention runs its chunked scan."""
    params, inputs, target = problem

    def jaxpr(**variant):
        unet = build_unet(TWO_LEVEL, "float32", **variant)
        return jax.make_jaxpr(_loss_fn(unet, inputs, target))(params)

    assert _checkpoints(jaxpr(remat="none")) == []
    blocks = _checkpoints(jaxpr(remat="blocks"))
    # TWO_LEVEL (1 resnet per down level): resnets 1 + 1 down, 2 mid, 2 + 2 up; transformer
    # layers 1 down, 1 mid, 2 up
    assert len(blocks) == (1 + 1 + 2 + 2 + 2) + (1 + 1 + 2)
    assert all(e.params["policy"] is None for e in blocks)
    dots = _checkpoints(jaxpr(remat="dots"))
    assert len(dots) == 1
    assert dots[0].params["policy"] is jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    assert "scan" not in str(jaxpr())
    assert "scan" in str(jaxpr(attention="memory_efficient"))
    assert "scan" in str(jaxpr(ff_chunks=2))  # the feed-forward over token chunks


def test_build_unet_from_config_threads_model_options():
    cfg = memory_report.load_config(os.path.join(os.path.dirname(__file__), "..", "configs",
                                                 "ztsnr.py") + ":tiny")
    assert cfg.model.preset == "tiny" and cfg.model.remat == "none"
    cfg.model.remat, cfg.model.attention, cfg.model.split_head_dim = "blocks", "memory_efficient", False
    unet = build_unet_from_config(cfg)
    assert (unet.remat, unet.attention, unet.split_head_dim) == ("blocks", "memory_efficient", False)
    assert unet.dtype == {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.model.dtype]
    cfg.model.remat, cfg.model.attention, cfg.model.split_head_dim = "dots", "auto", True
    unet = build_unet_from_config(cfg)
    # "auto" is resolved at build time, for this process's backend (CPU here)
    assert (unet.remat, unet.attention, unet.split_head_dim) == ("dots", "dot_product", True)
    cfg.model.remat, cfg.model.ff_chunks = "none", 4
    assert build_unet_from_config(cfg).ff_chunks == 4


class _Built(Exception):
    pass


def test_train_loop_builds_the_configured_unet(demo_cache, tmp_path, monkeypatch):
    """train() builds its UNet through build_unet_from_config, so model.remat and the attention
    options reach the real step (stopped right there: nothing compiles)."""
    from helpers import tiny_config
    from sdxl_jax.models import build
    from sdxl_jax.train.loop import train
    seen = []

    def spy(cfg):
        unet = build_unet_from_config(cfg)
        seen.append((unet.remat, unet.attention))
        raise _Built
    monkeypatch.setattr(build, "build_unet_from_config", spy)
    cfg = tiny_config(**{"data.cache_dir": demo_cache, "model.remat": "blocks",
                         "model.attention": "memory_efficient"})
    with pytest.raises(_Built):
        train(cfg, str(tmp_path))
    assert seen == [("blocks", "memory_efficient")]


@pytest.mark.parametrize("kwargs,match", [
    (dict(remat="layers"), "model.remat='layers'"),
    (dict(attention="flash"), "model.attention='flash'"),
    (dict(ff_chunks=0), "model.ff_chunks=0"),
])
def test_bad_options_name_the_config_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_unet(PRESET, "float32", **kwargs)


# ---- memory report helpers ----------------------------------------------------------------------
def test_memory_report_parsers():
    assert memory_report.parse_mesh("fsdp=8") == {"data": -1, "fsdp": 8}
    assert memory_report.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4}
    assert memory_report.parse_mesh("data=4") == {"data": 4, "fsdp": -1}
    assert memory_report.parse_bucket("1216x832") == (832, 1216)
    for bad in ("1024", "1020x1024", "axb"):
        with pytest.raises(ValueError, match="--bucket"):
            memory_report.parse_bucket(bad)
    with pytest.raises(ValueError, match="--mesh"):
        memory_report.parse_mesh("model=2")


def test_memory_report_peak_and_fits():
    gib = 1024 ** 3
    stats = dict(argument_bytes=6 * gib, output_bytes=6 * gib, alias_bytes=5 * gib, temp_bytes=7 * gib)
    assert memory_report.peak_bytes(stats) == 14 * gib
    assert memory_report.fits(14 * gib) == {"TPU v5e": "yes", "TPU v4": "yes", "H100": "yes", "TPU v5p": "yes"}
    assert memory_report.fits(15 * gib)["TPU v5e"] == "tight"  # 15 > 0.9·16, ≤ 16
    assert memory_report.fits(int(16.5 * gib)) == {"TPU v5e": "no", "TPU v4": "yes", "H100": "yes",
                                                   "TPU v5p": "yes"}


def test_peak_buffers_groups_the_live_set_of_an_xla_dump(tmp_path):
    """Parses XLA's live-range report and optimized HLO (the two files --explain reads)."""
    (tmp_path / "module_0001.jit_train_step.cpu_after_optimizations-live-range.txt").write_text(
        "HloLiveRange (max 9):\n"
        "  Live ranges at 7 (peak):\n"
        "    fusion.1{}: 4096 bytes (cumulative: 4096 bytes)\n"
        "    fusion.2{}: 4096 bytes (cumulative: 8192 bytes)\n"
        "    param.3{}: 64 bytes (cumulative: 8256 bytes)\n"
        "  Stack trace breakdown for peak usage: 8256 bytes\n")
    (tmp_path / "module_0001.jit_train_step.cpu_after_optimizations.txt").write_text(
        "ENTRY %main {\n"
        "  %param.3 = f32[16]{0} parameter(0), metadata={op_name=\"state.params\"}\n"
        "  %fusion.1 = f32[32,32]{1,0} fusion(%param.3), kind=kLoop, metadata={op_name="
        "\"jit(train_step)/transpose(jvp(UNet))/dot\"}\n"
        "  ROOT %fusion.2 = f32[32,32]{1,0} fusion(%param.3), kind=kLoop, metadata={op_name="
        "\"jit(train_step)/jvp(UNet)/dot\"}\n"
        "}\n")
    peak, rows = memory_report.peak_buffers(str(tmp_path))
    assert peak == 8256
    assert rows == [("f32[32,32]", "backward", 1, 4096), ("f32[32,32]", "forward", 1, 4096),
                    ("f32[16]", "-", 1, 64)]
    with pytest.raises(FileNotFoundError, match="live-range"):
        memory_report.peak_buffers(str(tmp_path / "missing"))


def test_write_table_keeps_hand_written_findings(tmp_path):
    out = tmp_path / "docs" / "memory.md"
    memory_report.write_table(str(out), "# table v1\n")
    assert out.read_text() == "# table v1\n"
    out.write_text(out.read_text() + memory_report.FINDINGS_MARKER + "\nremat fits.\n")
    memory_report.write_table(str(out), "# table v2\n")
    assert out.read_text() == "# table v2\n\n" + memory_report.FINDINGS_MARKER + "\nremat fits.\n"


def test_buffer_assignment_dump_gives_the_memory_analysis_figures(tmp_path):
    """--until-buffers reads XLA's buffer-assignment dump instead of compiled.memory_analysis():
    on a donated update step (arguments, aliased and plain outputs, temporaries) both agree."""
    def step(state, x):
        h = jnp.tanh(x @ state["w"])
        h = jnp.tanh(h @ state["w"].T)
        return {"w": state["w"] - 0.1 * (h.T @ x)}, jnp.sum(h)

    state, x = {"w": jnp.ones((64, 64))}, jnp.ones((128, 64))
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, x).compile(
        compiler_options={"xla_dump_to": str(tmp_path), **memory_report.SIMULATION_OPTIONS})
    mem = compiled.memory_analysis()
    path = memory_report.wait_for_buffer_assignment(str(tmp_path), lambda: False, module="jit_step",
                                                    poll_s=0.01)
    assert memory_report.buffer_assignment_stats(path) == {
        "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
        "alias_bytes": mem.alias_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes, "code_bytes": 0}
    assert mem.argument_size_in_bytes == (64 * 64 + 128 * 64) * 4  # w and x
    assert mem.alias_size_in_bytes == 64 * 64 * 4  # the donated w is updated in place
    with pytest.raises(RuntimeError, match="without a buffer-assignment dump"):
        memory_report.wait_for_buffer_assignment(str(tmp_path / "empty"), lambda: False, poll_s=0.01)


def test_table_lists_every_grid_run_and_marks_the_missing(tmp_path):
    runs = list(memory_report.table_runs("1024x1024", str(tmp_path)))
    assert len(runs) == 3 * 3 * 2 and len({r[-1] for r in runs}) == 18
    assert runs[0][:4] == (8, 1, "none", "standard")
    gib = 1024 ** 3
    done = dict(devices=8, per_device_batch=1, remat="blocks", attention="memory_efficient",
                argument_bytes=5 * gib, temp_bytes=8 * gib, total_bytes=13 * gib, flops_global=167.7e12)
    missing = dict(devices=32, per_device_batch=4, remat="none", attention="standard", missing=True)
    md = memory_report.table_markdown([done, missing], "cmd")
    assert ("| 8 | 1 | blocks + memory-efficient attention | 5.00 | 8.00 | **13.00** | 167.7† | ✓ | ✓ | ✓ | ✓ |"
            in md)
    assert "| 32 | 4 | none | not run |" in md


def _compile_until_buffers(lowered, until_buffers: bool, dump, module: str):
    """(optimized HLO text, temp bytes) of a simulated compile with memory_report's options."""
    options = dict(memory_report.simulation_options(until_buffers), xla_dump_to=str(dump))
    path = memory_report.compile_until_buffers(lowered, options, module=module, poll_s=0.1)
    with open(path.replace("-buffer-assignment.txt", ".txt")) as f:
        return f.read(), memory_report.buffer_assignment_stats(path)["temp_bytes"]


def test_simulated_compile_keeps_the_fsdp_gathers_in_bfloat16(tmp_path):
    """XLA:CPU runs bf16 dots and all-gathers in f32 (float-normalization-bf16), so a simulated
    FSDP step that casts its weights to bf16 before gathering them still gathered float32 and
    the report doubled every gathered weight. The options of an --until-buffers compile keep
    them bf16, as TPU/GPU compilers do: the gather is bf16 and its buffers half the size."""
    import re
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    w_sh, x_sh = NamedSharding(mesh, P(None, "fsdp")), NamedSharding(mesh, P("fsdp"))

    def loss(w, x):  # the step's pattern: cast the fp32 shard, then let FSDP gather it
        w16 = jax.lax.with_sharding_constraint(w.astype(jnp.bfloat16), w_sh)
        return jnp.mean(jnp.tanh(x.astype(jnp.bfloat16) @ w16).astype(jnp.float32) ** 2)

    lowered = jax.jit(jax.grad(loss), in_shardings=(w_sh, x_sh), out_shardings=w_sh).lower(
        jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=w_sh),
        jax.ShapeDtypeStruct((8 * 512, 256), jnp.float32, sharding=x_sh))
    found = {}
    for until_buffers in (False, True):
        hlo, temp = _compile_until_buffers(lowered, until_buffers, tmp_path / str(until_buffers), "jit_loss")
        found[until_buffers] = set(re.findall(r"= (\w+)\[256,256\]\{[\d,]*\} all-gather\(", hlo)), temp
    assert found[False][0] == {"f32"} and found[True][0] == {"bf16"}
    # the temporaries are the gathered weight and the activations: all half as large in bf16
    assert found[True][1] * 2 == found[False][1]
