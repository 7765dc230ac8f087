"""`IceClient.extract` of one photo with the SDK traced into an in-memory exporter (a process of its own, so that
its tracer provider stays out of pytest's). Prints one JSON object: the client's finished spans and the job.

    python tests/interop/traced_extract.py --targets '{"localizer": ..., "learner": ..., "evaluator": ...}' \
        --image PHOTO --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from serve_traced import span_record


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--targets", required=True)
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)

    from client import ExtractOptions, GenerateOptions, IceClient, LocalizeOptions, Schedule

    options = ExtractOptions(
        # the tiny bundle's random attention needs a small merge threshold to give the noun segments
        localize=LocalizeOptions(max_concepts=2, max_rounds=2, merge_threshold=0.0008, min_area_fraction=0.0),
        schedule=Schedule(phase1_steps=2, phase2_steps=2, refinement_steps=1, num_class_images=2, checkpoint_every=0),
        generate=GenerateOptions(num_images=1, num_inference_steps=2, seed=0), seed=0)
    with IceClient(**json.loads(a.targets)) as ice:
        x = ice.extract(a.image, out_dir=a.out, options=options, progress=False)
    print(json.dumps({"job": x.job_id, "concepts": len(x.localization.concepts),
                      "spans": [span_record(s) for s in exporter.get_finished_spans()]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
