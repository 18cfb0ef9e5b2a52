"""The partition specs of the real full-size SDXL trees (UNet, CLIP-L, bigG) on a data=2 × fsdp=4
mesh, from abstract shapes, against a checked-in golden file (maxtext's sharding_compare_test):
a rule or threshold change that moves any parameter shows up as a diff here.

Regenerate deliberately with `SDXL_JAX_REGEN_GOLDEN=1 python -m pytest tests/test_sharding_golden.py`.
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
TREES = ("unet", "text_l", "text_g")


def _flat_specs(plan, tree) -> dict:
    specs = plan.specs(tree)
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
    return {parallel._path_str(p): [a if a is None or isinstance(a, str) else list(a) for a in spec]
            for p, spec in flat}


@pytest.fixture(scope="module")
def plan():
    mesh_cfg = ml_collections.ConfigDict({"data": 2, "fsdp": 4, "min_fsdp_size": 2**18})
    return parallel.ShardingPlan.from_config(mesh_cfg, jax.devices()[:8])


@pytest.fixture(scope="module")
def specs(plan):
    return {name: _flat_specs(plan, weights.cached_abstract_params(name, "sdxl")) for name in TREES}


def test_sdxl_partition_specs_match_the_golden_file(specs):
    if os.environ.get("SDXL_JAX_REGEN_GOLDEN"):
        with open(GOLDEN, "w") as f:
            json.dump(specs, f, indent=0, sort_keys=True)
    with open(GOLDEN) as f:
        golden = json.load(f)
    for name in TREES:
        missing, extra = sorted(set(golden[name]) - set(specs[name])), sorted(set(specs[name]) - set(golden[name]))
        assert not missing and not extra, (name, missing[:5], extra[:5])
        changed = {k: (golden[name][k], v) for k, v in specs[name].items() if golden[name][k] != v}
        assert not changed, (name, dict(list(changed.items())[:5]))
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
