"""Buckets (METHODS §7) and tags (§8, §9): pure functions against hand-computed values."""
import math

import numpy as np
import pytest

from sdxl_jax.data.buckets import (Fit, assign_bucket, batch_sizes, fit_cover, make_buckets,
                                   time_ids)
from sdxl_jax.data.plan import plan_epoch
from sdxl_jax.data.tags import augment_caption, normalize_tags, tag_counts, tag_weights

NAI_V1 = [(256, 1024), (320, 1024), (384, 1024), (384, 960), (384, 896), (448, 832), (512, 768),
          (512, 704), (512, 512), (576, 640)]


def test_nai_v1_check_vector():
    got = make_buckets(512 * 768, 256, 1024, 64, (512, 512))
    expected = set(NAI_V1) | {(h, w) for w, h in NAI_V1}
    assert len(got) == 19
    assert set(got) == expected


def test_sdxl_defaults_33_buckets():
    got = make_buckets(1024 * 1024, 512, 2048, 64, (1024, 1024))
    assert len(got) == 33
    assert got[0] == (512, 2048) and got[-1] == (2048, 512)
    assert got[15:18] == [(960, 1088), (1024, 1024), (1088, 960)]
    assert (832, 1216) in got and (1216, 832) in got
    assert all(w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0 for w, h in got)


def test_assignment_uses_log_aspect_ratio():
    # ar 1.45 lies between the geometric (1.414) and arithmetic (1.5) means of 1 and 2:
    # log distance picks 2:1, the linear NAI-v1 distance would pick 1:1.
    idx, err = assign_bucket(145, 100, [(64, 64), (128, 64)])
    assert idx == 1
    assert err == pytest.approx(math.log(2 / 1.45))
    # 2:3 on the SDXL table: 832x1216 (ar 0.6842) beats 768x1344 and 896x1152 (errors 0.154)
    sdxl = make_buckets(1024 * 1024, 512, 2048, 64, (1024, 1024))
    idx, err = assign_bucket(1000, 1500, sdxl)
    assert sdxl[idx] == (832, 1216)
    assert err == pytest.approx(abs(math.log(832 / 1216) - math.log(2 / 3)))


def test_fit_cover_center_and_time_ids():
    fit = fit_cover(1000, 500, (256, 192), "center")
    # scale = max(256/1000, 192/500) = 0.384 → 384x192, overhang 128 px in width, centred
    assert fit == Fit((384, 192), 0, 64)
    np.testing.assert_array_equal(time_ids(1000, 500, fit, (256, 192)), [500, 1000, 0, 64, 192, 256])
    tall = fit_cover(300, 900, (128, 256), "center")  # scale max(0.4267, 0.2844) → 128x384
    assert tall == Fit((128, 384), 64, 0)


def test_fit_cover_random_crop_range_and_determinism():
    lefts = {fit_cover(1000, 500, (256, 192), "random", np.random.default_rng(s)).crop_left
             for s in range(200)}
    assert min(lefts) >= 0 and max(lefts) <= 128 and len(lefts) > 50
    a = fit_cover(1000, 500, (256, 192), "random", np.random.default_rng(7))
    b = fit_cover(1000, 500, (256, 192), "random", np.random.default_rng(7))
    assert a == b and a.crop_top == 0


def test_batch_sizes_scaled_by_area():
    assert batch_sizes([(64, 64), (128, 64)], 8, 2) == [8, 8]
    # 8·8192/4096 = 16 ; 8·8192/8192 = 8
    assert batch_sizes([(64, 64), (128, 64)], 8, 2, True, 128 * 64) == [16, 8]
    # 8·1.3 = 10.4 → nearest multiple of 4 is 12
    assert batch_sizes([(100, 100)], 8, 4, True, 13000) == [12]
    with pytest.raises(ValueError, match="multiple"):
        batch_sizes([(64, 64)], 6, 4)


def test_normalize_tags():
    caption = "  Red_Hair, red hair,BLUE   eyes, , ^_^, 1girl ,looking_at_viewer"
    assert normalize_tags(caption) == ["red hair", "blue eyes", "^_^", "1girl", "looking at viewer"]
    assert normalize_tags("") == []


def test_tag_counts_are_document_frequencies():
    assert tag_counts([["a", "b"], ["a"], ["c", "a"]]) == {"a": 3, "b": 1, "c": 1}


def test_tag_weights_hand_computed():
    counts = {"a": 4, "b": 1, "c": 2, "rating:safe": 7}  # f_ref = median(4, 1, 2) = 2
    lists = [["a"], ["b"], ["a", "b"], ["rating:safe"], ["c"]]
    # raw: 2^-0.5, 2^0.5, exp(0)=1, 1 (no counted tag), 1 ; divided by their mean 1.024264
    w = tag_weights(lists, counts, 0.5, 0.1, 3.0, ("rating:*",))
    np.testing.assert_allclose(w, [0.690356, 1.380712, 0.976311, 0.976311, 0.976311], rtol=1e-5)
    # clip at 1.2 first: 0.707107, 1.2, 1, 1, 1 ; mean 0.981421
    w = tag_weights(lists, counts, 0.5, 0.1, 1.2, ("rating:*",))
    np.testing.assert_allclose(w, [0.720493, 1.222716, 1.018930, 1.018930, 1.018930], rtol=1e-5)
    assert np.mean(w) == pytest.approx(1.0)


def test_caption_dropout_shuffle_keep_first_n():
    tags = ["1girl", "solo", "red hair", "blue eyes", "smile", "hat"]
    assert augment_caption(tags, np.random.default_rng(0), 1.0, True, 1) == ""
    assert augment_caption(tags, np.random.default_rng(0), 0.0, False, 1) == ", ".join(tags)
    outs = {augment_caption(tags, np.random.default_rng(s), 0.0, True, 2) for s in range(30)}
    assert len(outs) > 10
    for out in outs:
        got = out.split(", ")
        assert got[:2] == ["1girl", "solo"] and sorted(got) == sorted(tags)
    a = [augment_caption(tags, np.random.default_rng(s), 0.5, True, 1) for s in range(200)]
    b = [augment_caption(tags, np.random.default_rng(s), 0.5, True, 1) for s in range(200)]
    assert a == b
    assert 60 < sum(x == "" for x in a) < 140  # dropout 0.5 over 200 draws


def test_plan_epoch_structure_and_carry():
    record_buckets = np.array([0] * 10 + [1] * 7 + [2] * 2)
    ids = np.arange(19)
    plan = plan_epoch(record_buckets, ids, [4, 4, 4], seed=0, epoch=0, carry_in=np.zeros(0, int))
    assert len(plan.batches) == 2 + 1  # floor(10/4) + floor(7/4); bucket 2 never fills a batch
    used = np.concatenate(plan.batches)
    assert len(set(used.tolist())) == len(used) == 12
    for b, batch in zip(plan.bucket_ids, plan.batches):
        assert (record_buckets[batch] == b).all()
    assert set(plan.carry_out.tolist()) == set(ids.tolist()) - set(used.tolist())
    nxt = plan_epoch(record_buckets, ids, [4, 4, 4], seed=0, epoch=1, carry_in=plan.carry_out)
    used_next = set(np.concatenate(nxt.batches).tolist())
    leftover_buckets_0_1 = [i for i in plan.carry_out if record_buckets[i] < 2]
    assert set(leftover_buckets_0_1) <= used_next  # carried records are used first next epoch
