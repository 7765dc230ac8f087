"""`make demo`: the whole job on one machine, offline.

    python -m client.demo                                   # the ToyWorld bundle on a held-out ToyWorld scene
    python -m client.demo --bundle build/tiny-bundle        # the tiny random bundle on a real photo

Starts the localizer, learner and evaluator on loopback (free ports), extracts the concepts of one picture through
the SDK, writes the report, stops the services (also on failure or Ctrl-C) and says where the report is.

With the ToyWorld bundle (toyworld/bundle, trained by `make toy-train` on a procedural world whose truth is known)
the picture is a held-out ToyWorld scene, the options are the bundle's own recommended ones, and the report shows
the ground truth (true objects, their masks) beside what was found. With any other bundle the picture is a photo
that scikit-image ships (its `coffee` cup, or `--photo astronaut`) and the schedule is short.
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


DEFAULT_BUNDLE = Path(__file__).resolve().parents[1] / "toyworld" / "bundle"
DEFAULT_SCENE = 13  # a held-out scene: a red ball and a green checkered heart (toyworld.world.held_out_scene)
# ToyWorld: the bundle's recommended class prompt, anchors and sampler apply; the schedule is the quality
# benchmark's (bench/quality.py: 80/80/40 steps instead of the published 400/400/300) so the demo takes minutes.
TOYWORLD = ExtractOptions(schedule=Schedule(phase1_steps=80, phase2_steps=80, refinement_steps=40, checkpoint_every=0),
                          generate=GenerateOptions(num_images=4, seed=0), seed=0)


def photo_png(name: str) -> bytes:
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(getattr(data, name)()).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE,
                        help="model bundle (default: the ToyWorld bundle; `make bundle` builds the tiny one)")
    parser.add_argument("--out", type=Path, default=Path("build/demo"))
    parser.add_argument("--photo", choices=["coffee", "astronaut", "chelsea", "rocket"], default="coffee",
                        help="the photo, for a bundle other than ToyWorld")
    parser.add_argument("--scene", type=int, default=DEFAULT_SCENE, help="the held-out ToyWorld scene")
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument("--record", type=Path, default=Path(__file__).resolve().parents[1] / "bench" / "results" / "demo.json",
                        help="with the ToyWorld bundle: where what was found is written beside the truth "
                             "(bench/results/demo.json)")
    a = parser.parse_args(argv)

    if not (a.bundle / "bundle.json").is_file():
        print(f"demo: {a.bundle} is not a model bundle; `make toy-train` trains the ToyWorld one, `make bundle` "
              "builds the tiny one", file=sys.stderr)
        return 2
    from client.cli import UsageError, writable_dir

    try:
        out = writable_dir(a.out)
    except UsageError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    options = DEMO
    kind = json.loads((a.bundle / "bundle.json").read_text()).get("kind")
    tiny, toyworld = kind == "tiny", kind == "toyworld"
    if toyworld:
        from toyworld.world import held_out_scene

        scene = held_out_scene(a.scene)
        options, name = TOYWORLD, f"toyworld-scene-{a.scene}"
        buf = io.BytesIO()
        scene.image.save(buf, format="PNG")
        image, what = buf.getvalue(), (f"held-out ToyWorld scene {a.scene} ("
                                       + ", ".join(o.phrase() for o in scene.objects) + ")")
    else:
        image, name, what = photo_png(a.photo), a.photo, f"scikit-image's `{a.photo}` photo"
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

        with IceClient(**services.targets()) as ice:
            sched = options.schedule
            steps = f"schedule {sched.phase1_steps}/{sched.phase2_steps}/{sched.refinement_steps} steps"
            print(f"demo: extracting the concepts of the {what} ({steps})", flush=True)
            extraction = ice.extract(image, out_dir=out / name, options=options, progress=True)
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
    report = (out / name / "report.html").resolve()
    nouns = ", ".join(c.noun for c in extraction.localization.concepts) or "none"
    print(f"\ndemo: done in {time.perf_counter() - started:.0f}s; concepts: {nouns}")
    if toyworld:
        from client.report import attach_ground_truth
        from toyworld.demo_record import demo_record, summary_lines

        attach_ground_truth(out / name, [(o.phrase(), o.mask) for o in scene.objects], f"ToyWorld test scene {a.scene}")
        record = demo_record(extraction, scene, a.scene)
        record["bundle"] = json.loads((a.bundle / "bundle.json").read_text()).get("digest")
        if a.record is not None:
            a.record.parent.mkdir(parents=True, exist_ok=True)
            a.record.write_text(json.dumps(record, indent=2) + "\n")
        for line in summary_lines(record):
            print("demo: " + line)
    print(f"demo: the report is {report}\n      open it in a browser: file://{report}")
    if tiny:
        print("demo: note: the tiny bundle is random weights; it runs every step, but its concepts, images and "
              "scores carry no meaning.")
    if not toyworld:
        print(ASSEMBLE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
