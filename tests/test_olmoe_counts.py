"""OLMoE's expert_counts pickles: restricted unpickling, the counts cube, the analyses on it, FullReport."""

import json
import os
import pickle
import subprocess
from collections import Counter
from pathlib import Path

import luigi
import numpy as np
import pytest
import xarray as xr

import analyses
import tasks
from analyses.registry import skip_reason
from spec_helpers import import_experiment
from storage import cube as cubes
from storage.importers import TraceError, import_trace
from storage.importers.olmoe_counts import load_counts_pickle

E, K = 16, 4
LAYERS = [0, 7, 15]


def _routing(seed, n_tokens, bias):
    """(layers, tokens, k) top-k ids drawn per token with a domain preference (distinct ids per token)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in LAYERS:
        logits = rng.standard_normal((n_tokens, E)) + bias
        out.append(np.argsort(-logits, axis=1)[:, :K].astype(np.int64))
    return np.stack(out)


def write_counts(root: Path, domains: dict[str, np.ndarray], *, protocol=4, as_dict=False) -> Path:
    """OLMoE's layout: root/expert_counts/<domain>.pkl, a list of per-layer Counters keyed by numpy int64."""
    folder = root / "expert_counts"
    folder.mkdir(parents=True, exist_ok=True)
    for name, ids in domains.items():
        counters = [Counter(ids[li].ravel()) for li in range(ids.shape[0])]  # keys: numpy int64, as OLMoE's
        obj = dict(zip(LAYERS, counters)) if as_dict else counters
        with open(folder / f"{name}.pkl", "wb") as f:
            pickle.dump(obj, f, protocol=protocol)
    return root


@pytest.fixture
def two_domains():
    bias_code = np.zeros(E)
    bias_code[:3] = 1.5
    return {"github": _routing(1, 300, bias_code), "arxiv": _routing(2, 200, np.zeros(E))}


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_real_pickles_every_protocol(tmp_path, two_domains, protocol):
    root = write_counts(tmp_path / "olmoe", two_domains, protocol=protocol)
    obj = load_counts_pickle(root / "expert_counts" / "github.pkl")
    assert isinstance(obj, list) and all(isinstance(c, Counter) for c in obj)
    key = next(iter(obj[0]))
    assert isinstance(key, np.int64)  # the numpy scalar was rebuilt, not a stand-in
    ref = np.bincount(two_domains["github"][1].ravel(), minlength=E)
    assert [obj[1].get(e, 0) for e in range(E)] == ref.tolist()


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


@pytest.mark.parametrize("func,name", [(os.system, f"{os.system.__module__}.system"), (eval, "builtins.eval"),
                                       (subprocess.check_output, "subprocess.check_output")])
def test_malicious_pickle_is_refused_naming_file_and_global(tmp_path, func, name):
    marker = tmp_path / "ran"
    path = tmp_path / "expert_counts" / "evil.pkl"
    path.parent.mkdir()
    payload = f"open({str(marker)!r}, 'w').write('x')" if func is eval else ["touch", str(marker)]
    if func is os.system:
        payload = f"touch {marker}"
    with open(path, "wb") as f:
        pickle.dump([Counter({np.int64(1): 3}), _Evil(func, payload)], f, protocol=2)
    with pytest.raises(TraceError) as err:
        load_counts_pickle(path)
    assert str(path) in str(err.value) and name in str(err.value)
    assert not marker.exists()
    with pytest.raises(TraceError, match="refused to unpickle global"):
        import_trace("olmoe_counts", tmp_path, tmp_path / "routing.zarr", top_k=K)
    assert not marker.exists() and not (tmp_path / "routing.zarr").exists()


def test_object_dtype_scalar_and_crosslayer_files_are_refused(tmp_path):
    p = tmp_path / "x.pkl"
    p.write_bytes(pickle.dumps([Counter({np.array("a", dtype=object)[()]: 1})]))  # a plain str key, no numpy scalar
    with pytest.raises(TraceError, match="expected an integer expert id"):
        import_trace("olmoe_counts", p, tmp_path / "a.zarr", top_k=1)
    cross = tmp_path / "expert_counts_crosslayer" / "c4.pkl"
    cross.parent.mkdir()
    cross.write_bytes(pickle.dumps([Counter({(np.int64(1), np.int64(2)): 4})]))
    with pytest.raises(TraceError, match="crosslayer"):
        import_trace("olmoe_counts", cross, tmp_path / "b.zarr", top_k=1)


def _brute_force(domains):
    """(layer, domain, expert) slot counts by a loop over every slot, domains in sorted-name order."""
    names = sorted(domains)
    out = np.zeros((len(LAYERS), len(names), E), dtype=np.int64)
    for di, d in enumerate(names):
        for li in range(len(LAYERS)):
            for e in domains[d][li].ravel():
                out[li, di, int(e)] += 1
    return names, out


@pytest.mark.parametrize("as_dict", [False, True])
def test_counts_cube_and_analyses_match_brute_force(tmp_path, two_domains, as_dict):
    root = write_counts(tmp_path / "olmoe", two_domains, as_dict=as_dict)
    summary = import_trace("olmoe_counts", root, tmp_path / "routing.zarr", top_k=K,
                           layers=None if as_dict else LAYERS, num_experts=E)
    assert summary["layers"] == LAYERS and summary["top_k"] == K
    ds = cubes.open_routing(tmp_path / "routing.zarr")
    assert [n for n in ds.variables if not {"long_name", "units"} <= set(ds[n].attrs)] == []  # CF attrs (issue 13)
    names, ref = _brute_force(two_domains)
    got = ds["slot_counts"].isel(checkpoint=0).sel(domain=names).transpose("layer", "domain", "expert").values
    np.testing.assert_array_equal(got, ref)

    usage = analyses.run("usage", ds).compute()
    u = usage["usage"].isel(checkpoint=0).sel(view="all", domain=names).transpose("layer", "domain", "expert").values
    np.testing.assert_allclose(u, ref / ref.sum(-1, keepdims=True))
    np.testing.assert_array_equal(usage["tokens"].isel(checkpoint=0).sel(view="all", domain=names).values[0],
                                  [two_domains[d].shape[1] for d in names])
    assert "usage_lo" not in usage and "not available" in usage.attrs["intervals"]

    bal = analyses.run("balance", ds).compute()
    pooled = ref.sum(1) / ref.sum((1, 2))[:, None]
    cv = pooled.std(axis=1) / pooled.mean(axis=1)
    np.testing.assert_allclose(bal["cv"].isel(checkpoint=0).values, cv)
    assert "lb_loss" not in bal and "cv_lo" not in bal

    spec = analyses.run("specialization", ds).compute()
    lift = (ref / ref.sum(-1, keepdims=True)) / pooled[:, None, :]
    np.testing.assert_allclose(spec["lift"].isel(checkpoint=0).sel(domain=names).transpose("layer", "domain", "expert"),
                               lift)
    excess = ref - pooled[:, None, :] * ref.sum(-1, keepdims=True)
    np.testing.assert_allclose(spec["excess"].isel(checkpoint=0).sel(domain=names).transpose("layer", "domain", "expert"),
                               excess, atol=1e-9)
    # no samples: the test, MI and vocabulary statistics are NaN, never made up
    assert np.isnan(spec["p_value"]).all() and np.isnan(spec["mi"]).all() and not spec["significant"].any()
    # the code domain prefers experts 0-2 (its bias), seen as lift > 1
    assert (spec["lift"].sel(domain="github").isel(checkpoint=0, expert=[0, 1, 2]) > 1).all()

    for name in analyses.REGISTRY:
        reason = skip_reason(name, ds)
        assert (reason is None) == (name in ("usage", "balance", "specialization")), (name, reason)


def test_bad_counts_name_the_file(tmp_path, two_domains):
    root = write_counts(tmp_path / "olmoe", two_domains)
    with pytest.raises(TraceError, match="needs option top_k"):
        import_trace("olmoe_counts", root, tmp_path / "a.zarr")
    with pytest.raises(TraceError, match="not a multiple of top_k=3"):
        import_trace("olmoe_counts", root, tmp_path / "a.zarr", top_k=3)
    with pytest.raises(TraceError, match="option layers lists 2"):
        import_trace("olmoe_counts", root, tmp_path / "a.zarr", top_k=K, layers=[0, 1])
    bad = tmp_path / "short" / "expert_counts"
    bad.mkdir(parents=True)
    (bad / "c4.pkl").write_bytes(pickle.dumps([Counter({np.int64(0): 4}), Counter({np.int64(1): 8})]))
    with pytest.raises(TraceError, match=r"c4\.pkl: the layers count different numbers of slots"):
        import_trace("olmoe_counts", tmp_path / "short", tmp_path / "b.zarr", top_k=K)
    (bad / "c4.pkl").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(TraceError, match=r"c4\.pkl: not a readable pickle"):
        import_trace("olmoe_counts", tmp_path / "short", tmp_path / "b.zarr", top_k=K)
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


def _experiment(tmp_path, paths, *, port, run=("usage", "balance", "specialization", "change", "temporal")):
    trace = {"format": "olmoe_counts", "paths": [str(p) for p in paths], "options": {"top_k": K, "layers": LAYERS}}
    return import_experiment(tmp_path, trace, run=run, port=port, name="olmoe-counts")


@pytest.mark.slow
def test_fullreport_on_one_checkpoint_of_counts(tmp_path, two_domains):
    root = write_counts(tmp_path / "olmoe", two_domains)
    exp = _experiment(tmp_path, [root], port=18841)
    assert luigi.build([tasks.FullReport(experiment=str(exp))], local_scheduler=True, log_level="WARNING")
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert {"usage", "balance", "specialization"} <= set(summary["analyses"])
    skipped = summary["skipped"]
    assert set(skipped) == {"change", "temporal"}
    assert "aggregate counts only" in skipped["change"] and "per-token routing" in skipped["temporal"]
    assert summary["domains"] == {d: int(two_domains[d].shape[1]) for d in two_domains}
    html = (run / "report" / "index.html").read_text()
    assert html.count("Skipped:") == 2 and "Intervals" in html
    usage = xr.open_zarr(run / "analyses" / "usage.zarr")
    assert float(usage["usage_all"].sum("expert").mean()) == pytest.approx(1.0)


@pytest.mark.slow
def test_fullreport_on_one_domain_of_counts_skips_specialization(tmp_path, two_domains):
    root = write_counts(tmp_path / "olmoe", {"c4": two_domains["arxiv"]})
    exp = _experiment(tmp_path, [root / "expert_counts" / "c4.pkl"], port=18842, run=("usage", "specialization"))
    assert luigi.build([tasks.FullReport(experiment=str(exp))], local_scheduler=True, log_level="WARNING")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "usage" in summary["analyses"]
    assert "needs at least 2 distinct domain labels" in summary["skipped"]["specialization"]


def test_side_table_relabels_and_pools_domain_files(tmp_path, two_domains):
    root = write_counts(tmp_path / "olmoe", {**two_domains, "wikipedia": two_domains["arxiv"][:, :50]})
    side = {"github": {"domain": "code"}, "arxiv": {"domain": "prose"}, "wikipedia": {"domain": "prose"}}
    import_trace("olmoe_counts", root, tmp_path / "r.zarr", top_k=K, layers=LAYERS, side_table=side)
    ds = cubes.open_routing(tmp_path / "r.zarr")
    assert sorted(map(str, ds["domain"].values)) == ["code", "prose"]
    _, ref = _brute_force({"arxiv": two_domains["arxiv"], "wikipedia": two_domains["arxiv"][:, :50]})
    np.testing.assert_array_equal(ds["slot_counts"].isel(checkpoint=0).sel(domain="prose").values, ref.sum(1))
    with pytest.raises(TraceError, match=r"side table names domain file\(s\) \['news'\]"):
        import_trace("olmoe_counts", root, tmp_path / "s.zarr", top_k=K, side_table={"news": {"domain": "x"}})


def test_a_damaged_counts_cube_is_refused_on_open(tmp_path, two_domains):
    """The counts cube is sealed like every import (manifest, then complete): a cut chunk is found on open."""
    import_trace("olmoe_counts", write_counts(tmp_path / "olmoe", two_domains), tmp_path / "r.zarr", top_k=K)
    chunk = next(p for p in (tmp_path / "r.zarr" / "slot_counts").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[:5])
    with pytest.raises(cubes.CubeError, match="slot_counts"):
        cubes.open_routing(tmp_path / "r.zarr")
