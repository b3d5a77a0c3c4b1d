"""specialization's vectorised kernels against the direct loops they replace: the
vocabulary floor (expected_max_share) against one binomial CDF per (m, expert)
over the ±12 sd window, to 1e-12 relative; the shuffled-MI floor against one
bincount per (leading index, relabelling); type × expert counts against a loop
over tokens, in memory and lazily with token blocks."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from analyses import specialization as sp


# the plain definition kept beside the fast form in analyses/specialization.py is the reference
expected_max_share_direct = sp.expected_max_share_plain


def shuffled_mi_direct(counts, codes, n_groups):
    lead = counts.shape[:-2]
    S, E = counts.shape[-2:]
    x = counts.reshape(-1, S, E).astype(np.float64)
    out = np.full((x.shape[0], codes.shape[0]), np.nan)
    for g in range(x.shape[0]):
        for r in range(codes.shape[0]):
            table = np.zeros((n_groups, E))
            np.add.at(table, codes[r], x[g])
            if table.sum() > 0:
                p = table / table.sum()
                outer = p.sum(1, keepdims=True) * p.sum(0, keepdims=True)
                nz = p > 0
                out[g, r] = np.sum(p[nz] * np.log2(p[nz] / outer[nz]))
    return out.reshape(*lead, codes.shape[0])


def _rates(rng, kind, E):
    if kind == 0:
        return rng.dirichlet(np.ones(E)) * rng.uniform(1, 8)  # k·share: rates summing to ~k
    if kind == 1:
        return rng.dirichlet(np.full(E, 0.1)) * rng.uniform(0.5, 4)  # a few dominant experts, many near 0
    if kind == 2:
        return np.full(E, rng.uniform(0, 1))  # ties
    if kind == 3:
        return rng.uniform(0, 1, E) ** 3
    return 1 - rng.uniform(0, 1e-3, E) * rng.random()  # rates near 1


@pytest.mark.parametrize("seed", range(4))
def test_expected_max_share_matches_the_direct_sum(seed):
    rng = np.random.default_rng(seed)
    for it in range(25):
        kind = it % 5
        q = np.clip(_rates(rng, kind, int(rng.integers(1, 48))), 0, 1)
        if it % 6 == 0:
            q[rng.integers(q.size)] = 0.0
        n = rng.integers(0, int(10 ** rng.uniform(0.3, 4.5 if kind < 4 else 3)) + 1, size=int(rng.integers(1, 40)))
        want, got = expected_max_share_direct(n, q), sp.expected_max_share(n, q)
        if np.isnan(want):
            assert np.isnan(got)
            continue
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15), (n, q)


def test_expected_max_share_edge_cases(monkeypatch):
    for n, q in (([3], [1.0, 0.0]), ([4, 9], [1.0, 0.3]), ([5, 0, 7], [0.0, 0.0]), ([1, 1, 2], [0.5, 0.5]),
                 ([4], [0.999999, 0.5]), ([1], [0.3]), ([2, 2], [1e-300, 0.2])):
        n, q = np.array(n), np.array(q)
        assert sp.expected_max_share(n, q) == pytest.approx(expected_max_share_direct(n, q), rel=1e-12, abs=1e-15)
    assert np.isnan(sp.expected_max_share(np.array([], dtype=int), np.array([0.5])))
    assert np.isnan(sp.expected_max_share(np.array([3]), np.array([np.nan, 0.1])))
    # padded blocks split at a tiny budget give the same sums
    rng = np.random.default_rng(5)
    q, n = rng.dirichlet(np.ones(16)) * 2, rng.integers(0, 3000, size=60)
    whole = sp.expected_max_share(n, q)
    monkeypatch.setattr(sp, "_BLOCK_CELLS", 64)
    assert sp.expected_max_share(n, q) == pytest.approx(whole, rel=1e-14)


def test_shuffled_mi_matches_one_table_per_relabelling(monkeypatch):
    rng = np.random.default_rng(0)
    for it in range(12):
        S, E, D, R = (int(rng.integers(1, hi)) for hi in (80, 10, 5, 9))
        lead = tuple(int(v) for v in rng.integers(1, 3, size=it % 3))
        x = rng.poisson(rng.uniform(0, 4), size=(*lead, S, E))
        if it % 4 == 0:
            x.reshape(-1, S, E)[0] = 0  # an empty table: NaN
        codes = np.stack([rng.permutation(rng.integers(0, D, S)) for _ in range(R)])
        if it % 2:
            monkeypatch.setattr(sp, "_MEMBER_BUDGET", int(rng.integers(1, 3 * S)))  # several blocks of relabellings
        else:
            monkeypatch.undo()
        got, want = sp.shuffled_mi(x, codes, n_groups=D), shuffled_mi_direct(x, codes, D)
        assert got.shape == (*lead, R)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_type_counts_against_a_token_loop():
    rng = np.random.default_rng(1)
    C, L, T, K, E, n_types = 2, 3, 101, 2, 5, 7
    ids = rng.integers(-1, E, size=(C, L, T, K)).astype(np.int16)
    codes = rng.integers(-1, n_types, size=T)
    counts = np.zeros((C, L, n_types, E), dtype=np.int64)
    n = np.zeros((C, L, n_types), dtype=np.int64)
    for c in range(C):
        for l in range(L):
            for t in range(T):
                if codes[t] < 0:
                    continue
                slots = [e for e in ids[c, l, t] if e >= 0]
                for e in slots:
                    counts[c, l, codes[t], e] += 1
                n[c, l, codes[t]] += bool(slots)
    da = xr.DataArray(ids, dims=("checkpoint", "layer", "token", "k"),
                      coords={"layer": np.arange(L) + 4, "step": ("checkpoint", [10, 20])})
    for arr in (da, da.chunk({"checkpoint": 1, "layer": 2, "token": 17})):
        got_counts, got_n = sp.type_counts(arr, codes, n_types, E=E)
        assert got_counts.dims == ("checkpoint", "layer", "_type", "_expert")
        assert got_n.dims == ("checkpoint", "layer", "_type")
        assert (arr.chunks is None) == (got_counts.chunks is None)
        np.testing.assert_array_equal(got_counts.values, counts)
        np.testing.assert_array_equal(got_n.values, n)
        np.testing.assert_array_equal(got_n["step"].values, [10, 20])
