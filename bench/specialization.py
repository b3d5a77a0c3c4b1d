"""Benchmark (issue 12): specialization's vocabulary floor, fast ``expected_max_share`` vs the plain definition.

``expected_max_share(n, q)`` is called once per (checkpoint, layer) by
``vocabulary_specialization``: ``n`` the occurrence count of every token type
kept (Zipf-like, a long tail of small counts and a few large ones), ``q`` the E
experts' selection rates. The script draws such inputs (seeded), times the fast
form and :func:`analyses.specialization.expected_max_share_plain` on the same
inputs (repetitions interleaved) and prints one JSON document: medians, every
time, the plain/fast ratio per shape, the relative difference of the two values, and
the machine (cores, load, versions) at start and end.

Run from the repository root::

    python -m bench.specialization            # E in (8, 64), vocabularies like the demo's and a 32k one
    python -m bench.specialization --tiny     # seconds; a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def inputs(n_types: int, max_count: int, E: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Zipf-like type counts (1..max_count) and skewed expert rates summing to k=2."""
    rng = np.random.default_rng(seed)
    n = np.minimum(rng.zipf(1.3, n_types), max_count).astype(np.int64)
    q = np.minimum(rng.dirichlet(np.full(E, 2.0)) * 2, 1.0)
    return n, q


def main(argv=None) -> None:
    from analyses.specialization import expected_max_share, expected_max_share_plain

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    shapes = [(300, 200, 8)] if args.tiny else [(2000, 2000, 8), (2000, 2000, 64), (32000, 20000, 64)]
    reps = 1 if args.tiny else args.reps
    warm = inputs(50, 50, 4)
    expected_max_share(*warm), expected_max_share_plain(*warm)  # imports (scipy) outside the timings
    from bench.analyses import machine

    doc = {"benchmark": "specialization", "issue": 12, "machine_start": machine(), "shapes": []}
    for n_types, max_count, E in shapes:
        n, q = inputs(n_types, max_count, E)
        times = {"fast": [], "plain": []}
        values = {}
        for r in range(reps):
            order = ("fast", "plain") if r % 2 == 0 else ("plain", "fast")
            for name in order:
                func = expected_max_share if name == "fast" else expected_max_share_plain
                t0 = time.perf_counter()
                values[name] = func(n, q)
                times[name].append(time.perf_counter() - t0)
            print(f"{n_types} types, E={E}: rep {r}", file=sys.stderr)
        med = {k: float(np.median(v)) for k, v in times.items()}
        doc["shapes"].append({
            "n_types": n_types, "distinct_counts": int(np.unique(n).size), "max_count": int(n.max()), "experts": E,
            "median_s": med, "times_s": times, "plain_over_fast": med["plain"] / med["fast"],
            "relative_difference": abs(values["fast"] - values["plain"]) / abs(values["plain"]),
        })
    doc["machine_end"] = machine()
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
