"""LoRA Studio: train, compare and export Stable Diffusion LoRAs."""

__version__ = "0.1.0"
