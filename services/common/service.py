"""What each service's `__main__` and servicer share: device choice, server identity, and the start-up path.

A service's `__main__.py` is three lines: build its `ServiceSpec` from settings and call `main(...)` here.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from importlib import metadata

from ice.common.v1 import common_pb2
from services.common.images import DEFAULT_LIMITS
from services.common.server import ServiceSpec, configure_logging, serve_forever
from services.common.settings import Settings, add_arguments, from_sources

log = logging.getLogger("ice.service")


def server_version() -> str:
    try:
        return metadata.version("ice-serving")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def resolve_device(setting: str = "auto") -> str:
    """`auto` -> cuda when available, else cpu; anything else is passed through."""
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {setting}: CUDA is not available on this machine")
    return setting


def device_description(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        return f"{device} ({torch.cuda.get_device_name(index)})"
    return device


def compute_dtype(device: str):
    """bf16 on CUDA, fp32 on CPU (bf16 matmuls on CPU are slow and less accurate)."""
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def precision_name(dtype) -> str:
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def bundle_info(bundle, precision: str) -> common_pb2.BundleInfo:
    return common_pb2.BundleInfo(
        name=bundle.name, version=bundle.version, sha256=bundle.digest, image_size=bundle.image_size, precision=precision
    )


def server_info(service_full_name: str, bundle, settings: Settings, device: str, precision: str) -> common_pb2.ServerInfo:
    return common_pb2.ServerInfo(
        service=service_full_name,
        server_version=server_version(),
        bundle=bundle_info(bundle, precision) if bundle is not None else None,
        device=device_description(device),
        max_message_bytes=settings.max_message_bytes,
        max_image_pixels=DEFAULT_LIMITS.max_pixels,
    )


def main(
    name: str,
    build_spec: Callable[[Settings], ServiceSpec],
    argv: list[str] | None = None,
    settings_cls: type = Settings,
    description: str = "",
) -> int:
    """Parse flags + environment into settings, build the service, serve until SIGTERM."""
    parser = argparse.ArgumentParser(prog=f"python -m services.{name}", description=description)
    add_arguments(parser, settings_cls)
    args = parser.parse_args(argv)
    settings = from_sources(args, cls=settings_cls)
    configure_logging(settings.log_level)
    if settings.bundle is None:
        parser.error("--bundle (or ICE_BUNDLE) is required: a model bundle directory (see `ice-bundle`)")
    log.info("%s settings: %s", name, settings.redacted())
    return serve_forever(build_spec(settings), settings)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run a service: python -m services.localizer | services.learner | services.evaluator")
