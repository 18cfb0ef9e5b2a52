"""The NovelAI Diffusion V3 recipe for SDXL: v-prediction, ZTSNR, MinSNR(γ=5)+1, NAI buckets.

Run (real SDXL; `model.pretrained` must point at SDXL weights: a diffusers folder, a single-file
.safetensors, or a Hub id when online):

    python train.py --config configs/ztsnr.py --workdir runs/nai3 \
        --config.model.pretrained=/path/to/sdxl --config.data.images_dir=/path/to/images

Offline tiny demo on CPU (generates its own dataset, trains its own tiny VAE, caches, trains the
UNet; about 8 minutes on 2 cores):

    python train.py --config configs/ztsnr.py:tiny --workdir runs/demo

Any field can be overridden with --config.a.b=value; the config is locked, so a misspelt key
is an error. Fields marked [ours] are choices the NAI-v3 report does not specify (METHODS.md).
"""
import ml_collections

from sdxl_jax.config_sections import checkpoint_section, ema_section, log_section, mesh_section
from sdxl_jax.config_sections import root_config


def get_config(preset: str = "sdxl") -> ml_collections.ConfigDict:
    c = root_config(preset, task="unet")  # train.py runs the trainer of c.task
    tiny = c.preset == "tiny"

    c.model = _model(c.preset, tiny)
    c.schedule = _schedule()

    c.loss = _loss()
    c.latents = _latents()

    # ---- text conditioning (METHODS §8) -------------------------------------------------------
    c.text = t = ml_collections.ConfigDict()
    t.max_chunks = 1 if tiny else 3  # 75-token chunks per caption, static for jit

    c.data = _data(tiny)
    c.train = _train(tiny)

    # ---- text-encoder training (train.trainable="unet+text") -----------------------------------
    c.text_encoders = te = ml_collections.ConfigDict()
    te.train_l = True  # CLIP-L
    te.train_g = False  # OpenCLIP bigG
    te.learning_rate_l = 1e-6 if not tiny else 1e-4  # fine-tuners' usual: ~1/10 of the UNet's
    te.learning_rate_g = 1e-6 if not tiny else 1e-4
    te.stop_step_l = 0  # optimizer step after which CLIP-L stops training (0 = never)
    te.stop_step_g = 0

    c.lora = _lora()

    # ---- EMA (METHODS §12) --------------------------------------------------------------------
    c.ema = ema_section(decay=0.9999)

    # ---- device mesh --------------------------------------------------------------------------
    c.mesh = mesh_section()
    if not tiny:  # shard params, optimizer state and EMA over every device (ZeRO-3)
        c.mesh.data, c.mesh.fsdp = 1, -1

    # ---- checkpoints ---------------------------------------------------------------------------
    c.checkpoint = checkpoint_section(every_steps=600 if tiny else 2000)

    c.sample = _sample(tiny)

    # ---- monitoring: TensorBoard always, W&B too when log.wandb_project is set -------------------
    c.log = log_section()
    c.profile_steps = ""  # "a,b": write a jax.profiler trace for steps a…b under the workdir
    return c


def _model(preset: str, tiny: bool) -> ml_collections.ConfigDict:
    """Model: sizes, starting weights, compute dtype, memory options."""
    m = ml_collections.ConfigDict()
    m.preset = preset  # model sizes: "sdxl" (2.57 B UNet), "tiny" (same blocks, small), "micro"
    # Weights to start from: a diffusers folder, a single-file SGM .safetensors, or a Hub id.
    # "" means random init (only sensible for `tiny`); the sdxl preset requires it.
    m.pretrained = ""
    # compute dtype of UNet/VAE/CLIP activations; params stay float32. The tiny (CPU) preset
    # uses float32: XLA:CPU has no bf16 speed-up and compiles bf16 graphs ~2× slower.
    m.dtype = "float32" if tiny else "bfloat16"
    # Memory (docs/memory.md): remat every block and chunked attention give 13.25 GiB per device at
    # 1024², per-device batch 1, FSDP-8 without accumulation, and 15.07 GiB with the in-step
    # accumulation of the defaults (k = 2 measured). Tiny needs neither.
    m.remat = "none" if tiny else "blocks"  # gradient checkpointing: "none" | "blocks" | "dots"
    # "standard" | "memory_efficient" (chunked) | "dot_product" (jax.nn.dot_product_attention:
    # cuDNN flash on NVIDIA with bf16) | "splash" (Pallas, TPU) | "auto" (the backend's kernel)
    m.attention = "standard" if tiny else "auto"
    m.split_head_dim = False  # "standard" attention only: heads as an axis instead of folded into the batch
    # run each transformer layer's feed-forward over this many token chunks (checkpointed scan:
    # one chunk's GEGLU intermediates live at a time; same parameters); 1 = unchunked. 4 fits a
    # per-device batch of 2 at 1024² on 16 GiB under FSDP-8 (11.99 GiB, unchunked 16.88; README),
    # for one more forward of each feed-forward per step
    m.ff_chunks = 1
    # FSDP gathers each weight in the compute dtype: the shard is cast before the all-gather, so
    # gathers move and hold half the bytes with bf16 (no effect with float32 compute)
    m.gather_in_compute_dtype = True
    # resume adapters from an existing kohya / PEFT LoRA file (train.trainable="lora")
    m.lora_init = ""
    # a VAE task run (configs/vae_decoder.py) whose VAE replaces the source's: the latent cache,
    # previews, sample and export all use it. The tiny demo sets it to its own trained VAE.
    m.vae_workdir = ""
    return m


def _schedule() -> ml_collections.ConfigDict:
    """Noise schedule (METHODS §1, §3)."""
    s = ml_collections.ConfigDict()
    s.num_train_timesteps = 1000
    s.beta_start = 0.00085
    s.beta_end = 0.012
    s.ztsnr = "rescale"  # "rescale" (Lin et al. Alg. 1, ᾱ_999 = 0) | "off" (plain SDXL)
    s.terminal_prob = 0.0  # [ours] extra probability mass on t = T−1 in the timestep draw
    return s


def _loss() -> ml_collections.ConfigDict:
    """Loss (METHODS §2, §6, §9)."""
    l = ml_collections.ConfigDict()
    # [ours] | "min_snr" (Hang et al.) | "debiased" (Yu et al., √SNR/(SNR+1)): both 0 at SNR=0,
    # so they never train the ZTSNR terminal step | "none"
    l.weighting = "min_snr_plus_one"
    l.type = "mse"  # "mse" | "huber": pseudo-Huber 2c(√(d²+c²)−c) per element (METHODS §15)
    l.huber_c = 0.1  # c of loss.type="huber" (kohya's default); > 0
    # "snr": c_t = c + (1−c)/(1+σ_t)² (Khrapov et al., kohya's form) [ours: the schedule's exact
    # form], 1 at no noise → c at pure noise | "constant"
    l.huber_schedule = "snr"
    l.snr_gamma = 5.0  # γ of MinSNR, the report's setting
    l.tag_weighting = True  # [ours] per-sample tag weights (data.tags.*)
    l.masked = False  # mask-weighted mean from the cached masks (alpha or x.mask.png; METHODS §15)
    return l


def _latents() -> ml_collections.ConfigDict:
    """Latents (METHODS §10)."""
    z = ml_collections.ConfigDict()
    z.normalization = "scale"  # "scale" (×0.13025, every SDXL tool) | "per_channel" (report)
    z.scale_factor = 0.13025
    # per_channel statistics; empty = take them from the cache manifest (stored in checkpoints)
    z.mean = ml_collections.config_dict.placeholder(tuple)
    z.std = ml_collections.config_dict.placeholder(tuple)
    return z


def _data(tiny: bool) -> ml_collections.ConfigDict:
    """Data (METHODS §7, §9)."""
    d = ml_collections.ConfigDict()
    d.cache_dir = ""  # latent cache built by data_tools.build_cache; "" = <workdir>/cache
    d.images_dir = ""  # folder of images + .txt captions; used to build a missing cache
    d.manifest = ""  # alternative to images_dir: JSONL of {"path":…, "caption":…}
    # alternative: a prepared TFDS split NAME[:SPLIT] (array_record), read with tfds.data_source
    d.tfds = ""
    d.tfds_data_dir = ""  # "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    d.tfds_image_key = "image"  # feature with the image: Image (encoded) or uint8 array; nested: outer/inner
    d.tfds_caption_key = "caption"  # feature with the caption: text, bytes or a list of tags
    # Several datasets in one run, instead of the single source above: a tuple (or list) of dicts
    # {"images_dir" | "manifest" | "cache_dir": PATH, "repeats": int ≥ 1, "weight": float > 0,
    #  "name": str}; each record of a source appears repeats × weight times per epoch on average.
    # A source without cache_dir gets <data.cache_dir or <workdir>/cache>/<name>, built when
    # missing. kohya folder names: images_dir "10_cat" means repeats 10, and an images_dir (also
    # data.images_dir) whose subfolders are all N_name is one source per subfolder (README).
    d.sources = ()
    d.val_fraction = 0.02  # held-out share of the cache for validation loss
    d.seed = 0  # data order seed (global batch plan, caption dropout, tag shuffle)
    d.caption_dropout = 0.1  # probability of an empty caption (enables CFG)
    d.tag_shuffle = True  # shuffle comma-separated tags ...
    d.keep_first_n = 1  # ... keeping the first N in place
    d.prefetch = 2  # batches prefetched in a background thread
    d.read_threads = 2  # threads reading/decoding cache records for each batch
    # a gs:// cache: shards copied to local disk in the background, up to this many GB, and read
    # from there once copied (sdxl_jax/data/shard_mirror.py); 0 = every record from gs://
    d.local_shard_cache_gb = 50.0
    d.latents_dtype = "float16"  # storage dtype of latents in the cache
    d.demo_size = 256  # images of the generated demo dataset (tiny preset, missing images_dir)
    # the tiny demo (no data configured) first trains its own VAE from scratch on the demo images
    # for this many steps (train/demo_vae.py; reused when one with the same settings exists):
    # 800 reach 22.4 dB held-out PSNR (~3 min on 2 CPU cores). 0 = the seeded random VAE, whose
    # latents carry almost nothing of the images (previews are colour noise)
    d.demo_vae_steps = 800
    # -- cache building (data_tools.build_cache); all but the last two fix the cache content --
    d.store_std = False  # also store the VAE posterior std per latent (for sampling z ~ N(μ, σ))
    d.shard_size = 1024  # records per ArrayRecord shard (the unit of resume)
    d.max_image_pixels = 8192 * 8192  # larger images are skipped (decompression-bomb guard)
    d.min_image_pixels = (128 * 128 if tiny else 1024 * 1024) // 4  # smaller: skipped (¼ bucket area)
    d.build_batch_size = 8  # images per VAE call (padded to a multiple of the local devices)
    d.decode_workers = 0  # image-decoding threads while encoding; 0 = one per CPU core
    d.buckets = b = ml_collections.ConfigDict()
    # tiny: 96×160, 128×128, 160×96 only (16×16 latents: the demo trains ~4× faster than at
    # 256², where 300 steps did not learn the prompts); every bucket shape is one compile
    b.max_area = 128 * 128 if tiny else 1024 * 1024  # pixel-area budget per bucket
    b.min_side = 96 if tiny else 512
    b.max_side = 160 if tiny else 2048
    b.step = 32 if tiny else 64
    b.base = (128, 128) if tiny else (1024, 1024)  # always-present square bucket (w, h)
    b.max_ar_error = 0.5  # max |log(ar_bucket) − log(ar_image)|; larger images are skipped
    b.crop = "random"  # "random" | "center" crop of the overhang
    b.crop_seed = 0  # seed of the random crops (fixed per image by a hash of its path)
    b.scale_batch_by_area = False  # per-bucket batch ∝ max_area/area (multiple of data-parallel)
    d.tags = g = ml_collections.ConfigDict()
    g.alpha = 0.5  # w = clip(exp(mean −α·log(f/f_ref)), w_min, w_max), mean rescaled to 1
    g.w_min = 0.1
    g.w_max = 3.0
    g.meta_patterns = ("rating:*", "*quality", "year *", "masterpiece", "absurdres")
    return d


def _train(tiny: bool) -> ml_collections.ConfigDict:
    """Training: steps, batches, optimizer, what trains."""
    tr = ml_collections.ConfigDict()
    # tiny: 1,200 steps of batch 8 at 128² (~5 min on 2 CPU cores with the compiles): previews of
    # the prompted backgrounds; tools/prompt_check 28 of 32 backgrounds right (1,500 steps: 28; README)
    tr.steps = 1200 if tiny else 100_000  # optimizer steps (one global batch each)
    # The recipe is stated per global batch (METHODS §13). Each device holds a micro-batch of
    # per_device_batch_size samples; the step accumulates k = global / (per-device × devices)
    # micro-batches into one update. 0 = no accumulation (the global batch at once).
    tr.global_batch_size = 8 if tiny else 256
    tr.per_device_batch_size = 0 if tiny else 1
    tr.seed = 0  # init / noise / timestep seed
    tr.learning_rate = 5e-4 if tiny else 1e-5
    tr.lr_schedule = "cosine" if tiny else "constant"  # "constant" | "cosine" (both after linear warmup)
    tr.warmup_steps = 50 if tiny else 500
    tr.optimizer = "adamw"  # "adamw" | "adafactor" | "lion"
    tr.b1 = 0.9
    tr.b2 = 0.999
    tr.eps = 1e-8
    tr.weight_decay = 0.01
    tr.grad_clip = 1.0  # global-norm clipping; 0 disables
    tr.log_every = 10
    tr.max_nonfinite = 5  # consecutive non-finite steps that stop the run
    # Before the first step, the compiled step's memory (XLA's buffer assignment) is checked
    # against the device: "auto" (the device's limit; nothing on CPU), "off", or a limit such as
    # "16GiB". A step that cannot fit stops with the bytes needed and the settings that would fit.
    tr.fit_check = "auto"
    # Every batch shape the data plan will use (bucket × stage) is compiled before or while
    # training, in this many threads (XLA compiles release the GIL); 0 = one per core, at most
    # one per shape and at most as many as host memory holds (one compile's measured footprint).
    tr.compile_workers = 0
    # Progressive stages: a tuple of dicts {"steps": N, "cache_dir": DIR, "global_batch_size": B}
    # run in order; empty = one stage from train.steps / data.cache_dir.
    tr.stages = ()

    # What trains (METHODS §14): "unet" (full fine-tuning, the recipe), "unet+text" (the UNet and
    # the text encoders chosen in text_encoders.*), or "lora" (adapters only, lora.*; the base
    # weights stay frozen in the compute dtype). Optimizer state and EMA exist only for what trains.
    tr.trainable = "unet"
    return tr


def _lora() -> ml_collections.ConfigDict:
    """Adapters (train.trainable="lora"; METHODS §14)."""
    lo = ml_collections.ConfigDict()
    lo.algo = "lora"  # "lora" (LoCon with lora.conv) | "lokr" (LyCORIS Kronecker, linear layers)
    lo.rank = 16
    lo.alpha = 16.0  # ΔW scale = alpha / rank
    lo.conv = False  # also adapt the resnet convs, shortcuts, time_emb_proj, samplers (LoCon)
    lo.conv_rank = 8  # rank / alpha of the 3×3 convs (1×1 convs use rank / alpha)
    lo.conv_alpha = 8.0
    lo.models = ("unet",)  # any of "unet", "text_l", "text_g"
    lo.targets = ()  # extra regexes on module paths (e.g. "down_blocks_1/attentions_0/proj_in")
    lo.lokr_factor = -1  # LoKr: -1 = the most square split
    lo.rank_dropout = 0.0  # LyCORIS rank dropout (input dropout cannot be merged on the fly)
    lo.scale = 1.0  # multiplier of ΔW in training previews (exports keep the file at scale 1)
    return lo


def _sample(tiny: bool) -> ml_collections.ConfigDict:
    """Samples and validation (METHODS §4, §5)."""
    sp = ml_collections.ConfigDict()
    sp.every_steps = 600 if tiny else 2000  # 0 disables previews and validation
    sp.prompts = ("completely black", "white background, red circle", "blue square, 1girl")
    # a kohya prompt file (one prompt per line; --n --w --h --d --l --s): replaces sample.prompts
    # and sample.seeds; per-prompt sizes snap to the nearest bucket
    sp.prompts_file = ""
    sp.negative = ""
    sp.seeds = (0,)
    sp.steps = 28
    sp.cfg = 5.0
    sp.rescale = 0.0  # CFG rescale φ
    sp.sampler = "euler"  # "euler" | "euler_a" | "dpmpp_2m"
    sp.schedule = "trailing"  # "trailing" | "karras"
    sp.width = 128 if tiny else 1024
    sp.height = 128 if tiny else 1024
    sp.sigma_max_scaling = True  # resolution-aware σ_1 (METHODS §5)
    sp.val_batches = 2  # validation batches per evaluation
    return sp
