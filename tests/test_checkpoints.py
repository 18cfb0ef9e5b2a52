"""Checkpoint faults end in one message and lose nothing: an unreadable latest step is moved
aside (`<step>.corrupt`) and the previous one resumes, after which that step number can be saved
again; when no step reads, the run stops naming the directory and renames nothing; a save that
runs out of disk (a real tmpfs when we may mount one, else an injected TensorStore error)
reports "no space left on DIR; last good checkpoint is step N" and leaves step N intact.
kill -9 during a save is covered by tests/test_reliability.py."""
import errno
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdxl_jax import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_SPACE = ("RESOURCE_EXHAUSTED: Error writing \"w/0.0\" in OCDBT database: Failed to write "
            "4702208 bytes to file 14: No space left on device [os_error_code='28']")


def _state(value, shape=(16, 8)):
    """A small stand-in for a train state: what matters here is arrays on disk."""
    return {"params": {"w": jnp.full(shape, value, jnp.float32)},
            "step": jnp.asarray(int(value), jnp.int32)}


def _abstract():
    abstract = jax.eval_shape(lambda: _state(0))
    sh = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
    return ckpt_lib.abstract_with_shardings(abstract, sh)


def _save(directory, steps, keep=10):
    ck = ckpt_lib.Checkpointer(str(directory), keep=keep, async_save=False)
    for step in steps:
        ck.save(step, _state(step), {"iterator": {"step": step}}, {"run": "test"}, {"step": step})
    ck.close()


def _truncate_arrays(step_dir):
    """Cut every array data file of a step (OCDBT `d/` files) to half: a copy or disk that
    stopped half way."""
    cut = 0
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        if os.path.basename(root) == "d":
            for name in files:
                path = os.path.join(root, name)
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
                cut += 1
    assert cut, f"no array files under {step_dir}"


def test_truncated_latest_moved_aside_then_saved_again(tmp_path, caplog):
    _save(tmp_path, (1, 2, 3))
    _truncate_arrays(tmp_path / "3")
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=10, async_save=False)
    with caplog.at_level("WARNING"):
        restored = ck.restore_latest_good(_abstract())
    assert restored.step == 2 and restored.data_state == {"iterator": {"step": 2}}
    np.testing.assert_array_equal(np.asarray(restored.state["params"]["w"]), np.full((16, 8), 2.0))
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3.corrupt"]  # kept, not deleted
    assert "step 3" in caplog.text and "3.corrupt" in caplog.text
    # the resumed run reaches step 3 again: saving it must not collide with the bad copy
    ck.save(3, _state(33), {"iterator": {"step": 3}}, {"run": "test"}, {"step": 3})
    ck.close()
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=10, async_save=False)
    assert ck.steps == [1, 2, 3]
    np.testing.assert_array_equal(np.asarray(ck.restore(3, _abstract()).state["params"]["w"]),
                                  np.full((16, 8), 33.0))
    # the same step number going bad again keeps both bad copies
    _truncate_arrays(tmp_path / "3")
    assert ck.restore_latest_good(_abstract()).step == 2
    ck.close()
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3.corrupt", "3.corrupt.1"]


def test_all_unreadable_is_one_error_naming_the_directory(tmp_path):
    _save(tmp_path, (1, 2))
    for step in ("1", "2"):
        _truncate_arrays(tmp_path / step)
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=10, async_save=False)
    with pytest.raises(ckpt_lib.CheckpointError) as e:
        ck.restore_latest_good(_abstract())
    ck.close()
    message = str(e.value)
    assert str(tmp_path) in message and "[1, 2]" in message and "\n" not in message
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]  # nothing renamed: a rerun fails the same
    empty = ckpt_lib.Checkpointer(str(tmp_path / "fresh"), async_save=False)
    assert empty.restore_latest_good(_abstract()) is None  # no checkpoint at all: a fresh start
    empty.close()


def test_disk_full_classified_through_nesting():
    assert ckpt_lib.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert ckpt_lib.is_disk_full(OSError(errno.EDQUOT, "quota"))
    try:
        try:
            raise ValueError(NO_SPACE)
        except ValueError as inner:
            raise RuntimeError("Failed to run 6 Handler Commit operations") from inner
    except RuntimeError as outer:
        assert ckpt_lib.is_disk_full(outer)
    assert ckpt_lib.is_disk_full(ExceptionGroup("save", [KeyError("x"), ValueError(NO_SPACE)]))
    assert not ckpt_lib.is_disk_full(ValueError("RESOURCE_EXHAUSTED: out of device memory"))
    assert not ckpt_lib.is_disk_full(OSError(errno.EACCES, "Permission denied"))


def _small_disk(tmp_path, monkeypatch):
    """(directory, how): a 3 MiB tmpfs when this process may mount one, else a directory whose
    Orbax writes fail the way TensorStore reports ENOSPC."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    ok = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True).returncode == 0
    if ok:
        return mnt, "tmpfs"
    real = ckpt_lib.ocp.CheckpointManager.save

    def failing_save(self, step, *a, **k):
        if step >= 2:  # step 1 fits, the big one does not
            os.makedirs(os.path.join(str(self.directory), f"{step}.orbax-checkpoint-tmp"))
            raise ValueError(NO_SPACE)
        return real(self, step, *a, **k)
    monkeypatch.setattr(ckpt_lib.ocp.CheckpointManager, "save", failing_save)
    return mnt, "injected"


@pytest.mark.parametrize("async_save", [False, True])
def test_disk_full_names_last_good_step_and_keeps_it(tmp_path, monkeypatch, async_save):
    disk, how = _small_disk(tmp_path, monkeypatch)
    try:
        ckdir = str(disk / "checkpoints")
        ck = ckpt_lib.Checkpointer(ckdir, keep=10, async_save=async_save)
        ck.save(1, _state(1), {"iterator": {"step": 1}}, {}, {})
        ck.wait()
        big = {"params": {"w": jax.random.normal(jax.random.PRNGKey(0), (1024, 2048))},  # 8 MiB
               "step": jnp.asarray(2, jnp.int32)}
        with pytest.raises(ckpt_lib.DiskFullError) as e:
            ck.save(2, big, {"iterator": {"step": 2}}, {}, {})
            ck.wait()  # an async save's failure surfaces here
        ck.close()  # after the error: releases, does not raise it again
        assert str(e.value).startswith(f"no space left on {ckdir}; last good checkpoint is step 1"), how
        assert sorted(os.listdir(ckdir)) == ["1"]  # the unfinished step's files are gone
        monkeypatch.undo()
        ck = ckpt_lib.Checkpointer(ckdir, keep=10, async_save=False)
        restored = ck.restore_latest_good(_abstract())
        ck.close()
        assert restored.step == 1
        np.testing.assert_array_equal(np.asarray(restored.state["params"]["w"]), np.full((16, 8), 1.0))
    finally:
        if how == "tmpfs":
            subprocess.run(["umount", str(disk)], check=True)


def test_disk_full_is_one_line_and_nonzero_exit(tmp_path):
    """The CLI view: Orbax's writer-thread tracebacks are not printed, the one message is."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True).returncode == 0
    inject = "" if mounted else (
        "real = ocp.CheckpointManager.save\n"
        "def save(self, step, *a, **k):\n"
        "    if step < 2: return real(self, step, *a, **k)\n"
        f"    raise ValueError({NO_SPACE!r})\n"
        "ocp.CheckpointManager.save = save\n")
    script = (
        "import logging, sys\n"
        "import jax, jax.numpy as jnp\n"
        "import orbax.checkpoint as ocp\n"
        "from sdxl_jax import checkpoint as C, cli\n"
        f"{inject}"
        "def main(argv):\n"
        "    logging.basicConfig(level=logging.WARNING)\n"
        "    ck = C.Checkpointer(argv[0], async_save=True)\n"
        "    try:\n"
        "        ck.save(1, {'w': jnp.ones((4, 4))}, {}, {}, {})\n"
        "        ck.save(2, {'w': jax.random.normal(jax.random.PRNGKey(0), (1024, 2048))}, {}, {}, {})\n"
        "        ck.wait()\n"
        "    finally:\n"
        "        ck.close()\n"
        "sys.exit(cli.run(main))\n")
    try:
        proc = subprocess.run([sys.executable, "-c", script, str(mnt / "ck")], capture_output=True,
                              text=True, timeout=120, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=True)
    lines = [s for s in proc.stderr.splitlines() if s.strip()]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert lines == [f"error: no space left on {mnt / 'ck'}; last good checkpoint is step 1. Free "
                     "space (or lower checkpoint.keep) and rerun the same command to resume"], lines[:20]
