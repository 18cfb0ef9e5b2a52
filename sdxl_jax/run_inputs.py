"""What a run reads, resolved once: `resolve_run(cfg, workdir) -> RunInputs`.

Every entry point asks this module the same question, so the trainer, `data_tools.build_cache`,
`runs.open_run` (sample, export) and the tools agree on which VAE encodes the latents, which
caches each stage reads, and which weights stay frozen:

- the VAE (`VaeSource`): `model.vae_workdir` (a configs/vae_decoder.py run), else the tiny
  demo's own VAE (an offline preset with no data configured and `data.demo_vae_steps` > 0),
  else `model.pretrained`, else the seeded random init — with the fingerprint the cache builder
  writes into every manifest it makes with it;
- the frozen-weight loader and the tokenizers (`Weights`);
- the stages (`StageInputs`) with their caches (`CacheInput`: where, built from what, and the
  manifest when it exists) and the latent statistics `per_channel` normalisation uses.

Resolving only reads. What is still missing (the demo dataset, the demo VAE, a cache to build)
is listed in `RunInputs.missing`; `sdxl_jax.train.prepare.prepare_run` makes it and resolves
again. `check_caches` compares every cache a run reads with the run before anything compiles.
"""
from __future__ import annotations

import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field

from sdxl_jax import paths
from sdxl_jax.config_sections import offline_preset
from sdxl_jax.data import cache as C
from sdxl_jax.data.sources import DataSource, resolve_sources

FROZEN = ("vae", "text_l", "text_g")
VAE_TASK = "vae_decoder"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VaeSource:
    """Which VAE a run encodes (and previews, samples, exports) with."""
    kind: str  # "run" (model.vae_workdir) | "demo" (the tiny demo's own) | "pretrained" | "seeded"
    path: str = ""  # the VAE run's directory, or model.pretrained; "" for the seeded init
    fingerprint: str = ""  # data.encode.vae_fingerprint of its params; "" until it exists

    @property
    def ready(self) -> bool:
        return bool(self.fingerprint) or self.kind in ("pretrained", "seeded")

    def describe(self) -> str:
        what = {"run": f"the VAE run {self.path}", "demo": f"the demo VAE {self.path}",
                "pretrained": f"model.pretrained={self.path}", "seeded": "the seeded random VAE"}
        return what[self.kind] + (f" (fingerprint {self.fingerprint})" if self.fingerprint else "")


@dataclass(frozen=True)
class Weights:
    """The frozen-weight loader: the VAE of `vae`, the text encoders (and a LoRA base) of
    `weights.frozen_params` (model.pretrained, else the seeded init of train.seed)."""
    preset: str
    dtype: str
    pretrained: str
    seed: int
    vae: VaeSource

    def load(self, components=FROZEN, shardings=None) -> dict:
        """{name: params}, each leaf placed by `shardings[name]` when given (runs.source_params:
        the one rule open_run, sample and export read a run's sources by)."""
        from sdxl_jax.runs import source_params
        if "vae" in components and self.vae.kind == "demo" and not _finished_demo_vae(self.vae.path):
            raise FileNotFoundError(f"the demo VAE {self.vae.path} is not trained yet: train.py "
                                    "trains it first (sdxl_jax.train.prepare.prepare_run)")
        vae_run = self.vae.path if self.vae.kind in ("run", "demo") else ""
        config = {"model": {"preset": self.preset, "pretrained": self.pretrained, "vae_workdir": vae_run},
                  "train": {"seed": self.seed}}
        return source_params(config, shardings, components)

    def tokenizers(self):
        from sdxl_jax.models.tokenizer import get_tokenizers
        return get_tokenizers(self.preset, self.pretrained)


def _get(cfg, dotted: str, default=None):
    node = cfg
    for k in dotted.split("."):
        try:
            node = node[k]
        except (KeyError, TypeError, AttributeError):
            return default
    return node


def demo_wanted(cfg) -> bool:
    """The tiny demo's fallback: an offline preset with no data configured at all."""
    d = cfg["data"]
    return offline_preset(cfg["model"]["preset"]) and not any(
        _get(d, k) for k in ("cache_dir", "images_dir", "manifest", "tfds", "sources"))


def check_vae_run(path: str) -> None:
    """model.vae_workdir must name a VAE run (configs/vae_decoder.py), as export requires."""
    from sdxl_jax.config import ConfigError
    from sdxl_jax.runs import open_run
    task = open_run(path).task
    if task != VAE_TASK:
        raise ConfigError(f"model.vae_workdir={path!r} is a {task!r} run, not a VAE run: give the "
                          f"--workdir of a configs/vae_decoder.py run")


def resolve_vae(cfg, workdir: str | None, fingerprint: bool = True) -> VaeSource:
    """The run's VAE source (see the module docstring); `fingerprint` loads it to hash it."""
    m, unet = cfg["model"], cfg.get("task", "unet") == "unet"  # a VAE run trains from its source
    if unet and m.get("vae_workdir"):
        path = paths.absolute(m["vae_workdir"])  # a local run or a gs:// one
        check_vae_run(path)
        src = VaeSource("run", path)
    elif unet and demo_wanted(cfg) and int(_get(cfg, "data.demo_vae_steps", 0)):
        src = VaeSource("demo", demo_vae_dir(cfg, workdir))
        if not _finished_demo_vae(src.path):
            return src  # not trained yet: prepare_run trains it
    elif m.get("pretrained"):
        src = VaeSource("pretrained", m["pretrained"])
    else:
        src = VaeSource("seeded")
    if not fingerprint:
        return src
    from sdxl_jax.data.encode import vae_fingerprint
    w = _weights(cfg, src)
    return VaeSource(src.kind, src.path, vae_fingerprint(w.load(("vae",))["vae"], w.preset, w.dtype))


def _weights(cfg, vae: VaeSource) -> Weights:
    return Weights(cfg["model"]["preset"], cfg["model"]["dtype"], cfg["model"]["pretrained"] or "",
                   int(cfg["train"]["seed"]), vae)


def resolve_weights(cfg, workdir: str | None = None, fingerprint: bool = False) -> Weights:
    """The frozen-weight loader of `cfg` (a ConfigDict or the dict a checkpoint saved)."""
    return _weights(cfg, resolve_vae(cfg, workdir, fingerprint))


def demo_vae_dir(cfg, workdir: str | None) -> str:
    """Where the demo VAE of these settings is: a finished one under the workdir or in the user
    cache, else the workdir's (where prepare_run trains it)."""
    from sdxl_jax.train.demo_vae import finished, locations
    local, shared = locations(cfg, workdir)
    return next((p for p in (local, shared) if finished(p)), local)


def _finished_demo_vae(path: str) -> bool:
    from sdxl_jax.train.demo_vae import finished
    return finished(path)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheInput:
    """One latent cache a stage reads: where, what it is built from, and its manifest's facts."""
    name: str  # the data source's name, or "data" for a single cache
    cache_dir: str
    images_dir: str = ""  # what a missing cache is built from (one of the three, or none)
    manifest: str = ""
    tfds: str = ""
    exists: bool = False
    vae_fingerprint: str = ""  # from its manifest
    source: str = ""  # what it was built from (its manifest's settings.source)
    buckets: tuple = ()  # its bucket table ((w, h), …)
    filled: tuple = ()  # the buckets holding records
    num_masked: int = 0

    @property
    def inputs(self) -> str:
        """The build_cache description of what this cache is meant to hold ("" = unknown)."""
        if self.images_dir:
            return f"images:{paths.absolute(self.images_dir)}"
        if self.manifest:
            return f"manifest:{paths.absolute(self.manifest)}"
        return ""


@dataclass(frozen=True)
class StageInputs:
    index: int
    end_step: int  # cumulative
    global_batch_size: int
    caches: tuple[CacheInput, ...]
    sources: tuple[DataSource, ...] = ()  # data.sources (several caches, mixed); () = one cache

    @property
    def data(self):
        """What the loaders read: the sources, or the one cache folder."""
        return list(self.sources) or self.caches[0].cache_dir

    @property
    def buckets(self) -> tuple:
        """The bucket shapes this stage's batches take: those holding records in its caches."""
        return tuple(sorted({b for c in self.caches for b in c.filled}))


def _cache_input(name: str, cache_dir: str, images_dir="", manifest="", tfds="") -> CacheInput:
    cache_dir = paths.absolute(cache_dir)  # a folder or a gs:// prefix
    if not paths.isfile(paths.join(cache_dir, C.MANIFEST)):
        return CacheInput(name, cache_dir, images_dir, manifest, tfds)
    m = C.load_manifest(cache_dir)
    buckets = tuple(tuple(b) for b in m["buckets"])
    filled = tuple(tuple(s["bucket"]) for s in m["shards"] if s["count"])
    return CacheInput(name, cache_dir, images_dir, manifest, tfds, True, m.get("vae_fingerprint", ""),
                      m.get("settings", {}).get("source", ""), buckets, tuple(sorted(set(filled))),
                      int(m.get("num_masked", 0)))


def _stages(cfg, workdir: str | None, demo_images: str) -> tuple[StageInputs, ...]:
    d = cfg.data
    sources = resolve_sources(cfg, workdir)
    root = d.cache_dir or (paths.join(workdir, "cache") if workdir else "")
    raw = list(cfg.train.stages) or [{"steps": cfg.train.steps}]
    out, end = [], 0
    for i, st in enumerate(raw):
        st = dict(st)
        end += int(st["steps"])
        gbs = int(st.get("global_batch_size") or cfg.train.global_batch_size)
        if st.get("cache_dir"):
            caches, mixed = (_cache_input("data", st["cache_dir"]),), ()
        elif sources:
            caches = tuple(_cache_input(s.name, s.cache_dir, s.images_dir, s.manifest) for s in sources)
            mixed = tuple(sources)
        else:
            if not root:
                raise ValueError("no cache folder: set data.cache_dir (or give a workdir)")
            caches = (_cache_input("data", root, d.images_dir or demo_images, d.manifest, d.tfds),)
            mixed = ()
        out.append(StageInputs(i, end, gbs, caches, mixed))
    return tuple(out)


def latent_stats(cfg, stage: StageInputs):
    """Per-channel (mean, std) for `per_channel` normalisation: the config's, else the first
    stage's manifest (several sources: pooled by latents × repeats × weight, the mix the step
    is fed); (None, None) for the other normalisations or while a cache is missing."""
    if cfg.latents.normalization != "per_channel":
        return None, None
    if cfg.latents.mean is not None and cfg.latents.std is not None:
        return tuple(cfg.latents.mean), tuple(cfg.latents.std)
    if not all(c.exists for c in stage.caches):
        return None, None
    manifests = [C.load_manifest(c.cache_dir) for c in stage.caches]
    if len(stage.sources) > 1:
        from sdxl_jax.data.sources import pooled_latent_stats
        return pooled_latent_stats(stage.sources, manifests)
    stats = manifests[0]["latent_stats"]
    return tuple(stats["mean"]), tuple(stats["std"])


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunInputs:
    task: str
    weights: Weights
    stages: tuple[StageInputs, ...] = ()  # the UNet task's
    latent_mean: tuple | None = None
    latent_std: tuple | None = None
    demo_images: str = ""  # the generated demo dataset's folder when the run uses it
    images_dir: str = ""  # the VAE task's pixel inputs
    manifest: str = ""
    workdir: str = field(default="", compare=False)  # where the run writes (not an input)

    @property
    def vae(self) -> VaeSource:
        return self.weights.vae

    @property
    def total_steps(self) -> int:
        return self.stages[-1].end_step if self.stages else 0

    @property
    def missing(self) -> tuple[str, ...]:
        """What prepare_run still has to make, in order."""
        out = []
        if self.demo_images and not _has_files(self.demo_images):
            out.append(f"the demo dataset {self.demo_images}")
        if not self.vae.ready:
            out.append(f"the demo VAE {self.vae.path}")
        seen = set()
        for st in self.stages:
            for c in st.caches:
                if not c.exists and c.cache_dir not in seen:
                    seen.add(c.cache_dir)
                    out.append(f"the latent cache {c.cache_dir}")
        return tuple(out)

    def saved_config(self, cfg) -> dict:
        """The config a checkpoint keeps: `cfg` with the resolved VAE run written in, so sample,
        export and open_run find the demo VAE without resolving it again."""
        from sdxl_jax.train.common import config_json
        out = config_json(cfg)
        if self.vae.kind == "demo":
            out["model"]["vae_workdir"] = self.vae.path
        return out


def _has_files(path: str) -> bool:
    return os.path.isdir(path) and bool(os.listdir(path))


def resolve_run(cfg, workdir: str | None) -> RunInputs:
    """The inputs of the run `cfg` in `workdir` (None: a tool without a run directory, e.g.
    build_cache, which then needs data.cache_dir). Reads only; see RunInputs.missing."""
    from sdxl_jax.data import demo as demo_data
    demo = demo_data.data_dir(workdir) if workdir and demo_wanted(cfg) else ""
    weights = resolve_weights(cfg, workdir, fingerprint=cfg.task != VAE_TASK)
    if cfg.task == VAE_TASK:
        if not (cfg.data.images_dir or cfg.data.manifest or demo):
            raise FileNotFoundError("no training images: set data.images_dir (a folder of images) or "
                                    "data.manifest (JSONL of {\"path\", \"caption\"})")
        return RunInputs(cfg.task, weights, demo_images=demo, images_dir=cfg.data.images_dir or demo,
                         manifest=cfg.data.manifest or "", workdir=workdir or "")
    stages = _stages(cfg, workdir, demo)
    mean, std = latent_stats(cfg, stages[0])
    return RunInputs(cfg.task, weights, stages, mean, std, demo_images=demo, workdir=workdir or "")


def resolve_build(cfg, images=None, manifest=None, tfds=None, out=None):
    """build_cache's (config, RunInputs): a copy of `cfg` with the inputs and `out` it was given
    written into data.*, resolved as train.py resolves a run, so the cache is encoded by the VAE
    the trainer will compare it with."""
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
        if images or manifest or tfds is not None:
            cfg.data.images_dir, cfg.data.manifest = images or "", manifest or ""
            cfg.data.tfds = f"{tfds.name}:{tfds.split}" if tfds is not None else ""
        if out:
            cfg.data.cache_dir = out
    return cfg, resolve_run(cfg, None)


# ---------------------------------------------------------------------------------------------
# Checks and repair commands
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    """How the trainer was started: its config file[:preset] and `--config.*` overrides, so a
    repair command it prints runs with exactly the same settings."""
    config: str
    overrides: tuple[str, ...] = ()

    @classmethod
    def from_argv(cls, config: str, argv) -> "Command":
        """The `--config.key=value` (or `--config.key value`) arguments of `argv`, verbatim."""
        out, args = [], list(argv)
        for i, a in enumerate(args):
            if a.startswith("--config."):
                out.append(a if "=" in a or i + 1 == len(args) else f"{a}={args[i + 1]}")
        path, _, preset = config.partition(":")
        return cls(os.path.abspath(path) + (f":{preset}" if preset else ""), tuple(out))


def _python() -> str:
    """`python` when that is this interpreter, else its full path."""
    found = shutil.which("python")
    try:
        if found and os.path.samefile(found, sys.executable):
            return "python"
    except OSError:
        pass
    return sys.executable


def _input_flags(source: str) -> list[str]:
    """build_cache flags that read the inputs a manifest's settings.source describes."""
    kind, _, rest = source.partition(":")
    if kind in ("images", "manifest"):
        return [f"--{kind}", rest]
    if kind == "tfds":  # tfds:NAME:SPLIT@DIR image=K caption=C
        head, _, tail = rest.partition("@")
        data_dir, image, caption = tail.rsplit(" ", 2)
        return ["--tfds", head, "--tfds-data-dir", data_dir,
                "--image-key", image.partition("=")[2], "--caption-key", caption.partition("=")[2]]
    raise ValueError(f"unknown cache source {source!r}")


def rebuild_command(cache: CacheInput, inputs: RunInputs, command: Command | None,
                    verify: bool = False, rebuild: bool = False) -> str | None:
    """The exact build_cache command that (re)builds `cache` for this run, or None when what
    it holds or how the run was configured is unknown."""
    source = cache.inputs or cache.source
    if not source or command is None:
        return None
    args = [_python(), "-m", "data_tools.build_cache", *_input_flags(source), "--out", cache.cache_dir,
            "--config", command.config, *command.overrides]
    if inputs.vae.kind == "demo":
        args.append(f"--config.model.vae_workdir={inputs.vae.path}")
    args += ["--verify"] * verify + ["--rebuild"] * rebuild
    line = shlex.join(args)
    if os.path.abspath(os.getcwd()) != REPO:  # `-m data_tools…` needs the repository on the path
        line = shlex.join(["env", f"PYTHONPATH={REPO}"]) + " " + line
    return line


def _fix(cache: CacheInput, inputs: RunInputs, command: Command | None, rebuild: bool) -> str:
    cmd = rebuild_command(cache, inputs, command, rebuild=rebuild)
    if cmd:
        return f"rebuild it with: {cmd}"
    return (f"rebuild it with python -m data_tools.build_cache (--out {cache.cache_dir}) and this "
            "run's config, or point the run at a cache built with its VAE")


def check_one_source_per_cache(inputs: RunInputs) -> None:
    """Two inputs given one cache folder would train the second on the first one's records."""
    owners: dict[str, CacheInput] = {}
    for c in (c for st in inputs.stages for c in st.caches):
        other = owners.setdefault(c.cache_dir, c)
        if other.inputs and c.inputs and other.inputs != c.inputs:
            raise C.CacheError(f"data sources {other.name!r} ({other.inputs}) and {c.name!r} "
                               f"({c.inputs}) share the cache folder {c.cache_dir}: one cache "
                               "holds one source; give each its own cache_dir")


def check_caches(cfg, inputs: RunInputs, command: Command | None = None) -> None:
    """Every cache the run reads against the run: its VAE, bucket table and inputs, masks when
    loss.masked, and each file intact. One CacheError naming both sides and the fix."""
    from sdxl_jax.data.buckets import buckets_from_config
    check_one_source_per_cache(inputs)
    table = tuple(tuple(b) for b in buckets_from_config(cfg.data.buckets))
    for st in inputs.stages:
        for c in st.caches:
            where = f"the cache {c.cache_dir}" + (f" (data source {c.name!r})" if st.sources else "")
            if not c.exists:
                raise C.CacheError(f"no latent cache at {c.cache_dir}: {_fix(c, inputs, command, False)}")
            if c.vae_fingerprint != inputs.vae.fingerprint:
                raise C.CacheError(
                    f"{where} was encoded by VAE {c.vae_fingerprint}, but this run's VAE is "
                    f"{inputs.vae.describe()}: its latents are not this VAE's; "
                    f"{_fix(c, inputs, command, True)}")
            if c.buckets != table:
                raise C.CacheError(f"{where} has the bucket table {_short(c.buckets)}, but this run's "
                                   f"data.buckets give {_short(table)}; {_fix(c, inputs, command, True)}")
            if c.inputs and c.source and c.source != c.inputs:
                raise C.CacheError(f"{where} holds {c.source}, but this run reads it as {c.inputs}; "
                                   f"{_fix(c, inputs, command, True)}")
            if cfg.loss.masked and not c.num_masked:
                raise C.CacheError(
                    f"loss.masked=true, but {where} holds no masks (0 records with an alpha channel "
                    "or an x.mask.png): add the masks and rebuild it, or set loss.masked=false")
            try:
                C.read_index(c.cache_dir)
            except C.CacheError as e:
                raise repaired(e, inputs, command) from None


def _short(buckets) -> str:
    b = list(buckets)
    return f"{b}" if len(b) <= 4 else f"[{b[0]}, {b[1]}, …, {b[-1]}] ({len(b)} buckets)"


def repaired(e: C.CacheError, inputs: RunInputs, command: Command | None) -> C.CacheError:
    """`e` with its repair advice replaced by this run's exact build_cache command."""
    cache_dir = getattr(e, "cache_dir", None)
    cache = next((c for st in inputs.stages for c in st.caches if c.cache_dir == cache_dir), None)
    cmd = rebuild_command(cache, inputs, command, verify=e.verify) if cache is not None else None
    if not cmd:
        return e
    return C.CacheError(f"{e.problem}; rerun `{cmd}`, which rebuilds the damaged shards",
                        cache_dir=cache_dir, verify=e.verify)

