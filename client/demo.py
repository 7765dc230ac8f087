"""`make demo`: the whole job on one machine, offline.

    python -m client.demo --bundle build/tiny-bundle --out build/demo

Starts the localizer, learner and evaluator on loopback (free ports), extracts the concepts of a real photo
that scikit-image ships (its `coffee` cup, or `--photo astronaut`) through the SDK with a short schedule,
writes the report, stops the services (also on failure or Ctrl-C) and says where the report is.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from client.devservers import DevServices, ServicesFailed
from client.errors import IceClientError
from client.options import ExtractOptions, GenerateOptions, LocalizeOptions, Schedule

# Short enough for ~10 minutes on a 2-core CPU with the tiny bundle; the published schedule is 400/400/300 steps
# with 1000 class images and 8 images of 50 steps per prompt.
DEMO = ExtractOptions(
    localize=LocalizeOptions(max_concepts=3),
    schedule=Schedule(phase1_steps=20, phase2_steps=20, refinement_steps=10, num_class_images=4, checkpoint_every=0),
    generate=GenerateOptions(num_images=4, num_inference_steps=10, seed=0),
    seed=0,
)

ASSEMBLE = """\
To extract meaningful concepts, assemble a real bundle from local weights (nothing is downloaded):
  ice-bundle assemble --out bundles/sd21 \\
      --diffusion /models/stable-diffusion-2-1-base \\
      --open-clip-config /models/ViT-B-32.json --open-clip-weights /models/ViT-B-32.safetensors \\
      --dino /models/dino-vits16
  (--vocab FILE is optional: the shipped 1,108-word vocabulary is the default)
then serve it (`ice serve --bundle bundles/sd21`, or the Kubernetes overlays under k8s/) and run
  ice extract photo.jpg --out result/          (the published schedule: 400/400/300 steps; use a GPU)"""


def photo_png(name: str) -> bytes:
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(getattr(data, name)()).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="model bundle (make bundle builds the tiny one)")
    parser.add_argument("--out", type=Path, default=Path("build/demo"))
    parser.add_argument("--photo", choices=["coffee", "astronaut", "chelsea", "rocket"], default="coffee")
    parser.add_argument("--start-timeout", type=float, default=600.0)
    a = parser.parse_args(argv)

    if not (a.bundle / "bundle.json").is_file():
        print(f"demo: {a.bundle} is not a model bundle; build the tiny one with `make bundle`", file=sys.stderr)
        return 2
    from client.cli import UsageError, writable_dir

    try:
        out = writable_dir(a.out)
    except UsageError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    options = DEMO
    tiny = json.loads((a.bundle / "bundle.json").read_text()).get("kind") == "tiny"
    if tiny:
        # random attention maps merge into few segments at the published threshold: merge less
        options = replace(DEMO, localize=replace(DEMO.localize, merge_threshold=0.0008, min_area_fraction=0.0))
    started = time.perf_counter()
    services = DevServices(a.bundle, log_dir=out / "logs", job_store=out / "jobs")
    print(f"demo: starting the localizer, learner and evaluator on loopback (logs in {out / 'logs'}) ...",
          flush=True)
    try:
        services.start(timeout=a.start_timeout)
        print("demo: services ready: " + ", ".join(f"{k} {v}" for k, v in services.targets().items()), flush=True)
        from client.sdk import IceClient

        image = photo_png(a.photo)
        with IceClient(**services.targets()) as ice:
            print(f"demo: extracting the concepts of scikit-image's `{a.photo}` photo "
                  f"(schedule {DEMO.schedule.phase1_steps}/{DEMO.schedule.phase2_steps}/"
                  f"{DEMO.schedule.refinement_steps} steps)", flush=True)
            extraction = ice.extract(image, out_dir=out / a.photo, options=options, progress=True)
    except ServicesFailed as exc:
        print(f"demo: the services did not start: {exc}", file=sys.stderr)
        return 1
    except IceClientError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130
    finally:
        services.stop()
    report = (out / a.photo / "report.html").resolve()
    nouns = ", ".join(c.noun for c in extraction.localization.concepts) or "none"
    print(f"\ndemo: done in {time.perf_counter() - started:.0f}s; concepts: {nouns}")
    print(f"demo: the report is {report}\n      open it in a browser: file://{report}")
    if tiny:
        print("demo: note: the tiny bundle is random weights; it runs every step, but its concepts, images and "
              "scores carry no meaning.")
    print(ASSEMBLE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
