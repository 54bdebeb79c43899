"""Known-harmless library messages, silenced at their source only (by logger or module, category and message)."""

from __future__ import annotations

import logging
import re
import warnings

from PIL import Image

# diffusers' ModelMixin.to() warns on every dtype cast, listing the modules it wants kept in float32 (0.42: the check
# is `[] is not None`, always true). With an empty list there is nothing to keep, and the trainer's cast of the VAE to
# float32, which is what the sentence asks for, printed it on every run. A non-empty list still shows.
_NO_FP32_MODULES = re.compile(r"There are modules in \w+ that should be kept in float32: \[\]\.")


class _DropEmptyFp32Notice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _NO_FP32_MODULES.match(record.getMessage())


def quiet_known_noise() -> None:
    """Install the filters once; safe to call again."""
    logger = logging.getLogger("diffusers.models.modeling_utils")
    if not any(isinstance(f, _DropEmptyFp32Notice) for f in logger.filters):
        logger.addFilter(_DropEmptyFp32Notice())
    # Pillow warns when an image is above Image.MAX_IMAGE_PIXELS (set by studio.engine.images to our own limit) and
    # errors above twice that. Every image above our limit is refused and recorded as that item's problem by the
    # dataset doctor (images._pixels_problem), so the warning would only repeat it on stderr. A permanent filter,
    # not catch_warnings(): the doctor decodes on several threads and catch_warnings is not thread-safe.
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit of \d+ pixels",
                            category=Image.DecompressionBombWarning, module=r"PIL\.Image")
