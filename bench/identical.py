"""Hash every registered analysis's results, to show a refactor changed no number and no attr.

Runs each analysis (its defaults) on a few seeded ``storage.schema.mock_cube`` shapes (with
and without pairs / router logits / lens variables, in memory and dask-chunked), on an
aggregate-counts cube, on a cube with an out-of-range expert id (the error message is
hashed), and on a routing cube given with ``--routing`` (through
``analyses.runner.compute_analysis``, as the pipeline does). Prints one JSON document:
``{case: {analysis: {variable: sha256 of dims, dtype, values and attrs}}}``.

    python -m bench.identical > /tmp/before.json           # before the refactor
    python -m bench.identical > /tmp/after.json            # after it
    python -m bench.identical --compare /tmp/before.json /tmp/after.json

``--compare`` prints ``identical`` per case, or the (case, analysis, variable) keys that differ.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import numpy as np

CASES = {
    "default": dict(capacity_factor=1.25),
    "no_pairs_no_logits_no_lens": dict(paired=False, with_logits=False, with_lens=False, seed=1),
    "small_k1": dict(n_checkpoints=2, n_layers=2, num_experts=4, top_k=1, n_samples=12, seq_len=16, seed=2,
                     with_lens=False),
    "uniform_e16_k4": dict(n_checkpoints=2, n_layers=3, num_experts=16, top_k=4, n_samples=18, seq_len=24,
                           uniform=True, seed=3, capacity_factor=1.0),
}


def _hash_array(a) -> str:
    a = np.asarray(a)
    h = hashlib.sha256(f"{a.dtype}|{a.shape}".encode())
    if a.dtype.kind == "O":
        h.update(json.dumps([str(x) for x in a.ravel()]).encode())
    else:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _hash_attrs(attrs) -> str:
    return hashlib.sha256(json.dumps(attrs, sort_keys=True, default=str).encode()).hexdigest()[:16]


ATTRS_ONLY = False  # --attrs: the attrs themselves instead of hashes (to read a difference)


def hash_result(ds) -> dict:
    """{variable or coordinate: hash of its dims, values and attrs}, plus the result attrs."""
    if ATTRS_ONLY:
        return {"__attrs__": dict(ds.attrs), **{str(n): dict(v.attrs) for n, v in ds.variables.items()}}
    ds = ds.compute()
    out = {"__attrs__": _hash_attrs(ds.attrs), "__dims__": json.dumps(dict(ds.sizes), sort_keys=True)}
    for name, var in ds.variables.items():
        out[str(name)] = "|".join([",".join(var.dims), _hash_array(var.values), _hash_attrs(var.attrs)])
    return out


def run_case(routing, runner=None) -> dict:
    import analyses
    from analyses.registry import skip_reason

    out = {}
    for name in sorted(analyses.REGISTRY):
        reason = skip_reason(name, routing)
        if reason:
            out[name] = {"__skipped__": reason}
            continue
        try:
            res = runner(name) if runner else analyses.run(name, routing)
            out[name] = hash_result(res)
        except Exception as exc:  # a refusal is a result too: its message must not change
            out[name] = {"__error__": f"{type(exc).__name__}: {exc}"}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--routing", help="also hash every analysis over this routing.zarr (pipeline path)")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    p.add_argument("--tiny", action="store_true", help="one small case only")
    p.add_argument("--attrs", action="store_true", help="print the attrs themselves, not hashes")
    args = p.parse_args(argv)
    global ATTRS_ONLY
    ATTRS_ONLY = args.attrs
    if args.compare:
        return compare(*args.compare)

    import xarray as xr

    from storage.schema import mock_cube

    doc = {}
    cases = {"small_k1": CASES["small_k1"]} if args.tiny else CASES
    for case, kw in cases.items():
        print(f"case {case}", file=sys.stderr)
        ds = mock_cube(**kw)
        doc[case] = run_case(ds)
        if case == "default" and not args.tiny:
            doc[case + "_dask"] = run_case(ds.chunk({"token": 97}))
            bad = ds.copy(deep=True)
            ids = bad["expert_ids"].values
            ids[1, 0, 5, 0] = ds.attrs["num_experts"] + 3
            ids[0, 1, 9, 1] = -4
            doc["bad_ids"] = run_case(bad)
            doc["bad_ids_dask"] = run_case(bad.chunk({"token": 97}))
    if not args.tiny:
        from storage.schema import counts_cube

        rng = np.random.default_rng(7)
        counts = rng.integers(0, 50, size=(2, 3, 3, 8))
        cc = counts_cube(counts, checkpoints=["a", "b"], steps=[10, 20], layers=[0, 1, 2],
                         domains=["code", "math", "prose"], top_k=2,
                         attrs={"model_family": "mock", "router_semantics": "softmax_topk", "source": "mock"})
        doc["counts"] = run_case(cc)
    if args.routing:
        from analyses.runner import compute_analysis
        from storage import cube as cubes

        ds = cubes.open_routing(args.routing, complete_only=True)
        doc["routing"] = run_case(ds, runner=lambda name: compute_analysis(args.routing, name, {}))
    del xr
    json.dump(doc, sys.stdout, indent=1, sort_keys=True)
    print()
    return 0


def compare(before: str, after: str) -> int:
    a, b = (json.load(open(f)) for f in (before, after))
    bad = 0
    for case in sorted(set(a) | set(b)):
        ca, cb = a.get(case, {}), b.get(case, {})
        diffs = []
        for name in sorted(set(ca) | set(cb)):
            if name not in ca:
                diffs.append(f"{name}: new analysis")
                continue
            if name not in cb:
                diffs.append(f"{name}: missing after")
                continue
            for key in sorted(set(ca[name]) | set(cb[name])):
                if ca[name].get(key) != cb[name].get(key):
                    diffs.append(f"{name}.{key}: {ca[name].get(key)!s:.80} -> {cb[name].get(key)!s:.80}")
        only_new = all(d.endswith("new analysis") for d in diffs)
        print(f"{case}: " + ("identical" if not diffs else
                             ("identical (new: " + ", ".join(d.split(':')[0] for d in diffs) + ")") if only_new
                             else f"{len(diffs)} difference(s)"))
        for d in diffs if not only_new else []:
            print("   ", d)
        bad += 0 if only_new else len(diffs)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
