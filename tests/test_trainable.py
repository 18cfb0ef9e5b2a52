"""What trains (`train.trainable`) through the one engine, on the tiny preset: a LoRA run trains
only its adapters, lowers the loss and resumes bitwise; text-encoder training changes the chosen
encoder only, and stops at its stop step."""
import jax
import numpy as np
import pytest

from helpers import ENGINE_PRESET, held_out_loss, tiny_config
from sdxl_jax import checkpoint as ckpt_lib
from sdxl_jax import models
from sdxl_jax.models.weights import frozen_params
from sdxl_jax.train.loop import train

LORA_STEPS = 6


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


@pytest.fixture(scope="module")
def lora_runs(demo_cache, tmp_path_factory):
    # the seeded tiny base has diffusers' zero-initialised conv_out, so no layer upstream of it gets
    # a gradient until conv_out itself is adapted (an extra target; a pretrained base needs none)
    cfg = tiny_config(**{"data.cache_dir": demo_cache, "train.trainable": "lora", "train.steps": LORA_STEPS,
                         "checkpoint.every_steps": 3, "train.learning_rate": 3e-3, "lora.rank": 4,
                         "lora.alpha": 4.0, "lora.targets": ("conv_out",), "ema.enabled": False})
    tmp = tmp_path_factory.mktemp("lora")
    straight = train(cfg, str(tmp / "straight"))
    train(cfg, str(tmp / "resumed"), max_steps=LORA_STEPS // 2)
    resumed = train(cfg, str(tmp / "resumed"))
    return cfg, tmp, straight, resumed


def test_a_lora_run_trains_only_its_adapters_and_lowers_the_loss(lora_runs):
    from sdxl_jax.adapters import make_plan, merge_params
    from sdxl_jax.train.trainable import lora_settings
    cfg, tmp, straight, _ = lora_runs
    adapters = _np(straight["state"].params)
    assert set(adapters) == {"unet"}  # the trained tree is the adapter tree, nothing else
    n_trained = sum(x.size for x in jax.tree.leaves(adapters))
    n_unet = models.count_params(models.abstract_params("unet", ENGINE_PRESET))
    assert 0 < n_trained < 0.5 * n_unet
    ups = [x for p, x in jax.tree_util.tree_flatten_with_path(adapters)[0] if "lora_up" in jax.tree_util.keystr(p)]
    assert any(np.abs(u).max() > 0 for u in ups)  # B started at zero and moved
    base = _np(frozen_params(cfg, components=("unet", "text_l", "text_g")))
    plan = make_plan({k: models.abstract_params(k, ENGINE_PRESET) for k in ("unet", "text_l", "text_g")},
                     lora_settings(cfg))
    merged = merge_params(base, adapters, plan)
    targeted = {("unet",) + path + ("kernel",) for path in plan["unet"]}
    for path, x in jax.tree_util.tree_flatten_with_path(merged["unet"])[0]:
        key = ("unet",) + tuple(k.key for k in path)
        if key not in targeted:  # bitwise the base everywhere the adapters do not reach
            np.testing.assert_array_equal(x, _get(base["unet"], key[1:]))
    text = {k: base[k] for k in ("text_l", "text_g")}
    before, after = held_out_loss(cfg, base["unet"], text), held_out_loss(cfg, merged["unet"], text)
    assert after < 0.98 * before, (before, after)  # measured: 0.2456 → 0.2373 in 6 steps


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def test_a_lora_run_resumes_bitwise(lora_runs):
    _, tmp, straight, resumed = lora_runs
    assert resumed["start_step"] == LORA_STEPS // 2 and resumed["end_step"] == LORA_STEPS
    for field in ("params", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, _np(getattr(straight["state"], field)),
                     _np(getattr(resumed["state"], field)))
    meta = ckpt_lib.Checkpointer(str(tmp / "straight" / "checkpoints")).read_json(LORA_STEPS, "meta")
    assert meta["trainable"] == "lora" and meta["lora"]["rank"] == 4


def test_a_lora_run_over_a_zero_conv_out_base_is_refused_before_training(demo_cache, tmp_path):
    cfg = tiny_config(**{"data.cache_dir": demo_cache, "train.trainable": "lora", "train.steps": 1})
    with pytest.raises(ValueError, match=r"conv_out kernel is all zero .* train nothing; adapt it too "
                       r'with lora.targets=\("conv_out",\) or start from model.pretrained'):
        train(cfg, str(tmp_path / "lora"))
    assert not (tmp_path / "lora" / "checkpoints").exists()  # refused before the checkpointer


def test_text_encoder_training_changes_only_the_chosen_encoder_until_its_stop_step(demo_cache, tmp_path):
    cfg = tiny_config(**{"data.cache_dir": demo_cache, "train.trainable": "unet+text", "train.steps": 3,
                         "checkpoint.every_steps": 1, "text_encoders.train_l": True,
                         "text_encoders.train_g": False, "text_encoders.stop_step_l": 2,
                         "text_encoders.learning_rate_l": 1e-3})
    wd = str(tmp_path / "te")
    summary = train(cfg, wd)
    state = summary["state"]
    assert set(state.params) == {"unet", "text_l"}  # bigG is not trained: no params, no Adam state
    source = _np(frozen_params(cfg, components=("text_l",)))["text_l"]
    ck = ckpt_lib.Checkpointer(f"{wd}/checkpoints")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _np(state.params))
    by_step = {s: _np(ck.restore_params(s, abstract, "params", on_host=True)[0]) for s in (1, 2, 3)}
    ck.close()
    moved = lambda a, b: max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))  # noqa: E731
    assert moved(by_step[1]["text_l"], source) > 0  # CLIP-L trains…
    assert moved(by_step[2]["text_l"], by_step[1]["text_l"]) > 0
    jax.tree.map(np.testing.assert_array_equal, by_step[3]["text_l"], by_step[2]["text_l"])  # …until step 2
    assert moved(by_step[3]["unet"], by_step[2]["unet"]) > 0  # the UNet goes on
