"""The one download LoRA Studio ever makes: a captioning model from the Hugging Face hub, after the user agreed.

Everything else in the app runs with the hub switched off (studio.engine.offline); only the functions here switch
it on, for one call, under a lock.
"""

from __future__ import annotations

import contextlib
import fnmatch
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from studio.engine.captioning.base import CaptionModelError
from studio.engine.captioning.models import ModelSpec, spec_for

_ONLINE_LOCK = threading.Lock()


class DownloadCancelled(Exception):
    """The user stopped the download; what was fetched so far stays in the cache and is resumed next time."""


@dataclass(frozen=True)
class DownloadOffer:
    """What a download would fetch: shown to the user, who must agree before anything is fetched."""

    model_id: str
    label: str
    kind: str
    files: tuple[tuple[str, int], ...]  # (file name, bytes); empty when the hub could not be asked
    total_bytes: int
    exact: bool  # False: total_bytes is an estimate from LoRA Studio's table
    source: str  # "hub" (asked just now) | "table" (the hub could not be reached)
    revision: str = ""

    def describe(self) -> str:
        size = format_bytes(self.total_bytes)
        return f"{self.label} ({self.model_id}), {'about ' if not self.exact else ''}{size}"


def format_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


@contextlib.contextmanager
def _online() -> Iterator[None]:
    """Let huggingface_hub reach the hub for the duration of the block (it reads this flag at every request)."""
    from huggingface_hub import constants

    with _ONLINE_LOCK:
        was = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = False
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE = was


def _wanted(name: str, spec: ModelSpec) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in spec.files) and "/" not in name


def download_offer(model_id: str, timeout_s: float = 10.0) -> DownloadOffer:
    """The files and size of a catalog model, asked of the hub now; LoRA Studio's table when it cannot be reached."""
    spec = spec_for(model_id)
    if spec is None:
        raise CaptionModelError(f"LoRA Studio only downloads the captioning models it lists; '{model_id}' is not one. "
                                "Download it yourself and choose its folder.")
    try:
        from huggingface_hub import HfApi

        with _online():
            info = HfApi().model_info(model_id, files_metadata=True, timeout=timeout_s)
        files = tuple((s.rfilename, int(s.size or 0)) for s in info.siblings or () if _wanted(s.rfilename, spec))
        if files:
            return DownloadOffer(model_id, spec.label, spec.kind, files, sum(n for _, n in files), True, "hub",
                                 info.sha or "")
    except Exception:  # offline, a proxy, the hub down: fall back to the table, and say it is an estimate
        pass
    return DownloadOffer(model_id, spec.label, spec.kind, (), spec.approx_bytes, spec.exact, "table")


class _Progress:
    """A tqdm stand-in for hf_hub_download: counts bytes for ``report`` and stops when ``stop`` is set."""

    def __init__(self, report: Callable[[int], None], stop: threading.Event | None):
        self.report, self.stop = report, stop

    def make(self):
        report, stop = self.report, self.stop

        from tqdm.auto import tqdm

        class Bar(tqdm):
            def __init__(self, *args, **kwargs):
                kwargs["disable"] = True  # nothing printed; the app shows its own progress
                super().__init__(*args, **kwargs)

            def update(self, n=1):
                if stop is not None and stop.is_set():
                    raise DownloadCancelled("download stopped")
                report(int(n or 0))
                return super().update(n)

        return Bar


def download(offer: DownloadOffer, *, consent: bool, progress: Callable[[int, int], None] | None = None,
             stop: threading.Event | None = None) -> Path:
    """Fetch the offered model into the Hugging Face cache and return its folder.

    ``consent`` must be True: the caller has shown ``offer`` (model and size) and the user said yes.
    ``progress(done_bytes, total_bytes)`` is called as bytes arrive. Raises DownloadCancelled when stopped.
    """
    if not consent:
        raise CaptionModelError("Nothing was downloaded: a download needs your explicit agreement.")
    spec = spec_for(offer.model_id)
    if spec is None:
        raise CaptionModelError(f"'{offer.model_id}' is not a model LoRA Studio offers to download.")
    from huggingface_hub import HfApi, hf_hub_download

    from studio.engine.checkpoint import hf_hub_cache, hub_snapshot

    done = 0

    def report(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, max(offer.total_bytes, done))

    bar = _Progress(report, stop).make()
    try:
        with _online():
            files = offer.files
            if not files:  # the offer came from the table: the hub is reachable now, or this fails clearly
                info = HfApi().model_info(offer.model_id, files_metadata=True)
                files = tuple((s.rfilename, int(s.size or 0)) for s in info.siblings or () if _wanted(s.rfilename, spec))
            for name, _ in files:
                if stop is not None and stop.is_set():
                    raise DownloadCancelled("download stopped")
                # The main branch, not a commit id: only then is refs/main written, which offline look-ups read.
                hf_hub_download(offer.model_id, name, cache_dir=str(hf_hub_cache()), tqdm_class=bar)
    except DownloadCancelled:
        raise
    except Exception as exc:
        raise CaptionModelError(f"{offer.label} could not be downloaded ({type(exc).__name__}: {exc}). Check the "
                                "internet connection and try again; finished files are kept.") from None
    folder = hub_snapshot(offer.model_id)
    if folder is None:
        raise CaptionModelError(f"{offer.label} was downloaded but cannot be found in the Hugging Face cache "
                                f"('{hf_hub_cache()}').")
    return folder
