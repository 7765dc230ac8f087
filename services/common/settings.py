"""Every setting of every ICE service, declared once: name, type, default, environment variable, doc.

A setting `foo_bar` is read from the flag `--foo-bar`, else the environment variable `ICE_FOO_BAR`, else its
default (flags win over the environment, which wins over the default). `python -m services.<svc> --help`
prints them all; `describe()` renders the table the README and the Kubernetes ConfigMap use.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

# Default ports: gRPC for each service; each metrics port is the gRPC port + 1000.
DEFAULT_PORTS = {"localizer": 50051, "learner": 50052, "evaluator": 50053}


def _setting(default: Any, doc: str, services: tuple[str, ...] = ("all",), secret: bool = False):
    return field(default=default, metadata={"doc": doc, "services": services, "secret": secret})


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


@dataclass(frozen=True)
class Settings:
    # --- the model bundle -------------------------------------------------------------------------------
    bundle: Path | None = _setting(None, "Model bundle directory (see `ice-bundle`). Required to serve.")
    verify_bundle_hashes: bool = _setting(
        False, "Check every bundle file's sha256 at start-up (slower start; sizes are always checked)."
    )
    device: str = _setting("auto", "Torch device: auto (cuda when present, else cpu), cpu, cuda, cuda:N.")
    # --- network ----------------------------------------------------------------------------------------
    host: str = _setting("0.0.0.0", "Address the gRPC server binds.")
    port: int = _setting(0, "gRPC port; 0 picks the service's default (localizer 50051, learner 50052, evaluator 50053).")
    metrics_port: int = _setting(-1, "Prometheus /metrics HTTP port; -1 = gRPC port + 1000, 0 = disabled.")
    health_port: int = _setting(
        0, "Extra plaintext port serving only grpc.health.v1 (for Kubernetes probes when TLS is on); 0 = none."
    )
    max_message_bytes: int = _setting(64 * 1024 * 1024, "Largest gRPC message received or sent, in bytes.")
    max_workers: int = _setting(16, "Threads serving RPCs.")
    max_concurrent_rpcs: int = _setting(64, "RPCs in flight before new ones get RESOURCE_EXHAUSTED.")
    keepalive_time_ms: int = _setting(30_000, "Server keepalive ping interval.")
    keepalive_timeout_ms: int = _setting(10_000, "Keepalive ping timeout.")
    max_connection_age_ms: int = _setting(
        300_000, "Connections are closed (GOAWAY) after this age, so clients re-resolve and rebalance."
    )
    max_connection_age_grace_ms: int = _setting(600_000, "Grace for in-flight RPCs on an aged-out connection.")
    grace_seconds: float = _setting(30.0, "On SIGTERM: time in-flight RPCs get to finish.")
    # --- security ---------------------------------------------------------------------------------------
    tls_cert: Path | None = _setting(None, "PEM server certificate; with --tls-key enables TLS.")
    tls_key: Path | None = _setting(None, "PEM server private key.")
    tls_client_ca: Path | None = _setting(None, "PEM CA bundle; when set, clients must present a certificate it signed (mTLS).")
    auth_token: str | None = _setting(
        None, "Bearer token required in `authorization: Bearer …` metadata (health is exempt).", secret=True
    )
    auth_token_file: Path | None = _setting(
        None, "File holding the bearer token (e.g. a mounted Secret); re-read when it changes (--credentials-reload-s)."
    )
    auth_token_overlap_s: float = _setting(
        300.0, "After --auth-token-file changes, the token it replaced is still accepted for this many seconds, so "
        "that clients whose copy of the Secret the kubelet updates later are not refused meanwhile; 0 = refused at "
        "once (a leaked token)."
    )
    credentials_reload_s: float = _setting(
        1.0, "Seconds between checks of the TLS files and --auth-token-file for new contents: a renewed certificate, "
        "client CA or token is used from the next connection or call, without a restart (a file that is unreadable, "
        "invalid or empty keeps the previous one); 0 = check at every connection and call."
    )
    # --- logging ----------------------------------------------------------------------------------------
    log_level: str = _setting("INFO", "Python logging level.")

    # ------------------------------------------------------------------------------------------------------
    def grpc_port(self, service: str) -> int:
        return self.port or DEFAULT_PORTS.get(service, 50050)

    def resolved_metrics_port(self, service: str, bound_grpc_port: int | None = None) -> int:
        if self.metrics_port >= 0:
            return self.metrics_port
        return (bound_grpc_port or self.grpc_port(service)) + 1000

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict for logs, with secrets masked."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = "***" if (f.metadata.get("secret") and value) else (str(value) if isinstance(value, Path) else value)
        return out


def env_name(name: str) -> str:
    return "ICE_" + name.upper()


def _converter(f) -> Any:
    tp = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if "bool" in tp:
        return _parse_bool
    if "Path" in tp:
        return Path
    if "int" in tp:
        return int
    if "float" in tp:
        return float
    return str


def add_arguments(parser: argparse.ArgumentParser, cls: type = Settings) -> None:
    """One flag per setting; defaults stay None so that the environment can fill what the flags leave."""
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('doc', '')} [env {env_name(f.name)}; default {f.default!r}]"
        parser.add_argument(flag, dest=f.name, type=_converter(f), default=None, help=help_text)


def from_sources(args: argparse.Namespace | None = None, env: dict[str, str] | None = None, cls: type = Settings, **overrides):
    """Build settings: explicit overrides > flags > environment > defaults. Bad values raise SystemExit."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in fields(cls):
        convert = _converter(f)
        value = getattr(args, f.name, None) if args is not None else None
        if value is None and env_name(f.name) in env:
            raw = env[env_name(f.name)]
            try:
                value = convert(raw)
            except ValueError as exc:
                raise SystemExit(f"invalid value for {env_name(f.name)}: {raw!r} ({exc})") from exc
        if f.name in overrides:
            value = overrides[f.name]
        if value is not None:
            values[f.name] = value
        elif f.default is MISSING:
            raise SystemExit(f"missing required setting --{f.name.replace('_', '-')}")
    settings = cls(**values)
    validate(settings)
    return settings


def validate(settings: Settings) -> None:
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise SystemExit("--tls-cert and --tls-key must be given together")
    if settings.tls_client_ca and not settings.tls_cert:
        raise SystemExit("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    for name in ("credentials_reload_s", "auth_token_overlap_s"):
        if getattr(settings, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be 0 or more")
    for name in ("max_message_bytes", "max_workers", "max_concurrent_rpcs"):
        if getattr(settings, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive")


def describe(cls: type = Settings) -> str:
    """A Markdown table of every setting (used by docs and tests)."""
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for f in fields(cls):
        rows.append(f"| `--{f.name.replace('_', '-')}` | `{env_name(f.name)}` | `{f.default!r}` | {f.metadata.get('doc', '')} |")
    return "\n".join(rows)


# --- per-service settings: each service's settings extend the shared ones --------------------------------------
@dataclass(frozen=True)
class LocalizerSettings(Settings):
    max_concepts: int = _setting(0, "Default cap on concepts per image when a request sets none (0 = no cap other "
                                 "than max_rounds, as published); a request may ask for 1-64.", ("localizer",))
    onnx_providers: str = _setting(
        "auto", "onnxruntime providers, comma-separated (auto = CUDAExecutionProvider when present, then CPU).",
        ("localizer", "evaluator"))
    kl_backend: str = _setting("auto", "Attention-merge kernel: auto (Triton on CUDA, torch elsewhere), triton, torch.",
                               ("localizer",))


@dataclass(frozen=True)
class LearnerSettings(Settings):
    job_store: Path = _setting(Path("ice-jobs"), "Directory of the job database (SQLite), checkpoints and artifacts.",
                               ("learner",))
    queue_size: int = _setting(8, "Jobs waiting behind the running one; beyond it CreateLearningJob is RESOURCE_EXHAUSTED.",
                               ("learner",))
    checkpoint_every: int = _setting(50, "Default steps between checkpoints (a request may override).", ("learner",))
    max_total_steps: int = _setting(20_000, "Largest phase1+phase2+refinement step count a job may ask for.",
                                    ("learner",))
    class_images_dir: Path | None = _setting(
        None, "Cache of prior-preservation class images shared by all jobs; default <job-store>/class-images.",
        ("learner",))
    resume_jobs: bool = _setting(True, "On start, resume unfinished jobs from their last checkpoint.", ("learner",))
    advertise_address: str = _setting(
        "", "host:port clients use to reach THIS replica; sent in every job's metadata so that clients behind a "
            "load-balanced target send a job's later calls to the replica that owns it (Kubernetes: the pod's "
            "stable StatefulSet DNS name).", ("learner",))
    max_concepts: int = _setting(16, "Most concepts one learning job may ask for (RESOURCE_EXHAUSTED beyond).",
                                 ("learner",))
    class_image_steps: int = _setting(50, "Denoising steps of each prior-preservation class image.", ("learner",))
    gradient_checkpointing: bool = _setting(
        True, "Full-UNet refinement recomputes each UNet block's activations in the backward pass instead of keeping "
              "them (less memory, a second forward pass per refinement step).", ("learner",))
    adam_8bit: bool = _setting(
        False, "Refine with bitsandbytes' 8-bit AdamW (2 bytes of optimizer state per UNet weight instead of 8; CUDA "
               "only, needs `pip install bitsandbytes`).", ("learner",))
    max_job_memory_bytes: int = _setting(
        0, "Memory one job may need at its peak; a job estimated above it is refused (RESOURCE_EXHAUSTED) at creation. "
           "0 = the device's: a CUDA device's memory less 1 GiB, on a CPU the host's (or container's) memory less "
           "what the idle learner holds; -1 = accept every job.", ("learner",))
    max_job_crashes: int = _setting(
        3, "A job that was running each of this many times the learner process died (e.g. killed for memory) fails "
           "instead of being resumed again.", ("learner",))
    concept_library: str = _setting(
        "", "Where the concept library lives (every succeeded job's concepts, for ListConcepts, GenerateComposition "
            "and ExportConcepts): a folder, or object storage every replica shares (s3://bucket/prefix, gs://..., "
            "az://...; credentials from the environment). Empty = <job-store>/library (this replica only).",
        ("learner",))
    max_composition_tokens: int = _setting(
        16, "Most distinct library tokens one GenerateComposition or ExportConcepts request may reference "
            "(RESOURCE_EXHAUSTED beyond).", ("learner",))


@dataclass(frozen=True)
class EvaluatorSettings(Settings):
    batch_size: int = _setting(32, "Images embedded per encoder forward pass.", ("evaluator",))
    max_images_per_request: int = _setting(
        1024, "Generated + composition images one Evaluate request (or one EvaluateSet item) may carry.",
        ("evaluator",))
    max_concepts_per_request: int = _setting(64, "Concepts one Evaluate request (or one EvaluateSet item) may carry.",
                                             ("evaluator",))
    max_images_per_concept: int = _setting(64, "Generated images one concept may carry.", ("evaluator",))
    max_set_items: int = _setting(10_000, "Items one EvaluateSet stream may carry (only embeddings are kept per item).",
                                  ("evaluator",))
    clip_backend: str = _setting(
        "auto", "CLIP image encoder: onnx (the bundle's export), torch (open_clip), or auto (onnx, except torch on a "
        "CUDA device when onnxruntime has no CUDA provider).", ("evaluator",))
    onnx_providers: str = _setting(
        "auto", "onnxruntime providers, comma-separated (auto = CUDAExecutionProvider when present, then CPU).",
        ("localizer", "evaluator"))


def settings_markdown() -> str:
    """docs/settings.md: every service's settings (tests/test_runtime.py keeps the file current)."""
    parts = ["# Settings", "", "Generated from `services/common/settings.py` by `python -m services.common.settings`.",
             "Flags win over environment variables, which win over defaults.", ""]
    for title, cls in (("Every service", Settings), ("Localizer", LocalizerSettings), ("Learner", LearnerSettings),
                       ("Evaluator", EvaluatorSettings)):
        shared = {f.name for f in fields(Settings)}
        rows = [f for f in fields(cls) if cls is Settings or f.name not in shared]
        parts += [f"## {title}", "", "| flag | environment | default | meaning |", "|---|---|---|---|"]
        parts += [f"| `--{f.name.replace('_', '-')}` | `{env_name(f.name)}` | `{f.default!r}` | {f.metadata.get('doc', '')} |"
                  for f in rows]
        parts.append("")
    return "\n".join(parts)


if __name__ == "__main__":
    print(settings_markdown(), end="")
