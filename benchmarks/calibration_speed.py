"""How long one hour of audio takes through the mixed scenario set on ONE core (issue target: <= 60 s).

Prints a summary and writes benchmarks/results/calibration_speed.json. Not a test: timings depend on the machine.
Usage: python benchmarks/calibration_speed.py [--hours 1.0] [--clip-seconds 10] [--severity 0.6]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # one core, before numpy/scipy load their thread pools

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from megaedge.runtime.bench import speech_like_audio  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument("--clip-seconds", type=float, default=10.0)
    parser.add_argument("--severity", type=float, default=0.6)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "calibration_speed.json"))
    args = parser.parse_args()
    try:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    except (AttributeError, OSError):
        pass

    from megaedge.calibration import scenarios

    names = sorted(scenarios.SCENARIOS)
    clips = int(round(args.hours * 3600 / args.clip_seconds))
    sources = [speech_like_audio(args.clip_seconds, seed) for seed in range(8)]
    scenarios.apply(names[0], sources[0], 16000, args.severity, 0)  # warm-up: imports, FFT plans
    per_scenario = defaultdict(float)
    start = time.perf_counter()
    for i in range(clips):
        name = names[i % len(names)]
        t0 = time.perf_counter()
        out = scenarios.apply(name, sources[i % len(sources)], 16000, args.severity, seed=i)
        per_scenario[name] += time.perf_counter() - t0
        assert np.isfinite(out).all()
    elapsed = time.perf_counter() - start
    audio_seconds = clips * args.clip_seconds
    slowest = sorted(per_scenario.items(), key=lambda kv: -kv[1])[:5]
    result = {
        "benchmark": "calibration_speed",
        "audio_seconds": audio_seconds,
        "clips": clips,
        "scenarios": len(names),
        "severity": args.severity,
        "elapsed_seconds": round(elapsed, 2),
        "seconds_per_audio_hour": round(elapsed * 3600 / audio_seconds, 2),
        "realtime_factor": round(elapsed / audio_seconds, 5),
        "target_seconds_per_audio_hour": 60,
        "slowest_scenarios_seconds": {k: round(v, 2) for k, v in slowest},
        "cores": 1,
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{audio_seconds / 3600:.2f} h of audio through {len(names)} scenarios on one core: {elapsed:.1f} s "
          f"({result['seconds_per_audio_hour']} s per audio hour; target <= 60 s)")
    print("slowest scenarios:", ", ".join(f"{k} {v:.1f}s" for k, v in slowest))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
