"""analyses.training: gate diagnostics vs closed forms, run comparison vs brute force, ranks, composition."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from analyses.training import (
    compare_routing, composition, expert_load, gate_diagnostics, score_ranks, sunburst_rings,
)
from storage.schema import mock_cube


def _router(mats):
    """(run, step, layer, expert, hidden) DataArray from {run: {step: [layer matrices]}}."""
    runs = list(mats)
    steps = sorted({s for r in mats.values() for s in r})
    first = next(iter(next(iter(mats.values())).values()))
    L, (E, H) = len(first), first[0].shape
    arr = np.full((len(runs), len(steps), L, E, H), np.nan)
    for i, r in enumerate(runs):
        for s, layers in mats[r].items():
            arr[i, steps.index(s)] = np.stack(layers)
    return xr.DataArray(arr, dims=("run", "step", "layer", "expert", "hidden"),
                        coords={"run": runs, "step": steps, "layer": np.arange(L), "expert": np.arange(E)})


def test_gate_closed_forms():
    eye = np.eye(4, 6) * 2.0  # orthogonal rows, norm 2, singular values all 2 -> effective rank 4
    same = np.tile(np.array([[3.0, 4.0, 0, 0, 0, 0]]), (4, 1))  # identical rows, norm 5, rank 1
    ds = gate_diagnostics(_router({"a": {0: [eye], 10: [same]}, "b": {0: [same]}}))
    a0, a10 = ds.sel(run="a", step=0, layer=0), ds.sel(run="a", step=10, layer=0)
    assert float(a0.mean_row_norm) == pytest.approx(2.0)
    assert float(a0.cosine_mean) == pytest.approx(0.0) and float(a10.cosine_max) == pytest.approx(1.0)
    assert float(a0.effective_rank) == pytest.approx(4.0) and float(a10.effective_rank) == pytest.approx(1.0)
    assert float(a10.mean_row_norm_change) == pytest.approx(3.0)
    assert float(a10.effective_rank_change) == pytest.approx(-3.0)
    assert float(ds.sel(run="b", step=0, layer=0).effective_rank_change) == 0.0
    assert np.isnan(float(ds.sel(run="b", step=10, layer=0).effective_rank))
    assert ds.cosine_mean.attrs["units"] == "1"


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 6), st.integers(2, 9))
def test_gate_cosine_and_rank_against_reference(seed, E, H):
    w = np.random.default_rng(seed).normal(size=(E, H))
    ds = gate_diagnostics(_router({"r": {0: [w]}})).sel(run="r", step=0, layer=0)
    n = np.linalg.norm(w, axis=1)
    cos = [w[i] @ w[j] / (n[i] * n[j]) for i in range(E) for j in range(i + 1, E)]
    assert float(ds.cosine_mean) == pytest.approx(np.mean(cos))
    sv = np.linalg.svd(w, compute_uv=False)
    p = sv / sv.sum()
    assert float(ds.effective_rank) == pytest.approx(np.exp(-(p * np.log(p)).sum()))


def _brute_compare(a, b):
    ia, ib = a.expert_ids.values, b.expert_ids.values
    C, L, T, K = ia.shape
    top1 = np.zeros((C, L))
    ov = np.zeros((C, L))
    first = np.full((C, L), -1)
    for c in range(C):
        for l in range(L):
            for t in range(T):
                sa, sb = set(ia[c, l, t]), set(ib[c, l, t])
                top1[c, l] += ia[c, l, t, 0] == ib[c, l, t, 0]
                ov[c, l] += len(sa & sb) / K
                if sa != sb and first[c, l] < 0:
                    first[c, l] = t
    return top1 / T, ov / T, first


def test_compare_routing_brute_force():
    a = mock_cube(n_checkpoints=2, n_layers=3, n_samples=6, seq_len=8, seed=1, ragged=False, paired=False)
    b = a.copy(deep=True)
    ids = b.expert_ids.values.copy()
    rng = np.random.default_rng(2)
    flip = rng.random(ids.shape[:3]) < 0.3
    ids[flip] = ids[flip][:, ::-1]  # same set, other order: top-1 changes, set does not
    swap = rng.random(ids.shape[:3]) < 0.2
    ids[swap, 1] = (ids[swap, 0] + 1 + rng.integers(0, 6, swap.sum())) % 8
    ids[swap & (ids[..., 1] == ids[..., 0]), 1] = (ids[swap & (ids[..., 1] == ids[..., 0]), 0] + 1) % 8
    b["expert_ids"].values = ids
    got = compare_routing(a, b)
    top1, ov, first = _brute_compare(a, b)
    np.testing.assert_allclose(got.agreement_top1.values, top1)
    np.testing.assert_allclose(got.overlap.values, ov)
    np.testing.assert_array_equal(got.first_divergent_token.values, first)
    for c in range(2):
        t = int(got.first_divergence_token[c])
        assert t == first[c][first[c] >= 0].min()
        assert int(got.first_divergence_layer[c]) == int(a.layer.values[np.flatnonzero(first[c] == t)[0]])
        # where that token is, in the reader's terms
        assert str(got.first_divergence_sample.values[c]) == str(a.sample.values[t])
        assert int(got.first_divergence_position[c]) == int(a.position.values[t])
        assert str(got.first_divergence_text.values[c]) == str(a.token_text.values[t])
    same = compare_routing(a, a)
    assert (same.agreement_top1 == 1).all() and (same.first_divergence_token == -1).all()
    assert (same.first_divergence_position == -1).all() and (same.first_divergence_sample == "").all()


def test_compare_routing_refuses_other_tokens():
    a = mock_cube(n_checkpoints=1, n_layers=1, n_samples=3, seq_len=4, seed=0, ragged=False, paired=False)
    b = a.copy(deep=True)
    b = b.assign_coords(token_id=("token", b.token_id.values + 1))
    with pytest.raises(ValueError, match="token axes differ"):
        compare_routing(a, b)


def test_expert_load_counts_and_dead():
    ds = mock_cube(n_checkpoints=1, n_layers=1, num_experts=4, n_samples=4, seq_len=5, ragged=False, paired=False)
    ids = np.zeros_like(ds.expert_ids.values)
    ids[..., 0], ids[..., 1] = 0, 1  # experts 2 and 3 never chosen
    ds["expert_ids"].values = ids
    load = expert_load(ds)
    assert load.share.values[0, 0].tolist() == [0.5, 0.5, 0.0, 0.0]
    assert int(load.dead_experts[0, 0]) == 2 and float(load.max_share[0, 0]) == 0.5
    z = ds.router_logits.values[0, 0].astype(float)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    assert float(load.entropy[0, 0]) == pytest.approx(float((-(p * np.log(p)).sum(-1)).mean()), rel=1e-6)


def test_score_ranks():
    sc = xr.Dataset({"score": (("run", "step", "task", "metric"),
                               np.array([[[[0.5, 2.0]]], [[[0.7, 3.0]]], [[[0.5, np.nan]]]]))},
                    coords={"run": ["a", "b", "c"], "step": [1], "task": ["t"], "metric": ["acc", "nll"],
                            "higher_is_better": ("metric", [True, False])})
    r = score_ranks(sc)["rank"]
    assert r.sel(metric="acc").values.ravel().tolist() == [2, 1, 2]  # ties share the lower rank
    nll = r.sel(metric="nll").values.ravel()
    assert nll[:2].tolist() == [1, 2] and np.isnan(nll[2])


def test_composition_and_rings():
    comp = composition([
        {"domain": "code", "dataset": "train", "source": "a.py", "tokens": 30, "samples": 1},
        {"domain": "code", "dataset": "train", "source": "b.py", "tokens": 10, "samples": 1},
        {"domain": "code", "dataset": "eval", "source": "", "tokens": 10, "samples": 2},
        {"domain": "prose", "dataset": "train", "source": "x", "tokens": 50, "samples": 5},
        {"domain": "code", "dataset": "train", "source": "a.py", "tokens": 0, "samples": 1},
    ])
    assert int(comp.tokens.sum()) == 100 and int(comp.samples.sum()) == 10
    rings = sunburst_rings(comp, "tokens")
    assert [(l, round(w, 3)) for l, _, w in rings[0]] == [("code", 0.5), ("prose", 0.5)]
    assert [(l, round(w, 3)) for l, _, w in rings[1]] == [("eval", 0.1), ("train", 0.4), ("train", 0.5)]
    assert [l for l, _, _ in rings[2]] == ["(unrecorded)", "a.py", "b.py", "x"]
    for ring in rings:
        assert sum(w for _, _, w in ring) == pytest.approx(1.0)
    # children lie within their parents
    assert rings[2][1][1] >= rings[1][1][1] and rings[2][2][1] + rings[2][2][2] <= rings[1][1][1] + rings[1][1][2] + 1e-12
    with pytest.raises(ValueError, match="negative"):
        composition([{"domain": "d", "dataset": "x", "tokens": -1, "samples": 0}])


def _captured(monkeypatch):
    """Figures drawn by analyses.figures.training, kept open for inspection (savefig returns fake paths)."""
    from analyses.figures import plotting

    figs = {}

    def fake(fig, out_dir, stem, formats=("png",)):
        figs[stem] = fig
        return [Path(out_dir) / f"{stem}.{f}" for f in formats]

    monkeypatch.setattr(plotting, "savefig", fake)
    return figs


def test_sunburst_figure_from_known_inputs(monkeypatch, tmp_path):
    from analyses.figures import training as fig

    figs = _captured(monkeypatch)
    comp = composition([{"domain": "a", "dataset": "x", "source": "s", "tokens": 75, "samples": 1},
                        {"domain": "b", "dataset": "x", "source": "s", "tokens": 25, "samples": 3}])
    files = fig.sunburst(comp, tmp_path)
    assert [f.name for f in files] == ["data_composition.png"]
    left, right = figs["data_composition"].axes
    inner = [p for p in left.patches if abs(p.get_y() - 0.6) < 1e-9]  # ring 0 (domains) starts at radius 0.6
    assert sorted(round(p.get_width() / (2 * np.pi), 6) for p in inner) == [0.25, 0.75]
    inner_r = [p for p in right.patches if abs(p.get_y() - 0.6) < 1e-9]
    assert sorted(round(p.get_width() / (2 * np.pi), 6) for p in inner_r) == [0.25, 0.75]  # samples 1 : 3


def test_score_figures_from_known_inputs(monkeypatch, tmp_path):
    from analyses.figures import training as fig

    figs = _captured(monkeypatch)
    sc = xr.Dataset({"score": (("run", "step", "task", "metric"),
                               np.array([[[[0.5]], [[0.6]]], [[[0.4]], [[0.9]]]]))},
                    coords={"run": ["a", "b"], "step": [1, 2], "task": ["t"], "metric": ["acc"],
                            "higher_is_better": ("metric", [True])})
    sc["rank"] = score_ranks(sc)["rank"]
    files = fig.scores(sc, sc, tmp_path)
    assert {f.name for f in files} >= {"score_trends.png", "score_trends.pdf", "score_summary.pdf", "score_ranks.png"}
    trend = figs["score_trends"].axes[0]
    assert [list(l.get_ydata()) for l in trend.get_lines()] == [[0.5, 0.6], [0.4, 0.9]]
    heat = figs["score_ranks"].axes[0]
    assert [t.get_text() for t in heat.texts] == ["2", "1"]  # at the last step b (0.9) beats a (0.6)
    bars = figs["score_summary"].axes[1].patches
    assert [b.get_height() for b in bars] == [2.0, 1.0]


def test_diversity_figure_across_layers_and_datasets(monkeypatch, tmp_path):
    """Known per-layer, per-dataset diversity series: a row per run, last values against layer per dataset."""
    from analyses.figures import training as fig
    from storage.training import LogRecord, training_cube

    figs = _captured(monkeypatch)
    recs = [LogRecord(run, step, f"{d}/diversity_loss/layer_{l}", 0.1 * (l + 1) * (2 if d == "b" else 1) + step + r,
                      "x") for r, run in enumerate(("lb", "no_lb")) for step in (1, 2) for d in ("a", "b")
            for l in range(3)]
    recs.append(LogRecord("lb", 1, "loss", 2.0, "loss"))
    files = fig.diversity(training_cube(recs), tmp_path)
    assert [f.name for f in files] == ["diversity_losses.png"]
    axes = figs["diversity_losses"].axes
    assert len(axes) == 4  # 2 runs × (curves, across layers)
    assert len(axes[0].get_lines()) == 6  # 2 datasets × 3 layers, loss left out
    by_ds = {l.get_label(): (list(l.get_xdata()), list(l.get_ydata())) for l in axes[3].get_lines()}
    # no_lb (r = 1) at its last step 2: 0.1 (l + 1) · (1 or 2) + 2 + 1
    assert by_ds["a"][0] == [0, 1, 2] and by_ds["a"][1] == pytest.approx([3.1, 3.2, 3.3])
    assert by_ds["b"][1] == pytest.approx([3.2, 3.4, 3.6])
    assert fig.diversity(training_cube([LogRecord("r", 1, "loss", 1.0, "loss")]), tmp_path) == []


def test_logged_entropy_figure_and_its_summary_table(monkeypatch, tmp_path):
    """Entropy series a log records (per layer, two runs): the figure plots them, the CSV summary equals
    the known first / last / min / max / mean, and cross-entropy losses are not mistaken for them."""
    from analyses.figures import training as fig
    from analyses.training import series_summary
    from storage.training import LogRecord, training_cube

    figs = _captured(monkeypatch)
    vals = {(run, l): [2.0 - 0.1 * s * (l + 1) - r for s in range(4)] for r, run in enumerate(("lb", "no_lb"))
            for l in range(2)}
    recs = [LogRecord(run, 10 * s, f"train/router_entropy/layer_{l}", v[s], "x")
            for (run, l), v in vals.items() for s in range(4) if not (run == "no_lb" and s == 0)]
    recs.append(LogRecord("lb", 10, "loss", 3.0, "loss"))
    cube = training_cube(recs)
    ent = fig.family_metrics(cube, "entropy")
    assert len(ent) == 2 and not any("loss" in m for m in ent)
    assert [f.name for f in fig.logged_entropy(cube, tmp_path)] == ["logged_entropy.png"]
    assert len(figs["logged_entropy"].axes[0].get_lines()) == 2
    t = series_summary(cube, ent).set_index(["run", "layer"])
    for (run, l), v in vals.items():
        row = t.loc[(run, l)]
        got = v[1:] if run == "no_lb" else v
        assert (row["n"], row["first_step"], row["last_step"]) == (len(got), 40 - 10 * len(got), 30)
        assert [row[k] for k in ("first", "last", "min", "max", "mean")] == pytest.approx(
            [got[0], got[-1], min(got), max(got), np.mean(got)])


def test_side_by_side_section(tmp_path):
    """The report's block for an analysis of several runs: a column per run, each run's figures and numbers."""
    from analyses.figures.training_runs import side_by_side
    from storage import cube as cubes
    from storage.layout import RunLayout

    main, other = RunLayout(tmp_path / "main"), RunLayout(tmp_path / "other")
    cubes.write_result(xr.Dataset(attrs={"runs": ["lb", "no_lb"], "run_roots": [str(main.root), str(other.root)],
                                         "side_by_side": {"usage": ["no_lb"]}}),
                       main.analyses_dir / "training.zarr", fingerprint="x")
    cubes.write_result(xr.Dataset({"share": ("expert", [0.75, 0.25])}), other.analysis("usage"), fingerprint="y")
    # a result the stage did not list (left by an earlier configuration of that run) is not shown
    cubes.write_result(xr.Dataset({"share": ("expert", [0.5, 0.5])}), other.analysis("balance"), fingerprint="z")

    class FakeAnalysis:
        @staticmethod
        def figure(result, out, formats):
            out.mkdir(parents=True, exist_ok=True)
            (out / "usage_bars.png").write_bytes(b"png")
            return [out / "usage_bars.png"]

        @staticmethod
        def summary(result):
            return {"max_share": float(result.share.max()), "per": {"e0": float(result.share[0])}, "note": "text"}

    main_png = main.figures_dir / "usage" / "usage_bars.png"
    page, heads = side_by_side(main, "usage", FakeAnalysis, [main_png], ("png",), {"max_share": 0.5})
    assert heads == {"no_lb": {"max_share": 0.75, "per": {"e0": 0.75}, "note": "text"}}
    assert (main.figures_dir / "usage" / "runs" / "no_lb" / "usage_bars.png").is_file()
    assert "repeat(2," in page and "<strong>lb</strong>" in page and "<strong>no_lb</strong>" in page
    assert 'src="figures/usage/usage_bars.png"' in page and 'src="figures/usage/runs/no_lb/usage_bars.png"' in page
    # headline numbers side by side: main's, then the other run's; absent ones as a dash
    assert '<tr><th>max_share</th><td class="num">0.5</td><td class="num">0.75</td></tr>' in page
    assert '<tr><th>per › e0</th><td class="num">—</td><td class="num">0.75</td></tr>' in page
    # an analysis the other run did not compute: no block
    assert side_by_side(main, "balance", FakeAnalysis, [main_png]) == ("", {})
