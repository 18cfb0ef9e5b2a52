"""Every CLI turns a user's mistake into one line `error: …` and a non-zero exit: real
subprocesses for the entry points (each fails before anything compiles), and the shared wrapper (sdxl_jax.cli) in-process for the rest."""
import json
import os
import subprocess
import sys

import pytest

from sdxl_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, cwd=REPO):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    env.pop(cli.DEBUG_ENV, None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def assert_one_line(proc, *fragments):
    """Exit status non-zero; stderr's error is one line `error: …` holding every fragment."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: "), proc.stderr
    for f in fragments:
        assert f in errors[0], (f, errors[0])
    return errors[0]


TRAIN = ("train.py", "--config", "configs/ztsnr.py:tiny")


def test_train_missing_config_file(tmp_path):
    proc = run("train.py", "--config", "configs/nope.py", "--workdir", str(tmp_path / "wd"))
    assert_one_line(proc, "--config", "configs/nope.py", "No such file")
    assert proc.returncode == cli.EXIT_USAGE


def test_train_misspelt_key_keeps_did_you_mean(tmp_path):
    proc = run(*TRAIN, "--workdir", str(tmp_path / "wd"), "--config.data.cache_dirr=/x")
    assert_one_line(proc, "--config.data.cache_dirr=/x",
                    'Did you mean "cache_dir" instead of "cache_dirr"?')
    assert not (tmp_path / "wd").exists()  # stopped before the run started


def test_train_zero_byte_pretrained_weights(tmp_path):
    from sdxl_jax.data.demo import make_demo_dataset
    images = tmp_path / "images"
    make_demo_dataset(str(images), n=2)  # given inputs: no demo-data fallback
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    proc = run(*TRAIN, "--workdir", str(tmp_path / "wd"), f"--config.model.pretrained={weights}",
               f"--config.data.images_dir={images}")
    assert_one_line(proc, str(weights), "0 bytes")
    assert proc.returncode == cli.EXIT_ERROR


def test_train_workdir_that_is_a_file(tmp_path):
    workdir = tmp_path / "runs"
    workdir.write_text("not a directory")
    proc = run(*TRAIN, "--workdir", str(workdir))
    assert_one_line(proc, f"--workdir '{workdir}' is a file")
    assert workdir.read_text() == "not a directory"


def test_sample_zero_steps(tmp_path):
    proc = run("-m", "sdxl_jax.sample", "--workdir", str(tmp_path), "--prompt", "x",
               "--steps", "0", "--out", str(tmp_path / "x.png"))
    assert_one_line(proc, "steps 0", "at least 1 step")


def test_demo_dataset_negative_n(tmp_path):
    proc = run("-m", "data_tools.make_demo_dataset", "--out", str(tmp_path / "d"), "--n", "-3")
    assert_one_line(proc, "--n -3", "at least 1 image")
    assert not (tmp_path / "d").exists()  # nothing written, no empty demo.json


# ---- in-process: the same wrapper, no interpreter start-up -------------------------------------

@pytest.fixture
def fake_run(monkeypatch):
    """sample.load_run replaced by a tiny run's config: the size checks come before any model
    is built, so nothing else is needed."""
    from sdxl_jax import sample
    cfg = {"model": {"preset": "tiny"}, "sample": {"width": 256, "height": 256}}
    monkeypatch.setattr(sample, "load_run", lambda *a, **k: (cfg, None, {}))
    monkeypatch.setattr(sample, "sampler_for_run", lambda *a: pytest.fail("got past the checks"))
    return sample


@pytest.mark.parametrize("flag, value, fragments", [
    ("--width", "200", ("width 200", "multiple of 32", "try 192 or 224")),
    ("--height", "-64", ("height -64", "positive")),
])
def test_sample_bad_sizes(fake_run, tmp_path, flag, value, fragments):
    with pytest.raises(SystemExit) as e:  # main() is the CLI: the one line is the exit message
        fake_run.main(["--workdir", str(tmp_path), "--prompt", "x", flag, value,
                       "--out", str(tmp_path / "x.png")])
    err = e.value.code
    assert isinstance(err, str) and err.startswith("error: ") and "\n" not in err
    assert all(f in err for f in fragments), err


def test_usage_errors_are_one_line(fake_run, capsys):
    with pytest.raises(SystemExit) as e:
        fake_run.main(["--prompt", "x", "--out", "x.png"])  # neither --workdir nor --checkpoint
    err = capsys.readouterr().err.strip()
    assert e.value.code == cli.EXIT_USAGE and len(err.splitlines()) == 1
    assert err.startswith("error: python -m sdxl_jax.sample: one of the arguments --workdir "
                          "--checkpoint is required")


def test_debug_flag_and_env_show_the_traceback(fake_run, tmp_path, monkeypatch):
    argv = ["--workdir", str(tmp_path), "--prompt", "x", "--width", "200", "--out", "x.png"]
    with pytest.raises(ValueError, match="width 200"):
        fake_run.main(argv + ["--debug"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="width 200"):
        fake_run.main(argv)


def exit_message(fn):
    """The SystemExit message cli.run turns fn's error into."""
    with pytest.raises(SystemExit) as e:
        cli.run(lambda argv: fn(), [])
    return e.value.code


def test_which_errors_are_one_line():
    from sdxl_jax.data.cache import CacheError

    def wrapped():  # a library re-raising our error as the cause of its own
        try:
            raise CacheError("cache shard s.array_record: file missing")
        except CacheError as e:
            raise RuntimeError("worker failed") from e
    assert exit_message(wrapped) == "error: cache shard s.array_record: file missing"

    def enospc():
        raise OSError(28, "No space left on device", "/ckpt/tmp")
    assert exit_message(enospc).startswith(
        "error: [Errno 28] No space left on device: '/ckpt/tmp'")

    def multi_line():
        raise ValueError("first line\n  second line")
    assert exit_message(multi_line) == "error: first line; second line"

    with pytest.raises(KeyError):  # a bug, not a user's mistake: the traceback stays
        cli.run(lambda argv: {}["missing"], [])

    def bug_while_handling():  # a bug raised while handling a user error is not hidden
        try:
            raise ValueError("a user error")
        except ValueError:
            return [][1]
    with pytest.raises(IndexError):
        cli.run(lambda argv: bug_while_handling(), [])


def test_wrapper_is_transparent_on_success(tmp_path, capsys):
    """Exit status and stdout of main are unchanged when nothing fails."""
    from data_tools import make_demo_dataset
    assert make_demo_dataset.main(["--out", str(tmp_path / "d"), "--n", "1"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 1 captioned images to {tmp_path / 'd'}"
    assert json.loads((tmp_path / "d" / "demo.json").read_text())["spec"]["n"] == 1


def test_train_profile_steps_one_value_before_anything_starts(tmp_path):
    """profile_steps=3 used to fail after the restore with "not enough values to unpack"."""
    proc = run(*TRAIN, "--workdir", str(tmp_path / "wd"), "--config.profile_steps=3")
    assert_one_line(proc, "profile_steps='3': give 'a,b', the first and last step to trace")
    assert not (tmp_path / "wd").exists()  # stopped before the run started


@pytest.mark.parametrize("key, value, message", [
    ("lora.targets", ("attn1/(to_q",), r"lora\.targets\[0\]='attn1/\(to_q': not a regular "
                                       r"expression \(missing \), unterminated subpattern"),
    ("profile_steps", "5,2", r"profile_steps='5,2': give 'a,b'.* 0 ≤ a < b"),
    ("profile_steps", "a,b", r"profile_steps='a,b': give 'a,b'"),
])
def test_config_values_that_reached_a_traceback_are_one_line(key, value, message):
    from helpers import tiny_config
    from sdxl_jax.config import ConfigError, validate
    with pytest.raises(ConfigError, match=message):
        validate(tiny_config(**{key: value, "train.trainable": "lora"}))
