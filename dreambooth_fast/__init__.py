"""dreambooth-fast: fast DreamBooth for cascaded text-to-image diffusion models."""

__version__ = "0.1.0"
