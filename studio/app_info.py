"""One source of the application's identity for the GUI, packaging and LoRA metadata."""

from studio import __version__

# Reverse-DNS id: the .desktop file name, the AppStream <id>, QGuiApplication.setDesktopFileName and the macOS
# bundle identifier all use it, so docks group the window with its launcher. io.github.<owner> must match
# HOMEPAGE's GitHub owner (Flathub verifies that); tests/packaging checks both.
APP_ID = "io.github.lorastudio.LoraStudio"
APP_NAME = "LoRA Studio"
APP_EXECUTABLE = "lora-studio"
# Windows and macOS need a separate windowed launcher (see packaging/pyinstaller/lora-studio.spec).
GUI_EXECUTABLE = "lora-studio-gui"
ORGANIZATION = "LoRA Studio"
SUMMARY = "Train, compare and export Stable Diffusion LoRAs by point and click"
VERSION = __version__
HOMEPAGE = "https://github.com/lorastudio/lora-studio"
ISSUES_URL = f"{HOMEPAGE}/issues"
DEVELOPER_ID = "io.github.lorastudio"
DEVELOPER_NAME = "The LoRA Studio contributors"
LICENSE = "Apache-2.0"  # SPDX, as in pyproject.toml
METADATA_LICENSE = "CC0-1.0"  # the AppStream file's own licence; stores accept only a few permissive ones

# Newest first. Add a line when __version__ changes, then run `python packaging/generate.py`
# (a test fails while the newest entry is not VERSION or the generated files are stale).
RELEASES = (("0.1.0", "2026-11-22"),)

# Store listing (AppStream description, installer pages). Plain sentences: they are escaped, not parsed.
DESCRIPTION = (
    "LoRA Studio teaches a Stable Diffusion model a new subject or style from a folder of your pictures. "
    "It walks you through five steps: choose a base model, check the pictures and their captions, pick the "
    "settings, train while watching the loss and preview images, and export a LoRA file.",
    "The exported file works in AUTOMATIC1111, ComfyUI and diffusers and carries the usual training metadata. "
    "Stable Diffusion 1.x, 2.x and SDXL are supported, on NVIDIA GPUs, Apple silicon or the CPU. "
    "Everything runs on your computer; the app never downloads anything by itself.",
    "The same job file can also be trained from the command line with lora-studio train.",
)
CATEGORIES = ("Graphics", "ArtificialIntelligence")  # freedesktop main + additional category
KEYWORDS = ("Stable Diffusion", "LoRA", "SDXL", "fine-tuning", "training", "diffusion", "AI")
# (file under docs/screenshots/ at the release tag, caption); the first one is the store's default.
# The files are what `lora-studio screenshots docs/screenshots` writes.
SCREENSHOTS = (
    ("train.png", "Training with the loss curve and preview images"),
    ("dataset.png", "Checking the pictures and their captions"),
    ("try_and_export.png", "Trying the LoRA and exporting it"),
)


def screenshot_url(name: str) -> str:
    """Stable address of a screenshot: the tagged release, so old metadata keeps pointing at old pictures."""
    owner_repo = HOMEPAGE.removeprefix("https://github.com/")
    return f"https://raw.githubusercontent.com/{owner_repo}/v{VERSION}/docs/screenshots/{name}"
