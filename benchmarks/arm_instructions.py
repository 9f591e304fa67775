"""Instructions the ARM dot-product build executes for its products and attention, counted under qemu.

No ARM machine is lent to this project, so the aarch64 kernels (Jetson Orin's CPU) can be checked for their bits
(tests/runtime/test_kernel_crosscheck.py) but not timed. What can be measured here is the instruction stream: this
cross-compiles a small driver around the kernel source of this checkout and of git revision ``--baseline`` and
runs one product of ``--rows`` weight rows of ``--k`` inputs, as a decode step makes it for one sequence (gemv.h
``gemv_share``) and a batched one for B sequences (decode_batch.h ``rows_groups``), and as a prompt of R rows
makes it (gemm.h ``gemm_rows``, the tile packing included), and one layer's attention over float or half caches
(attention.h ``attend``), under qemu's user-mode emulator in single-step mode, counting the instructions executed
(qemu's ``exec`` log, one entry per instruction there) less those of the same driver with the work skipped. An
instruction count is not a time: an A78's two vector pipes, its loads and the memory decide that, and only a run
on the board can say it (``python benchmarks/batched_decode.py``, ``megaedge bench`` there).

Needs ``aarch64-linux-gnu-gcc`` and ``qemu-aarch64-static`` (Debian: gcc-aarch64-linux-gnu, qemu-user-static).

    python benchmarks/arm_instructions.py [--baseline REV] [--blocks 32,128] [--batches 1,2,4,8]
                                          [--prompt-rows 1,4,16,64] [--attention 400] [--out JSON]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import provenance

from megaedge.runtime import kernels

RESULTS = Path(__file__).resolve().parent / "results"
FLAGS = ["-O3", "-ffp-contract=off", "-march=armv8.2-a+dotprod", "-static"]  # a Jetson build's, without OpenMP

DRIVER = r"""
#include <stdio.h>
#include "decoder.c"
/* argv: mode n k blk B [skip]. mode "steps": n weight rows of k inputs for B sequences, a decode step's product
   (gemv_share) for one, a batched step's (rows_groups) for more; mode "prompt": gemm_rows, the same weights for a
   prompt of B rows. Fixed inputs. */
int main(int argc, char **argv) {
    const int prompt = argv[1][0] == 'p';
    const int n = atoi(argv[2]), k = atoi(argv[3]), blk = atoi(argv[4]), B = atoi(argv[5]), nb = k / blk;
    uint8_t *w = malloc((size_t)n * k);
    float *s = malloc(sizeof(float) * n * nb), *y = malloc(sizeof(float) * n * B);
    for (size_t i = 0; i < (size_t)n * k; i++) w[i] = (uint8_t)(i * 2654435761u >> 13);
    for (int i = 0; i < n * nb; i++) s[i] = 0.01f;
    me_linear m = {w, s, n, k, nb, blk, 0};
    const int lanes = me_pack_lanes(blk);  /* the layout the runtime keeps in memory: packed where the build packs */
    if (lanes) {
        const size_t rows = (size_t)(n + lanes - 1) / lanes * lanes;
        uint8_t *pw = aligned_alloc(64, (rows * k + 63) / 64 * 64);
        float *ps = malloc(sizeof(float) * rows * nb);
        me_pack_q8(w, s, n, nb, blk, pw, ps);
        m.w = pw;
        m.s = ps;
        m.packed = lanes;
    }
    me_act acts[ME_MAX_BATCH];
    int8_t *q = malloc((size_t)B * k);
    float *sa = malloc(sizeof(float) * B * nb);
    int32_t *asum = calloc((size_t)B * nb, sizeof(int32_t));
    for (int i = 0; i < B * k; i++) q[i] = (int8_t)((i * 7 + i / k * 13) % 255 - 127);
    for (int i = 0; i < B * nb; i++) sa[i] = 0.02f;
    for (int b = 0; b < B && b < ME_MAX_BATCH; b++) {
        acts[b].q = q + (size_t)b * k;
        acts[b].sa = sa + (size_t)b * nb;
        acts[b].asum = asum + (size_t)b * nb;
    }
    me_act rows = {q, sa, asum};
    if (argv[1][0] == 'a') {  /* "attend-half" / "attend-float": one layer's attention of a 1.7B step, B positions */
        const int heads = 16, kv_heads = 8, dim = 128, half = argv[1][7] == 'h';
        float *keys = malloc(sizeof(float) * kv_heads * B * dim), *values = malloc(sizeof(float) * kv_heads * B * dim);
        me_layer l = {m, m, m, m, m, m, m, NULL, NULL, NULL, NULL, keys, values};
        me_model model = {1, 2048, heads, kv_heads, dim, 6144, B, 151936, 1e-6f, 0.088f, &l, m, NULL};
        model.kv_half = half;
        uint16_t *hk = (uint16_t *)keys, *hv = (uint16_t *)values;
        for (int i = 0; i < kv_heads * B * dim; i++) {
            const float v = (float)((i * 37) % 101 - 50) / 50.f;
            if (half) {
                hk[i] = me_half(v);
                hv[i] = me_half(-v);
            } else {
                keys[i] = v;
                values[i] = -v;
            }
        }
        float *qh = malloc(sizeof(float) * heads * dim), *out = malloc(sizeof(float) * heads * dim),
              *scores = malloc(sizeof(float) * 2 * B);
        for (int i = 0; i < heads * dim; i++) qh[i] = (float)(i % 17) / 17.f;
        if (argc <= 6)
            for (int g = 0; g < kv_heads; g++) attend(&model, &l, g, qh, out, B, scores);
        printf("%a\n", out[0]);
        return 0;
    }
    void *scratch = malloc(pack_bytes((size_t)k, B) + 64);
    if (argc > 6)
        y[0] = 0.f;
    else if (prompt)
        gemm_rows(&m, &rows, y, B, 0, n, scratch);
    else if (B == 1)  /* one sequence: the decode step's own product (me_decode_step), not a batch of one */
        gemv_share(&m, &acts[0], y);  /* outside a parallel region: one thread's share is every row */
    else
        rows_groups(&m, acts, B, y, n, 0, lanes ? (n + lanes - 1) / lanes : n, NULL, asum, sa);  /* groups */
    printf("%a\n", y[0]);
    return 0;
}
"""


def build(source: Path, out: Path, cc: str) -> Path:
    driver = out.with_suffix(".c")
    driver.write_text(DRIVER)
    subprocess.run([cc, *FLAGS, f"-I{source}", str(driver), "-o", str(out), "-lm"], check=True,
                   capture_output=True)
    return out


def executed(qemu: str, binary: Path, args: list[str], log: Path) -> int:
    """Instructions executed by one run: single-stepped, every instruction is a block of its own in the log."""
    subprocess.run([qemu, "-cpu", "max", "-singlestep", "-d", "exec,nochain", "-D", str(log), str(binary), *args],
                   check=True, capture_output=True)
    with open(log, "rb") as f:
        count = sum(1 for line in f if line.startswith(b"Trace"))
    log.unlink()
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="HEAD~1", metavar="REV", help="kernels of this git revision beside")
    parser.add_argument("--blocks", default="32,128")
    parser.add_argument("--batches", default="1,2,4,8", help="sequences of a batched decode step")
    parser.add_argument("--prompt-rows", default="1,4,16,64", help="rows of a prompt (0: none)")
    parser.add_argument("--attention", default="400", help="cached positions of an attention count (0: none)")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--k", type=int, default=2048, help="inputs per row (the 1.7B decoder's hidden size)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64-static") or shutil.which(
        "qemu-aarch64")
    if not cc or not qemu:
        sys.exit("needs aarch64-linux-gnu-gcc and qemu-aarch64 (apt install gcc-aarch64-linux-gnu qemu-user-static)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(f"git archive {args.baseline} megaedge/assets/kernels | tar -x -C {tmp}", shell=True,
                       check=True, cwd=provenance.ROOT)
        builds = {"this": build(kernels.SOURCE.parent, tmp / "this", cc),
                  "baseline": build(tmp / "megaedge" / "assets" / "kernels", tmp / "baseline", cc)}
        products = [("steps", int(b)) for b in args.batches.split(",")]
        products += [("prompt", int(r)) for r in args.prompt_rows.split(",") if int(r)]
        cases = [(int(blk), mode, count) for blk in args.blocks.split(",") for mode, count in products]
        cases += [(128, f"attend-{kind}", int(n)) for n in args.attention.split(",") if int(n)
                  for kind in ("float", "half")]  # no weights read: the block is a placeholder
        for blk, mode, count in cases:
            shape = [mode, str(args.rows), str(args.k), str(blk), str(count)]
            attention = mode.startswith("attend")
            row = {"product": mode, **({} if attention else {"block": blk}),
                   {"steps": "sequences", "prompt": "prompt_rows"}.get(mode, "positions"): count,
                   "unit": "kv head and position" if attention else "weight block and row"}
            for name, binary in builds.items():  # less the same binary's run without the work (its setup)
                row[f"{name}_instructions"] = (executed(qemu, binary, shape, tmp / "log")
                                               - executed(qemu, binary, [*shape, "skip"], tmp / "log"))
            # block products of the call (for a sequence or prompt row each); attention: kv heads x positions
            per = 8 * count if attention else args.rows * (args.k // blk) * count
            row["this_per_unit"] = round(row["this_instructions"] / per, 2)
            row["baseline_per_unit"] = round(row["baseline_instructions"] / per, 2)
            row["change"] = round(row["this_instructions"] / row["baseline_instructions"] - 1, 3)
            rows.append(row)
            what = {"steps": f"blocks of {blk}, {count} sequences", "prompt": f"blocks of {blk}, a prompt of "
                    f"{count} rows"}.get(mode, f"{mode}, {count} positions")
            print(f"{what}: {row['baseline_per_unit']} -> {row['this_per_unit']} instructions per "
                  f"{row['unit']} ({row['change'] * 100:+.0f} %)", flush=True)
    result = {
        "benchmark": "arm_instructions", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": provenance.commit(), "command": "python " + " ".join(sys.argv),
        "machine": {"compiler": subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.split(
            "\n")[0], "emulator": subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.split(
            "\n")[0], "flags": " ".join(FLAGS)},
        "baseline": args.baseline, "rows": args.rows, "k": args.k, "results": rows,
        "notes": "Dynamic instruction counts of one product of `rows` x `k` int8 weights in the aarch64 "
                 "dot-product build, under qemu user mode, one thread; not a time. steps: a decode step's product "
                 "for one sequence (gemv.h), a batched step's for more (decode_batch.h); prompt: a prompt's "
                 "product for that many activation rows (gemm.h: over weights packed at load where the build packs "
                 "them, as the runtime keeps them, else packed per tile and the packing counted). "
                 "attend-float / attend-half: one 1.7B layer's attention (16 query heads over 8 kv heads of 128) "
                 "over that many cached positions in float or half caches, per kv head and position. Products: per "
                 "block of weights and sequence or prompt row. The setup subtracted is "
                 "this build's driver's, so the baseline's figures carry its driver's small difference.",
    }
    out = Path(args.out) if args.out else RESULTS / "arm_instructions.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
