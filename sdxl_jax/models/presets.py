"""Architecture sizes: "sdxl" (the real SDXL base 1.0 configs), "tiny" (same blocks, small) and
"micro" (tiny's text towers and VAE, a one-level UNet: for tests of the engine, not of SDXL) and
"mid" (tiny's text towers and VAE, SDXL's UNet blocks, layers per block and transformer depths
1/2/10 at 1/5 of its widths: parity tests, benches and compile timings of a larger step).

Each function returns constructor kwargs for the diffusers / transformers config classes, so the
same dicts describe the modules built here and the folders written by export. "tiny" keeps every
structural feature of SDXL (3 UNet levels: plain, cross-attn, cross-attn with deeper
transformers; text_time micro-conditioning; 8x VAE; two CLIP text towers, penultimate states
concatenated) at widths that run on a CPU.
"""
from __future__ import annotations

from sdxl_jax.config_sections import MODEL_PRESETS, PRESETS  # noqa: F401  (re-exported: one list)
from sdxl_jax.models.tokenizer import tiny_vocab_size


# Both SDXL text configs carry CLIP's legacy special-token ids (eos_token_id == 2); with that
# value transformers pools the EOS state at argmax(input_ids), i.e. at <|endoftext|>, the
# highest id of the vocabulary. The tiny vocabulary keeps <|endoftext|> last for the same rule.
_LEGACY_SPECIAL_IDS = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)


def _check(preset: str) -> str:
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {MODEL_PRESETS}")
    return preset


def text_l_config(preset: str) -> dict:
    """CLIP ViT-L/14 text tower (SDXL `text_encoder`)."""
    if _check(preset) == "sdxl":
        return dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                    num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                    hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
                    **_LEGACY_SPECIAL_IDS)
    return dict(vocab_size=tiny_vocab_size(), hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32,
                **_LEGACY_SPECIAL_IDS)


def text_g_config(preset: str) -> dict:
    """OpenCLIP ViT-bigG/14 text tower with projection (SDXL `text_encoder_2`)."""
    if _check(preset) == "sdxl":
        return dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                    num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77,
                    hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1280,
                    **_LEGACY_SPECIAL_IDS)
    return dict(vocab_size=tiny_vocab_size(), hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=32,
                **_LEGACY_SPECIAL_IDS)


def unet_config(preset: str) -> dict:
    """UNet config (`unet.UNet2DConditionModel` fields = diffusers' UNet2DConditionModel config
    keys). `attention_head_dim` is the number of heads per level
    (diffusers' naming quirk, identical in the PyTorch SDXL config)."""
    _check(preset)
    hidden_l = text_l_config(preset)["hidden_size"]
    hidden_g = text_g_config(preset)["hidden_size"]
    pooled_dim = text_g_config(preset)["projection_dim"]
    common = dict(
        in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2, use_linear_projection=True, flip_sin_to_cos=True, freq_shift=0,
        addition_embed_type="text_time", act_fn="silu",
        # every GroupNorm of the resnets, transformers and output (the transformers' eps is
        # PyTorch's fixed 1e-6); a preset may pick another group count dividing its widths
        norm_num_groups=32, norm_eps=1e-5,
        # CLIP-L penultimate ‖ bigG penultimate
        cross_attention_dim=hidden_l + hidden_g,
    )
    if preset == "sdxl":
        time_dim = 256
        sizes = dict(sample_size=128, block_out_channels=(320, 640, 1280),
                     transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20))
    elif preset == "mid":
        # SDXL's structure (levels, 2 resnets per block, transformer depths 1/2/10, heads of 64
        # channels) at 1/5 of its widths
        time_dim = 16
        sizes = dict(sample_size=32, block_out_channels=(64, 128, 256),
                     transformer_layers_per_block=(1, 2, 10), attention_head_dim=(1, 2, 4))
    elif preset == "micro":
        # The smallest UNet with every kind of block the trainer touches: one level with
        # cross-attention (2 heads), the mid block, text_time conditioning. For engine and smoke
        # tests (loop, checkpoints, sharding): ~2.5x faster to compile than tiny, 172 leaves
        # instead of 408. Not an SDXL layout (export's single-file key map needs tiny or sdxl).
        time_dim = 16
        sizes = dict(sample_size=32, block_out_channels=(32,), layers_per_block=1,
                     down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                     transformer_layers_per_block=(1,), attention_head_dim=(2,))
    else:
        # Sized for CPU: fwd+bwd at batch 8 of 16×16 latents in ~0.18 s on 2 cores. GroupNorm
        # keeps SDXL's 32 groups (the checkpoints of earlier runs were trained so); at 32 channels
        # that is a per-channel instance norm that removes every channel's spatial mean (a flat colour,
        # the time / pooled-text embedding added before norm2). The first level, which feeds
        # the output norm, therefore has 64 channels (2 per group): with 32 the demo sampled
        # speckled textures, never flat fields (README, "the demo"). One resnet per level halves
        # the op count (compile time); the last level keeps a 2-layer transformer like SDXL's.
        time_dim = 16
        sizes = dict(sample_size=32, block_out_channels=(64, 32, 64), layers_per_block=1,
                     transformer_layers_per_block=(1, 1, 2), attention_head_dim=(1, 1, 2))
    # pooled bigG embedding ‖ 6 sinusoidal micro-conditions (orig hw, crop tl, target hw)
    return dict(common, **sizes, addition_time_embed_dim=time_dim,
                projection_class_embeddings_input_dim=6 * time_dim + pooled_dim)


def vae_config(preset: str) -> dict:
    """AutoencoderKL config (diffusers' field names; 4 levels = 8x down/up sampling, 4 latent
    channels). GroupNorm eps is autoencoder.VAEConfig's default, 1e-6 as in every SD VAE."""
    common = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu", latent_channels=4,
                  scaling_factor=0.13025)
    if _check(preset) == "sdxl":
        return dict(common, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                    norm_num_groups=32, sample_size=1024)
    return dict(common, block_out_channels=(16, 32, 32, 32), layers_per_block=1,
                norm_num_groups=8, sample_size=256)
