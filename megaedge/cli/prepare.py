"""``megaedge prepare``: save this machine's optimized, pre-packed graphs next to the bundle so processes start fast."""

from __future__ import annotations

import argparse

from megaedge.cli.common import add_threads_option
from megaedge.runtime import limits

NAME = "prepare"
HELP = "once per device: save onnxruntime's optimized, pre-packed graphs for this CPU (faster cold start)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory written by `megaedge export` (must be writable)")
    add_threads_option(parser, "while preparing; default: all cores")
    parser.add_argument("--remove", action="store_true", help="delete this machine's prepared copies instead")
    parser.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    import json
    import time
    from pathlib import Path

    from megaedge.runtime import prepared

    bundle = Path(args.bundle).expanduser()
    # Both ways write under BUNDLE/prepared/: a read-only bundle fails here, not after minutes of optimizing.
    limits.check_output_dir(bundle, "BUNDLE")
    if args.remove:
        target = prepared.directory(bundle)
        removed, foreign = prepared.remove(bundle)
        notes = [f"left in place, not written by megaedge: {', '.join(foreign)}"] if foreign else []
        if removed and prepared.in_use(bundle):
            notes.append("copies a running process still uses stay until it exits")
        left = f" ({'; '.join(notes)})" if notes else ""
        print(f"{target}: {'removed' if removed else 'nothing to remove'}{left}")
        return 0
    t0 = time.perf_counter()
    index = prepared.prepare(bundle, args.threads)
    if args.json:
        print(json.dumps({**index, "directory": str(prepared.directory(bundle))}, indent=2))
        return 0
    print(f"prepared {bundle.name} for this machine ({index['machine_key']}) in {time.perf_counter() - t0:.1f} s "
          f"-> {prepared.directory(bundle)}")
    for name, entry in index["graphs"].items():
        print(f"  {name:<8} {entry['bytes'] / 2**30:6.2f} GiB on disk ({entry['seconds']:.1f} s)")
    print("  bundle files verified; later loads skip the sha256 check until a file changes (size, mtime, ctime or "
          "inode)")
    return 0
