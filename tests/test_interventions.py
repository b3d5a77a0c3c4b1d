"""capture.interventions: router / output masks on tiny models of several families, and the ΔNLL they give."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from capture.families import moe_families, tiny_config, tiny_model
from capture.hooks import record_routing
from capture.interventions import MaskError, MaskSet, apply_masks, token_scores
from capture.load import language_model
from capture.routers import find_routers
from capture_helpers import seeded_tokens

FAMILIES = ["mixtral", "olmoe", "qwen3_moe", "deepseek_v3"]
IDS = torch.tensor([[5, 17, 33, 8, 61, 12, 90, 44, 3, 27]])


def _routing(model, ids=IDS):
    with torch.inference_mode(), record_routing(model) as rec:
        out = model(input_ids=ids, use_cache=False)
        return out.logits.clone(), rec.pop()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["router", "output"])
def test_masking_an_unselected_expert_changes_nothing_bit_exact(family, kind):
    model = tiny_model(family)
    logits, routed = _routing(model, IDS[:, :2])
    static = {}
    for layer, (ids, w, _) in routed.items():
        unused = sorted(set(range(8)) - set(ids.flatten().tolist()))
        assert unused, "two tokens at top-2 cannot use all 8 experts"
        static[layer] = [unused[0]]
    with apply_masks(model, MaskSet(kind, static=static)) as h:
        masked, _ = _routing(model, IDS[:, :2])
    assert h.calls == {l: 1 for l in static}
    assert torch.equal(masked, logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_router_mask_reroutes_and_hooks_are_removed(family):
    model = tiny_model(family)
    before, routed = _routing(model)
    layer = min(routed)
    top1 = int(routed[layer][0][0, int(routed[layer][1][0].argmax())])
    router = find_routers(model)[0].module
    with pytest.raises(RuntimeError, match="boom"):
        with apply_masks(model, MaskSet("router", static={layer: [top1]}, drop_top={max(routed): 1})):
            _, masked = _routing(model)
            assert top1 not in masked[layer][0].flatten().tolist()
            assert "forward" in router.__dict__
            raise RuntimeError("boom")
    assert "forward" not in router.__dict__
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    after, _ = _routing(model)
    assert torch.equal(after, before)


def _subset_model(family, model, keep, **over):
    """A model whose routers and experts only have the experts ``keep`` (weights copied)."""
    cfg = tiny_config(family)
    for k, v in over.items():
        setattr(cfg, k, v)
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        if hasattr(cfg, name):
            setattr(cfg, name, len(keep))
    small = type(model)(cfg).eval()
    idx = torch.as_tensor(keep)
    sd = {}
    for name, t in model.state_dict().items():
        if (".experts." in name or name.endswith(("gate.weight", "e_score_correction_bias"))) and t.shape[0] == 8:
            t = t[idx]
        sd[name] = t
    small.load_state_dict(sd)
    return small


@pytest.mark.parametrize("family,over", [("mixtral", {}), ("qwen3_moe", {"norm_topk_prob": True}),
                                         ("deepseek_v3", {"n_group": 1, "topk_group": 1})])
def test_router_mask_of_all_but_a_set_equals_a_model_that_only_has_the_set(family, over):
    model = tiny_model(family)
    for k, v in over.items():
        setattr(model.config, k, v)
        for m in model.modules():
            for attr in ({"n_group": "num_group"}.get(k, k), k):
                if hasattr(m, attr) and not isinstance(m, type(model)) and not hasattr(m, "layers"):
                    setattr(m, attr, v)
    keep = [1, 3, 4, 6]
    small = _subset_model(family, model, keep, **over)
    layers = [s.layer for s in find_routers(model)]
    masked = MaskSet("router", static={l: [e for e in range(8) if e not in keep] for l in layers})
    with apply_masks(model, masked):
        got, routed = _routing(model)
    want, routed_small = _routing(small)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for l in layers:
        mapped = torch.as_tensor(keep)[routed_small[l][0].long()]
        assert torch.equal(torch.sort(routed[l][0], -1).values, torch.sort(mapped, -1).values)


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_output_mask_keeps_routing_and_zeroes_only_that_experts_contribution(family):
    model = tiny_model(family)
    sites = find_routers(model)
    site = sites[0]
    block = model.get_submodule(site.name.rsplit(".", 1)[0])
    seen = {}
    h = block.register_forward_hook(lambda m, a, o: seen.__setitem__("out", (o[0] if isinstance(o, tuple) else o).clone()))
    h2 = block.experts.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].clone()))
    try:
        _, routed = _routing(model)
        full = seen["out"]
        ids, w, _ = routed[site.layer]
        e = int(ids[0, 0])
        with apply_masks(model, MaskSet("output", static={site.layer: [e]})):
            _, routed_m = _routing(model)
        masked = seen["out"]
        x = seen["x"]
    finally:
        h.remove()
        h2.remove()
    # routing of the masked layer kept; the weights recorded are the ones the experts got (0 on e, others unchanged)
    assert torch.equal(routed_m[site.layer][0], ids)
    w_m = routed_m[site.layer][1]
    assert torch.equal(w_m[ids == e], torch.zeros_like(w_m[ids == e]))
    assert torch.equal(w_m[ids != e], w[ids != e])
    # removed contribution = weight x expert e's output, computed on its own
    x2 = x.reshape(-1, x.shape[-1])
    with torch.inference_mode():
        alone = block.experts(x2, torch.full((x2.shape[0], 1), e), torch.ones(x2.shape[0], 1))
    wt = (w * (ids == e)).sum(-1, keepdim=True)
    torch.testing.assert_close((full - masked).reshape(x2.shape), wt * alone, rtol=1e-4, atol=1e-6)


def test_bad_masks_are_refused_by_name():
    model = tiny_model("mixtral")
    with pytest.raises(MaskError, match="no MoE router at decoder layer"):
        with apply_masks(model, MaskSet("router", static={7: [1]})):
            pass
    with pytest.raises(MaskError, match="outside"):
        with apply_masks(model, MaskSet("output", static={0: [9]})):
            pass
    with pytest.raises(ValueError, match="mask kind"):
        MaskSet("weights")
    assert not any(m._forward_hooks for m in model.modules())


def test_token_scores_equal_a_plain_loop_and_delta_nll_is_their_difference():
    model = tiny_model("olmoe")
    tokens = seeded_tokens([6, 9, 4], seed=3)
    mask = MaskSet("router", drop_top={0: 1, 1: 1})
    base = token_scores(model, tokens, batch_size=2)
    abl = token_scores(model, tokens, masks=mask, batch_size=2)
    tid = np.asarray(tokens.token_id.values)
    sample = np.asarray(tokens["sample"].values)
    for scores, m in ((base, None), (abl, mask)):
        ref = []
        for s in np.unique(sample):
            ids = torch.as_tensor(tid[sample == s])[None]
            with torch.inference_mode(), apply_masks(model, m):
                lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            nll = [-float(lp[i, ids[0, i + 1]]) for i in range(ids.shape[1] - 1)] + [np.nan]
            ref += nll
            acc = [float(int(lp[i].argmax()) == int(ids[0, i + 1])) for i in range(ids.shape[1] - 1)]
            got = scores["correct"][sample == s]
            assert np.array_equal(got[:-1], acc) and np.isnan(got[-1])
        np.testing.assert_allclose(scores["nll"], ref, rtol=1e-4, atol=1e-5)
    assert np.nanmean(abl["nll"] - base["nll"]) != 0


# ------------------------------------------------------------------ analyses.interventions (pure)

def _fake_runs(seed=0, S=12, R=3):
    from analyses.interventions import per_sample

    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 7, size=S)
    sample = np.repeat(np.arange(S) * 10, lengths)
    def scores(shift):
        nll = rng.random(sample.size) + shift
        last = np.r_[sample[1:] != sample[:-1], True]
        nll[last] = np.nan
        corr = (rng.random(sample.size) < 0.5).astype(float)
        corr[last] = np.nan
        return {"nll": nll, "correct": corr}
    base = scores(0.0)
    runs = [scores(0.2 * r) for r in range(R)]
    return sample, base, runs, per_sample(base, sample), xr_concat([per_sample(r, sample) for r in runs])


def xr_concat(parts):
    import xarray as xr

    return xr.concat(parts, dim="run")


def test_delta_cube_equals_a_plain_loop_and_its_bootstrap():
    import xarray as xr

    from analyses.bootstrap import bootstrap_weights
    from analyses.interventions import delta_cube

    sample, base, runs, b, r = _fake_runs()
    ids = np.unique(sample)
    dom = np.where(ids % 20 == 0, "code", "prose")
    groups = xr.DataArray(dom, dims="sample", name="domain")
    res = delta_cube(b, r, groups, n_boot=50, seed=4)
    tok_dom = dom[np.searchsorted(ids, sample)]
    for i, run in enumerate(runs):
        for g in ("code", "prose", "all"):
            sel = (tok_dom == g) if g != "all" else np.ones(sample.size, bool)
            ok = sel & np.isfinite(base["nll"])
            want = run["nll"][ok].mean() - base["nll"][ok].mean()
            assert np.isclose(float(res.delta_nll.isel(run=i).sel(domain=g)), want)
            acc = run["correct"][ok].mean() - base["correct"][ok].mean()
            assert np.isclose(float(res.delta_accuracy.isel(run=i).sel(domain=g)), acc)
    # one replicate by hand: the code domain of run 1
    w = bootstrap_weights(len(ids), 50, 4, strata=dom)
    reps = []
    for row in w:
        num = den = 0.0
        for s, c in zip(ids, row):
            m = (sample == s) & np.isfinite(base["nll"])
            if dom[ids == s][0] == "code":
                num += c * (runs[1]["nll"][m] - base["nll"][m]).sum()
                den += c * m.sum()
        reps.append(num / den)
    assert np.isclose(float(res.delta_nll_lo.isel(run=1).sel(domain="code")), np.quantile(reps, 0.025))
    assert res.delta_nll.attrs["units"] == "nat" and res.delta_nll_lo.attrs["n_boot"] == 50


def test_rank_masks_and_random_controls_are_reproducible_by_seed():
    from analyses.interventions import random_ranking, rank_masks

    a, b, c = (random_ranking(8, [0, 1, 2], s) for s in (5, 5, 6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    score = np.arange(24, dtype=float).reshape(3, 8)
    per_layer = rank_masks(score, [0, 1, 2], [1, 2, 4], scope="layer")
    assert per_layer[0] == {"scope": "L0", "n_masked": 1, "static": {0: [7]}}
    assert per_layer[2]["static"] == {0: [7, 6, 5, 4]} and len(per_layer) == 9
    glob = rank_masks(score, [0, 1, 2], [1, 2, 4, 16], scope="global")
    assert glob[1]["static"] == {2: [7, 6]} and glob[2]["static"] == {2: [7, 6, 5, 4]}
    assert len(glob) == 3  # n=16 would mask every expert of layers 1 and 2: left out


def test_obs_vs_causal_point_rho_is_scipy_spearman():
    import xarray as xr
    from scipy.stats import spearmanr

    from analyses.interventions import obs_vs_causal

    rng = np.random.default_rng(1)
    U, S = 10, 15
    units = [f"L{u // 5}E{u % 5}" for u in range(U)]
    n = xr.DataArray(rng.integers(5, 20, S).astype(float), dims="sample")
    eff = xr.DataArray(rng.random((U, S)) * n.values, dims=("unit", "sample"), coords={"unit": units})
    usage = eff * 0.5 + xr.DataArray(rng.random((U, S)), dims=("unit", "sample"), coords={"unit": units})
    res = obs_vs_causal(eff, n, {"usage": usage, "anti": -eff}, n_boot=40, seed=2)
    want = spearmanr((usage.sum("sample") / n.sum()).values, (eff.sum("sample") / n.sum()).values)[0]
    assert np.isclose(float(res.rho.sel(measure="usage")), want)
    assert np.isclose(float(res.rho.sel(measure="anti")), -1.0)
    assert float(res.rho_lo.sel(measure="usage")) <= float(res.rho_hi.sel(measure="usage"))
    assert res.disagree.sizes["rank"] == 3


def test_intervention_figures_are_written(tmp_path):
    import xarray as xr

    from analyses.figures.interventions import degradation, scatter
    from analyses.interventions import delta_cube

    sample, base, runs, b, r = _fake_runs(R=4)
    ids = np.unique(sample)
    groups = xr.DataArray(np.where(ids % 20 == 0, "code", "prose"), dims="sample", name="domain")
    cube = delta_cube(b, r, groups, n_boot=20).assign_coords(
        ranking=("run", ["usage", "usage", "random", "random"]), n_masked=("run", [1, 2, 1, 2]),
        seed=("run", [-1, -1, 0, 0]))
    paths = degradation(cube, tmp_path) + scatter(np.arange(6.0), np.arange(6.0)[::-1], list("abcdef"), tmp_path, rho=-1.0)
    assert [p.suffix for p in paths] == [".png", ".png"] and all(p.stat().st_size > 1000 for p in paths)


# ------------------------------------------------------------------ hidden-state reuse (capture.interventions.sweep_scores)

def _reuse_sets(model, kind="router"):
    """Two single-expert masks and a drop-top-1 on each MoE layer after the first decoder layer, plus one
    set from layer 0 (not reusable) when layer 0 is MoE."""
    layers = [s.layer for s in find_routers(model)]
    sets = []
    for l in layers:
        if l > 0:
            sets += [MaskSet(kind, static={l: [0]}), MaskSet(kind, static={l: [1]}), MaskSet(kind, drop_top={l: 1})]
    if layers[0] == 0:
        sets.append(MaskSet(kind, static={0: [2]}))
    return sets + [None]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["router", "output"])
def test_reusing_the_states_before_the_first_masked_layer_is_bit_identical(family, kind):
    from capture.interventions import decoder_stack, sweep_scores

    model = tiny_model(family)
    tokens = seeded_tokens([6, 9, 4, 7], seed=5)
    sets = _reuse_sets(model, kind)
    got, stats = sweep_scores(model, tokens, sets, batch_size=3)
    assert stats["reuse"], stats["why"]
    want = [token_scores(model, tokens, masks=m, batch_size=3) for m in sets]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g["nll"], w["nll"])
        np.testing.assert_array_equal(g["correct"], w["correct"])
    n_batches, L = 2, stats["decoder_layers"]
    starts = [(m.first_layer or 0) if m else 0 for m in sets]
    # per batch: a prefix pass to the last start, each set from its start; batch 0 also checks each start whole
    expected = n_batches * (max(starts) + sum(L - s for s in starts)) + len({s for s in starts if s > 0}) * L
    assert stats["layer_passes"] == expected < n_batches * len(sets) * L
    stack = decoder_stack(model, find_routers(model))
    assert not any("forward" in m.__dict__ for m in stack) and not any(m._forward_hooks for m in model.modules())


def test_reuse_is_refused_when_a_layer_is_not_a_function_of_its_input():
    """A layer whose output drifts from call to call (a stand-in for hidden state kept across calls): the
    first-batch check sees different logits, and every set is then scored by whole forwards."""
    from capture.interventions import decoder_stack, sweep_scores

    model = tiny_model("mixtral")
    stack = decoder_stack(model, find_routers(model))
    calls = []

    def drift(module, args, output):
        calls.append(1)
        return output + 1e-3 * len(calls)

    h = stack[0].register_forward_hook(drift)
    try:
        got, stats = sweep_scores(model, seeded_tokens([6, 9], seed=1), _reuse_sets(model), batch_size=2)
    finally:
        h.remove()
    assert not stats["reuse"] and "changed the logits" in stats["why"]
    assert not any("forward" in m.__dict__ for m in stack)


def test_reuse_is_off_for_a_single_later_set_and_patches_are_removed_on_errors():
    from capture.interventions import decoder_stack, sweep_scores

    model = tiny_model("qwen3_moe")
    tokens = seeded_tokens([5, 5], seed=2)
    _, stats = sweep_scores(model, tokens, [MaskSet("router", static={1: [0]}), None], batch_size=2)
    assert not stats["reuse"] and "fewer than two" in stats["why"]
    stack = decoder_stack(model, find_routers(model))
    with pytest.raises(MaskError, match="outside"):
        sweep_scores(model, tokens, [MaskSet("router", static={1: [0]}), MaskSet("router", static={1: [99]})],
                     batch_size=2)
    assert not any("forward" in m.__dict__ for m in stack) and not any(m._forward_hooks for m in model.modules())


from test_families import REFUSED  # noqa: E402  (the families capture refuses by name)


@pytest.mark.parametrize("family", sorted(set(moe_families()) - set(REFUSED)))
def test_reuse_is_bit_identical_on_every_installed_family(family):
    """Every family capture supports: two masks on each MoE layer after the first, with reuse, give the scores
    of whole masked forwards (router masks; output masks where the family refuses router masks)."""
    from capture.interventions import sweep_scores

    model = tiny_model(family)
    sites = find_routers(language_model(model))
    tokens = seeded_tokens([6, 9, 4, 7], seed=5)
    for kind in ("router", "output"):
        sets = [MaskSet(kind, static={s.layer: [e]}) for s in sites if s.layer > 0 for e in (0, 1)] + [None]
        try:
            got, stats = sweep_scores(model, tokens, sets, batch_size=3)
        except MaskError as e:
            if "no next-token logits" in str(e):
                pytest.skip(f"{family}: {e}")
            continue
        assert stats["reuse"], stats["why"]
        for g, m in zip(got, sets):
            w = token_scores(model, tokens, masks=m, batch_size=3)
            np.testing.assert_array_equal(g["nll"], w["nll"])
        return
    pytest.fail(f"{family}: neither mask kind applies")


def test_without_a_layer_list_whole_forwards_are_counted_and_scores_unchanged(monkeypatch):
    import capture.interventions as ci

    model = tiny_model("qwen3_moe")
    tokens = seeded_tokens([5, 6, 4], seed=3)
    sets = [MaskSet("router", static={1: [e]}) for e in range(3)]
    monkeypatch.setattr(ci, "decoder_stack", lambda runner, sites: None)
    got, stats = ci.sweep_scores(model, tokens, sets, batch_size=2)
    assert not stats["reuse"] and "one decoder-layer list" in stats["why"]
    assert stats["decoder_layers"] == 1 and stats["layer_passes"] == stats["forward_passes"] == 2 * 3
    for g, m in zip(got, sets):
        np.testing.assert_array_equal(g["nll"], token_scores(model, tokens, masks=m, batch_size=2)["nll"])


def test_skipping_layers_restores_a_module_that_sits_twice_in_the_stack():
    from capture.interventions import _skip_layers

    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    stack = torch.nn.ModuleList([a, a, b])
    cached = torch.zeros(1, 2)
    with _skip_layers(stack, 3, cached):
        assert torch.equal(a(torch.ones(1, 2)), cached) and torch.equal(b(torch.ones(1, 2)), cached)
    assert "forward" not in a.__dict__ and "forward" not in b.__dict__
    assert not torch.equal(a(torch.ones(1, 2)), cached)


def test_a_mask_on_a_layer_without_a_router_is_refused_before_anything_runs():
    from capture.interventions import sweep_scores

    model = tiny_model("mixtral")
    with pytest.raises(MaskError, match=r"no MoE router at decoder layer\(s\) \[9\] \(MoE layers: \[0, 1\]\)"):
        sweep_scores(model, seeded_tokens([4, 4], seed=1), [MaskSet("router", static={9: [0]}),
                                                             MaskSet("router", static={1: [0]})], batch_size=2)


def test_jobs_of_one_worker_take_the_model_one_at_a_time(tmp_path, monkeypatch):
    """Two sweep jobs on threads of one worker: the second waits for the first's patches to be undone."""
    import threading
    import time

    import capture.interventions as ci

    model = tiny_model("mixtral")
    monkeypatch.setattr(ci, "_MODELS", {})
    monkeypatch.setattr("capture.load.load_model", lambda *a, **k: model)
    tokens = seeded_tokens([6, 5, 7], seed=4)
    plain = {k: np.asarray(tokens[k].values) for k in ("sample", "position", "token_id")}
    inside, overlap = [], []
    real = ci.sweep_scores

    def traced(*a, **k):
        inside.append(1)
        overlap.append(len(inside))
        time.sleep(0.05)
        try:
            return real(*a, **k)
        finally:
            inside.pop()

    monkeypatch.setattr(ci, "sweep_scores", traced)
    masks = [{"kind": "router", "static": {1: [e]}, "drop_top": []} for e in range(3)]
    out = []
    threads = [threading.Thread(target=lambda: out.append(ci.sweep_job("m", plain, masks, batch_size=2)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(overlap) == 1 and len(out) == 2
    for a, b in zip(out[0]["scores"], out[1]["scores"]):
        np.testing.assert_array_equal(a["nll"], b["nll"])

