"""Shared fixtures: one tiny bundle per test session, real photos from scikit-image, free loopback ports."""

from __future__ import annotations

import io
import os
import socket
from pathlib import Path

import pytest

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory) -> Path:
    """A tiny bundle built once per session (ICE_TEST_BUNDLE points at a prebuilt one to save ~20 s)."""
    prebuilt = os.environ.get("ICE_TEST_BUNDLE")
    if prebuilt:
        return Path(prebuilt)
    from services.common.tiny_bundle import build_tiny_bundle

    return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_bundle_dir):
    from services.common.bundle import Bundle

    return Bundle.open(tiny_bundle_dir)


def _png_bytes(array) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def photo_png() -> bytes:
    """A real photo (scikit-image's `coffee`, 600x400) as PNG bytes."""
    from skimage import data

    return _png_bytes(data.coffee())


@pytest.fixture(scope="session")
def astronaut_png() -> bytes:
    from skimage import data

    return _png_bytes(data.astronaut())


def interruptible() -> None:
    """`preexec_fn` for a child the test stops with SIGINT (Ctrl-C): a shell running the suite in the background
    starts it with SIGINT ignored, which Python would inherit and never turn into KeyboardInterrupt."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def free_port() -> int:
    """A port that was free a moment ago. Only for what must know its port before it binds (a learner replica that
    advertises its own address); a server binds any free port itself (`port=-1`) and reports the one it bound,
    and a port where nothing may answer is `refusing_port`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def refusing_port():
    """A loopback port that refuses connections while the test runs: bound by this socket, which never listens, so
    no other process can take it in the meantime."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]
