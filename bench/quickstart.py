"""The quickstart end to end with the input pipeline on the host vs on the device, side by side.

    .venv/bin/python bench/quickstart.py                 # host, device (~10 min on 2 cores)
    .venv/bin/python bench/quickstart.py --rounds 2      # host, device, device, host

Each run is ``stagetrain run`` of ``examples/quickstart.yaml`` (a local Ray, 2 CPU workers) into a
temporary storage folder, with ``data.augment_on`` set to ``host`` (per-sample crop, flip and resize in
the training process: the pipeline before issue 19) or ``device`` (Fashion-MNIST held on the device, one
``roi_align`` per batch). Rounds alternate the order. Printed: wall-clock from the command's start to its
exit, the final val top-1, their device/host ratios (medians over rounds), and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MODES = ("host", "device")


def run(job: dict, mode: str, tmp: str, name: str) -> dict:
    spec = {**job, "data": {**job["data"], "augment_on": mode}}
    path = Path(tmp) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "AWS_EC2_METADATA_DISABLED": "true"}
    cmd = [
        sys.executable,
        "-m",
        "service.cli",
        "run",
        str(path),
        "--job-id",
        name,
        "--storage",
        f"{tmp}/runs",
    ]
    started = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    record = json.loads((Path(tmp) / "runs" / name / "job.json").read_text())
    stages = record["stages"]
    return {
        "wall_s": round(wall, 1),
        "val_acc": stages[-1]["val_acc"],
        "stage_val_acc": [s["val_acc"] for s in stages],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("job", nargs="?", default=str(REPO / "examples/quickstart.yaml"))
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    job = yaml.safe_load(Path(args.job).read_text())
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="stagetrain-bench-qs-") as tmp:
        for r in range(args.rounds):
            for mode in MODES if r % 2 == 0 else reversed(MODES):
                results[mode].append(run(job, mode, tmp, f"{mode}-{r}"))
                print(f"round {r + 1} {mode}: {results[mode][-1]}", flush=True)
    med = {m: {k: statistics.median(x[k] for x in results[m]) for k in ("wall_s", "val_acc")} for m in MODES}
    ratio = med["device"]["wall_s"] / med["host"]["wall_s"]
    print(
        f"\nwall-clock: host {med['host']['wall_s']:.0f} s, device {med['device']['wall_s']:.0f} s "
        f"(device/host {ratio:.2f}); val top-1: host {med['host']['val_acc']:.2%}, "
        f"device {med['device']['val_acc']:.2%}"
    )
    print(
        json.dumps(
            {
                "job": args.job,
                "rounds": args.rounds,
                "median": med,
                "wall_ratio": round(ratio, 3),
                "runs": results,
            }
        )
    )


if __name__ == "__main__":
    main()
