"""Pushing to the Hugging Face Hub (sdxl_jax.publish, export --push-to-hub) against the loopback
stand-in of tests/hub_standin.py: the repo, the one commit's files and sizes (large files through
the LFS batch API), --private, --revision, and one error line for each way a push fails.

Every push runs as a subprocess, as a user runs it: huggingface_hub reads HF_ENDPOINT and
HF_HUB_OFFLINE when it is imported, and the suite runs offline. The staging-folder tests need no
model (they run with any huggingface_hub the project supports); the export tests push each of
the four formats of a tiny run.
"""
import dataclasses
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from hub_standin import HubStandin, User

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = {"hf_alice": User("alice", orgs=("team",)), "hf_read": User("rita", role="read"),
          "hf_fine": User("alice", role="fineGrained")}


@pytest.fixture()
def hub():
    with HubStandin(TOKENS) as h:
        yield h


def run_cli(module: str, args: list, hub_url: str, token: str | None = "hf_alice", **env):
    """`python -m module args` with the Hub at `hub_url` (Xet off: the stand-in serves LFS)."""
    full = dict(os.environ, HF_ENDPOINT=hub_url, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1",
                HF_HOME=env.pop("hf_home"), PYTHONPATH=ROOT)
    full.update(env)
    full.pop("HF_TOKEN", None)
    if token is not None:
        full["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=300)


def error_line(proc) -> str:
    """The one `error: …` line of a failed command (and that it is the only one)."""
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and proc.stderr.rstrip().endswith(lines[0]), proc.stderr[-2000:]
    return lines[0]


def local_files(folder: str) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder).replace(os.sep, "/")] = p
    return out


# ---- a prepared staging folder (no model) -------------------------------------------------------

@pytest.fixture()
def staged(tmp_path):
    from PIL import Image
    folder = tmp_path / "staged"
    (folder / "unet").mkdir(parents=True)
    (folder / "README.md").write_text("---\nlicense: mit\ntags:\n- v-prediction\n---\n# tiny\n")
    (folder / "unet" / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(3001))
    (folder / "unet" / "config.json").write_text(json.dumps({"sample_size": 8}))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "preview.png")
    return str(folder)


def test_push_is_one_commit_with_every_file(hub, staged, tmp_path):
    proc = run_cli("sdxl_jax.publish", [staged, "--repo", "alice/tiny", "--commit-message", "v1"],
                   hub.url, hf_home=str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [c["repo"] for c in hub.commits] == ["alice/tiny"]
    commit = hub.commits[0]
    assert commit["revision"] == "main" and commit["message"] == "v1"
    want = local_files(staged)
    assert sorted(commit["files"]) == ["README.md", "preview.png", "unet/config.json",
                                       "unet/model.safetensors"]
    for path, local in want.items():
        with open(local, "rb") as f:
            assert commit["files"][path] == f.read(), path
    # weights and the binary PNG went through the LFS batch API and a PUT of their bytes
    assert commit["lfs"] == {"unet/model.safetensors", "preview.png"}
    assert sum(1 for m, p in hub.calls if m == "PUT") == 2
    assert [p for m, p in hub.calls if "/commit/" in p] == ["/api/models/alice/tiny/commit/main"]
    assert hub.repos["alice/tiny"]["private"] is False


def test_private_repo_and_branch(hub, staged, tmp_path):
    home = str(tmp_path / "hf")
    proc = run_cli("sdxl_jax.publish", [staged, "--repo", "team/tiny", "--private",
                                        "--revision", "dev"], hub.url, hf_home=home)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert hub.repos["team/tiny"]["private"] is True
    assert set(hub.repos["team/tiny"]["branches"]) == {"main", "dev"}
    assert [(c["repo"], c["revision"]) for c in hub.commits] == [("team/tiny", "dev")]
    # a second push of the same repo adds a commit (the repo exists: no error)
    proc = run_cli("sdxl_jax.publish", [staged, "--repo", "team/tiny", "--revision", "dev"],
                   hub.url, hf_home=home)
    assert proc.returncode == 0 and len(hub.commits) == 2
    # --private never pushes into an existing public repo
    assert run_cli("sdxl_jax.publish", [staged, "--repo", "alice/pub"], hub.url,
                   hf_home=home).returncode == 0
    line = error_line(run_cli("sdxl_jax.publish", [staged, "--repo", "alice/pub", "--private"],
                              hub.url, hf_home=home))
    assert "alice/pub exists and is public" in line and len(hub.commits) == 3


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there: connection refused
    return port


@pytest.mark.parametrize("case, token, repo, expect", [
    ("no token", None, "alice/x", "no Hugging Face token to push alice/x with: set HF_TOKEN"),
    ("401", "hf_wrong", "alice/x", "rejected the token (401 Unauthorized"),
    ("read-only", "hf_read", "rita/x", "the token of rita is read-only"),
    ("403", "hf_fine", "alice/x", "may not write to alice/x (403 Forbidden"),
    ("someone else's", "hf_alice", "bob/x", "bob/x belongs to bob, which is not alice"),
    ("bad id", "hf_alice", "just-a-name", "give the repo as OWNER/NAME"),
])
def test_push_errors_are_one_line(hub, staged, tmp_path, case, token, repo, expect):
    line = error_line(run_cli("sdxl_jax.publish", [staged, "--repo", repo], hub.url, token,
                              hf_home=str(tmp_path / "hf")))
    assert expect in line, line
    assert hub.commits == [] and not hub.repos  # nothing created, nothing half-uploaded


def test_unreachable_and_offline_hub(staged, tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}"
    line = error_line(run_cli("sdxl_jax.publish", [staged, "--repo", "alice/x"], url,
                              hf_home=str(tmp_path / "hf")))
    assert line.startswith(f"error: cannot reach the Hugging Face Hub at {url} (connection "
                           "failed") and "nothing was uploaded" in line, line
    line = error_line(run_cli("sdxl_jax.publish", [staged, "--repo", "alice/x"], url,
                              hf_home=str(tmp_path / "hf"), HF_HUB_OFFLINE="1"))
    assert "HF_HUB_OFFLINE is set" in line and "HF_HUB_OFFLINE=0" in line


def test_folder_without_card_is_refused(hub, staged, tmp_path):
    os.remove(os.path.join(staged, "README.md"))
    line = error_line(run_cli("sdxl_jax.publish", [staged, "--repo", "alice/x"], hub.url,
                              hf_home=str(tmp_path / "hf")))
    assert "has no README.md" in line and hub.calls == []


# ---- export --push-to-hub of a tiny run, each format --------------------------------------------

@pytest.fixture(scope="module")
def lora_run(reference_run, tmp_path_factory):
    """A LoRA run of the reference run's config (micro preset), saved by the trainer's contract:
    adapter trees as params/EMA, meta trainable + lora."""
    import jax

    from sdxl_jax.adapters import AdapterConfig, init_adapters, make_plan
    from sdxl_jax.checkpoint import Checkpointer
    from sdxl_jax.models.weights import cached_abstract_params
    from sdxl_jax.train.state import TrainState

    cfg = json.loads(reference_run[0].to_json_best_effort())
    lora = AdapterConfig(rank=2, alpha=1.0)
    cfg["train"]["trainable"] = "lora"
    cfg["lora"].update({k: v for k, v in dataclasses.asdict(lora).items() if k in cfg["lora"]})
    plan = make_plan({"unet": cached_abstract_params("unet", cfg["model"]["preset"])}, lora)
    tree = jax.device_get(init_adapters(plan, seed=0))
    wd = str(tmp_path_factory.mktemp("lora_run"))
    state = TrainState(step=np.int32(3), params=tree, opt_state={}, ema_params=tree,
                       rng=np.zeros((2,), np.uint32), nonfinite=np.int32(0))
    ck = Checkpointer(os.path.join(wd, "checkpoints"), async_save=False)
    ck.save(3, state, {"iterator": {}}, cfg,
            {"latents": {"normalization": "scale", "mean": None, "std": None},
             "trainable": "lora", "lora": dataclasses.asdict(lora)})
    ck.close()
    from PIL import Image  # the preview grids the trainer leaves: the card shows the newest <= 3
    for step, value in ((2, 40), (4, 200)):
        os.makedirs(os.path.join(wd, "samples"), exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(
            os.path.join(wd, "samples", f"step_{step:07d}.png"))
    return wd


@pytest.mark.parametrize("fmt, weights, keep", [
    ("diffusers", None, True), ("single-file", "tiny-single-file.safetensors", False),
    ("lora", "tiny-lora.safetensors", True),
    ("lora-diffusers", "pytorch_lora_weights.safetensors", False)])
def test_export_pushes_each_format(hub, reference_run, lora_run, tmp_path, fmt, weights, keep):
    """With --out the export is kept there and the push is that export byte for byte; without,
    it is staged in the workdir and the staging folder is gone afterwards."""
    from safetensors.numpy import load

    from sdxl_jax.model_card import parse_card

    wd = lora_run if fmt.startswith("lora") else reference_run[1]
    repo = f"alice/tiny-{fmt}"
    out = str(tmp_path / ("out" if fmt == "diffusers" else "out.safetensors"))
    card = []
    if fmt == "lora-diffusers":  # a card written by --model-card and edited, uploaded as is
        edited = tmp_path / "card.md"
        edited.write_text("---\nlicense: mit\ntags:\n- lora\n---\n# edited by hand\n")
        card = ["--card", str(edited)]
    proc = run_cli("sdxl_jax.export", ["--workdir", wd, "--format", fmt, "--push-to-hub", repo,
                                       "--license", "mit", "--private", *card]
                   + (["--out", out] if keep else []), hub.url, hf_home=str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [c["repo"] for c in hub.commits] == [repo] and hub.repos[repo]["private"] is True
    step = 3 if fmt.startswith("lora") else 8
    assert hub.commits[0]["message"] == f"sdxl_jax export: {fmt}, step {step} (ema weights)"
    files = hub.commits[0]["files"]
    if fmt == "diffusers":
        want = local_files(out)
        assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors",
                "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                "text_encoder_2/model.safetensors", "scheduler/scheduler_config.json",
                "tokenizer/vocab.json", "tokenizer_2/vocab.json"} <= set(want)
    else:
        want = {weights: out}
    if fmt.startswith("lora"):
        want["images/preview.png"] = os.path.join(lora_run, "samples", "step_0000002.png")
    assert set(files) == set(want) | {"README.md"}
    for path, local in want.items():
        if os.path.exists(local):  # kept at --out, or the run's own preview
            assert len(files[path]) == os.path.getsize(local), path
            with open(local, "rb") as f:
                assert files[path] == f.read(), path
        else:  # staged only: a whole safetensors file (every tensor's bytes present)
            tensors = load(files[path])
            assert tensors and len(files[path]) > sum(t.nbytes for t in tensors.values())
    assert hub.commits[0]["lfs"] == {p for p in files if p.endswith((".safetensors", ".png"))}
    header, body = parse_card(files["README.md"].decode())
    assert header["license"] == "mit"
    assert ("lora" in header["tags"]) == fmt.startswith("lora")
    if card:
        assert body == "# edited by hand\n"
    elif fmt.startswith("lora"):
        assert header["widget"][0]["output"] == {"url": "images/preview.png"}
        assert "![preview grid](images/preview.png)" in body and "at step 2 " in body
    for folder in (wd, str(tmp_path)):
        assert not [n for n in os.listdir(folder) if n.startswith(".hub-staging-")]


def test_export_checks_access_before_exporting(hub, reference_run, tmp_path):
    """A push that cannot succeed fails before the checkpoint is read, in one line."""
    out = str(tmp_path / "m.safetensors")
    args = ["--workdir", reference_run[1], "--format", "single-file", "--push-to-hub",
            "alice/m", "--license", "mit", "--out", out]
    line = error_line(run_cli("sdxl_jax.export", args, hub.url, "hf_read",
                              hf_home=str(tmp_path / "hf")))
    assert "the token of rita is read-only" in line
    url = f"http://127.0.0.1:{_closed_port()}"
    line = error_line(run_cli("sdxl_jax.export", args, url, hf_home=str(tmp_path / "hf")))
    assert f"cannot reach the Hugging Face Hub at {url}" in line
    assert not os.path.exists(out) and hub.commits == [] and not hub.repos
