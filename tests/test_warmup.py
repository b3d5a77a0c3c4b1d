"""Warm-up / dummy batches: detection (storage/importers/warmup.py) and the shared exclusion step of imports."""

import json

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

import analyses
from storage import cube as cubes
from storage.importers import import_trace, importer_options
from storage.importers._core import Block, Collector, SampleMeta, Samples
from storage.importers.warmup import detect

E, K, LAYERS = 8, 2, [0, 1, 2]


def _random_routing(rng, n):
    """(layers, n, k) distinct ids and (layers, n, k) descending weights of random routing."""
    ids = np.argsort(rng.random((len(LAYERS), n, E)), axis=-1)[..., :K]
    w = -np.sort(-rng.dirichlet(np.ones(K), size=(len(LAYERS), n)), axis=-1).astype(np.float32)
    return ids, w


def _collect(tmp_path, samples, name="c"):
    """A Collector fed with ``samples``: [(n, ids (L, n, k), weights (L, n, k) or None, token ids or None)]."""
    def events():
        for i, (n, ids, w, tid) in enumerate(samples):
            yield Samples([SampleMeta(key=f"s{i}", n=n, token_id=tid)], where=f"sample {i}")
            for li, layer in enumerate(LAYERS):
                yield Block(layer=layer, where=f"sample {i}", ids=ids[li], weights=None if w is None else w[li])
    return Collector(tmp_path / name, num_experts=E).feed(events())


def _brute_runs(flag, min_run):
    """Runs of True at least min_run long, by walking the tokens one by one."""
    out, start = [], None
    for t, f in enumerate(list(flag) + [False]):
        if f and start is None:
            start = t
        elif not f and start is not None:
            if t - start >= min_run:
                out.append((start, t - 1))
            start = None
    return out


def test_three_signatures_and_short_runs(tmp_path):
    rng = np.random.default_rng(0)
    real = _random_routing(rng, 50)
    # a dummy batch: one routing, one weight vector, repeated for 40 tokens (ids vary by layer, not by token)
    const_ids = np.repeat(np.array([[[3, 5]], [[1, 2]], [[0, 7]]]), 40, axis=1)
    const_w = np.repeat(np.array([[[0.7, 0.3]]] * 3, dtype=np.float32), 40, axis=1)
    # fake routing: varying experts, every weight exactly 1/k
    fake_ids, _ = _random_routing(rng, 35)
    half = np.full((3, 35, K), 0.5, np.float32)
    short_ids = np.repeat(np.array([[[4, 6]]] * 3), 10, axis=1)  # constant but shorter than min_run
    short_w = np.repeat(np.array([[[0.6, 0.4]]] * 3, dtype=np.float32), 10, axis=1)
    samples = [
        (50, *real, rng.integers(1, 100, 50)),
        (40, const_ids, const_w, rng.integers(1, 100, 40)),
        (35, fake_ids, half, rng.integers(1, 100, 35)),
        (10, short_ids, short_w, rng.integers(1, 100, 10)),
        (33, *_random_routing(rng, 33), np.zeros(33, np.int64)),  # all-zero token ids
    ]
    found = detect([_collect(tmp_path, samples)], min_run=32)
    starts = np.cumsum([0] + [s[0] for s in samples])
    want = np.zeros(starts[-1], bool)
    for i in (1, 2, 4):
        want[starts[i]:starts[i + 1]] = True
    np.testing.assert_array_equal(found.mask, want)
    def criteria(t):  # of the flagged run holding token t (adjacent batches form one run)
        return next(c for a, b, c in found.runs if a <= t <= b)

    assert {"constant_routing", "uniform_weights"} <= set(criteria(starts[1])) and criteria(starts[1]) == criteria(starts[2])
    assert criteria(starts[4]) == ["zero_token_ids"]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 200), run=st.integers(0, 120), at=st.integers(0, 200),
       min_run=st.integers(2, 64))
def test_constant_run_flagged_exactly_when_long_enough(tmp_path_factory, seed, n, run, at, min_run):
    rng = np.random.default_rng(seed)
    ids, w = _random_routing(rng, n)
    at = min(at, n)
    if run:  # insert a run of `run` identical tokens at `at`
        ids = np.concatenate([ids[:, :at], np.repeat(ids[:, :1] * 0 + [[[2, 6]]], run, axis=1), ids[:, at:]], axis=1)
        w = np.concatenate([w[:, :at], np.repeat(np.full((3, 1, K), [0.8, 0.2], np.float32), run, axis=1),
                            w[:, at:]], axis=1)
    T = ids.shape[1]
    c = _collect(tmp_path_factory.mktemp("c"), [(T, ids, w, None)])
    found = detect([c], min_run=min_run)
    # reference: tokens equal to their neighbour at every layer, runs by a plain loop
    same = np.zeros(T, bool)
    for t in range(1, T):
        same[t] = all(set(ids[li, t]) == set(ids[li, t - 1]) and np.allclose(w[li, t], w[li, t - 1], atol=1e-6)
                      for li in range(3))
    flag = same.copy()
    flag[:-1] |= same[1:]
    want = np.zeros(T, bool)
    for a, b in _brute_runs(flag, min_run):
        want[a:b + 1] = True
    np.testing.assert_array_equal(found.mask, want)
    if run >= min_run:
        assert found.mask[at:at + run].all()


def test_checkpoints_must_agree_and_k_equal_e_is_never_constant(tmp_path):
    rng = np.random.default_rng(3)
    const = np.repeat(np.array([[[1, 4]]] * 3), 40, axis=1)
    a = _collect(tmp_path, [(40, const, None, None)], "a")
    b = _collect(tmp_path, [(40, *_random_routing(rng, 40)[:1], None, None)], "b")  # the same rows vary here
    assert detect([a], min_run=32).n_flagged == 40
    assert detect([a, b], min_run=32).n_flagged == 0  # one collapsed checkpoint deletes no tokens of the other
    full = np.repeat(np.array([[[0, 1]]] * 3), 40, axis=1)  # k = E = 2: every token selects every expert
    c = Collector(tmp_path / "k", num_experts=2).feed(iter(
        [Samples([SampleMeta("s", 40)], "s")] + [Block(layer=l, where="s", ids=full[i]) for i, l in enumerate(LAYERS)]))
    assert detect([c], min_run=32, num_experts=2).n_flagged == 0


def _megatron(folder, steps, *, dummy_first=64):
    """router_trace_rank0.jsonl: a dummy step (token ids 0, one routing) then real steps, with semantic_token_ids."""
    rng = np.random.default_rng(11)
    folder.mkdir(parents=True)
    truth = []
    with open(folder / "router_trace_rank0.jsonl", "w") as f:
        for s in range(steps):
            dummy = s == 0 and dummy_first
            n = dummy_first if dummy else 20
            tids = np.zeros(n, int) if dummy else rng.integers(1, 500, n)
            ids = []
            for layer in LAYERS:
                top = np.repeat([[layer % E, (layer + 3) % E]], n, axis=0) if dummy else \
                    np.argsort(rng.random((n, E)), axis=1)[:, :K]
                ids.append(top)
                f.write(json.dumps({"step": s, "layer": layer, "num_tokens": n, "topk": K,
                                    "top_indices": top.tolist(), "semantic_token_ids": tids.tolist()}) + "\n")
            truth.append((n, tids, np.stack(ids), bool(dummy)))
    return truth


def test_import_excludes_warmup_by_default_and_records_it(tmp_path):
    truth = _megatron(tmp_path / "ckpt", steps=4)
    out = tmp_path / "routing.zarr"
    s = import_trace("megatron", tmp_path / "ckpt", out, num_experts=E)
    assert s["warmup_excluded"] == 64 and s["tokens"] == 60 and s["samples"] == 3
    ds = cubes.open_routing(out)
    note = json.loads(ds.attrs["warmup_excluded"])
    assert note["tokens"] == 64 and note["whole_samples"] == 1 and note["excluded"]
    assert note["first_runs"][0]["first_sample"] == "step0" and note["first_runs"][0]["tokens"] == 64
    real = [t for t in truth if not t[3]]
    np.testing.assert_array_equal(ds["token_id"].values, np.concatenate([t[1] for t in real]))
    np.testing.assert_array_equal(ds["sample"].values, np.repeat([0, 1, 2], 20))
    got = ds["expert_ids"].isel(checkpoint=0).values
    ref = np.concatenate([t[2] for t in real], axis=1)
    np.testing.assert_array_equal(np.sort(got, -1), np.sort(ref, -1))

    kept = import_trace("megatron", tmp_path / "ckpt", tmp_path / "kept.zarr", num_experts=E, keep_warmup=True)
    assert kept["tokens"] == 124 and kept["warmup_excluded"] == 0
    dk = cubes.open_routing(tmp_path / "kept.zarr")
    assert json.loads(dk.attrs["warmup_excluded"])["excluded"] is False
    # the dummy batch inflates its two experts at layer 0 (0 and 3): the point of excluding it
    u_ex = analyses.run("usage", ds, n_boot=0, views=["all"]).usage_all.sel(view="all", layer=0).isel(checkpoint=0)
    u_in = analyses.run("usage", dk, n_boot=0, views=["all"]).usage_all.sel(view="all", layer=0).isel(checkpoint=0)
    assert float(u_in.sel(expert=0)) > 2 * float(u_ex.sel(expert=0))


def test_warmup_options_are_shared_and_checked(tmp_path):
    _megatron(tmp_path / "ckpt", steps=2)
    assert {"keep_warmup", "warmup_min_run"} <= set(importer_options("megatron"))
    assert "keep_warmup" not in importer_options("olmoe_counts")
    with pytest.raises(ValueError, match="keep_warmup='yes'"):
        import_trace("megatron", tmp_path / "ckpt", tmp_path / "a.zarr", keep_warmup="yes")
    with pytest.raises(ValueError, match="warmup_min_run=1"):
        import_trace("megatron", tmp_path / "ckpt", tmp_path / "a.zarr", warmup_min_run=1)
    # min_run above the dummy batch's 64 tokens keeps it
    s = import_trace("megatron", tmp_path / "ckpt", tmp_path / "b.zarr", warmup_min_run=65, num_experts=E)
    assert s["warmup_tokens"] == 0 and "warmup_excluded" not in xr.open_zarr(tmp_path / "b.zarr").attrs


def test_an_all_warmup_trace_is_refused(tmp_path):
    _megatron(tmp_path / "ckpt", steps=1)
    with pytest.raises(ValueError, match="every token looks like a warm-up"):
        import_trace("megatron", tmp_path / "ckpt", tmp_path / "a.zarr", num_experts=E)
    assert not (tmp_path / "a.zarr").exists()


def test_report_states_the_exclusion(tmp_path):
    from analyses.report import _import_note

    _megatron(tmp_path / "ckpt", steps=3)
    import_trace("megatron", tmp_path / "ckpt", tmp_path / "a.zarr", num_experts=E)
    note = _import_note("warmup_excluded", xr.open_zarr(tmp_path / "a.zarr").attrs["warmup_excluded"])
    assert note.startswith("Warm-up / dummy batches: 64 of 104 tokens (61.5 %) in 1 run(s), first at sample step0")
    assert "keep_warmup = true" in note


def test_tokens_without_routing_are_not_a_warmup_batch(tmp_path):
    """Tokens a source has no routing for (kept as -1 with Block.missing) repeat '-1', which is no routing."""
    rng = np.random.default_rng(5)
    ids, w = _random_routing(rng, 40)
    miss = np.ones(40, bool)

    def events():
        yield Samples([SampleMeta(key="s", n=40)], where="s")
        for li, layer in enumerate(LAYERS):
            yield Block(layer=layer, where="s", ids=ids[li], missing=miss)
    c = Collector(tmp_path / "m", num_experts=E).feed(events())
    assert (np.asarray(c.read("expert_ids", 0)) == -1).all()
    assert detect([c], min_run=32).n_flagged == 0
