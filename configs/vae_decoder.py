"""SDXL VAE decoder finetuning (NAI-v3 report: a finetuned decoder reduces JPEG-like artifacts).

Only the decoder (post_quant_conv + decoder) trains; the encoder is frozen, so the latent space
the UNet was trained on does not move (METHODS §11). Losses [ours]: pixel L1 + MSE, an optional
LPIPS-style perceptual loss from a weights file, and a PatchGAN discriminator (hinge loss,
taming-transformers' adaptive weight) switched on after a warm-up.

Run (real SDXL; `model.pretrained` points at SDXL weights, of which only the VAE is read):

    python train.py --config configs/vae_decoder.py --workdir runs/vae \
        --config.model.pretrained=/path/to/sdxl --config.data.images_dir=/path/to/images

Offline tiny demo on CPU (generates its own dataset; a couple of minutes):

    python train.py --config configs/vae_decoder.py:tiny --workdir runs/vae_demo

Use the result: `sdxl_jax.runs.open_run(workdir).params("vae")` returns the full VAE
parameters (frozen encoder + trained decoder, EMA by default) for export or sampling.
Any field can be overridden with --config.a.b=value; the config is locked.
"""
import ml_collections

from sdxl_jax.config_sections import checkpoint_section, ema_section, log_section, mesh_section
from sdxl_jax.config_sections import root_config


def get_config(preset: str = "sdxl") -> ml_collections.ConfigDict:
    c = root_config(preset, task="vae_decoder")  # train.py runs the trainer of c.task
    tiny = c.preset == "tiny"

    c.model = _model(c.preset, tiny)
    c.data = _data(tiny)
    c.loss = _loss()
    c.disc = _disc(tiny)
    c.train = _train(tiny)

    # ---- EMA of the trained weights (METHODS §12); export and samples use it ------------------
    c.ema = ema_section(decay=0.999 if tiny else 0.9999)

    # ---- device mesh --------------------------------------------------------------------------
    c.mesh = mesh_section()

    # ---- checkpoints ---------------------------------------------------------------------------
    c.checkpoint = checkpoint_section(every_steps=100 if tiny else 2000)

    # ---- reconstruction samples + held-out error -----------------------------------------------
    c.sample = sp = ml_collections.ConfigDict()
    sp.every_steps = 100 if tiny else 2000  # 0 disables; step 0 of a fresh run is always measured
    sp.num_images = 4  # held-out images: rows of the input | reconstruction grid, and the error
    sp.image_size = 64 if tiny else 512  # square side the held-out images are centre-cropped to
    # ---- monitoring: TensorBoard always, W&B too when log.wandb_project is set -------------------
    c.log = log_section()
    c.profile_steps = ""  # "a,b": write a jax.profiler trace for steps a…b under the workdir
    return c


def _model(preset: str, tiny: bool) -> ml_collections.ConfigDict:
    """Model: the VAE, its starting weights, what trains."""
    m = ml_collections.ConfigDict()
    m.preset = preset  # VAE sizes: "sdxl" (83.7 M params, 49.5 M in the decoder) or "tiny"
    # Weights to start from (encoder and decoder): a diffusers folder, a single-file SGM
    # .safetensors or a Hub id. "" = the seeded random VAE of the UNet trainer (tiny only).
    m.pretrained = ""
    # Compute dtype of the VAE; params, losses, perceptual net and discriminator stay float32.
    m.dtype = "float32" if tiny else "bfloat16"
    # Decode z ~ N(μ, σ) of the frozen encoder instead of μ [ours]: off by default, because the
    # UNet produces (and the latent cache stores) posterior means.
    m.sample_posterior = False
    # Train the encoder too (a VAE from scratch or for a new latent space; the posterior is then
    # always sampled and loss.kl_weight applies). False = the NAI-v3 decoder-only recipe.
    m.train_encoder = False
    return m


def _data(tiny: bool) -> ml_collections.ConfigDict:
    """Data: pixels, not the latent cache."""
    d = ml_collections.ConfigDict()
    d.images_dir = ""  # folder of images (recursive); captions are not needed
    d.manifest = ""  # alternative: JSONL of {"path": …, "caption": …} (entries need a caption)
    d.val_fraction = 0.05  # held-out share by key hash (the latent loader's rule); samples use it
    d.seed = 0  # data order and crop seed
    # Side of the square random training crop taken from the bucket-sized image; 0 = train on
    # the full bucket (one compiled step per bucket). Must be ≤ data.buckets.min_side.
    d.crop_size = 64 if tiny else 256
    d.prefetch = 2  # batches prefetched in a background thread
    d.read_threads = 2  # threads decoding images for each batch
    d.max_image_pixels = 8192 * 8192  # larger images are skipped (decompression-bomb guard)
    d.min_image_pixels = (256 * 256 if tiny else 1024 * 1024) // 4  # smaller ones are skipped
    d.demo_size = 256  # images of the generated demo dataset (tiny preset, no images_dir)
    d.buckets = b = ml_collections.ConfigDict()  # the UNet config's bucket table (METHODS §7)
    b.max_area = 256 * 256 if tiny else 1024 * 1024  # pixel-area budget per bucket
    b.min_side = 192 if tiny else 512
    b.max_side = 320 if tiny else 2048
    b.step = 64
    b.base = (256, 256) if tiny else (1024, 1024)  # always-present square bucket (w, h)
    b.max_ar_error = 0.5  # max |log(ar_bucket) − log(ar_image)|; larger errors are skipped
    b.crop = "random"  # "random" | "center" crop of the overhang after the cover-fit
    b.scale_batch_by_area = False  # per-bucket batch ∝ max_area/area (only with crop_size 0)
    return d


def _loss() -> ml_collections.ConfigDict:
    """Reconstruction losses [ours]."""
    l = ml_collections.ConfigDict()
    l.l1_weight = 1.0  # mean |x̂ − x| over pixels in [−1, 1]
    l.mse_weight = 1.0  # mean (x̂ − x)²
    # LPIPS-style perceptual net (.safetensors, format in sdxl_jax/train/vae_losses.py); "" = no
    # perceptual loss. A path that does not exist is an error, never a silent zero.
    l.perceptual_weights = ""
    l.perceptual_weight = 1.0
    # KL(posterior ‖ N(0, I)) per image value [ours, the LDM autoencoders' 1e-6]; only with
    # model.train_encoder (a frozen encoder's KL is a constant)
    l.kl_weight = 1e-6
    return l


def _disc(tiny: bool) -> ml_collections.ConfigDict:
    """Discriminator: PatchGAN, hinge loss, adaptive weight."""
    g = ml_collections.ConfigDict()
    g.enabled = True
    g.start_step = 50 if tiny else 5000  # GAN terms are exactly 0 before this optimizer step
    g.weight = 0.5  # × adaptive weight ‖∇_last rec‖/(‖∇_last gan‖+1e-4) (taming's disc_weight)
    g.max_adaptive_weight = 1e4  # clip of the adaptive weight (taming's value)
    g.channels = 16 if tiny else 64  # width of the first conv (ndf)
    g.layers = 2 if tiny else 3  # stride-2 convs (taming's n_layers)
    g.learning_rate = 1e-3 if tiny else 1e-5  # Adam, constant
    g.b1 = 0.5  # taming's Adam betas
    g.b2 = 0.9
    return g


def _train(tiny: bool) -> ml_collections.ConfigDict:
    """Training of the decoder (the UNet config's keys)."""
    tr = ml_collections.ConfigDict()
    tr.steps = 200 if tiny else 50_000
    tr.global_batch_size = 8 if tiny else 64
    tr.seed = 0  # seeds the random VAE (when model.pretrained is empty), the discriminator, noise
    tr.learning_rate = 1e-3 if tiny else 1e-5
    tr.lr_schedule = "constant"  # "constant" | "cosine" (both after linear warmup)
    tr.warmup_steps = 10 if tiny else 500
    tr.optimizer = "adamw"  # "adamw" | "adafactor" | "lion"
    tr.b1 = 0.9
    tr.b2 = 0.999
    tr.eps = 1e-8
    tr.weight_decay = 0.0
    tr.grad_clip = 1.0  # global-norm clipping of the decoder gradient; 0 disables
    # micro-batch per device; the step accumulates global / (per-device × devices) micro-batches
    # into one update of decoder and discriminator (METHODS §13). 0 = the global batch at once.
    tr.per_device_batch_size = 0
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
    return tr
