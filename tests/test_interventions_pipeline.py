"""Issue 15's pipeline: the [interventions] table, the sweeps' pure helpers, and tasks/interventions.py end to end."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from analyses import interventions as iv
from experiments.spec import SpecError, load_experiment
from pipeline_helpers import CONDITIONS, build, tiny_model  # noqa: F401  (fixture)

# ------------------------------------------------------------------ the spec


def _exp(tmp_path, body: str, analyses='["usage"]'):
    p = tmp_path / "e.toml"
    p.write_text(f'name = "x"\noutput_dir = "out"\n[analyses]\nrun = {analyses}\n[interventions]\nenabled = true\n{body}')
    return p


@pytest.mark.parametrize("body,analyses,match", [
    ("bogus = 1", '["usage"]', r"unknown key 'interventions.bogus'"),
    ('kinds = ["weights"]', '["usage"]', r"'interventions.kinds'"),
    ('rankings = ["lift:code"]', '["usage"]', r"ranks from the specialization analysis"),
    ('rankings = ["divergence:a_minus_b"]', '["usage"]', r"ranks from the divergence analysis"),
    ('rankings = ["popularity"]', '["usage"]', r"'popularity' is not a ranking"),
    ('random_seeds = 2', '["usage"]', r"random_seeds' must be in \[5, 1000\]"),
    ('n_values = [0, 2]', '["usage"]', r"n_values' must be distinct integers >= 1"),
    ('scopes = ["model"]', '["usage"]', r"'interventions.scopes'"),
    ("drop_top1 = false\ncausal = false\nrankings = []", '["usage"]', r"runs nothing"),
    ('rankings = ["points:nowhere.json"]', '["usage"]', r"no points file at .*nowhere.json"),
])
def test_bad_interventions_tables_are_refused_in_one_line(tmp_path, body, analyses, match):
    with pytest.raises(SpecError, match=match) as e:
        load_experiment(_exp(tmp_path, body, analyses))
    assert "\n" not in str(e.value) and str(tmp_path / "e.toml") in str(e.value)


def test_a_valid_interventions_table_loads(tmp_path):
    exp = load_experiment(_exp(tmp_path, 'rankings = ["usage:code", "lift", "importance"]\nn_values = [1, 3]',
                               '["usage", "specialization"]'))
    assert exp.interventions.rankings == ["usage:code", "lift", "importance"] and exp.interventions.n_values == [1, 3]
    names = iv.sweep_names(["router"], drop_top1=True, causal=True, rankings=exp.interventions.rankings,
                           random_seeds=5)
    assert list(names)[:4] == ["router.drop_top1", "router.single", "router.rank.usage-code", "router.rank.lift"]
    assert names["router.random"] == {"kind": "router", "sweep": "random", "ranking": "random", "seed": -1, "seeds": 5}


# ------------------------------------------------------------------ pure helpers

def test_points_files_in_every_accepted_form_give_the_same_order(tmp_path):
    import json

    order = [(1, 3), (0, 0), (1, 1)]
    forms = {"dicts": [{"layer": l, "expert": e, "value": 3.0 - i} for i, (l, e) in enumerate(order)],
             "pairs": [[l, e] for l, e in order], "triples": [[l, e, 10 - i] for i, (l, e) in enumerate(order)],
             "wrapped": {"points": [{"layer": l, "expert": e} for l, e in order]}}
    for name, doc in forms.items():
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps(doc))
        score = iv.read_points(f, layers=[0, 1], num_experts=4)
        assert np.isfinite(score).sum() == 3, name
        flat = np.argsort(-score.reshape(-1), kind="stable")[:3]
        assert [(int(x // 4), int(x % 4)) for x in flat] == order, name
        # top-n sets never reach the experts the file does not rank
        sets = iv.rank_masks(score, [0, 1], [1, 3, 4], scope="global")
        assert [m["n_masked"] for m in sets] == [1, 3]
    score = iv.read_points(tmp_path / "dicts.json", layers=[0, 1], num_experts=4)
    assert [m["static"] for m in iv.rank_masks(score, [0, 1], [1, 2], scope="layer")] == [{0: [0]}, {1: [3]},
                                                                                          {1: [3, 1]}]


@pytest.mark.parametrize("doc,match", [
    ("{not json", r"not JSON"),
    ('{"a": 1}', r"expected a non-empty list"),
    ("[]", r"expected a non-empty list"),
    ('[{"layer": 0}]', r"record 0: expected"),
    ('[[0, 1], ["0", 2]]', r"record 1: layer and expert must be integers"),
    ('[[0, 1], [5, 2]]', r"record 1: layer 5 has no router \(MoE layers: \[0, 1\]\)"),
    ('[[0, 9]]', r"record 0: expert 9 outside \[0, 4\)"),
    ('[[0, 1], [1, 2], [0, 1]]', r"record 2: \(layer 0, expert 1\) is listed twice"),
    ('[[0, 1, NaN]]', r"record 0: value must be a finite number"),
    ('[[0, 1, 0.5], [0, 2]]', r"record 1: values on some records only"),
    ('[[0, 1, 1e999]]', r"record 0: value must be a finite number"),
    ("[[0, 1, " + "9" * 400 + "]]", r"record 0: value must be a finite number"),
    ("[[0, 1, " + "9" * 5000 + "]]", r"not JSON"),
    ("[" * 100_000, r"not JSON"),
])
def test_damaged_points_files_are_refused_naming_the_record(tmp_path, doc, match):
    f = tmp_path / "p.json"
    f.write_text(doc)
    with pytest.raises(ValueError, match=match) as e:
        iv.read_points(f, layers=[0, 1], num_experts=4)
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_a_points_file_with_a_byte_order_mark_is_read(tmp_path):
    f = tmp_path / "p.json"
    f.write_bytes(b"\xef\xbb\xbf[[1, 2]]")
    assert iv.read_points(f, layers=[0, 1], num_experts=4)[1, 2] == 1.0


def test_a_points_ranking_is_read_relative_to_the_experiment_file(tmp_path):
    (tmp_path / "pts").mkdir()
    (tmp_path / "pts" / "last_token_agentic_points.json").write_text("[[0, 1]]")
    exp = load_experiment(_exp(tmp_path, 'rankings = ["points:pts/last_token_agentic_points.json"]', '["usage"]'))
    (r,) = exp.interventions.rankings
    assert r == f"points:{tmp_path / 'pts' / 'last_token_agentic_points.json'}"
    names = iv.sweep_names(["router"], drop_top1=False, causal=False, rankings=[r], random_seeds=5)
    assert names["router.rank.points-last_token_agentic_points"]["ranking"] == "points:last_token_agentic_points.json"



def test_observed_counts_equal_a_plain_loop():
    rng = np.random.default_rng(0)
    L, T, K, E = 3, 40, 2, 5
    ids = rng.integers(-1, E, size=(L, T, K))
    w = rng.random((L, T, K))
    tok_sample = np.repeat([3, 7, 9, 12], 10)
    samples = np.asarray([3, 9, 12])  # sample 7 not counted
    slots, weights = iv.observed(ids, w, tok_sample, samples, E)
    want_s, want_w = np.zeros((L, E, 3)), np.zeros((L, E, 3))
    for l in range(L):
        for t in range(T):
            if tok_sample[t] not in samples:
                continue
            j = int(np.flatnonzero(samples == tok_sample[t])[0])
            for k in range(K):
                if ids[l, t, k] >= 0:
                    want_s[l, ids[l, t, k], j] += 1
                    want_w[l, ids[l, t, k], j] += w[l, t, k]
    assert np.array_equal(slots, want_s) and np.allclose(weights, want_w)


def test_mask_sets_of_each_sweep_kind():
    layers, E = [0, 2], 4
    drop = iv.mask_sets({"kind": "router", "sweep": "drop_top1", "seed": -1}, layers=layers, num_experts=E)
    assert [m["mask"]["drop_top"] for m in drop] == [[0], [2]] and [m["scope"] for m in drop] == ["L0", "L2"]
    single = iv.mask_sets({"kind": "output", "sweep": "single", "seed": -1}, layers=layers, num_experts=E)
    assert [m["unit"] for m in single] == [f"L{l}E{e}" for l in layers for e in range(E)]
    assert single[5]["mask"] == {"kind": "output", "static": {2: [1]}, "drop_top": []}
    score = np.asarray([[0.1, 0.9, 0.2, 0.0], [0.5, np.nan, 0.3, 0.8]])
    ranked = iv.mask_sets({"kind": "router", "sweep": "mask", "ranking": "usage", "seed": -1}, layers=layers,
                          num_experts=E, n_values=[1, 2, 3], scopes=["global", "layer"], score=score)
    glob = [m for m in ranked if m["scope"] == "global"]
    assert [m["masked"] for m in glob] == ["L0E1", "L0E1 L2E3", "L0E1 L2E0 L2E3"]
    per_layer = [m for m in ranked if m["scope"] == "L2"]
    assert per_layer[1]["mask"]["static"] == {2: [3, 0]}  # NaN ranks last
    assert len({m["run"] for m in ranked}) == len(ranked)
    rnd = [iv.mask_sets({"kind": "router", "sweep": "random", "ranking": "random", "seed": -1, "seeds": 5},
                        layers=layers, num_experts=E, n_values=[1, 2]) for _ in range(2)]
    assert rnd[0] == rnd[1] and sorted({m["seed"] for m in rnd[0]}) == [0, 1, 2, 3, 4] and len(rnd[0]) == 10
    first = iv.random_ranking(E, layers, 0).reshape(-1).argmax()
    assert rnd[0][0]["masked"] == f"L{layers[first // E]}E{first % E}"


def _usage_result():
    rng = np.random.default_rng(1)
    u = rng.random((2, 2, 3, 4, 5))
    return xr.Dataset({"usage": (("checkpoint", "layer", "view", "domain", "expert"), u),
                       "usage_all": (("checkpoint", "layer", "view", "expert"), u.mean(3)),
                       "weighted_usage_all": (("checkpoint", "layer", "view", "expert"), u.max(3))},
                      coords={"checkpoint": ["a", "b"], "layer": [1, 3], "view": ["all", "x", "y"],
                              "domain": ["code", "data", "math", "prose"], "expert": np.arange(5)})


def test_ranking_scores_read_the_analyses_they_rank_from():
    usage = _usage_result()
    got = iv.ranking_score("usage:math", "b", layers=[1, 3], num_experts=5, usage=usage)
    assert np.array_equal(got, usage["usage"].sel(checkpoint="b", view="all", domain="math").values)
    got = iv.ranking_score("weighted_usage", "a", layers=[3, 1], num_experts=5, usage=usage)
    assert np.array_equal(got, usage["weighted_usage_all"].sel(checkpoint="a", view="all").values[::-1])
    lift = xr.Dataset({"lift": usage["usage"].isel(view=0, drop=True).transpose("checkpoint", "layer", "expert",
                                                                              "domain")})
    got = iv.ranking_score("lift", "a", layers=[1, 3], num_experts=5, specialization=lift)
    assert np.array_equal(got, usage["usage"].sel(checkpoint="a", view="all").max("domain").values)
    imp = xr.DataArray(np.arange(30.0).reshape(2, 5, 3), dims=("layer", "expert", "sample"),
                       coords={"layer": [1, 3]})
    assert np.array_equal(iv.ranking_score("importance", "a", layers=[1, 3], num_experts=5, importance=imp),
                          imp.sum("sample").values)
    r1, r2 = (iv.ranking_score("random", "a", layers=[1, 3], num_experts=5, seed=s) for s in (3, 3))
    assert np.array_equal(r1, r2)
    with pytest.raises(ValueError, match="no domain 'legal'"):
        iv.ranking_score("usage:legal", "a", layers=[1, 3], num_experts=5, usage=usage)
    with pytest.raises(ValueError, match="no checkpoint 'zz'"):
        iv.ranking_score("usage", "zz", layers=[1, 3], num_experts=5, usage=usage)


def test_divergence_rankings_follow_its_points_json_order():
    from analyses.divergence import mask_points

    rng = np.random.default_rng(2)
    diff = rng.normal(size=(1, 2, 2, 4))
    use = rng.random((1, 2, 2, 2, 4))
    div = xr.Dataset({"usage_diff": (("checkpoint", "layer", "view", "expert"), diff),
                      "usage": (("checkpoint", "layer", "view", "condition", "expert"), use)},
                     coords={"checkpoint": ["c"], "layer": [0, 1], "view": ["canonical", "last_canonical"],
                             "condition": ["A", "B"], "expert": np.arange(4)},
                     attrs={"condition_a": "A", "condition_b": "B"})
    for arg, key in (("a_minus_b", "A_minus_B"), ("b_minus_a", "B_minus_A"), ("usage_a", "A")):
        score = iv.ranking_score(f"divergence:{arg}", "c", layers=[0, 1], num_experts=4, divergence=div)
        order = [(p["layer"], p["expert"]) for p in mask_points(div, checkpoint="c")[key]]
        flat = np.argsort(-score.reshape(-1), kind="stable")
        assert [(int(f // 4), int(f % 4)) for f in flat] == order


def _fake_checkpoint(seed=0, S=12, layers=(0, 1), E=3):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 7, size=S)
    sample = np.repeat(np.arange(S), lengths)
    last = np.r_[sample[1:] != sample[:-1], True]

    def scores(shift):
        nll = rng.random(sample.size) + shift
        corr = (rng.random(sample.size) < 0.5).astype(float)
        nll[last] = np.nan
        corr[last] = np.nan
        return {"nll": nll, "correct": corr}

    doms = np.where(np.arange(S) % 3 == 0, "code", "prose")[sample]
    cond = np.where(np.arange(S) % 2 == 0, "A", "B")[sample]
    tokens = {"sample": sample, "position": np.concatenate([np.arange(n) for n in lengths]),
              "token_id": rng.integers(0, 50, sample.size), "domain": doms, "condition": cond}
    L = len(layers)
    slots = rng.integers(0, 5, size=(L, E, S)).astype(float)
    base = iv.baseline_dataset(scores(0.0), tokens, layers=list(layers), slots=slots, weights=slots * 0.5,
                               importance=rng.random((L, E, S)))
    sets = iv.mask_sets({"kind": "router", "sweep": "single", "seed": -1}, layers=list(layers), num_experts=E)
    per_unit = [scores(0.1 * (i + 1)) for i in range(len(sets))]
    drop = iv.mask_sets({"kind": "router", "sweep": "drop_top1", "seed": -1}, layers=list(layers), num_experts=E)
    per_drop = [scores(0.05) for _ in drop]
    return (base, [iv.sweep_dataset(per_unit, sets, sample), iv.sweep_dataset(per_drop, drop, sample)],
            per_unit, sample)


def test_checkpoint_cube_effects_and_rho_equal_a_direct_computation():
    from scipy.stats import spearmanr

    base, sweeps, per_unit, sample = _fake_checkpoint()
    cube = iv.checkpoint_cube(base, sweeps, n_boot=30, seed=1, conditions=("A", "B"))
    ok = np.isfinite(per_unit[0]["nll"])
    base_nll = np.nansum(base["nll"].values)
    n = float(base["n"].sum())
    eff = np.asarray([(np.nansum(u["nll"][ok]) - base_nll) / n for u in per_unit])
    np.testing.assert_allclose(cube["effect"].sel(domain="all").values.reshape(-1), eff)
    for m, var in (("usage", "slots"), ("importance", "importance")):
        measure = base[var].sum("sample").values.reshape(-1) / n
        np.testing.assert_allclose(cube["measure_value"].sel(measure=m).values.reshape(-1), measure)
        assert np.isclose(float(cube["rho"].sel(measure=m, domain="all")), spearmanr(measure, eff)[0])
    assert {"delta_usage", "weighted_usage"} <= set(map(str, cube["measure"].values))
    gap = cube["delta_nll_by_condition"].sel(condition="A") - cube["delta_nll_by_condition"].sel(condition="B")
    np.testing.assert_allclose(cube["condition_gap"].values, gap.values)
    assert cube["delta_nll"].attrs["units"] == "nat" and cube["masked"].sizes["run"] == 8


def test_combine_stacks_checkpoints_with_their_steps():
    parts = {}
    for i, (name, step) in enumerate((("s0", 0), ("s9", 9))):
        base, sweeps, _, _ = _fake_checkpoint(seed=i)
        parts[(name, step)] = (base, sweeps)
    cube = iv.combine(parts, n_boot=20)
    assert list(cube["checkpoint"].values) == ["s0", "s9"] and list(cube["step"].values) == [0, 9]
    assert cube["delta_nll"].dims[0] == "checkpoint" and "rho" in cube and cube.attrs["chance"].startswith("0")


def test_combine_keeps_the_labels_of_a_run_the_first_checkpoint_lacks():
    """A top-n one checkpoint's ranking could not fill: NaN values there, the labels the other gives it."""
    parts = {}
    for i, (name, step) in enumerate((("s0", 0), ("s9", 9))):
        base, sweeps, _, _ = _fake_checkpoint(seed=i)
        if i == 0:
            sweeps = [sweeps[0], sweeps[1].isel(run=slice(1, None))]
        parts[(name, step)] = (base, sweeps)
    cube = iv.combine(parts, n_boot=20)
    first = str(parts[("s9", 9)][1][1]["run"].values[0])
    run = cube.sel(run=first)
    assert str(run["intervention"].values) == "drop_top1" and str(run["scope"].values) == "L0"
    assert int(run["n_masked"]) == 1 and np.isnan(run["delta_nll"].sel(checkpoint="s0", domain="all"))
    assert str(run["masked"].sel(checkpoint="s0").values) == "" and str(run["masked"].sel(checkpoint="s9").values)
    for k in ("intervention", "ranking", "scope", "unit", "n_masked", "seed"):
        assert not cube[k].isnull().any(), k


def test_rank_masks_never_masks_what_the_ranking_does_not_rank():
    score = np.array([[np.inf, 1.0, 2.0, np.nan]])
    sets = iv.rank_masks(score, [0], [1, 2, 3], scope="global")
    assert [m["static"] for m in sets] == [{0: [2]}, {0: [2, 1]}]
    assert [m["static"] for m in iv.rank_masks(score, [0], [2, 3], scope="layer")] == [{0: [2, 1]}]


def test_select_tokens_keeps_the_first_samples_of_each_group():
    sample = np.repeat(np.arange(8), 2)
    dataset = np.repeat(["a", "a", "a", "b", "b", "b", "b", "b"], 2)
    domain = np.repeat(["x", "y", "x", "z", "z", "z", "w", "w"], 2)
    keep = iv.select_tokens(sample, [dataset, domain], 1)
    assert sorted(set(sample[keep])) == [0, 1, 3, 6]
    assert iv.select_tokens(sample, [dataset, domain], 0).all()


# ------------------------------------------------------------------ the stages, end to end on the tiny demo


def test_interventions_stage_end_to_end_and_a_new_ranking_reruns_only_its_sweeps(tmp_path, tiny_model):  # noqa: F811
    import shutil

    import tasks
    from experiments.tiny import tiny_experiment
    from storage import cube as cubes
    from storage.ownership import MARKER
    from tasks.interventions import InterventionSweep, Interventions

    run = tmp_path / "run"
    shutil.copytree(tiny_model, run / "model")
    shutil.copy2(tiny_model.parent / MARKER, run / MARKER)
    table = {"enabled": True, "checkpoints": ["last"], "rankings": ["usage"], "n_values": [1, 2], "max_samples": 3,
             "n_boot": 20}
    exp = tmp_path / "tiny.toml"

    def write(t):
        exp.write_text(tiny_experiment(run, analyses=("usage",), port=18961, conditions=CONDITIONS, interventions=t))
        tasks._experiment.cache_clear()

    write(table)
    ok, errors = build(exp, [Interventions(experiment=str(exp))])
    assert ok, errors
    layout = tasks._layout(tasks._experiment(str(exp)))
    cube = cubes.open_result(layout.intervention("interventions"))
    assert list(cube["step"].values) == [12]  # "last"
    assert set(map(str, cube["intervention"].values)) == {"drop_top1", "single", "mask"}
    assert set(map(str, cube["ranking"].values)) >= {"usage", "random", "own top-1"}
    assert np.isfinite(cube["delta_nll"].sel(domain="all").values).all()
    assert {"condition_gap", "rho", "effect"} <= set(cube.data_vars)
    import json

    from capture.interventions import MASK_ATTRS

    assert json.loads(cube.attrs["masks"]) == {"router": MASK_ATTRS["router"]}
    passes = cube.attrs["forward_passes_total"]
    assert passes == sum(sum(v.values()) for v in json.loads(cube.attrs["forward_passes"]).values()) > 0
    # the single-expert sweep's effects are what the sweep store's per-sample sums give
    last = cube["checkpoint"].values[-1]
    single = cubes.open_result(layout.intervention(f"{last}/router.single"))
    base = cubes.open_result(layout.intervention(f"{last}/baseline"))
    want = (single["nll"].sum("sample") - base["nll"].sum()) / base["n"].sum()
    np.testing.assert_allclose(cube["effect"].sel(checkpoint=last, domain="all").values.reshape(-1), want.values)
    # the single-expert sets of each later layer shared one job that reused the states before that layer
    jobs = json.loads(single.attrs["hidden_state_reuse"])
    assert [j["reuse"] for j in jobs] == [j["sets"] > 1 for j in jobs] and any(j["reuse"] for j in jobs)
    assert 0 < cube.attrs["forward_equivalents_total"] < passes
    stamps = {p: p.stat().st_mtime_ns for p in (layout.root / "interventions").rglob("zarr.json")
              if p.parent.suffix == ".zarr"}
    # a ranking written elsewhere (seed 001's points.json), relative to the experiment file
    E = int(base.sizes["expert"])
    layer = int(base["layer"].values[-1])
    (tmp_path / "pts.json").write_text(json.dumps([{"layer": layer, "expert": E - 1 - e, "value": 1.0 - e / 10}
                                                   for e in range(3)]))
    write(dict(table, rankings=["usage", "importance", "points:pts.json"]))
    pending = [t for t in [InterventionSweep(experiment=str(exp), checkpoint=str(c), sweep=s)
                           for c in cube["checkpoint"].values
                           for s in tasks.interventions.sweeps(tasks._experiment(str(exp)))] if not t.complete()]
    assert sorted({t.sweep for t in pending}) == ["router.rank.importance", "router.rank.points-pts"]
    ok, errors = build(exp, [Interventions(experiment=str(exp))])
    assert ok, errors
    changed = {p for p, t in stamps.items() if p.exists() and p.stat().st_mtime_ns != t}
    assert {p.parent.name for p in changed} == {"interventions.zarr"}
    ranked = set(map(str, cubes.open_result(layout.intervention("interventions"))["ranking"].values))
    assert {"importance", "points:pts.json"} <= ranked
    pts = cubes.open_result(layout.intervention(f"{last}/router.rank.points-pts"))
    masked = dict(zip(pts["n_masked"].values.tolist(), map(str, pts["masked"].values)))
    assert masked[1] == f"L{layer}E{E - 1}" and masked[2] == f"L{layer}E{E - 2} L{layer}E{E - 1}"


def test_vectorised_spearman_rows_equal_the_row_by_row_loop():
    from analyses.interventions import _spearman, _spearman_rows

    rng = np.random.default_rng(0)
    x, y = rng.random((40, 16)), rng.integers(0, 4, (40, 16)).astype(float)  # ties in y
    x[3] = 1.0  # constant row
    y[5, 2] = np.nan
    x[7, :5] = x[7, 5]
    got = _spearman_rows(x, y)
    want = np.asarray([_spearman(x[i], y[i]) for i in range(40)])
    np.testing.assert_allclose(got, want)
    assert np.isnan(got[3]) and np.isfinite(got[5])


def test_condition_gap_interval_equals_a_replicate_loop():
    """The gap's CI: per replicate, ΔNLL per token of A minus of B, from the by-condition draws."""
    from analyses.bootstrap import bootstrap_weights

    base, sweeps, _, _ = _fake_checkpoint()
    cube = iv.checkpoint_cube(base, sweeps, n_boot=40, seed=3, conditions=("A", "B"))
    cond = np.asarray(base["condition"].values).astype(str)
    sel = np.flatnonzero(np.isin(cond, ["A", "B"]))
    w = bootstrap_weights(sel.size, 40, 3, strata=cond[sel])
    run = sweeps[0].isel(run=0)
    d = (run["nll"].values - base["nll"].values)[sel]
    n = base["n"].values[sel]
    reps = []
    for b in range(40):
        per = {c: (w[b] * d)[cond[sel] == c].sum() / (w[b] * n)[cond[sel] == c].sum() for c in "AB"}
        reps.append(per["A"] - per["B"])
    lo, hi = np.quantile(reps, [0.025, 0.975])
    gap = cube["condition_gap"].isel(run=0)
    assert np.isclose(float(cube["condition_gap_lo"].isel(run=0)), lo)
    assert np.isclose(float(cube["condition_gap_hi"].isel(run=0)), hi)
    assert lo <= float(gap) <= hi and cube["condition_gap"].attrs["long_name"] == "ΔNLL under condition A minus under B"
