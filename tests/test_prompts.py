"""kohya-style prompt files: parsing, errors with the line, nearest-bucket sizes, grouped sampling."""
import numpy as np
import pytest

from sdxl_jax.data.buckets import make_buckets
from sdxl_jax.prompts import (PromptSpec, nearest_bucket, parse_prompt_line, read_prompt_file,
                              render_jobs, resolve_prompts, rows_grid)
from sdxl_jax.sample import SampleSettings

SAMPLE_FILE = """\
# previews for the night-sky run

masterpiece, 1girl, night sky --n lowres, bad hands --w 832 --h 1216 --d 42 --l 6.5 --s 20
   # indented comment
white background, red circle
(blue square:1.2), #1 fan --S 12 --N  --d 7
"""

SDXL_BUCKETS = make_buckets(1024 * 1024, 512, 2048, 64, (1024, 1024))
TINY_BUCKETS = make_buckets(256 * 256, 192, 320, 64, (256, 256))  # 192×320, 256×256, 320×192


def test_prompt_file_parse_literal(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(SAMPLE_FILE, encoding="utf-8")
    assert read_prompt_file(str(path)) == [
        PromptSpec("masterpiece, 1girl, night sky", negative="lowres, bad hands", width=832,
                   height=1216, seed=42, cfg=6.5, steps=20, line=3),
        PromptSpec("white background, red circle", line=5),
        # options are case-insensitive (as in kohya); an empty --n is an empty negative
        PromptSpec("(blue square:1.2), #1 fan", negative="", seed=7, steps=12, line=6),
    ]
    assert parse_prompt_line("   ") is None and parse_prompt_line("# x --w 5") is None
    assert parse_prompt_line("a --d 1 --d 2") == PromptSpec("a", seed=2)  # the last one wins


def test_prompt_file_errors_name_file_and_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("ok prompt\n\n1girl --ar 2:3\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"p\.txt:3: unknown option --ar; prompt files take --n, "
                                         r"--w, --h, --d, --l, --s"):
        read_prompt_file(str(path))
    path.write_text("# c\nx --w wide\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"p\.txt:2: --w needs an integer, got 'wide'"):
        read_prompt_file(str(path))
    path.write_text("x --s 0\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"p\.txt:1: --s 0 must be at least 1"):
        read_prompt_file(str(path))
    path.write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no prompt"):
        read_prompt_file(str(path))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_prompt_file(str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("size,bucket", [
    ((832, 1216), (832, 1216)),    # a bucket itself
    ((1000, 1000), (1024, 1024)),
    ((1920, 1080), (1344, 768)),   # 16:9 → 1.75 (1.667 and 2.0 are farther in log ratio)
    ((1080, 1920), (768, 1344)),
    ((1200, 900), (1152, 896)),    # 4:3 → 1.286
    ((3000, 500), (2048, 512)),    # beyond the widest bucket
])
def test_prompt_size_snaps_to_nearest_sdxl_bucket(size, bucket):
    assert nearest_bucket(*size, SDXL_BUCKETS) == bucket


def test_prompt_size_ties_in_ratio_go_to_the_nearest_area():
    table = [(512, 512), (1024, 1024), (512, 1024)]
    assert nearest_bucket(600, 600, table) == (512, 512)
    assert nearest_bucket(800, 800, table) == (1024, 1024)
    assert nearest_bucket(300, 700, table) == (512, 1024)


def test_prompt_resolve_options_over_defaults():
    defaults = SampleSettings(width=256, height=256, steps=28, cfg=5.0, negative="bad")
    specs = [PromptSpec("a"), PromptSpec("b", width=300, height=200, seed=9),
             PromptSpec("c", height=1000, cfg=3.0, steps=4, negative="")]
    a, b, c = resolve_prompts(specs, defaults, (0, 1), TINY_BUCKETS)
    assert (a.prompt, a.seeds, a.settings) == ("a", (0, 1), defaults)
    assert b.seeds == (9,) and (b.settings.width, b.settings.height) == (320, 192)
    assert b.settings.steps == 28 and b.settings.negative == "bad"
    # width from the defaults (256), height 1000 → ratio 0.256 → 192×320
    assert (c.settings.width, c.settings.height, c.settings.cfg, c.settings.steps,
            c.settings.negative) == (192, 320, 3.0, 4, "")


class _RecordingSampler:
    """Stands in for ImageSampler.generate: an image's pixels encode its prompt and seed."""

    def __init__(self):
        self.calls = []

    def generate(self, params, pairs, s):
        self.calls.append((list(pairs), s.width, s.height, s.steps))
        img = np.zeros((len(pairs), s.height // 64, s.width // 64, 3), np.uint8)
        for k, (prompt, seed) in enumerate(pairs):
            img[k, ..., 0], img[k, ..., 1] = ord(prompt[0]), seed
        return img, None


def test_prompt_jobs_group_same_settings_in_one_call():
    defaults = SampleSettings(width=256, height=256, steps=28)
    specs = [PromptSpec("a"), PromptSpec("b", width=320, height=192), PromptSpec("c", seed=5),
             PromptSpec("d", width=320, height=192, steps=10)]
    jobs = resolve_prompts(specs, defaults, (0, 1), TINY_BUCKETS)
    sampler = _RecordingSampler()
    rows = render_jobs(sampler, None, jobs)
    assert sampler.calls == [([("a", 0), ("a", 1), ("c", 5)], 256, 256, 28),
                             ([("b", 0), ("b", 1)], 320, 192, 28),
                             ([("d", 0), ("d", 1)], 320, 192, 10)]
    assert [r.shape for r in rows] == [(2, 4, 4, 3), (2, 3, 5, 3), (1, 4, 4, 3), (2, 3, 5, 3)]
    for row, prompt, seeds in zip(rows, "abcd", [(0, 1), (0, 1), (5,), (0, 1)]):
        assert (row[..., 0] == ord(prompt)).all()
        np.testing.assert_array_equal(row[:, 0, 0, 1], seeds)
    grid = rows_grid(rows)
    assert grid.shape == (4 + 3 + 4 + 3, 10, 3)  # widest row: 2 × 5 pixels
    assert (grid[7:11, 4:, :] == 128).all() and (grid[7:11, :4, 1] == 5).all()  # "c" padded grey


def test_prompt_file_cli_errors_before_loading_the_run(tmp_path, capsys):
    from sdxl_jax.sample import main
    bad = tmp_path / "p.txt"
    bad.write_text("fine\n1girl --ar 2:3\n", encoding="utf-8")
    out = str(tmp_path / "x.png")
    with pytest.raises(SystemExit) as e:  # no checkpoint exists: the file is read first
        main(["--workdir", str(tmp_path), "--prompts-file", str(bad), "--out", out])
    assert "p.txt:2: unknown option --ar" in f"{e.value.code}{capsys.readouterr().err}"
    with pytest.raises(SystemExit):
        main(["--workdir", str(tmp_path), "--out", out])  # neither --prompt nor --prompts-file
    assert "--prompts-file" in capsys.readouterr().err


def test_seed_beyond_32_bits_names_file_and_line(tmp_path):
    """A seed PRNGKey cannot take (beyond 64 bits: OverflowError) or would fold onto a smaller one
    (beyond 32 bits) is one line naming the file and line, in the sample CLI's reader and in
    the training config's sample.prompts_file, before any run starts."""
    from sdxl_jax.config import ConfigError, validate
    from helpers import tiny_config
    path = tmp_path / "p.txt"
    path.write_text("fine --d 4294967295\n\nhuge --d 1180591620717411303424\n", encoding="utf-8")
    message = r"p\.txt:3: --d 1180591620717411303424: a seed must be an integer from 0 to 4294967295"
    with pytest.raises(ValueError, match=message):
        read_prompt_file(str(path))
    with pytest.raises(ConfigError, match="sample.prompts_file: .*" + message):
        validate(tiny_config(**{"sample.prompts_file": str(path)}))
    path.write_text("folds onto 0 --d 4294967296\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"p\.txt:1: --d 4294967296: a seed must be"):
        read_prompt_file(str(path))
    with pytest.raises(ConfigError, match=r"sample.seeds\[1\]=-1: a seed must be"):
        validate(tiny_config(**{"sample.seeds": (0, -1)}))


def test_sample_seed_beyond_64_bits_is_one_line(tmp_path):
    from sdxl_jax.sample import main
    with pytest.raises(SystemExit) as e:  # no run exists: the seed is checked first
        main(["--workdir", str(tmp_path), "--prompt", "x", "--seed", "1180591620717411303424",
              "--out", str(tmp_path / "x.png")])
    assert e.value.code == ("error: --seed 1180591620717411303424: a seed must be an integer "
                            "from 0 to 4294967295")


def test_a_long_prompt_file_is_sampled_in_bounded_batches():
    """10,000 prompts of one setting: never one batch of 10,000 (the device OOM), but calls of
    at most the batch size, the last one padded to the same shape; each prompt's images are
    handed over as soon as they are drawn, in file order, and nothing is kept."""
    defaults = SampleSettings(width=256, height=256, steps=28)
    jobs = resolve_prompts([PromptSpec(chr(ord("a") + i % 26), seed=i % 256) for i in range(10_000)],
                           defaults, (0,), TINY_BUCKETS)
    sampler, done = _RecordingSampler(), []
    assert render_jobs(sampler, None, jobs, batch_size=8,
                       on_done=lambda i, images: done.append((i, images[:, 0, 0, :2].tolist()))) is None
    assert [len(pairs) for pairs, *_ in sampler.calls] == [8] * 1250
    assert done == [(i, [[ord("a") + i % 26, i % 256]]) for i in range(10_000)]
    # several seeds per prompt split across batches, the last batch padded: rows stay whole
    sampler = _RecordingSampler()
    rows = render_jobs(sampler, None, resolve_prompts([PromptSpec("x"), PromptSpec("y")], defaults,
                                                      (1, 2, 3), TINY_BUCKETS), batch_size=4)
    assert [pairs for pairs, *_ in sampler.calls] == [[("x", 1), ("x", 2), ("x", 3), ("y", 1)],
                                                      [("y", 2), ("y", 3), ("y", 3), ("y", 3)]]
    assert [r[:, 0, 0, 1].tolist() for r in rows] == [[1, 2, 3], [1, 2, 3]]
    assert [r[:, 0, 0, 0].tolist() for r in rows] == [[ord("x")] * 3, [ord("y")] * 3]
