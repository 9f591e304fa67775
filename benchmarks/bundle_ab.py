"""Bundles and decoders side by side in one run: each contender is ``megaedge bench BUNDLE --decode ENGINE --route
ROUTE`` in a fresh process, contenders interleaved round by round so a slow spell of the machine hits all of them.

Two questions it answers: what a recipe costs (the same FP32 bundle quantized with two recipes: encoder time, decode
speed, size, peak memory), and how a routed bundle's two decoders compare on its two routes (megaedge's native
kernels, which add the gated low-rank branches after each product on the LoRA route and skip them on the base
route, against onnxruntime's decoder graph). Forced tokens (EOS ignored); medians over rounds of each run's median.

Usage: python benchmarks/bundle_ab.py --bundle NAME=DIR [--bundle NAME=DIR ...] [--engines auto|native,ort]
       [--routes auto|lora,base] [--audio 10] [--tokens 32] [--rounds 2] [--threads 2] --out FILE
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import provenance

from megaedge.runtime import machine

RESULTS = Path(__file__).resolve().parent / "results"
FIGURES = ("tokens_per_s", "decode", "prefill", "first_token", "encoder", "rtf")


def _bundle(text: str) -> tuple[str, Path]:
    name, _, path = text.partition("=")
    if not path:
        raise argparse.ArgumentTypeError(f"--bundle {text!r}: give NAME=DIR")
    return name, Path(path)


def _describe(path: Path) -> dict:
    info = json.loads((path / "megaedge.json").read_text())
    native = info.get("decoder", {}).get("native") or {}
    ranks = sorted({layer[p]["lora"]["rank"] for layer in native.get("layers", []) for p in layer
                    if isinstance(layer[p], dict) and "lora" in layer[p]})
    quant = info.get("quantization", {})
    return {"mode": info.get("mode"), "precision": info.get("precision"), "num_layers": info["decoder"]["num_layers"],
            "hidden_size": info["decoder"]["hidden_size"], "recipe": quant.get("recipe", {}).get("name"),
            "decoder_block": quant.get("recipe", {}).get("block_size"), "lora_ranks": ranks,
            "bytes": {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.suffix == ".data"},
            "total_gb": round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=_bundle, action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--engines", default="auto", help="decoders, comma-separated: auto, native, ort")
    parser.add_argument("--routes", default="auto", help="routes, comma-separated: auto, lora, base")
    parser.add_argument("--audio", type=int, default=10, help="seconds of speech-like audio")
    parser.add_argument("--tokens", type=int, default=32, help="forced decode tokens")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True, help="file name under benchmarks/results")
    args = parser.parse_args()
    bundles = dict(args.bundle)
    engines, routes = args.engines.split(","), args.routes.split(",")
    keys = [(b, e, r) for b in bundles for e in engines for r in routes]
    runs: dict[tuple, list[dict]] = {key: [] for key in keys}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name, engine, route in keys:
                out = Path(tmp) / "run.json"
                subprocess.run([sys.executable, "-m", "megaedge", "bench", str(bundles[name]), "--audio",
                                str(args.audio), "--repeat", "2", "--tokens", str(args.tokens), "--route", route,
                                "--decode", engine, "--threads", str(args.threads), "--json", str(out)],
                               check=True, capture_output=True, text=True)
                result = json.loads(out.read_text())
                measured = {**result["runs"][f"{args.audio}s"], "peak_rss_mib": result.get("peak_rss_mib"),
                            "decode_engine": result["device"].get("decode_engine")}
                runs[name, engine, route].append(measured)
                print(f"round {round_ + 1}/{args.rounds} {name} {engine} {route}: "
                      f"{measured['tokens_per_s']['median']:.2f} tok/s, encoder {measured['encoder']['median']:.3f} s",
                      flush=True)
    rows = {}
    for (name, engine, route), measured in runs.items():
        row = {f: round(statistics.median(r[f]["median"] for r in measured), 4) for f in FIGURES}
        row.update(per_round_tokens_per_s=[r["tokens_per_s"]["median"] for r in measured],
                   peak_rss_mib=max(r["peak_rss_mib"] or 0 for r in measured),
                   decode_engine=measured[-1]["decode_engine"])
        rows[f"{name} {engine} {route}"] = row
    result = {
        "benchmark": "bundle_ab", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": provenance.commit(),
        "command": provenance.command({path: f"B_{name}" for name, path in bundles.items()}),
        "machine": {**machine.cpu_facts(), "python": platform.python_version(), "threads": args.threads},
        "bundles": {name: _describe(path) for name, path in bundles.items()},
        "audio_seconds": args.audio, "forced_tokens": args.tokens, "rounds": args.rounds, "results": rows,
        "notes": "Medians over rounds of each run's median (megaedge bench --repeat 2); seconds except tokens_per_s "
                 "(decode tokens per second), rtf and peak_rss_mib (the largest over rounds).",
    }
    print(f"{'contender':>28} {'tok/s':>7} {'encoder s':>9} {'prefill s':>9} {'first token s':>13} {'RSS MiB':>8}")
    for key, row in rows.items():
        print(f"{key:>28} {row['tokens_per_s']:>7.2f} {row['encoder']:>9.3f} {row['prefill']:>9.3f} "
              f"{row['first_token']:>13.3f} {row['peak_rss_mib']:>8.0f}")
    out = RESULTS / args.out
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
