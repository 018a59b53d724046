"""Transformer configurations of the random-weight demo checkpoints. Kept apart from
`demo_checkpoint` (which imports MindSpore) so that command lines can offer them as choices and
answer `--help` without importing MindSpore."""

from typing import Dict

# Real FLUX.1 keeps in_channels=64 (16 latent channels packed 2x2) and a 3-axis rope; so do these.
TRANSFORMER_CONFIGS: Dict[str, dict] = {
    "demo": dict(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(8, 12, 12),
    ),
    # Big enough that block compute dominates a forward pass on CPU (the benchmarks use it): hidden 1024,
    # 3 double + 6 single blocks, 0.2 G parameters.
    "mid": dict(
        patch_size=1, in_channels=64, num_layers=3, num_single_layers=6, attention_head_dim=128,
        num_attention_heads=8, joint_attention_dim=512, pooled_projection_dim=128, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),
}
