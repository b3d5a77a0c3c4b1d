"""Top-n Hamming search over the rows of a pruned-weight mask (issue 14), on one core.

For each repetition: a random row of a (rows × cols) boolean mask (default 4096 × 11008,
a LLaMA-7B MLP shape, 50 % kept), its top-128 nearest rows by Hamming distance with
``analyses.masks.top_similar`` (XOR + popcount on packed uint64 words). Compared, in the
same run, with ``np.unpackbits`` + a sum over unpacked bits (the brute force). Prints JSON:
seconds per search (median, every repeat), the ratio to the brute force, and the target
(≤ 1 s per search). ``--tiny`` for the smoke test.

    python -m bench.masks
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=11008)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tiny", action="store_true", help="256 × 512, 3 repeats (smoke test)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.rows, args.cols, args.repeats, args.n = 256, 512, 3, 32
    from analyses.masks import pack_rows, top_similar

    load0 = os.getloadavg()
    rng = np.random.default_rng(0)
    mask = rng.random((args.rows, args.cols), dtype=np.float32) < 0.5
    t = time.perf_counter()
    packed = pack_rows(mask)
    pack_s = time.perf_counter() - t
    fast, brute = [], []
    for rep in range(args.repeats):
        row = int(rng.integers(args.rows))
        t = time.perf_counter()
        idx, _ = top_similar(packed, row, args.n)
        fast.append(time.perf_counter() - t)
        t = time.perf_counter()
        bits = np.unpackbits(packed, axis=1, count=args.cols)
        d = (bits != bits[row]).sum(axis=1)
        d[row] = np.iinfo(d.dtype).max
        ref = np.argsort(d, kind="stable")[: args.n]
        brute.append(time.perf_counter() - t)
        print(f"repeat {rep}: {fast[-1]:.4f} s vs {brute[-1]:.4f} s", file=sys.stderr)
        if not np.array_equal(idx, ref):
            raise SystemExit("top_similar disagrees with the brute force")
    med = float(np.median(fast))
    print(json.dumps({
        "bench": "masks.top_similar", "shape": [args.rows, args.cols], "n": args.n, "threads": 1,
        "pack_s": pack_s, "search_s_median": med, "search_s": fast, "brute_force_s": brute,
        "speedup_vs_unpackbits": float(np.median(brute)) / med, "target_s": 1.0, "meets_target": med <= 1.0,
        "loadavg_start": load0, "loadavg_end": os.getloadavg(),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
