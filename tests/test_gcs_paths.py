"""The path layer (sdxl_jax/paths.py) and Orbax checkpoints on gs://, against a real GCS server on
loopback (conftest.gcs_server): what the objects in the bucket are is read back with the server's
own listing, not through the code under test."""
import os

import jax
import jax.numpy as jnp
import numpy as np

from conftest import GCS_BUCKET
from sdxl_jax import checkpoint as ckpt_lib
from sdxl_jax import paths


def _key(url: str) -> str:
    return url.split(f"gs://{GCS_BUCKET}/", 1)[1]


def test_whole_object_writes_listing_and_rename_on_gcs_and_disk(gcs_server, gcs_dir, tmp_path):
    for base in (gcs_dir, str(tmp_path / "local")):
        f = paths.join(base, "run", "config.json")
        assert not paths.exists(f)
        paths.write_text(f, "a" * 1000)
        paths.write_text(f, "b")  # replaces the whole file/object: no stale tail
        assert paths.read_text(f) == "b" and paths.isfile(f)
        paths.write_bytes(paths.join(base, "run", "sub", "x.bin"), b"\x00\x01")
        assert sorted(paths.listdir(paths.join(base, "run"))) == ["config.json", "sub"]
        assert paths.isdir(paths.join(base, "run", "sub"))
        paths.rename(paths.join(base, "run", "sub"), paths.join(base, "run", "sub.corrupt"))
        assert paths.read_bytes(paths.join(base, "run", "sub.corrupt", "x.bin")) == b"\x00\x01"
        assert not paths.exists(paths.join(base, "run", "sub"))
    assert sorted(os.listdir(tmp_path / "local" / "run")) == ["config.json", "sub.corrupt"]  # no temp files
    assert sorted(gcs_server.objects(GCS_BUCKET, _key(gcs_dir) + "/")) == [
        f"{_key(gcs_dir)}/run/config.json", f"{_key(gcs_dir)}/run/sub.corrupt/x.bin"]
    paths.rmtree(paths.join(gcs_dir, "run"))
    assert gcs_server.objects(GCS_BUCKET, _key(gcs_dir) + "/") == []
    assert paths.absolute(gcs_dir + "/") == gcs_dir and paths.absolute("~") == os.path.expanduser("~")


def test_orbax_steps_commit_keep_and_restore_on_gcs(gcs_server, gcs_dir):
    """Orbax on GCS marks a finished step with commit_success.txt (no rename there); keep-N
    deletes the older steps' objects; a restore reads back the saved arrays exactly."""
    directory = paths.join(gcs_dir, "checkpoints")
    state = {"w": jnp.arange(24, dtype=jnp.float32).reshape(4, 6), "n": jnp.int32(7)}
    ck = ckpt_lib.Checkpointer(directory, keep=2, async_save=True)
    for step in (1, 2, 3):
        ck.save(step, jax.tree.map(lambda x: x * step, state), {"i": step}, {"c": 1}, {"m": 1})
    ck.close()
    names = [n[len(_key(directory)) + 1:] for n in gcs_server.objects(GCS_BUCKET, _key(directory) + "/")]
    assert sorted(n.split("/")[0] for n in names if n.count("/") == 1 and
                  n.endswith("/commit_success.txt")) == ["2", "3"], names
    assert not [n for n in names if n.startswith("1/")]
    ck = ckpt_lib.Checkpointer(directory, read_only=True)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = ck.restore_latest_good(abstract)
    ck.close()
    assert restored.step == 3 and restored.data_state == {"i": 3}
    np.testing.assert_array_equal(restored.state["w"], np.arange(24, dtype=np.float32).reshape(4, 6) * 3)


COMPILE = ("import jax, jax.numpy as jnp\n"
           "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
           "jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)\n"
           "from sdxl_jax.train.common import use_compilation_cache\n"
           "import sys; use_compilation_cache(sys.argv[1])\n"
           "jax.monitoring.register_event_listener(lambda name, **kw: print('event', name))\n"
           "print(jax.config.jax_compilation_cache_dir)\n"
           "print(float(jax.jit(lambda x: jnp.sin(x) * 3)(jnp.arange(4.0)).sum()))\n")


def test_persistent_compilation_cache_on_gcs(gcs_server, gcs_dir):
    """The trainer's persistent XLA cache under a gs:// workdir: the first process writes its
    compiled program there, a second one finds it (no new entry)."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs, entries = [], []
    for _ in range(2):
        runs.append(subprocess.run([sys.executable, "-c", COMPILE, gcs_dir], env=dict(env, PYTHONPATH=root),
                                   capture_output=True, text=True, timeout=300))
        assert runs[-1].returncode == 0, runs[-1].stderr[-2000:]
        entries.append(gcs_server.objects(GCS_BUCKET, _key(gcs_dir) + "/jax_cache/"))
    assert runs[0].stdout.split()[0] == gcs_dir + "/jax_cache"
    assert entries[0] and all(e.split("/")[-1].startswith("jit_") for e in entries[0]), entries
    hit = "event /jax/compilation_cache/cache_hits"
    assert hit not in runs[0].stdout and hit in runs[1].stdout, runs[1].stdout
    assert entries[1] == entries[0]
    assert runs[1].stdout.splitlines()[-1] == runs[0].stdout.splitlines()[-1]  # the same result
