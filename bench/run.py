"""Run every benchmark under bench/, print a table, write bench/results/latest.json.

    python bench/run.py [--quick] [--only NAME_SUBSTRING] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import device_name  # noqa: E402


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    ap.add_argument("--only", default="", help="run only benchmark files whose name contains this")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "latest.json")
    args = ap.parse_args(argv)

    device = device_name()
    date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    records, failures = [], []
    for path in sorted(HERE.glob("bench_*.py")):
        if args.only and args.only not in path.stem:
            continue
        print(f"== {path.stem}", flush=True)
        try:
            results = _load(path).run(quick=args.quick)
        except Exception:
            traceback.print_exc()
            failures.append(path.stem)
            continue
        for r in results:
            records.append(r.to_json(device, date))
            print(f"   {r.name}: ours {r.ours_s * 1e3:.3f} ms, reference {r.reference_s * 1e3:.3f} ms, "
                  f"ratio {r.ratio:.2f}x  ({r.reference})", flush=True)

    width = max([len(r["name"]) for r in records] + [9])
    print()
    print(f"{'benchmark':<{width}}  {'ours (ms)':>12}  {'reference (ms)':>15}  {'ratio':>8}")
    for r in records:
        print(f"{r['name']:<{width}}  {r['ours_s'] * 1e3:>12.3f}  {r['reference_s'] * 1e3:>15.3f}  {r['ratio']:>7.2f}x")
    print(f"\ndevice: {device}; date: {date}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": device, "date": date, "results": records}, indent=2) + "\n")
    print(f"wrote {args.out}")
    if failures:
        print(f"FAILED: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
