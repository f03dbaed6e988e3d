"""sdtune: teach Stable Diffusion models new concepts."""

__version__ = "0.1.0"
