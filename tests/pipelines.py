"""Tiny random-weight pipelines of real diffusers families, built offline, for tests.

Each factory in ``FAMILIES`` builds one family's pipeline from its real classes (the diffusers
pipeline, transformer, VAE and scheduler classes, and the transformers text encoders and tokenizers
that pipeline expects) at toy sizes modelled on diffusers' own ``get_dummy_components()``, saves it
with ``pipe.save_pretrained`` and returns the folder (it holds ``model_index.json``), which
``diffusers.DiffusionPipeline.from_pretrained`` loads without the hub. ``call_kwargs(family)`` gives
the smallest call that exercises the family (2 steps, classifier-free guidance, a few latent
pixels, 2 or 3 latent frames for the video families).

Nothing is downloaded: the tokenizers are made here from a small word list (transformers 5's
``T5Tokenizer`` and ``CLIPTokenizer`` build their ``tokenizers`` Unigram / BPE model from the vocab
given), and every weight is drawn from ``torch.manual_seed(0)``, so a family's folder is the same on
every build. Needs ``transformers>=5`` besides diffusers (this module imports it at the top);
diffusers 0.42 loads the Wan transformer (it keeps some modules in fp32) only with ``accelerate``.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

PROMPT = "a painting of a squirrel eating a burger"
NEGATIVE_PROMPT = "low quality"
SEED = 0
TEXT_TOKENS = 16  # max_sequence_length of the T5 prompts in call_kwargs (the pipelines' own defaults are 120-512)

# lowercase words the tokenizers know whole; any other text falls back to single characters
_WORD_LIST = """
a an the of and in on with to at is are this that it its by for from as
painting photo picture video image drawing sketch render portrait landscape scene
squirrel eating burger dance dancing monkey cat dog bird horse fish person man woman child people
red green blue yellow black white orange purple pink brown gray
circle square triangle ball box cube moving left right up down fast slow
low high quality blurry sharp detailed beautiful ugly bad good
sky sea water tree forest city street house mountain snow rain sun night day light dark
walking running flying swimming sitting standing jumping playing
big small little old young new one two three
"""
WORDS = tuple(_WORD_LIST.split())
CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation


# --- tokenizers -----------------------------------------------------------------------------------


def t5_tokenizer(max_length: int = 512) -> T5Tokenizer:
    """A T5-style SentencePiece-Unigram tokenizer: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2 like T5's, then
    ``▁`` + each word of WORDS and the single characters of CHARS (what text outside WORDS splits
    into). Appends ``</s>``; no ``<extra_id_*>`` sentinels."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + w, -1.0) for w in WORDS]
    vocab += [(c, -6.0) for c in CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def clip_tokenizer() -> CLIPTokenizer:
    """A CLIP-style byte-level BPE tokenizer: the characters of CHARS alone and word-final
    (``x</w>``), merges that build each word of WORDS from its characters, and CLIP's two special
    tokens last (``<|endoftext|>`` is also unk and pad, as in openai/clip-vit-large-patch14).
    Lowercases; pads and truncates to 77 tokens like CLIP."""
    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for c in CHARS:
        add(c)
    for c in CHARS:
        add(c + "</w>")
    for word in WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            if merged + piece not in vocab:
                merges.append((merged, piece))
                add(merged + piece)
            merged += piece
    add("<|startoftext|>")
    add("<|endoftext|>")
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


# --- text encoders --------------------------------------------------------------------------------


def _t5_config(tokenizer: T5Tokenizer, d_model: int = 32) -> dict[str, Any]:
    """T5 v1.1 (gated-GELU) at the size of diffusers' tiny-random-t5, two layers, no dropout."""
    return dict(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def t5_encoder(tokenizer: T5Tokenizer, d_model: int = 32) -> T5EncoderModel:
    torch.manual_seed(SEED)
    return T5EncoderModel(T5Config(**_t5_config(tokenizer, d_model))).eval()


def umt5_encoder(tokenizer: T5Tokenizer, d_model: int = 32) -> UMT5EncoderModel:
    torch.manual_seed(SEED)
    return UMT5EncoderModel(UMT5Config(**_t5_config(tokenizer, d_model))).eval()


def _clip_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """CLIP's text tower at the size of diffusers' tests (hidden 32, projection 32), two layers. The
    special-token ids are the tokenizer's (an eos id other than 2 pools at the first eos token)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def clip_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    torch.manual_seed(SEED)
    return CLIPTextModel(_clip_config(tokenizer)).eval()


def clip_encoder_with_projection(tokenizer: CLIPTokenizer, seed: int = SEED) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(_clip_config(tokenizer)).eval()


# --- VAEs -----------------------------------------------------------------------------------------


def kl_vae(latent_channels: int = 4, **config: Any) -> diffusers.AutoencoderKL:
    """An AutoencoderKL with two levels (2x downsampling), 8/16 channels."""
    torch.manual_seed(SEED)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=16,
        **config,
    ).eval()


# --- the families ---------------------------------------------------------------------------------


def _save(pipe: diffusers.DiffusionPipeline, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder)
    return folder


def _pixart_transformer(additional_conditions: bool) -> diffusers.PixArtTransformer2DModel:
    """PixArt's transformer; with the resolution / aspect-ratio embedding the sample size is 128 (the
    1024 px checkpoints'), since the pipelines pass those conditions only for that size."""
    torch.manual_seed(SEED)
    return diffusers.PixArtTransformer2DModel(
        sample_size=128 if additional_conditions else 4,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        use_additional_conditions=additional_conditions,
    ).eval()


def _pixart_scheduler() -> diffusers.DPMSolverMultistepScheduler:
    """PixArt-α's and -Σ's DPM-Solver++ (the checkpoints' scheduler config)."""
    return diffusers.DPMSolverMultistepScheduler(
        beta_schedule="linear",
        beta_start=0.0001,
        beta_end=0.02,
        num_train_timesteps=1000,
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type="epsilon",
        lower_order_final=True,
        use_karras_sigmas=False,
    )


def build_dit(root: Path) -> Path:
    """DiTPipeline: class-conditioned DiT (learned sigma), AutoencoderKL, DDIM; no text encoder."""
    torch.manual_seed(SEED)
    transformer = diffusers.DiTTransformer2DModel(
        sample_size=4,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
    ).eval()
    scheduler = diffusers.DDIMScheduler(
        beta_schedule="linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000, clip_sample=False
    )
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=kl_vae(), scheduler=scheduler)
    return _save(pipe, root / "dit")


def build_pixart_alpha(root: Path) -> Path:
    """PixArtAlphaPipeline: PixArt transformer with the resolution / aspect-ratio embedding (as the
    1024 px checkpoint uses), T5 encoder, AutoencoderKL, DPM-Solver++."""
    tokenizer = t5_tokenizer()
    pipe = diffusers.PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=t5_encoder(tokenizer),
        vae=kl_vae(),
        transformer=_pixart_transformer(additional_conditions=True),
        scheduler=_pixart_scheduler(),
    )
    return _save(pipe, root / "pixart-alpha")


def build_pixart_sigma(root: Path) -> Path:
    """PixArtSigmaPipeline: PixArt transformer without the size embedding, T5 encoder, AutoencoderKL,
    DPM-Solver++."""
    tokenizer = t5_tokenizer()
    pipe = diffusers.PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=t5_encoder(tokenizer),
        vae=kl_vae(),
        transformer=_pixart_transformer(additional_conditions=False),
        scheduler=_pixart_scheduler(),
    )
    return _save(pipe, root / "pixart-sigma")


def build_latte(root: Path) -> Path:
    """LattePipeline: Latte 3D transformer (spatial + temporal blocks), T5 encoder, AutoencoderKL
    applied frame by frame, DDIM."""
    tokenizer = t5_tokenizer()
    torch.manual_seed(SEED)
    transformer = diffusers.LatteTransformer3DModel(
        sample_size=4,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        video_length=2,
    ).eval()
    scheduler = diffusers.DDIMScheduler(
        beta_schedule="linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000, clip_sample=False
    )
    pipe = diffusers.LattePipeline(
        tokenizer=tokenizer,
        text_encoder=t5_encoder(tokenizer),
        vae=kl_vae(),
        transformer=transformer,
        scheduler=scheduler,
    )
    return _save(pipe, root / "latte")


def build_sd3(root: Path) -> Path:
    """StableDiffusion3Pipeline: MMDiT (SD3Transformer2DModel), two CLIP text encoders with projection
    and a T5 encoder, AutoencoderKL with SD3's shift/scale and no quant convs, flow-matching Euler."""
    clip_tok = clip_tokenizer()
    t5_tok = t5_tokenizer()
    torch.manual_seed(SEED)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=4,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=96,  # the T5 width; the two CLIP widths side by side (32 + 32) are zero-padded to it
        pooled_projection_dim=64,  # both CLIP projections (32 + 32)
        out_channels=4,
        pos_embed_max_size=16,
    ).eval()
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=kl_vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=clip_encoder_with_projection(clip_tok, seed=SEED),
        tokenizer=clip_tok,
        text_encoder_2=clip_encoder_with_projection(clip_tok, seed=SEED + 1),
        tokenizer_2=clip_tok,
        text_encoder_3=t5_encoder(t5_tok, d_model=96),
        tokenizer_3=t5_tok,
    )
    return _save(pipe, root / "sd3")


def build_flux(root: Path) -> Path:
    """FluxPipeline: Flux transformer (double- and single-stream blocks, guidance embedding as in
    FLUX.1-dev), CLIP text encoder (pooled) and T5 encoder, AutoencoderKL without quant convs,
    flow-matching Euler with resolution-dependent shift."""
    clip_tok = clip_tokenizer()
    t5_tok = t5_tokenizer()
    torch.manual_seed(SEED)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    ).eval()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = diffusers.FluxPipeline(
        scheduler=scheduler,
        vae=kl_vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=clip_encoder(clip_tok),
        tokenizer=clip_tok,
        text_encoder_2=t5_encoder(t5_tok),
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    return _save(pipe, root / "flux")


def build_wan21(root: Path) -> Path:
    """WanPipeline (Wan 2.1 text-to-video): Wan 3D transformer, UMT5 encoder, the causal 3D
    AutoencoderKLWan (8x spatial, 4x temporal), and the checkpoints' UniPC flow scheduler."""
    tokenizer = t5_tokenizer()
    torch.manual_seed(SEED)
    vae = diffusers.AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
    torch.manual_seed(SEED)
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    scheduler = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
    )
    pipe = diffusers.WanPipeline(
        tokenizer=tokenizer,
        text_encoder=umt5_encoder(tokenizer),
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
    )
    return _save(pipe, root / "wan2.1")


def build_cogvideox(root: Path) -> Path:
    """CogVideoXPipeline (CogVideoX-2b layout): CogVideoX 3D transformer with sin-cos positions, T5
    encoder, AutoencoderKLCogVideoX (8x spatial, 4x temporal), CogVideoX's DDIM (v-prediction,
    zero-terminal-SNR)."""
    tokenizer = t5_tokenizer()
    torch.manual_seed(SEED)
    transformer = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=4,
        attention_head_dim=8,  # 4 x 8 = 32: a multiple of 16 for the 3D sin-cos embedding
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=32,
        num_layers=1,
        sample_width=2,
        sample_height=2,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=TEXT_TOKENS,
    ).eval()
    torch.manual_seed(SEED)
    vae = diffusers.AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    ).eval()
    scheduler = diffusers.CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        snr_shift_scale=3.0,
        steps_offset=0,
        timestep_spacing="trailing",
    )
    pipe = diffusers.CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=t5_encoder(tokenizer),
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    return _save(pipe, root / "cogvideox")


def build_ltx(root: Path) -> Path:
    """LTXPipeline (LTX-Video): LTX 3D transformer, T5 encoder, AutoencoderKLLTXVideo (4x spatial,
    4x temporal here), flow-matching Euler with LTX's dynamic shift."""
    tokenizer = t5_tokenizer()
    torch.manual_seed(SEED)
    transformer = diffusers.LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_layers=1,
        caption_channels=32,
    ).eval()
    torch.manual_seed(SEED)
    vae = diffusers.AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    ).eval()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
    )
    pipe = diffusers.LTXPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=t5_encoder(tokenizer),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return _save(pipe, root / "ltx-video")


FAMILIES: dict[str, Callable[[Path], Path]] = {
    "dit": build_dit,
    "pixart-alpha": build_pixart_alpha,
    "pixart-sigma": build_pixart_sigma,
    "latte": build_latte,
    "sd3": build_sd3,
    "flux": build_flux,
    "wan2.1": build_wan21,
    "cogvideox": build_cogvideox,
    "ltx-video": build_ltx,
}


def call_kwargs(family: str, output_type: str = "np") -> dict[str, Any]:
    """The smallest call of a family's pipeline: 2 steps, classifier-free guidance on (Flux: its
    embedded guidance), a height/width at or near the least the pipeline accepts (8 px = 4x4 latent
    pixels for the image families and Latte, 16 px = 2x2 for Wan and CogVideoX, 32 px = 8x8 for
    LTX, which asks for multiples of 32), 2 latent frames for Latte, Wan and LTX (5 frames), 3 for
    CogVideoX (9 frames), T5 prompts of TEXT_TOKENS tokens, and a fresh generator seeded with SEED."""
    common: dict[str, Any] = {
        "num_inference_steps": 2,
        "output_type": output_type,
        "generator": torch.Generator("cpu").manual_seed(SEED),
    }
    caption = {"prompt": PROMPT, "negative_prompt": NEGATIVE_PROMPT}
    kwargs: dict[str, dict[str, Any]] = {
        "dit": {"class_labels": [1], "guidance_scale": 4.0},
        "pixart-alpha": {
            **caption,
            "height": 8,
            "width": 8,
            "guidance_scale": 4.5,
            "use_resolution_binning": False,
            "clean_caption": False,
            "max_sequence_length": TEXT_TOKENS,
        },
        "pixart-sigma": {
            **caption,
            "height": 8,
            "width": 8,
            "guidance_scale": 4.5,
            "use_resolution_binning": False,
            "clean_caption": False,
            "max_sequence_length": TEXT_TOKENS,
        },
        "latte": {
            **caption,
            "height": 8,
            "width": 8,
            "video_length": 2,
            "guidance_scale": 7.5,
            "clean_caption": False,
        },
        "sd3": {**caption, "height": 8, "width": 8, "guidance_scale": 7.0, "max_sequence_length": TEXT_TOKENS},
        "flux": {"prompt": PROMPT, "height": 8, "width": 8, "guidance_scale": 3.5, "max_sequence_length": TEXT_TOKENS},
        "wan2.1": {
            **caption,
            "height": 16,
            "width": 16,
            "num_frames": 5,
            "guidance_scale": 5.0,
            "max_sequence_length": TEXT_TOKENS,
        },
        "cogvideox": {
            **caption,
            "height": 16,
            "width": 16,
            "num_frames": 9,  # 3 latent frames; an even latent count decodes to 4x its frames (8, not 5)
            "guidance_scale": 6.0,
            "max_sequence_length": TEXT_TOKENS,
        },
        "ltx-video": {
            **caption,
            "height": 32,
            "width": 32,
            "num_frames": 5,
            "guidance_scale": 3.0,
            "max_sequence_length": TEXT_TOKENS,
        },
    }
    return {**common, **kwargs[family]}
