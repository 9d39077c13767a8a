"""Diffusion core: model loading, the StreamDiffusion pipeline, the similarity filter. No I/O."""
