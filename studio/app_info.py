"""One source of the application's identity for the GUI, packaging and LoRA metadata."""

from studio import __version__

APP_ID = "io.github.lorastudio.LoraStudio"
APP_NAME = "LoRA Studio"
APP_EXECUTABLE = "lora-studio"
ORGANIZATION = "LoRA Studio"
SUMMARY = "Train, compare and export Stable Diffusion LoRAs by point and click"
VERSION = __version__
HOMEPAGE = "https://github.com/lorastudio/lora-studio"
