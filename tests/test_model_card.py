"""The model card of a run (sdxl_jax.model_card, export --model-card): its YAML header field by
field and the settings it states, literally, against the tiny reference run's config; licenses;
adapter and non-ZTSNR variants; the CLI that writes the card alone."""
import copy
import os

import pytest

from sdxl_jax import export, model_card
from sdxl_jax.model_card import RunFacts, parse_card, published_files, render_card, run_facts
from sdxl_jax.runs import open_run

PROMPTS = ["completely black", "white background, red circle", "blue square, 1girl"]


@pytest.fixture(scope="module")
def facts(reference_run):
    return run_facts(open_run(reference_run[1]), "ema")


def card(facts, fmt="single-file", repo="me/tiny", license_id="openrail++", preview=None):
    return parse_card(render_card(facts, fmt, repo, published_files(fmt, repo), license_id,
                                  "fp16", preview))


def test_card_states_the_runs_recipe(facts, reference_run, demo_images):
    cfg = reference_run[0]
    assert (facts.step, facts.trainable, facts.weights, facts.preview) == (8, "unet", "ema", None)
    # the settings this check rests on, as tests/helpers.py sets them
    assert (cfg.train.steps, cfg.train.global_batch_size, cfg.train.learning_rate) == (8, 8, 3e-4)
    assert (cfg.train.lr_schedule, cfg.schedule.ztsnr, cfg.loss.snr_gamma) == ("constant",
                                                                              "rescale", 5.0)
    header, body = card(facts)
    assert header == {
        "license": "openrail++",
        "tags": ["stable-diffusion-xl", "text-to-image", "v-prediction", "zero-terminal-snr",
                 "sdxl_jax"],
        "library_name": "diffusers", "pipeline_tag": "text-to-image",
        "widget": [{"text": p} for p in PROMPTS]}  # no base_model: random init
    for row in ["| steps | 8 of 8 |", "| global batch | 8 |",
                "| learning rate | 0.0003, constant after 0 warmup steps |",
                "| zero terminal SNR | yes (betas rescaled, ᾱ_T = 0) |",
                "| loss weighting | MinSNR+1: w = min(SNR+1, γ)/(SNR+1) (weight 1 at the ZTSNR "
                "terminal step), γ = 5 |",
                "| buckets | area ≤ 16384 px, sides 128–128 step 32, base 128×128, random crop |",
                "| EMA | decay 0.9999 (power 0.667) |",
                "| trained | UNet (text encoders and VAE frozen) |",
                "| published weights | EMA at step 8, fp16, format single-file |",
                "| `tiny.safetensors` |"]:
        assert row in body, row
    # dataset: the demo's 48 images, all in the run's one 128×128 bucket
    images = [f for f in os.listdir(demo_images) if f.endswith((".png", ".jpg", ".webp"))]
    assert len(images) == 48
    assert "**48 images** in 1 cache(s); a 0.1 share held out" in body
    assert "| 128x128 | 48 |" in body
    assert "![preview grid]" not in body
    # the scheduler line is the one the README shows and test_interop checks against diffusers
    line = ('pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, '
            'prediction_type="v_prediction", rescale_betas_zero_snr=True, '
            'timestep_spacing="trailing")')
    assert line in body
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")) as f:
        assert line in f.read()
    assert 'hf_hub_download("me/tiny", "tiny.safetensors")' in body


def test_preview_grid_is_the_newest_at_or_before_the_step(facts, tmp_path):
    for s in (2, 6, 10):
        (tmp_path / "samples").mkdir(exist_ok=True)
        (tmp_path / "samples" / f"step_{s:07d}.png").write_bytes(b"png")
    assert model_card.latest_preview(str(tmp_path), 8) == (
        str(tmp_path / "samples" / "step_0000006.png"), 6)
    assert model_card.latest_preview(str(tmp_path), 1) == (None, None)
    shown = copy.copy(facts)
    shown.preview, shown.preview_step = "x.png", 6
    header, body = card(shown, preview="images/preview.png")
    assert header["widget"][0] == {"text": PROMPTS[0], "output": {"url": "images/preview.png"}}
    assert "![preview grid](images/preview.png)" in body
    assert "Preview grid at step 6 (EMA weights; prompts: “completely black”" in body


def test_base_model_and_license(facts, tmp_path):
    sdxl = copy.deepcopy(facts)
    sdxl.config["model"]["pretrained"] = "stabilityai/stable-diffusion-xl-base-1.0"
    assert model_card.resolve_license(sdxl.config, None) == "openrail++"
    assert model_card.resolve_license(sdxl.config, "mit") == "mit"  # --license wins
    header, _ = card(sdxl)
    assert header["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    local = tmp_path / "base"
    local.mkdir()
    (local / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    sdxl.config["model"]["pretrained"] = str(local)
    assert model_card.resolve_license(sdxl.config, None) == "apache-2.0"
    assert "base_model" not in card(sdxl)[0]  # a local path is no Hub id
    with pytest.raises(ValueError, match=r"needs a license .*random init.*pass --license ID"):
        model_card.resolve_license(facts.config, None)


@pytest.mark.parametrize("algo, fmt", [("lora", "lora"), ("lora", "lora-diffusers"),
                                       ("lokr", "lora")])
def test_adapter_cards(facts, algo, fmt):
    lora = RunFacts(**{**facts.__dict__, "trainable": "lora",
                       "lora": {"algo": algo, "rank": 4, "alpha": 2.0, "models": ["unet"]}})
    header, body = card(lora, fmt=fmt, repo="me/style")
    assert header["tags"] == ["stable-diffusion-xl", "text-to-image", "v-prediction",
                              "zero-terminal-snr", algo, "sdxl_jax"]
    assert header["instance_prompt"] == PROMPTS[0]
    kind = {"lora": "LoRA", "lokr": "LoKr"}[algo]
    assert body.startswith(f"\n# style\n\n{kind} adapters for SDXL trained with sdxl_jax")
    assert "These adapters belong to a **v-prediction, zero terminal SNR** model" in body
    assert "| trained | " + algo + " adapters on unet: rank 4, α 2; base frozen |" in body
    if algo == "lokr":
        assert "`load_lora_weights` does not read LoKr" in body
    elif fmt == "lora":
        assert 'pipe.load_lora_weights("me/style", weight_name="style.safetensors")' in body
        assert "`<lora:style:0.8>`" in body
    else:
        assert 'pipe.load_lora_weights("me/style")\n' in body
        assert "| `pytorch_lora_weights.safetensors` |" in body


def test_card_without_ztsnr(facts):
    plain = copy.deepcopy(facts)
    plain.config["schedule"]["ztsnr"] = "off"
    header, body = card(plain, fmt="diffusers")
    assert "zero-terminal-snr" not in header["tags"]
    assert "| zero terminal SNR | no |" in body and "rescale_betas_zero_snr" not in body
    assert 'StableDiffusionXLPipeline.from_pretrained("me/tiny", ' in body


def test_model_card_flag_writes_the_card_alone(reference_run, tmp_path):
    wd = reference_run[1]
    path = str(tmp_path / "card.md")
    base = ["--workdir", wd, "--format", "single-file", "--push-to-hub", "me/tiny",
            "--model-card", path]
    with pytest.raises(SystemExit, match=r"^error: the model card needs a license .*--license"):
        export.main(base)
    assert export.main(base + ["--license", "mit"]) == 0
    with open(path) as f:
        header, body = parse_card(f.read())
    assert header["license"] == "mit" and "| `tiny.safetensors` |" in body
    assert sorted(os.listdir(tmp_path)) == ["card.md"]  # no export, no staging folder
    assert not [n for n in os.listdir(wd) if n.startswith(".hub-staging-")]
    with pytest.raises(SystemExit, match="card.md already exists; pass --overwrite"):
        export.main(base + ["--license", "mit"])
    with pytest.raises(SystemExit, match="writes the card alone, no export: leave --out out"):
        export.main(base + ["--license", "mit", "--overwrite", "--out", str(tmp_path / "m.safetensors")])
    with pytest.raises(SystemExit, match=r"--card .*missing.md: no such file; write one with "
                                         r"--model-card"):
        export.main(["--workdir", wd, "--format", "single-file", "--push-to-hub", "me/tiny",
                     "--card", str(tmp_path / "missing.md")])


def test_lora_card_loads_its_base_as_the_run_named_it(facts):
    lora = copy.deepcopy(facts)
    lora.trainable = "lora"
    lora.lora = {"algo": "lora", "rank": 4, "alpha": 4.0, "models": ["unet"]}
    _, body = card(lora, fmt="lora", repo="me/style")
    assert 'StableDiffusionXLPipeline.from_pretrained("BASE_MODEL", ' in body  # random init
    lora.config["model"]["pretrained"] = "/models/noob.safetensors"
    _, body = card(lora, fmt="lora", repo="me/style")
    assert "The adapters fit the base model `/models/noob.safetensors`." in body
    assert 'StableDiffusionXLPipeline.from_single_file("/models/noob.safetensors", ' in body
