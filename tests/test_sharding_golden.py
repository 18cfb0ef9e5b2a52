"""The partition specs of the real full-size SDXL trees on a data=2 × fsdp=4 mesh, from abstract
shapes, against checked-in golden files (maxtext's sharding_compare_test): the parameter trees
(UNet, CLIP-L, bigG), and the whole train state (params, optimizer state, EMA, step, RNG) with
the frozen trees of each `train.trainable` mode (unet, unet+text, LoRA), as the trainer's own
program (`build_program` of configs/ztsnr.py) lays them out. A rule, threshold or state-layout
change that moves any leaf shows up as a diff here.

Regenerate deliberately, then review the diff of tests/golden/:
    SDXL_JAX_REGEN_GOLDEN=1 python -m pytest -n 0 tests/test_sharding_golden.py
"""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from sdxl_jax import parallel
from sdxl_jax.models import weights
from sdxl_jax.train.state import create_state

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "sharding_sdxl_data2_fsdp4.json")
STATE_GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "sharding_sdxl_states_data2_fsdp4.json")
TREES = ("unet", "text_l", "text_g")
# train.trainable → its overrides of configs/ztsnr.py (sdxl preset)
MODES = {"unet": {}, "unet+text": {"text_encoders.train_l": True, "text_encoders.train_g": True},
         "lora": {}}


def _flat(specs) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
    return {parallel._path_str(p): [a if a is None or isinstance(a, str) else list(a) for a in spec]
            for p, spec in flat}


def _flat_specs(plan, tree) -> dict:
    return _flat(plan.specs(tree))


def _flat_shardings(shardings) -> dict:
    return _flat(jax.tree.map(lambda s: s.spec, shardings))


@pytest.fixture(scope="module")
def plan():
    mesh_cfg = ml_collections.ConfigDict({"data": 2, "fsdp": 4, "min_fsdp_size": 2**18})
    return parallel.ShardingPlan.from_config(mesh_cfg, jax.devices()[:8])


@pytest.fixture(scope="module")
def specs(plan):
    return {name: _flat_specs(plan, weights.cached_abstract_params(name, "sdxl")) for name in TREES}


def _nest(flat: dict) -> dict:
    """{"a/b/c": spec} → {"a": {"b": {"c": spec}}}: the state file shares its path prefixes."""
    out: dict = {}
    for key, spec in flat.items():
        *parents, leaf = key.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = spec
    return out


def _unnest(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_unnest(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


def _against_golden(path: str, specs: dict, nested: bool = False) -> dict:
    """The golden file's {tree: {leaf path: spec}}, after asserting `specs` equals it leaf by leaf
    (rewritten first under SDXL_JAX_REGEN_GOLDEN=1); `nested`: stored as nested dicts."""
    if os.environ.get("SDXL_JAX_REGEN_GOLDEN"):
        with open(path, "w") as f:
            json.dump({k: _nest(v) for k, v in specs.items()} if nested else specs, f, indent=0,
                      sort_keys=True)
    with open(path) as f:
        golden = json.load(f)
    if nested:
        golden = {k: _unnest(v) for k, v in golden.items()}
    assert sorted(golden) == sorted(specs)
    for name in golden:
        missing, extra = sorted(set(golden[name]) - set(specs[name])), sorted(set(specs[name]) - set(golden[name]))
        assert not missing and not extra, (name, missing[:5], extra[:5])
        changed = {k: (golden[name][k], v) for k, v in specs[name].items() if golden[name][k] != v}
        assert not changed, (name, dict(list(changed.items())[:5]))
    return golden


def test_sdxl_partition_specs_match_the_golden_file(specs):
    golden = _against_golden(GOLDEN, specs)
    # the file is not vacuous: most UNet weight bytes are sharded over fsdp, norms never are
    unet = golden["unet"]
    assert sum(1 for v in unet.values() if "fsdp" in v) > 500
    assert all(v == [] for k, v in unet.items() if "norm" in k)


def test_the_plan_covers_scalars_and_rng_keys_of_the_train_state(plan):
    import optax
    params = {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)}
    state = jax.eval_shape(lambda p: create_state(p, optax.adamw(1e-4), jax.random.PRNGKey(0)), params)
    sh = plan.shardings(state)
    assert sh.params["w"].spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert sh.ema_params["w"].spec == sh.params["w"].spec
    assert sh.step.spec == sh.rng.spec == sh.nonfinite.spec == jax.sharding.PartitionSpec()
    typed_key = jax.eval_shape(lambda: jax.random.key(0))
    assert plan.shardings({"k": typed_key})["k"].spec == jax.sharding.PartitionSpec()


@pytest.fixture(scope="module")
def state_specs(plan):
    """{mode/state, mode/frozen: {leaf path: spec}} of the trainer's program for each mode."""
    from helpers import config
    from sdxl_jax.train.program import build_program
    from sdxl_jax.train.unet_task import program_spec
    out = {}
    for mode, overrides in MODES.items():
        cfg = config("ztsnr", {"train.trainable": mode, **overrides})
        prog = build_program(program_spec(cfg, total_steps=cfg.train.steps), plan)
        out[f"{mode}/state"] = _flat_shardings(prog.shardings)  # what the trainer places by
        out[f"{mode}/frozen"] = _flat_shardings(prog.frozen_shardings)
    return out


def test_sdxl_train_states_match_the_golden_file(state_specs, specs):
    golden = _against_golden(STATE_GOLDEN, state_specs, nested=True)
    # the file is not vacuous: the full UNet's params, both Adam moments and the EMA are laid out
    # exactly as the parameter tree; the scalars and the RNG key are replicated
    unet = golden["unet/state"]
    for path, spec in specs["unet"].items():
        assert (unet[f"params/{path}"] == unet[f"ema_params/{path}"] == unet[f"opt_state/1/0/mu/{path}"]
                == unet[f"opt_state/1/0/nu/{path}"] == spec), path
    assert unet["step"] == unet["rng"] == unet["nonfinite"] == []
    both = golden["unet+text/state"]
    assert {k.split("/")[1] for k in both if k.startswith("params/")} == {"unet", "text_l", "text_g"}
    assert golden["unet+text/frozen"] == {}  # everything trains
    lora = golden["lora/state"]
    assert {k.split("/")[1] for k in lora if k.startswith("params/")} == {"unet"}
    assert all(k.rsplit("/", 1)[-1] in ("lora_down", "lora_up") for k in lora if k.startswith("params/"))
    assert {k.split("/")[0] for k in golden["lora/frozen"]} == {"unet", "text_l", "text_g"}
