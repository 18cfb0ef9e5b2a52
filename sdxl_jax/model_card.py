"""The model card (the repo's README.md) of an exported run: a YAML header the Hub reads, then what
the run did and how to load the result, all taken from the run itself.

    card = render_card(facts, "single-file", "me/nai3", published_files("single-file", "me/nai3"),
                       license_id="openrail++", preview="images/preview.png")

`run_facts(run)` gathers what the card states from a saved run (`runs.Run`): its config, step and
what trained; the dataset size and bucket histogram from the cache manifests it trained on; the
newest preview grid at or before the exported step; the sample prompts. A v-prediction, zero
terminal SNR model sampled as epsilon (what diffusers' from_single_file and most UIs assume)
gives grey or burnt images, so every loading recipe in the card sets the scheduler.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import re

log = logging.getLogger("sdxl_jax.model_card")

# Base models whose license is known without asking the Hub (their own cards say so).
KNOWN_LICENSES = {
    "stabilityai/stable-diffusion-xl-base-1.0": "openrail++",
    "stabilityai/stable-diffusion-xl-refiner-1.0": "openrail++",
}
ADAPTER_FORMATS = ("lora", "lora-diffusers")
PREVIEW_IN_REPO = "images/preview.png"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PREVIEW = re.compile(r"step_(\d+)\.png$")
_WEIGHTINGS = {  # loss.weighting -> how the card states it (METHODS §6)
    "min_snr_plus_one":
        "MinSNR+1: w = min(SNR+1, γ)/(SNR+1) (weight 1 at the ZTSNR terminal step)",
    "min_snr": "MinSNR (Hang et al., v-space): w = min(SNR, γ)/(SNR+1)",
    "debiased": "debiased estimation: w = √SNR/(SNR+1)",
    "none": "none (plain v-prediction MSE)",
}


@dataclasses.dataclass
class RunFacts:
    """What a card states about a run (plain data: the card renders without JAX or a model)."""
    config: dict
    step: int
    trainable: str  # "unet" | "unet+text" | "lora"
    weights: str  # "ema" | "raw": the published copy
    workdir: str
    lora: dict | None = None  # the AdapterConfig as a dict (LoRA runs)
    trained_text: tuple = ()
    datasets: list = dataclasses.field(default_factory=list)  # [{"name", "cache_dir", "manifest"}]
    preview: str | None = None  # newest preview grid of the run at or before `step`
    preview_step: int | None = None
    prompts: list = dataclasses.field(default_factory=list)


# ---- gathering ---------------------------------------------------------------------------------

def run_facts(run, weights: str) -> RunFacts:
    """RunFacts of a `runs.Run` at its step, `weights` the exported copy ("ema" / "raw")."""
    workdir = os.path.dirname(run.directory)
    config = run.config
    preview, preview_step = latest_preview(workdir, run.step)
    lora = dataclasses.asdict(run.lora_config()) if run.trainable == "lora" else None
    return RunFacts(config=config, step=run.step, trainable=run.trainable, weights=weights,
                    workdir=workdir, lora=lora, trained_text=run.trained_text,
                    datasets=dataset_manifests(config, workdir), preview=preview,
                    preview_step=preview_step, prompts=sample_prompts(config))


def latest_preview(workdir: str, step: int) -> tuple[str | None, int | None]:
    """(path, step) of the newest samples/step_*.png at or before `step`, or (None, None)."""
    best = (None, None)
    for path in glob.glob(os.path.join(workdir, "samples", "step_*.png")):
        m = _PREVIEW.search(os.path.basename(path))
        s = int(m.group(1)) if m else None
        if s is not None and s <= step and (best[1] is None or s > best[1]):
            best = (path, s)
    return best


def _cache_dirs(config: dict, workdir: str) -> list[tuple[str, str]]:
    """[(name, cache folder)] the run trained on: its data sources, or its one cache, plus the
    caches of stages that have their own."""
    import ml_collections

    from sdxl_jax.data.sources import resolve_sources

    d = config["data"]
    root = d.get("cache_dir") or os.path.join(workdir, "cache")
    try:
        sources = resolve_sources(ml_collections.ConfigDict(config), workdir)
    except (OSError, ValueError, KeyError) as e:  # inputs gone since training: name the cache
        log.warning("model card: cannot list the run's data sources (%s); reading %s", e, root)
        sources = []
    out = [(s.name, s.cache_dir) for s in sources] or [("data", root)]
    for i, st in enumerate(config["train"].get("stages") or ()):
        if st.get("cache_dir"):
            out.append((f"stage {i}", st["cache_dir"]))
    return out


def dataset_manifests(config: dict, workdir: str) -> list[dict]:
    """[{"name", "cache_dir", "manifest" (dict, or None when unreadable)}] of the run's caches."""
    out = []
    for name, cache_dir in _cache_dirs(config, workdir):
        path = os.path.join(cache_dir, "manifest.json")
        try:
            with open(path) as f:
                manifest = json.load(f)
        except (OSError, ValueError) as e:
            log.warning("model card: no dataset figures for %s: %s", name, e)
            manifest = None
        out.append({"name": name, "cache_dir": cache_dir, "manifest": manifest})
    return out


def sample_prompts(config: dict) -> list[str]:
    """The run's preview prompts: sample.prompts_file's when it is readable, else sample.prompts."""
    sp = config.get("sample", {})
    if sp.get("prompts_file"):
        from sdxl_jax.prompts import read_prompt_file
        try:
            return [p.prompt for p in read_prompt_file(sp["prompts_file"])]
        except (OSError, ValueError) as e:
            log.warning("model card: sample.prompts_file unreadable (%s); using sample.prompts", e)
    return [str(p) for p in sp.get("prompts") or ()]


def base_model(config: dict) -> str:
    """model.pretrained when it is a Hub id (what the Hub's base_model takes), else ""."""
    pretrained = str(config["model"].get("pretrained") or "")
    if not pretrained or os.path.exists(pretrained) or not _HUB_ID.match(pretrained):
        return ""
    return pretrained


def _local_card_license(pretrained: str) -> str:
    """The license in the YAML header of a local base model folder's README.md, or ""."""
    import yaml

    path = os.path.join(pretrained, "README.md") if os.path.isdir(pretrained) else ""
    if not path or not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8") as f:
        m = re.match(r"---\s*\n(.*?)\n---\s*\n", f.read(), re.S)
    try:
        header = yaml.safe_load(m.group(1)) if m else None
    except yaml.YAMLError:
        return ""
    return str(header.get("license") or "") if isinstance(header, dict) else ""


def resolve_license(config: dict, given: str | None) -> str:
    """`given` (--license), else the base model's when known; ValueError asking for --license."""
    if given:
        return given
    pretrained = str(config["model"].get("pretrained") or "")
    found = KNOWN_LICENSES.get(pretrained) or _local_card_license(pretrained)
    if found:
        return found
    base = pretrained or "random init (no model.pretrained)"
    raise ValueError(f"the model card needs a license and the base model's is not known here "
                     f"({base}): pass --license ID (a Hub license id, e.g. openrail++ for SDXL "
                     "derivatives; see https://huggingface.co/docs/hub/repositories-licenses)")


# ---- rendering ---------------------------------------------------------------------------------

def adapter_tag(facts: RunFacts) -> str | None:
    if facts.trainable != "lora":
        return None
    return "lokr" if (facts.lora or {}).get("algo") == "lokr" else "lora"


def card_metadata(facts: RunFacts, fmt: str, license_id: str, preview: str | None) -> dict:
    """The YAML header as a dict (key order kept)."""
    ztsnr = facts.config["schedule"]["ztsnr"] != "off"
    tags = ["stable-diffusion-xl", "text-to-image", "v-prediction"]
    tags += ["zero-terminal-snr"] if ztsnr else []
    tags += [adapter_tag(facts)] if fmt in ADAPTER_FORMATS else []
    tags.append("sdxl_jax")
    meta = {"license": license_id}
    base = base_model(facts.config)
    if base:
        meta["base_model"] = base
    meta.update(tags=tags, library_name="diffusers", pipeline_tag="text-to-image")
    if fmt in ADAPTER_FORMATS and facts.prompts:
        meta["instance_prompt"] = facts.prompts[0]  # the adapter's trigger, as LoRA cards give
    if facts.prompts:
        widget = [{"text": p} for p in facts.prompts]
        if preview:  # the grid holds every prompt: shown once, with the first
            widget[0]["output"] = {"url": preview}
        meta["widget"] = widget
    return meta


def _yaml(meta: dict) -> str:
    import yaml
    return yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)


def _total_steps(train: dict) -> int:
    stages = train.get("stages") or ()
    return sum(int(s["steps"]) for s in stages) if stages else int(train["steps"])


def settings_rows(facts: RunFacts, fmt: str, dtype: str) -> list[tuple[str, str]]:
    """(setting, value) rows of the recipe the run trained with."""
    c = facts.config
    tr, sch, loss, b, ema = c["train"], c["schedule"], c["loss"], c["data"]["buckets"], c["ema"]
    rows = [("steps", f"{facts.step} of {_total_steps(tr)}"
                      + (f" ({len(tr['stages'])} stages)" if tr.get("stages") else ""))]
    batches = [int(s.get("global_batch_size") or tr["global_batch_size"])
               for s in tr.get("stages") or ()] or [int(tr["global_batch_size"])]
    rows.append(("global batch", " → ".join(str(x) for x in batches)
                 + (f" (per device {tr['per_device_batch_size']}, gradient accumulation to the "
                    "global batch)" if tr.get("per_device_batch_size") else "")))
    rows.append(("learning rate", f"{tr['learning_rate']:g}, {tr['lr_schedule']} after "
                                  f"{tr['warmup_steps']} warmup steps"))
    rows.append(("optimizer", f"{tr['optimizer']} (β {tr['b1']:g}/{tr['b2']:g}, weight decay "
                              f"{tr['weight_decay']:g}, grad clip {tr['grad_clip']:g})"))
    rows.append(("prediction", "v-prediction"))
    rows.append(("zero terminal SNR", "yes (betas rescaled, ᾱ_T = 0)" if sch["ztsnr"] != "off"
                 else "no"))
    rows.append(("loss weighting", f"{_WEIGHTINGS.get(loss['weighting'], loss['weighting'])}, "
                                   f"γ = {loss['snr_gamma']:g}"))
    rows.append(("loss", loss["type"] + (f" (c = {loss['huber_c']:g}, {loss['huber_schedule']})"
                                         if loss["type"] == "huber" else "")))
    rows.append(("buckets", f"area ≤ {b['max_area']} px, sides {b['min_side']}–{b['max_side']} "
                            f"step {b['step']}, base {b['base'][0]}×{b['base'][1]}, "
                            f"{b['crop']} crop"))
    rows.append(("captions", f"dropout {c['data']['caption_dropout']:g}, tag shuffle "
                             f"{'on' if c['data']['tag_shuffle'] else 'off'} (first "
                             f"{c['data']['keep_first_n']} kept)"))
    rows.append(("EMA", f"decay {ema['decay']:g} (power {ema['power']:.3g})" if ema["enabled"]
                 else "off"))
    rows.append(("trained", _trained(facts)))
    rows.append(("latents", c["latents"]["normalization"]
                 + (f" × {c['latents']['scale_factor']:g}"
                    if c["latents"]["normalization"] == "scale" else " (per-channel μ/σ)")))
    rows.append(("compute dtype", str(c["model"]["dtype"])))
    merged = (", the adapters merged into the base" if facts.trainable == "lora"
              and fmt not in ADAPTER_FORMATS else "")
    rows.append(("published weights", f"{facts.weights.upper()} at step {facts.step}, {dtype}, "
                                       f"format {fmt}{merged}"))
    return rows


def _trained(facts: RunFacts) -> str:
    if facts.trainable == "lora":
        lo = facts.lora or {}
        conv = (f", LoCon convs rank {lo.get('conv_rank')} α {lo.get('conv_alpha'):g}"
                if lo.get("conv") else "")
        return (f"{lo.get('algo', 'lora')} adapters on {', '.join(lo.get('models') or ())}: rank "
                f"{lo.get('rank')}, α {float(lo.get('alpha', 0)):g}{conv}; base frozen")
    if facts.trainable == "unet+text":
        return f"UNet and text encoders {', '.join(facts.trained_text)}"
    return "UNet (text encoders and VAE frozen)"


def dataset_lines(facts: RunFacts) -> list[str]:
    """The dataset section: records and skipped inputs per cache, and the bucket histogram."""
    lines, histogram = [], {}
    total = 0
    for ds in facts.datasets:
        m = ds["manifest"]
        if m is None:
            lines.append(f"- {ds['name']}: no cache manifest at `{ds['cache_dir']}` when the card "
                         "was written")
            continue
        total += int(m.get("num_records", 0))
        lines.append(f"- {ds['name']}: {m.get('num_records', 0)} images cached "
                     f"({m.get('num_skipped', 0)} inputs skipped)")
        for bucket, n in (m.get("bucket_counts") or {}).items():
            histogram[bucket] = histogram.get(bucket, 0) + int(n)
    if not lines:
        return ["No dataset figures: the run's cache is not known."]
    val = facts.config["data"].get("val_fraction", 0)
    out = [f"**{total} images** in {len(facts.datasets)} cache(s); a {val:g} share held out for "
           "validation loss.", "", *lines]
    used = {k: v for k, v in histogram.items() if v}
    if used:
        out += ["", "| bucket (W×H) | images |", "|---|---:|"]
        out += [f"| {k} | {v} |" for k, v in sorted(used.items(), key=_bucket_order)]
    return out


def _bucket_order(item):
    w, _, h = item[0].partition("x")
    try:
        return (int(w) / int(h), int(w))
    except ValueError:
        return (0.0, 0)


PEFT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what load_lora_weights(repo) looks for
DIFFUSERS_PARTS = {
    "model_index.json": "the pipeline's index",
    "unet/": "UNet (PyTorch-layout safetensors + config)",
    "vae/": "VAE",
    "text_encoder/": "CLIP-L text encoder", "text_encoder_2/": "OpenCLIP bigG text encoder",
    "tokenizer/": "CLIP-L tokenizer", "tokenizer_2/": "bigG tokenizer",
    "scheduler/": "EulerDiscreteScheduler config: v-prediction, trailing timesteps",
    "sdxl_jax_export.json": "what sdxl_jax recorded about the export",
}


def published_files(fmt: str, repo_id: str) -> dict[str, str]:
    """{path in the repo: what it is} of an export of format `fmt` (known before exporting, so
    the card can be written alone)."""
    name = repo_id.split("/")[-1]
    if fmt == "diffusers":
        return dict(DIFFUSERS_PARTS)
    if fmt == "single-file":
        return {f"{name}.safetensors": "UNet, VAE and both text encoders in the SGM layout "
                                       "(ComfyUI, A1111/Forge), with v_pred / ztsnr markers"}
    if fmt == "lora":
        return {f"{name}.safetensors": "adapters in the kohya layout (ComfyUI, A1111/Forge, "
                                       "diffusers load_lora_weights)"}
    if fmt == "lora-diffusers":
        return {PEFT_WEIGHT_NAME: "adapters in the diffusers / PEFT layout"}
    raise ValueError(f"unknown export format {fmt!r}")


def model_file(files: dict, fmt: str) -> str:
    """The weight file a user loads (single-file and LoRA formats)."""
    weights = [p for p in files if p.endswith(".safetensors") and "/" not in p]
    return weights[0] if weights else "model.safetensors"


def _scheduler_line(ztsnr: bool) -> str:
    z = " rescale_betas_zero_snr=True," if ztsnr else ""
    return ("pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, "
            f"prediction_type=\"v_prediction\",{z} timestep_spacing=\"trailing\")")


@dataclasses.dataclass(frozen=True)
class _Usage:
    """What the loading recipes need to know."""
    fmt: str
    repo_id: str
    weight: str  # the file a user loads (single-file, LoRA formats)
    base: str  # the base model, as the run named it
    ztsnr: bool
    lokr: bool
    call: str  # the pipeline call with the run's sampling settings


def _usage(facts: RunFacts, fmt: str, repo_id: str, files: dict) -> _Usage:
    c = facts.config
    sp = c.get("sample", {})
    prompt = json.dumps(facts.prompts[0] if facts.prompts else "a photo")
    call = (f"image = pipe({prompt}, num_inference_steps={sp.get('steps', 28)}, "
            f"guidance_scale={float(sp.get('cfg', 5.0)):g}"
            + (f", guidance_rescale={float(sp['rescale']):g}" if sp.get("rescale") else "")
            + ").images[0]")
    return _Usage(fmt, repo_id, model_file(files, fmt),
                  str(c["model"].get("pretrained") or ""), c["schedule"]["ztsnr"] != "off",
                  adapter_tag(facts) == "lokr", call)


def _base_pipeline(base: str) -> str:
    """The line that loads the base model of a LoRA: a Hub id or folder, or a single file."""
    if base.endswith((".safetensors", ".ckpt")):
        return (f"pipe = StableDiffusionXLPipeline.from_single_file(\"{base}\", "
                "torch_dtype=torch.float16).to(\"cuda\")")
    return (f"pipe = StableDiffusionXLPipeline.from_pretrained(\"{base or 'BASE_MODEL'}\", "
            "torch_dtype=torch.float16).to(\"cuda\")")


def _diffusers_lines(u: _Usage) -> list[str]:
    sdxl_import = "from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline"
    if u.fmt == "diffusers":
        return ["The folder's scheduler is already v-prediction"
                + (", zero terminal SNR" if u.ztsnr else "") + ", trailing timesteps:", "",
                "```python", "import torch", "from diffusers import StableDiffusionXLPipeline",
                f"pipe = StableDiffusionXLPipeline.from_pretrained(\"{u.repo_id}\", "
                "torch_dtype=torch.float16).to(\"cuda\")", u.call, "```"]
    if u.fmt == "single-file":
        return ["```python", "import torch", "from huggingface_hub import hf_hub_download",
                sdxl_import, f"path = hf_hub_download(\"{u.repo_id}\", \"{u.weight}\")",
                "pipe = StableDiffusionXLPipeline.from_single_file(path, "
                "torch_dtype=torch.float16).to(\"cuda\")",
                "# from_single_file builds an epsilon scheduler: make it v-prediction",
                _scheduler_line(u.ztsnr), u.call, "```"]
    if u.lokr:
        return ["diffusers' `load_lora_weights` does not read LoKr; use ComfyUI or "
                "A1111/Forge (LyCORIS support) below."]
    name = "" if u.fmt == "lora-diffusers" else f", weight_name=\"{u.weight}\""
    base = (f"the base model `{u.base}`" if u.base else
            "the seeded random init of the run's train.seed (a test run: BASE_MODEL below)")
    return [f"The adapters fit {base}.", "", "```python", "import torch", sdxl_import,
            _base_pipeline(u.base), _scheduler_line(u.ztsnr),
            f"pipe.load_lora_weights(\"{u.repo_id}\"{name})", u.call, "```"]


def _comfyui_lines(u: _Usage) -> list[str]:
    sampling = ("**ModelSamplingDiscrete** (sampling `v_prediction`"
                + (", `zsnr` on" if u.ztsnr else "") + ")")
    if u.fmt == "single-file":
        return [f"Put `{u.weight}` in `models/checkpoints/` and load it with **Load Checkpoint**: "
                "it reads the file's `v_pred`" + (" and `ztsnr`" if u.ztsnr else "") + " marker "
                f"keys. Where a build does not, add {sampling} after the loader."]
    if u.fmt == "lora":
        return [f"Put `{u.weight}` in `models/loras/` and use **LoraLoader** on a v-prediction"
                + (" ZTSNR" if u.ztsnr else "") + " checkpoint of the base model"
                + (f" (`{u.base}`)." if u.base else ".")]
    if u.fmt == "lora-diffusers":
        return ["ComfyUI loads kohya-layout LoRAs: the same run's `--format lora` export is the "
                "one to use there."]
    return ["ComfyUI loads single files: the same run's `--format single-file` export is the one "
            f"to use there, with {sampling} if the loader does not detect it."]


def _a1111_lines(u: _Usage) -> list[str]:
    if u.fmt == "single-file":
        return [f"Put `{u.weight}` in `models/Stable-diffusion/`. Forge and recent A1111 builds "
                "read the `v_pred`" + (" / `ztsnr`" if u.ztsnr else "") + " marker keys; a build "
                "that does not needs a `.yaml` config beside the file with "
                "`parameterization: \"v\"`" + (" and zero terminal SNR enabled in its settings"
                                                if u.ztsnr else "") + "."]
    if u.fmt == "lora":
        return [f"Put `{u.weight}` in `models/Lora/` and prompt with "
                f"`<lora:{os.path.splitext(u.weight)[0]}:0.8>` on a v-prediction checkpoint of "
                "the base model" + (" (LoKr through the built-in LyCORIS support)."
                                    if u.lokr else ".")]
    return ["A1111 and Forge load single files: use the same run's "
            + ("`--format lora` (kohya layout)" if u.fmt == "lora-diffusers"
               else "`--format single-file`") + " export."]


def usage_lines(facts: RunFacts, fmt: str, repo_id: str, files: dict) -> list[str]:
    """How to load the published files in diffusers, ComfyUI and A1111/Forge."""
    u = _usage(facts, fmt, repo_id, files)
    what = ("These adapters belong to a" if fmt in ADAPTER_FORMATS else "This is a")
    return ["## How to use", "",
            f"{what} **v-prediction" + (", zero terminal SNR" if u.ztsnr else "") + "** model: "
            "sampled as epsilon-prediction (what most tools assume of an SDXL file) it gives grey "
            "or burnt images. Each recipe below sets the sampler to match.", "",
            "### diffusers", "", *_diffusers_lines(u), "", "### ComfyUI", "", *_comfyui_lines(u),
            "", "### A1111 / Forge", "", *_a1111_lines(u)]


def render_card(facts: RunFacts, fmt: str, repo_id: str, files: dict, license_id: str,
                dtype: str = "fp16", preview: str | None = None) -> str:
    """The README.md text: YAML header, then the run's recipe, dataset, files and usage.

    files: {path in the repo: what it is} (`published_files`); preview: the repo path of the
    preview grid (None: no image)."""
    c = facts.config
    title = repo_id.split("/")[-1]
    kind = ({"lora": "LoRA", "lokr": "LoKr"}[adapter_tag(facts)] + " adapters for SDXL"
            if fmt in ADAPTER_FORMATS else "An SDXL model")
    pretrained = str(c["model"].get("pretrained") or "")
    source = f"`{pretrained}`" if pretrained else "a seeded random init (no base model)"
    lines = ["---", _yaml(card_metadata(facts, fmt, license_id, preview)).rstrip(), "---", "",
             f"# {title}", "",
             f"{kind} trained with sdxl_jax (JAX/Flax, the NovelAI Diffusion V3 recipe) from "
             f"{source}, model preset `{c['model']['preset']}`: {facts.step} steps.", ""]
    if preview:
        shown = ", ".join(f"“{p}”" for p in facts.prompts)
        lines += [f"![preview grid]({preview})", "",
                  f"Preview grid at step {facts.preview_step} (EMA weights"
                  + (f"; prompts: {shown}" if shown else "") + ").", ""]
    lines += ["## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in settings_rows(facts, fmt, dtype)]
    lines += ["", "## Dataset", "", *dataset_lines(facts), "", "## Files", "",
              "| file | what |", "|---|---|"]
    lines += [f"| `{p}` | {what} |" for p, what in files.items()]
    lines += ["", *usage_lines(facts, fmt, repo_id, files), ""]
    return "\n".join(lines)


def parse_card(text: str) -> tuple[dict, str]:
    """(YAML header as a dict, body) of a card: what tests and reviewers read back."""
    import yaml
    m = re.match(r"---\n(.*?)\n---\n", text, re.S)
    if not m:
        raise ValueError("the card has no YAML header between --- lines")
    return yaml.safe_load(m.group(1)), text[m.end():]
