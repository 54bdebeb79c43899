"""Shared fixtures: offline by force, user dirs in a temp folder, tiny models of each family, small datasets."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

# Before anything imports huggingface_hub: any download attempt must fail loudly.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("TQDM_DISABLE", "1")
# One compute thread: tiny models gain nothing from two, and on a busy 2-core machine a second thread fights the
# GUI thread and the torchrun workers (measured: test_trainer.py 216 s with two threads, 52 s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _user_dirs(tmp_path_factory):
    """Keep the demo model, caches and presets out of the real home folder."""
    root = tmp_path_factory.mktemp("user")
    os.environ["LORA_STUDIO_CACHE"] = str(root / "cache")
    os.environ["LORA_STUDIO_DATA"] = str(root / "data")
    os.environ["HF_HOME"] = str(root / "hf-home")
    yield root


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Fail any test that tries to open a network connection (loopback stays allowed for torchrun)."""
    real_connect = socket.socket.connect

    def guarded(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1", "")) and sock.family != socket.AF_UNIX:
            raise RuntimeError(f"test tried to reach the network: {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


from fixtures_data import make_dataset  # noqa: E402  (shared with tests that build their own folders)

_TINY_CACHE: dict[str, Path] = {}


def tiny_model_dir(tmp_path_factory, family: str, prediction_type: str) -> Path:
    key = f"{family}-{prediction_type}"
    if key not in _TINY_CACHE:
        from studio.engine.tiny import save_tiny_model

        _TINY_CACHE[key] = save_tiny_model(tmp_path_factory.mktemp(f"tiny-{key}"), family, prediction_type)
    return _TINY_CACHE[key]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Any registered family's tiny model: ``tiny_model(family, prediction_type)`` → its folder (built once)."""
    return lambda family, prediction_type: tiny_model_dir(tmp_path_factory, family, prediction_type)


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory) -> Path:
    """A tiny random SD1-architecture diffusers folder (epsilon prediction)."""
    return tiny_model_dir(tmp_path_factory, "sd1", "epsilon")


@pytest.fixture(scope="session")
def tiny_sd2v(tmp_path_factory) -> Path:
    """A tiny random SD2-architecture diffusers folder with v-prediction."""
    return tiny_model_dir(tmp_path_factory, "sd2", "v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny random SDXL-architecture diffusers folder (two text encoders)."""
    return tiny_model_dir(tmp_path_factory, "sdxl", "epsilon")


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "data")


def pytest_sessionfinish(session, exitstatus):
    """Skips hide missing pieces: in CI a skipped test fails the run loudly."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    # The one allowed skip: the CUDA sync checks on a machine without a CUDA GPU (its reason is printed by -ra).
    skipped = len([r for r in (reporter.stats.get("skipped", []) if reporter else [])
                   if "needs a CUDA GPU" not in str(getattr(r, "longrepr", ""))])
    if skipped and os.environ.get("CI") and exitstatus == 0:
        reporter.write_line(f"FAILED: {skipped} test(s) were skipped; CI must run every test", red=True)
        session.exitstatus = 1


@pytest.fixture(scope="session")
def tiny_captioners(tmp_path_factory) -> dict[str, Path]:
    """Tiny random captioning models: {"tagger": ONNX tagger folder, "blip": ..., "florence2": ...}."""
    from fixtures_captioning import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("captioners"))


@pytest.fixture
def demo_copy(tmp_path) -> Path:
    """A copy of the bundled demo dataset (8 captioned shapes) that a test may change."""
    import shutil

    from studio.paths import resource_path

    return Path(shutil.copytree(resource_path("demo", "dataset"), tmp_path / "demo"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): tiny models
    train fastest on one thread; on a busy machine two threads spin against each other (measured: a preview took
    0.25 s on one thread, 1.2-10 s on two)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
