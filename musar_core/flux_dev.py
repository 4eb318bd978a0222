"""Reference facts about FLUX.1-dev that the code and the capacity plan rely on."""

# diffusers FluxTransformer2DModel config of black-forest-labs/FLUX.1-dev.
FLUX_DEV_TRANSFORMER_CONFIG: dict = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_DEV_TRANSFORMER_PARAMS_BILLIONS = 11.90
# Pixels per packed token side: VAE downsamples 8x, then 2x2 patches are packed into one token.
PIXELS_PER_TOKEN_SIDE = 16
T5_MAX_TOKENS = 512
