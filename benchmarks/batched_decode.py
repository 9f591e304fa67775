"""Batched native decode steps at a real geometry: aggregate tokens/s of 1, 2, 4, 8 concurrent sequences.

Builds the native decoder's weights directly (random int8 blocks in the MatMulNBits layout, the 1.7B or 0.6B
decoder geometry, the LM head tied to the embedding as exported bundles do), so no 1.7B export is needed: the
products, attention and per-layer work are the runtime's own (native_decode.step / step_batch). Each sequence
has a cache of ``--context`` positions (a 30 s prompt is ~400). Batch sizes are interleaved round by round, so
a busy spell of the machine hits every size alike; the median step of each size is reported.

Per batch size: step seconds, aggregate tokens/s (batch / step), speed-up over one sequence, weight bytes read
per step and per token, the rate they are read at, and the share of the step a pure read of those bytes takes
at the one-sequence rate (the rest is products, attention and the small work between them).

Usage: python benchmarks/batched_decode.py [--geometry 1.7b] [--batches 1,2,4,8] [--steps 12] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import provenance

from megaedge.runtime import kernels, machine, native_decode

RESULTS = Path(__file__).parent / "results"
GEOMETRIES = {
    "1.7b": dict(layers=28, hidden=2048, heads=16, kv_heads=8, head_dim=128, intermediate=6144, vocab=151936),
    "0.6b": dict(layers=28, hidden=1024, heads=16, kv_heads=8, head_dim=128, intermediate=3072, vocab=151936),
}
BLOCK = 128


_commit = provenance.commit

def write_weights(folder: Path, g: dict, seed: int = 0) -> tuple[dict, int]:
    """weights.bin with every projection (uint8 blocks + float32 scales), norms and inv_freq; the native index of
    it, and the bytes one decode step reads (projections, their scales and the LM head)."""
    rng = np.random.default_rng(seed)
    path = folder / "weights.bin"
    offset, step_bytes = 0, 0

    with open(path, "wb") as f:
        def put(array: np.ndarray) -> dict:
            nonlocal offset
            data = np.ascontiguousarray(array)
            f.write(data.tobytes())
            ref = {"file": path.name, "offset": offset, "length": data.nbytes, "dtype": data.dtype.name,
                   "shape": list(data.shape)}
            offset += data.nbytes
            return ref

        def linear(k: int, n: int) -> dict:
            nonlocal step_bytes
            blocks = k // BLOCK
            weight = rng.integers(0, 256, (n, blocks, BLOCK), dtype=np.uint8)
            # scales that keep activations near unit variance through the layer (1/sqrt(k) per product)
            scales = np.full((n, blocks), 1.0 / (64.0 * np.sqrt(k)), np.float32)
            step_bytes += weight.nbytes + scales.nbytes
            return {"k": k, "n": n, "block": BLOCK, "weight": put(weight), "scales": put(scales)}

        h, q, kv, i = g["hidden"], g["heads"] * g["head_dim"], g["kv_heads"] * g["head_dim"], g["intermediate"]
        shapes = {"q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h), "gate": (h, i), "up": (h, i), "down": (i, h)}
        layers = []
        for _ in range(g["layers"]):
            entry = {name: linear(*shapes[name]) for name in native_decode.PROJECTIONS}
            for name, size in (("input_norm", h), ("post_norm", h), ("q_norm", g["head_dim"]),
                               ("k_norm", g["head_dim"])):
                entry[name] = put(np.ones(size, np.float32))
            layers.append(entry)
        head = linear(h, g["vocab"])
        inv_freq = 1.0 / (1e6 ** (np.arange(0, g["head_dim"], 2, dtype=np.float32) / g["head_dim"]))
        index = {"format": "matmulnbits-q8", "zero_point": 128, **g, "eps": 1e-6, "scaling": g["head_dim"] ** -0.5,
                 "layers": layers, "lm_head": head,
                 "embedding": {"kind": "q8", "weight": head["weight"], "scales": head["scales"]},
                 "final_norm": put(np.ones(h, np.float32)), "inv_freq": put(inv_freq.astype(np.float32))}
    return index, step_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="1.7b")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--steps", type=int, default=12, help="steps timed per batch size and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--context", type=int, default=400, help="cache positions per sequence before stepping")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="JSON file (default results/batched_decode_<geometry>.json)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    g = GEOMETRIES[args.geometry]
    built = kernels.load()
    threads = args.threads or len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        index, step_bytes = write_weights(folder, g)
        print(f"weights written in {time.perf_counter() - t0:.1f} s: {step_bytes / 1e9:.2f} GB read per step",
              flush=True)
        info = SimpleNamespace(decoder={"native": index}, routed=False)
        base = native_decode.NativeDecoder(folder, info, built, threads=threads)
        base.wait_loaded()
        rng = np.random.default_rng(1)
        shape = (1, g["kv_heads"], args.context, g["head_dim"])
        presents = [rng.standard_normal(shape).astype(np.float32) for _ in range(2 * g["layers"])]
        pools = {}
        for b in batches:
            pools[b] = []
            for _ in range(b):
                d = base.spawn()
                d.start(presents, args.rounds * (args.steps + 1) + 2)
                pools[b].append(d)
        times: dict[int, list[float]] = {b: [] for b in batches}
        for r in range(args.rounds):
            for b in batches:  # interleaved: each round runs every batch size
                decoders = pools[b]
                tokens = [int(t) for t in rng.integers(0, g["vocab"], b)]
                for _ in range(args.steps):
                    s0 = time.perf_counter()
                    logits = (decoders[0].step(tokens[0])[None] if b == 1
                              else native_decode.step_batch(decoders, tokens))
                    times[b].append(time.perf_counter() - s0)
                    tokens = [int(np.argmax(row)) for row in logits]
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"B={b} {statistics.median(times[b][-args.steps:]) * 1e3:.0f} ms" for b in batches), flush=True)
    one = statistics.median(times[batches[0]]) if batches[0] == 1 else None
    rows = []
    for b in batches:
        step = statistics.median(times[b])
        rows.append({
            "batch": b, "step_seconds": round(step, 4), "tokens_per_second": round(b / step, 2),
            "speedup_vs_one": round((b / step) / (1 / one), 2) if one else None,
            "weight_bytes_per_step": step_bytes, "weight_bytes_per_token": step_bytes // b,
            "read_gb_per_second": round(step_bytes / step / 1e9, 2),
            "read_share_at_one_sequence_rate": round(one / step, 3) if one else None,
        })
    result = {
        "benchmark": "batched_decode", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(), "command": "python " + " ".join(sys.argv),
        "machine": {**machine.cpu_facts(), "python": platform.python_version(), "kernel_isa": built.isa,
                    "threads": threads},
        "geometry": args.geometry, "context": args.context, "steps_per_round": args.steps, "rounds": args.rounds,
        "results": rows,
        "notes": "Random int8 weights at the real geometry in the MatMulNBits layout; every sequence's tokens are "
                 "the bits it gets alone (tests/runtime/test_batching.py). read_share_at_one_sequence_rate: the "
                 "one-sequence step time over this size's step time, i.e. the share a weight read at the "
                 "single-stream rate would take; the rest is int8 products and per-sequence attention.",
    }
    print(f"{'batch':>5} {'step ms':>8} {'tok/s':>7} {'speed-up':>8} {'GB/s':>6}")
    for row in rows:
        print(f"{row['batch']:>5} {row['step_seconds'] * 1e3:>8.0f} {row['tokens_per_second']:>7.2f} "
              f"{row['speedup_vs_one'] or 0:>8.2f} {row['read_gb_per_second']:>6.1f}")
    out = Path(args.out) if args.out else RESULTS / f"batched_decode_{args.geometry}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
