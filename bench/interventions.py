"""Cost of the issue-15 interventions on a demo checkpoint, and whether reusing hidden states would pay.

Prints one JSON document: forward passes and seconds of drop-top-1 (per layer),
a global top-n sweep over the usage ranking and 5 random controls, and the
single-expert masks of observational-vs-causal; headline ΔNLL with CIs; and,
per MoE layer, the share of one forward spent *before* that layer (the most a
mask starting there could save by reusing cached hidden states).

    python -m bench.interventions --run /tmp/F/runs/demo          # a finished demo run's checkpoints + tokens
    python -m bench.interventions --tiny                          # tiny random Mixtral (smoke test)
    python -m bench.interventions --run /tmp/F2/runs/demo --reuse-only   # hidden-state reuse only
    python -m bench.interventions --run runs/demo --sweep-reuse --max-samples 36   # the wired sweeps, reuse on/off
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import xarray as xr


def _model_and_tokens(args):
    if args.tiny:
        from capture.families import tiny_model
        from storage.schema import token_table

        rng = np.random.default_rng(0)
        lengths = [12] * 8
        sample = np.repeat(np.arange(8), lengths)
        tokens = token_table(sample=sample, position=np.concatenate([np.arange(n) for n in lengths]),
                             token_id=rng.integers(3, 100, size=sample.size))
        tokens = tokens.assign_coords(domain=("token", np.where(sample % 2 == 0, "code", "prose").astype(object)))
        return {"tiny": tiny_model("mixtral")}, tokens
    from capture.load import load_model

    ck = sorted(os.listdir(os.path.join(args.run, "model", "checkpoints")))
    names = [ck[0], ck[-1]] if len(ck) > 1 else ck
    models = {n: load_model(os.path.join(args.run, "model", "checkpoints", n)) for n in names}
    tokens = xr.open_zarr(os.path.join(args.run, "tokens", "demo_eval.zarr")).load()
    if args.max_samples:
        keep = np.isin(tokens["sample"].values, np.unique(tokens["sample"].values)[: args.max_samples])
        tokens = tokens.isel(token=np.flatnonzero(keep))
    return models, tokens


def _usage(model, tokens, batch_size):
    """Routed slots per (layer, expert) of the unmasked model over the real tokens of the table."""
    from capture.hooks import record_routing
    from capture.interventions import _batches
    from capture.routers import find_routers

    sites = find_routers(model)
    counts = np.zeros((len(sites), sites[0].num_experts))
    with torch.inference_mode(), record_routing(model, sites) as rec:
        for g, lens, ids in _batches(tokens, batch_size):
            S = ids.shape[1]
            attn = torch.as_tensor((np.arange(S)[None, :] < lens[:, None]).astype(np.int64))
            model(input_ids=torch.as_tensor(ids), attention_mask=attn, use_cache=False)
            real = np.concatenate([b * S + np.arange(n) for b, n in enumerate(lens)])
            for i, (_, (e, _, _)) in enumerate(sorted(rec.pop().items())):
                np.add.at(counts[i], e.numpy()[real].reshape(-1), 1)
    return [s.layer for s in sites], counts


def _layer_shares(model, tokens, batch_size):
    """Share of a forward spent before each decoder layer (hooks time the layers)."""
    from capture.interventions import _batches

    layers = model.model.layers
    marks = {}
    hs = [l.register_forward_pre_hook(lambda m, a, i=i: (marks.setdefault(i, time.perf_counter()), None)[1])
          for i, l in enumerate(layers)]
    try:
        g, lens, ids = next(_batches(tokens, batch_size))
        shares = []
        for _ in range(3):
            marks.clear()
            t0 = time.perf_counter()
            with torch.inference_mode():
                model(input_ids=torch.as_tensor(ids), use_cache=False)
            t1 = time.perf_counter()
            shares.append([(marks[i] - t0) / (t1 - t0) for i in range(len(layers))])
    finally:
        for h in hs:
            h.remove()
    return np.median(np.asarray(shares), axis=0).round(3).tolist()


def _reuse(model, tokens, batch_size, repeats=7):
    """Does reusing the hidden states before the first masked layer pay? Measured, not estimated.

    For a router mask of one expert in layer L: the full masked forward vs a forward whose decoder
    layers before L return the outputs cached from the unmasked pass (embeddings, masks and the
    layers from L on still run). Both give the same logits (checked); the ratio is the saving.
    """
    from capture.interventions import MaskSet, _batches, apply_masks
    from capture.routers import find_routers

    layers = model.model.layers
    g, lens, ids = next(_batches(tokens, batch_size))
    S = ids.shape[1]
    x = torch.as_tensor(ids)
    attn = torch.as_tensor((np.arange(S)[None, :] < lens[:, None]).astype(np.int64))
    cache = {}
    hs = [l.register_forward_hook(lambda m, a, o, i=i: cache.__setitem__(i, o)) for i, l in enumerate(layers)]
    with torch.inference_mode():
        model(input_ids=x, attention_mask=attn, use_cache=False)
    for h in hs:
        h.remove()
    out = {}
    for site in find_routers(model):
        L = site.layer
        mask = MaskSet("router", static={L: [0]})

        def run(reuse):
            patched = []
            if reuse:
                for i in range(L):
                    layers[i].forward = (lambda *a, _o=cache[i], **k: _o)
                    patched.append(layers[i])
            try:
                with torch.inference_mode(), apply_masks(model, mask):
                    t0 = time.perf_counter()
                    logits = model(input_ids=x, attention_mask=attn, use_cache=False).logits
                    return time.perf_counter() - t0, logits
            finally:
                for m in patched:
                    del m.forward

        full = [run(False) for _ in range(repeats)]
        re = [run(True) for _ in range(repeats)]
        tf, tr = float(np.median([t for t, _ in full])), float(np.median([t for t, _ in re]))
        out[f"L{L}"] = {"full_s": round(tf, 4), "reuse_s": round(tr, 4), "saving": round(1 - tr / tf, 3),
                        "max_abs_logit_diff": float((full[0][1] - re[0][1]).abs().max())}
    return out


def _sweep_reuse(model, tokens, batch_size, repeats=3):
    """The wired path (``capture.interventions.sweep_scores``, grouped as ``tasks.interventions.job_groups``):
    the single-expert sweep and drop-top-1, with and without hidden-state reuse, timed in one run (median of
    ``repeats``, alternating), scores compared bit for bit."""
    from capture.interventions import MaskSet, sweep_scores
    from capture.routers import find_routers
    from tasks.interventions import job_groups

    layers = [s.layer for s in find_routers(model)]
    E = find_routers(model)[0].num_experts
    out = {}
    for name, sets in {"single": [MaskSet("router", static={l: [e]}) for l in layers for e in range(E)],
                       "drop_top1": [MaskSet("router", drop_top={l: 1}) for l in layers]}.items():
        plain = [{"mask": {"static": m.static, "drop_top": list(m.drop_top)}} for m in sets]
        groups = job_groups(plain)
        times = {True: [], False: []}
        res = {}
        for _ in range(repeats):
            for reuse in (False, True):
                t0 = time.perf_counter()
                res[reuse] = [sweep_scores(model, tokens, [sets[i] for i in g], batch_size=batch_size, reuse=reuse)
                              for g in groups]
                times[reuse].append(time.perf_counter() - t0)
        same = all(np.array_equal(a["nll"], b["nll"], equal_nan=True) and
                   np.array_equal(a["correct"], b["correct"], equal_nan=True)
                   for (ga, _), (gb, _) in zip(res[True], res[False]) for a, b in zip(ga, gb))
        n_layers = res[True][0][1]["decoder_layers"]
        tr, tf = float(np.median(times[True])), float(np.median(times[False]))
        out[name] = {"mask_sets": len(sets), "jobs": len(groups), "whole_s": round(tf, 3), "reuse_s": round(tr, 3),
                     "time_saving": round(1 - tr / tf, 3), "bit_identical": bool(same),
                     "forward_passes": sum(st["forward_passes"] for _, st in res[True]),
                     "forward_equivalents_run": round(sum(st["layer_passes"] for _, st in res[True]) / n_layers, 2),
                     "jobs_reusing": sum(st["reuse"] for _, st in res[True])}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/demo")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--reuse-only", action="store_true", help="only measure hidden-state reuse (no sweeps)")
    p.add_argument("--sweep-reuse", action="store_true",
                   help="only time the wired single-expert and drop-top-1 sweeps with and without reuse")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-samples", type=int, default=0)
    p.add_argument("--n-boot", type=int, default=100)
    p.add_argument("--figures", default="", help="also draw the degradation and scatter figures into this folder")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from analyses.interventions import delta_cube, obs_vs_causal, per_sample, random_ranking, rank_masks
    from capture.interventions import MaskSet, forward_passes, token_scores

    load0 = os.getloadavg()
    models, tokens = _model_and_tokens(args)
    if args.sweep_reuse:
        json.dump({"bench": "interventions_sweep_reuse", "batch_size": args.batch_size, "samples":
                   int(np.unique(tokens["sample"].values).size),
                   "checkpoints": {n: _sweep_reuse(m, tokens, args.batch_size) for n, m in models.items()},
                   "loadavg": os.getloadavg()}, sys.stdout, indent=1)
        print()
        return
    if args.reuse_only:
        json.dump({"bench": "interventions_reuse", "batch_size": args.batch_size,
                   "checkpoints": {n: _reuse(m, tokens, args.batch_size) for n, m in models.items()},
                   "loadavg": os.getloadavg()}, sys.stdout, indent=1)
        print()
        return
    sample = np.asarray(tokens["sample"].values)
    ids = np.unique(sample)
    dom = np.asarray(tokens["domain"].values).astype(object).astype(str)[np.searchsorted(sample, ids)]
    groups = xr.DataArray(dom, dims="sample", name="domain")
    per_pass = forward_passes(len(ids), args.batch_size)
    doc = {"bench": "interventions", "samples": int(len(ids)), "tokens": int(sample.size),
           "forwards_per_scoring": per_pass, "checkpoints": {}}
    for name, model in models.items():
        t0 = time.perf_counter()
        base_tok = token_scores(model, tokens, batch_size=args.batch_size)
        t_base = time.perf_counter() - t0
        base = per_sample(base_tok, sample)
        layers, usage = _usage(model, tokens, args.batch_size)
        E = usage.shape[1]
        runs, labels, scorings = [], [], 0
        t0 = time.perf_counter()
        for layer in layers:  # drop-top-1 per layer
            runs.append(per_sample(token_scores(model, tokens, masks=MaskSet("router", drop_top={layer: 1}),
                                                batch_size=args.batch_size), sample))
            labels.append(("drop_top1", "own top-1", f"L{layer}", 1, -1))
            scorings += 2  # the router runs twice, the rest once: counted as one pass + router re-run
        ns = [1, 2, 4]
        for rk, score, seed in [("usage", usage, -1)] + [("random", random_ranking(E, layers, s), s) for s in range(5)]:
            for m in rank_masks(score, layers, ns, scope="global"):
                runs.append(per_sample(token_scores(model, tokens, masks=MaskSet("router", static=m["static"]),
                                                    batch_size=args.batch_size), sample))
                labels.append(("router", rk, m["scope"], m["n_masked"], seed))
        t_sweep = time.perf_counter() - t0
        r = xr.concat(runs, dim="run")
        cube = delta_cube(base, r, groups, n_boot=args.n_boot)
        cube = cube.assign_coords({k: ("run", [lab[i] for lab in labels]) for i, k in
                                   enumerate(("intervention", "ranking", "scope", "n_masked", "seed"))})
        t0 = time.perf_counter()
        eff, units = [], []
        for layer in layers:
            for e in range(E):
                s = per_sample(token_scores(model, tokens, masks=MaskSet("router", static={layer: [e]}),
                                            batch_size=args.batch_size), sample)
                eff.append((s["nll"] - base["nll"]).values)
                units.append(f"L{layer}E{e}")
        t_single = time.perf_counter() - t0
        effect = xr.DataArray(np.asarray(eff), dims=("unit", "sample"), coords={"unit": units})
        use = xr.DataArray(np.repeat((usage / usage.sum(1, keepdims=True)).reshape(-1, 1), len(ids), 1)
                           * base["n"].values[None], dims=("unit", "sample"), coords={"unit": units})
        ovc = obs_vs_causal(effect, base["n"], {"usage": use}, n_boot=args.n_boot)
        d = cube.delta_nll.sel(domain="all").values
        if args.figures:
            from analyses.figures.interventions import degradation, scatter

            sweep = cube.isel(run=np.flatnonzero(cube.intervention.values != "drop_top1"))
            degradation(sweep, args.figures, stem=f"degradation_{name}")
            scatter(usage.reshape(-1) / usage.sum(1).repeat(E), effect.sum("sample").values / float(base["n"].sum()),
                    units, args.figures, rho=float(ovc.rho.item()), stem=f"obs_vs_causal_{name}")
        doc["checkpoints"][name] = {
            "seconds": {"baseline": round(t_base, 3), "drop_top1_and_sweeps": round(t_sweep, 3),
                        "single_expert_masks": round(t_single, 3)},
            "forward_passes": {"baseline": per_pass, "sweeps": per_pass * len(runs),
                               "single_expert": per_pass * len(units)},
            "delta_nll_all": {f"{a}|{b}|{c}|n={n_}|seed={s_}": round(float(v), 4)
                              for (a, b, c, n_, s_), v in zip(labels, d)},
            "drop_top1_ci": [[round(float(x), 4) for x in cube[v].sel(domain="all").values[:len(layers)]]
                             for v in ("delta_nll_lo", "delta_nll_hi")],
            "rho_usage_vs_causal": [round(float(ovc[v].item()), 3) for v in ("rho", "rho_lo", "rho_hi")],
            "most_disagreeing": ovc.disagree.values[0].tolist(),
            "share_of_forward_before_layer": _layer_shares(model, tokens, args.batch_size),
            "hidden_state_reuse": _reuse(model, tokens, args.batch_size),
        }
    doc["loadavg"] = [load0, os.getloadavg()]
    json.dump(doc, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
