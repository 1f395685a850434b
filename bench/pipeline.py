"""Images/s of a worker's training steps per stage, input pipeline on the host vs on the device.

    .venv/bin/python bench/pipeline.py                       # examples/quickstart.yaml, 5 rounds
    .venv/bin/python bench/pipeline.py JOB.yaml --rounds 3 --timed-steps 20

Per stage of the job, one worker (this process, the threads a Ray worker of the job gets) takes warm-up
and timed optimizer steps through ``StageRunner`` exactly as ``stagetrain plan --calibrate`` does
(``workers.calibrate``): model, optimizer, the real data source. Two modes of ``data.augment_on``:

- ``host``: each sample is cropped, flipped and resized to the stage resolution in the loader (per-sample
  ``v2.RandomResizedCrop``; the pipeline before issue 19), then normalised on the device;
- ``device``: the split lives on the device (``data.device_cache_bytes``) or streams as full images with
  their crop boxes; one ``roi_align`` over the batch crops and resizes there.

Rounds alternate the order of the modes (host first, then device first, ...) so that both see the same
drift of this shared machine; figures are medians over rounds. Printed per stage: img/s of each mode,
device/host, and each stage's img/s relative to the last (highest-resolution) stage: how much cheaper the
low-resolution stages are in each mode. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.operations import make_plan  # noqa: E402
from service.spec import load_spec  # noqa: E402
from workers.calibrate import _measure_plan, _threads, calibration_device  # noqa: E402

MODES = ("host", "device")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("job", nargs="?", default="examples/quickstart.yaml")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--timed-steps", type=int, default=15)
    args = ap.parse_args()

    spec = load_spec(args.job)
    plan = make_plan(spec, None, source=args.job)
    specs = {
        m: spec.model_copy(update={"data": spec.data.model_copy(update={"augment_on": m})}) for m in MODES
    }
    device, name = calibration_device(spec)
    labels = [st.label for st in plan.stages]
    speeds: dict[str, list[list[float]]] = {m: [] for m in MODES}  # mode -> rounds -> per stage
    with _threads(spec, device):
        for r in range(args.rounds):
            for mode in MODES if r % 2 == 0 else reversed(MODES):
                measured = _measure_plan(
                    specs[mode], plan, device, args.warmup_steps, args.timed_steps, print
                )
                speeds[mode].append([s.images_per_s_per_worker for s in measured])
                print(f"round {r + 1} {mode}: " + ", ".join(f"{v:,.0f}" for v in speeds[mode][-1]) + " img/s")

    median = {m: [statistics.median(r[k] for r in speeds[m]) for k in range(len(labels))] for m in MODES}
    print(f"\n{args.job} on {name}: img/s of one worker, median of {args.rounds} rounds")
    print(
        f"{'stage':>6} {'px':>4} {'host':>8} {'device':>8} {'dev/host':>9} {'host/last':>10} {'dev/last':>9}"
    )
    rows = []
    for k, st in enumerate(plan.stages):
        host, dev = median["host"][k], median["device"][k]
        row = {
            "stage": st.label,
            "resolution": st.resolution,
            "host_img_s": round(host, 1),
            "device_img_s": round(dev, 1),
            "device_over_host": round(dev / host, 3),
            "host_over_last": round(host / median["host"][-1], 3),
            "device_over_last": round(dev / median["device"][-1], 3),
        }
        rows.append(row)
        print(
            f"{st.label:>6} {st.resolution:>4} {host:>8,.0f} {dev:>8,.0f} {row['device_over_host']:>9.2f} "
            f"{row['host_over_last']:>10.2f} {row['device_over_last']:>9.2f}"
        )
    print(json.dumps({"job": args.job, "device": name, "rounds": args.rounds, "stages": rows}))


if __name__ == "__main__":
    main()
