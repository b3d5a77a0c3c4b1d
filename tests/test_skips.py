"""Imports with one checkpoint, one domain or unknown token ids; per-phase views; Megatron token ids."""

import json

import luigi
import numpy as np
import pytest

import analyses
import tasks
from analyses.registry import skip_reason
from spec_helpers import import_experiment
from storage import cube as cubes
from storage.importers import TraceError, import_trace
from storage.schema import mock_cube

E, K, LAYERS = 8, 2, [0, 1]


def test_skip_reasons_name_what_is_missing():
    one = mock_cube(n_checkpoints=1, n_layers=2, with_logits=False, with_lens=False)
    assert "at least 2" in skip_reason("change", one) and "1 complete checkpoint" in skip_reason("change", one)
    single = one.assign_coords(domain=("token", np.full(one.sizes["token"], "web", dtype=object)))
    reason = skip_reason("specialization", single)
    assert "at least 2 distinct domain labels" in reason and "['web']" in reason
    assert "expert_weights" in skip_reason("confidence", single.drop_vars("expert_weights"))
    assert skip_reason("usage", single) is None and skip_reason("specialization", one) is None
    with pytest.raises(ValueError, match="at least 2"):  # called directly, the analysis still refuses clearly
        analyses.run("change", one)


def _vocab_reference(ds, min_count):
    """vocab_input per (checkpoint, layer) by loops over the tokens whose id is known."""
    tid = ds["token_id"].values
    ids = ds["expert_ids"].values
    out = np.full(ids.shape[:2], np.nan)
    for c in range(ids.shape[0]):
        for li in range(ids.shape[1]):
            shares = []
            for t in np.unique(tid[tid >= 0]):
                rows = ids[c, li, tid == t]
                rows = rows[(rows >= 0).any(axis=1)]
                if len(rows) < min_count:
                    continue
                counts = np.bincount(rows[rows >= 0].ravel(), minlength=E)
                shares.append(counts.max() / len(rows))
            if shares:
                out[c, li] = np.mean(shares)
    return out


def test_vocabulary_statistics_ignore_unknown_token_ids():
    ds = mock_cube(n_checkpoints=1, n_layers=2, num_experts=E, with_logits=False, with_lens=False, seed=4)
    rng = np.random.default_rng(0)
    tid = ds["token_id"].values.copy()
    tid[rng.random(tid.size) < 0.3] = -1  # a third of the ids unknown
    part = ds.assign_coords(token_id=("token", tid))
    r = analyses.run("specialization", part, n_boot=0, n_shuffle=5, min_count=5).compute()
    np.testing.assert_allclose(r["vocab_input"].values, _vocab_reference(part, 5))
    # before: -1 was one more token type, the most frequent one; now it is no type at all
    as_type = analyses.run("specialization", part.assign_coords(token_id=("token", np.where(tid < 0, 10**6, tid))),
                           n_boot=0, n_shuffle=5, min_count=5).compute()
    assert (as_type["vocab_input_types"] == r["vocab_input_types"] + 1).all()
    none = ds.assign_coords(token_id=("token", np.full(tid.size, -1, np.int32)))
    r0 = analyses.run("specialization", none, n_boot=0, n_shuffle=5).compute()
    for v in ("vocab_input", "vocab_next", "vocab_input_floor", "vocab_component"):
        assert np.isnan(r0[v]).all(), v
    assert (r0["vocab_input_types"] == 0).all() and np.isfinite(r0["mi"]).all()


def _megatron(folder, *, steps=3, n=16, token_ids=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    tids = rng.integers(1, 1000, (steps, n))
    with open(folder / "router_trace_rank0.jsonl", "w") as f:
        for s in range(steps):
            for layer in LAYERS:
                top = np.argsort(rng.random((n, E)), axis=1)[:, :K]
                rec = {"step": s, "layer": layer, "num_tokens": n, "topk": K, "top_indices": top.tolist()}
                if token_ids:
                    rec["semantic_token_ids"] = tids[s].tolist()
                f.write(json.dumps(rec) + "\n")
    return tids


def test_megatron_semantic_token_ids_become_token_ids(tmp_path):
    tids = _megatron(tmp_path / "a")
    import_trace("megatron", tmp_path / "a", tmp_path / "a.zarr", num_experts=E)
    np.testing.assert_array_equal(cubes.open_routing(tmp_path / "a.zarr")["token_id"].values, tids.ravel())
    # micro batches: rows are [seq, batch] flattened, token ids follow the same unflattening
    import_trace("megatron", tmp_path / "a", tmp_path / "b.zarr", num_experts=E, micro_batch_size=2)
    got = cubes.open_routing(tmp_path / "b.zarr")["token_id"].values
    np.testing.assert_array_equal(got, np.concatenate([t.reshape(8, 2).T.ravel() for t in tids]))
    _megatron(tmp_path / "c", token_ids=False)
    import_trace("megatron", tmp_path / "c", tmp_path / "c.zarr", num_experts=E)
    assert (cubes.open_routing(tmp_path / "c.zarr")["token_id"].values == -1).all()
    lines = (tmp_path / "a" / "router_trace_rank0.jsonl").read_text().splitlines()
    rec = json.loads(lines[1])
    rec["semantic_token_ids"][0] += 1
    lines[1] = json.dumps(rec)
    (tmp_path / "a" / "router_trace_rank0.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError, match=r"line 2: field 'semantic_token_ids': differs from the token ids of .*line 1"):
        import_trace("megatron", tmp_path / "a", tmp_path / "d.zarr", num_experts=E)


def test_phase_views_match_a_token_subset():
    ds = mock_cube(n_checkpoints=2, n_layers=2, num_experts=E, with_logits=False, with_lens=False, seed=2)
    phase = np.where(ds["position"].values < 6, "prefill", "decode").astype(object)
    ds = ds.assign_coords(phase=("token", phase))
    u = analyses.run("usage", ds, n_boot=10).compute()
    assert [str(v) for v in u["view"].values] == ["all", "canonical", "last_canonical", "prefill", "decode"]
    ids = ds["expert_ids"].values
    for p in ("prefill", "decode"):
        sub = ids[:, :, phase == p]
        ref = np.stack([[np.bincount(sub[c, li].ravel(), minlength=E) / sub[c, li].size for li in range(2)]
                        for c in range(2)])
        np.testing.assert_allclose(u["usage_all"].sel(view=p).values, ref)
    # the phase-free views are unchanged by the extra classes
    plain = analyses.run("usage", ds.drop_vars("phase"), n_boot=10).compute()
    for v in ("all", "canonical", "last_canonical"):
        np.testing.assert_allclose(u["usage"].sel(view=v).values, plain["usage"].sel(view=v).values)
        np.testing.assert_allclose(u["usage_lo"].sel(view=v).values, plain["usage_lo"].sel(view=v).values)

    t = analyses.run("temporal", ds, n_boot=0).compute()
    sample = ds["sample"].values
    for p in ("prefill", "decode"):
        ok = (sample[1:] == sample[:-1]) & (phase[1:] == p) & (phase[:-1] == p)
        top1 = ids[..., 0]
        ref = (top1[..., 1:] == top1[..., :-1])[..., ok].mean(-1)
        np.testing.assert_allclose(t["top1_repeat_by_phase"].sel(view=p).values, ref)
    # one phase only: no per-phase views (they would repeat 'all')
    only = ds.assign_coords(phase=("token", np.full(phase.size, "prefill", dtype=object)))
    assert "prefill" not in analyses.run("usage", only, n_boot=0)["view"].values
    assert "top1_repeat_by_phase" not in analyses.run("temporal", only, n_boot=0)


@pytest.mark.slow
def test_fullreport_on_one_checkpoint_one_domain_import(tmp_path):
    """Before: FullReport failed ('change' needs 2 checkpoints, 'specialization' 2 domains). After: reasons."""
    _megatron(tmp_path / "trace", token_ids=False, steps=4)
    exp = import_experiment(tmp_path, {"format": "megatron", "paths": [str(tmp_path / "trace")], "num_experts": E},
                            run=["usage", "change", "specialization", "confidence", "temporal"], port=18843,
                            name="one-checkpoint")
    assert luigi.build([tasks.FullReport(experiment=str(exp))], local_scheduler=True, log_level="WARNING")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    skipped = summary["skipped"]
    assert set(skipped) == {"change", "specialization", "confidence"}
    assert "needs at least 2" in skipped["change"] and "1 complete checkpoint" in skipped["change"]
    assert "distinct domain labels" in skipped["specialization"]
    assert "expert_weights" in skipped["confidence"]
    assert {"usage", "temporal"} <= set(summary["analyses"])
    html = (tmp_path / "run" / "report" / "index.html").read_text()
    assert html.count("Skipped:") == 3
