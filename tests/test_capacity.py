"""Capacity drops and the weight self-test in the run.

* ``capture.job`` writes each checkpoint's per-token weight-sum self-test into
  the routing cube attr ``weight_self_test`` (JSON keyed by checkpoint); checked
  against the weight sums read back from the cube, on a tiny Mixtral
  (renormalised: sums 1) and a tiny OLMoE (top-k of a full softmax: sums < 1).
* ``analyses.capacity`` on a real tiny Switch Transformers capture equals
  ``capture.capacity.drop_accounting`` (loops over the cube) and a brute-force
  bootstrap; it is skipped with a stated reason on cubes without drops.
"""

from __future__ import annotations

import json
import os
import threading
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import transformers
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

import analyses
from analyses import bootstrap as bs
from analyses.registry import skip_reason
from capture.capacity import drop_accounting
from capture.families import tiny_model
from capture.job import WEIGHT_SELF_TEST_ATTR, build_template, capture_into_cube, weight_self_test
from capture.load import ModelInfo
from capture.run import capture_model
from capture_helpers import ListSink, seeded_tokens
from cube_helpers import lazy, small_cube
from storage import cube as cubes
from storage.schema import empty_routing, mock_cube

transformers.logging.set_verbosity_error()

VOCAB = 100
LENGTHS = [5, 9, 2, 12, 7]


def _tokens(lengths=LENGTHS, seed=0, vocab=VOCAB):
    return seeded_tokens(lengths, seed, high=vocab)


# --------------------------------------------------------------------------- weight self-test in the cube attrs

def _save(config, path, seed):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.mul_(20.0)  # sharpen the near-uniform random routers: sums then spread visibly
    model.save_pretrained(path)
    return path


def _cube_with_checkpoints(tmp_path, config, names):
    ckpts = [SimpleNamespace(name=n, step=100 * i, path=str(_save(config, tmp_path / n, seed=i)))
             for i, n in enumerate(names)]
    table = tmp_path / "tokens.zarr"
    cubes.write_result(_tokens(), table, fingerprint="test")
    template = build_template([str(table)], checkpoints=ckpts, keep_logits=False)
    routing = tmp_path / "routing.zarr"
    cubes.prepare_routing(routing, template)
    return ckpts, routing


def _common():
    return dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                max_position_embeddings=64, intermediate_size=64, num_hidden_layers=2, num_experts_per_tok=2)


def _observed_sums(routing, checkpoint):
    ds = cubes.open_routing(routing)
    w = ds["expert_weights"].sel(checkpoint=checkpoint).values.astype(np.float64)
    ids = ds["expert_ids"].sel(checkpoint=checkpoint).values
    assert (ids >= 0).all()
    s = w.sum(-1)  # (layer, token): what the experts received per token
    return s.min(), s.max(), ds.attrs


def test_mixtral_self_test_in_the_attrs_says_renormalised_sums_of_one(tmp_path):
    ckpts, routing = _cube_with_checkpoints(
        tmp_path, transformers.MixtralConfig(num_local_experts=8, **_common()), ["early", "late"])
    # two checkpoints: each job merges its own entry into the one attr
    for c in ckpts:
        out = capture_into_cube(c.path, str(routing), c.name, batch_size=3, progress=False)
        assert out["weight_self_test"] == "consistent"
    attrs = cubes.open_routing(routing).attrs
    tests = json.loads(attrs[WEIGHT_SELF_TEST_ATTR])
    assert sorted(tests) == ["early", "late"]
    for c in ckpts:
        lo, hi, _ = _observed_sums(routing, c.name)
        got = tests[c.name]
        assert got["weight_sum_min"] == pytest.approx(lo, abs=1e-6)
        assert got["weight_sum_max"] == pytest.approx(hi, abs=1e-6)
        assert abs(lo - 1) < 1e-5 and abs(hi - 1) < 1e-5
        assert got["claim"] == "renormalised" and got["sums_constant"] is True and got["verdict"] == "consistent"


def test_olmoe_self_test_in_the_attrs_says_sums_below_one(tmp_path):
    # OLMoE without norm_topk_prob: the k weights are the top-k of a softmax over all experts
    ckpts, routing = _cube_with_checkpoints(
        tmp_path, transformers.OlmoeConfig(num_experts=8, norm_topk_prob=False, **_common()), ["only"])
    capture_into_cube(ckpts[0].path, str(routing), "only", batch_size=4, progress=False)
    got = json.loads(cubes.open_routing(routing).attrs[WEIGHT_SELF_TEST_ATTR])["only"]
    lo, hi, _ = _observed_sums(routing, "only")
    assert got["weight_sum_min"] == pytest.approx(lo, abs=1e-6)
    assert got["weight_sum_max"] == pytest.approx(hi, abs=1e-6)
    assert hi < 1 - 1e-3 and hi - lo > 1e-2, "the tiny model's sums must vary for the test to mean anything"
    assert got["claim"] == "not renormalised" and got["sums_constant"] is False and got["verdict"] == "consistent"


def _info(**kw):
    base = dict(family="f", moe_layers=[0], num_experts=8, top_k=2, router_semantics="s", shared_experts=0,
                dtype="float32", vocab_size=10)
    return ModelInfo(**{**base, **kw})


@pytest.mark.parametrize(("kw", "verdict"), [
    (dict(renormalised_claim=True, weight_sum_min=0.7, weight_sum_max=1.0), "contradicts the router semantics"),
    (dict(renormalised_claim=False, weight_sum_min=1.0, weight_sum_max=1.0), "contradicts the router semantics"),
    (dict(renormalised_claim=False, weight_sum_min=1.0, weight_sum_max=1.0, top_k=1), "consistent"),
    (dict(renormalised_claim=True, weight_sum_min=2.5, weight_sum_max=2.5), "consistent"),  # a scaling factor
    (dict(renormalised_claim=None, weight_sum_min=0.2, weight_sum_max=0.9), "not tested: the router semantics"),
    (dict(renormalised_claim=True, weight_sum_min=0.0, weight_sum_max=1.0, capacity={"expert_capacity": 2}),
     "not tested: capacity"),
    (dict(renormalised_claim=True), "not tested: no routing weight"),
])
def test_self_test_verdicts(kw, verdict):
    got = weight_self_test(_info(**kw), n_tokens=10)
    assert got["verdict"].startswith(verdict)
    json.dumps(got, allow_nan=False)


def test_concurrent_json_merges_keep_every_checkpoint(tmp_path):
    routing = tmp_path / "routing.zarr"
    cubes.prepare_routing(routing, empty_routing(_tokens(), checkpoints=[f"c{i}" for i in range(8)],
                                                 steps=list(range(8)), layers=[0], num_experts=4, top_k=1,
                                                 keep_logits=False, attrs={"model_family": "m", "source": "t",
                                                                           "router_semantics": "s"}, lazy=True))
    threads = [threading.Thread(target=cubes.set_routing_attrs,
                                args=(routing, {}), kwargs={"merge_json": {"weight_self_test": {f"c{i}": i}}})
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert json.loads(cubes.open_routing(routing, complete_only=False).attrs["weight_self_test"]) == {
        f"c{i}": i for i in range(8)}
    cubes.set_routing_attrs(routing, {"plain": "x"})
    with pytest.raises(ValueError, match="'plain' is not a JSON object"):
        cubes.set_routing_attrs(routing, {}, merge_json={"plain": {"a": 1}})


# --------------------------------------------------------------------------- the capacity analysis

@pytest.fixture(scope="module")
def switch_cube():
    """Two tiny Switch Transformers checkpoints captured over samples long enough to overflow capacity."""
    tokens = _tokens([5, 8, 3, 20, 14, 1, 17], seed=1)
    got, info = [], None
    for seed in (0, 1):
        sink = ListSink()
        info = capture_model(tiny_model("switch_transformers", seed=seed), tokens, sink, progress=False, batch_size=3)
        got.append(sink.result())
    ds = empty_routing(tokens, checkpoints=["a", "b"], steps=[0, 10], layers=list(info.moe_layers),
                       num_experts=info.num_experts, top_k=info.top_k, keep_logits=False, keep_capacity=True,
                       attrs={"model_family": info.family, "router_semantics": info.router_semantics,
                              "source": "test capture"}, lazy=False)
    for c, g in enumerate(got):
        for v in ("expert_ids", "expert_weights", "capacity_dropped"):
            ds[v].values[c] = g[v]
    assert (ds["capacity_dropped"].values == 1).any(), "no drop: the comparison would be vacuous"
    return ds


def test_capacity_equals_drop_accounting_on_a_switch_capture(switch_cube):
    ref = drop_accounting(switch_cube)
    P = int(switch_cube["position"].max()) + 1
    got = analyses.run("capacity", switch_cube, position_bins=P, n_boot=0)
    # one bucket per position when there are as many buckets as positions
    np.testing.assert_array_equal(got["position_start"].values, np.arange(P))
    np.testing.assert_array_equal(got["dropped_by_position"].values, ref["dropped_by_position"].values)
    np.testing.assert_array_equal(got["slots_by_position"].values, ref["slots_by_position"].values)
    np.testing.assert_allclose(got["drop_rate_by_position"].values, ref["drop_rate_by_position"].values)
    np.testing.assert_array_equal(got["dropped_by_expert"].values, ref["dropped_by_expert"].values)
    np.testing.assert_allclose(got["drop_rate"].values, ref["drop_rate"].values)
    # per chosen expert: dropped over the slots that chose it (brute force over the cube)
    ids, flag = switch_cube["expert_ids"].values, switch_cube["capacity_dropped"].values
    for c in range(2):
        for layer in range(ids.shape[1]):
            for e in range(switch_cube.sizes["expert"]):
                chose = ids[c, layer] == e
                want = (flag[c, layer][chose] == 1).mean() if chose.any() else np.nan
                np.testing.assert_allclose(got["drop_rate_by_expert"].values[c, layer, e], want)
    # a dask-backed cube gives the same result without reading it while the graph is built
    xr.testing.assert_allclose(analyses.run("capacity", lazy(switch_cube), position_bins=P, n_boot=0).compute(), got)


def test_capacity_bootstrap_matches_brute_force(switch_cube):
    n_boot, seed = 50, 3
    got = analyses.run("capacity", switch_cube, n_boot=n_boot, seed=seed, position_bins=4)
    sample = switch_cube["sample"].values
    labels = np.unique(sample)
    flag = switch_cube["capacity_dropped"].values[..., 0]  # top-1: one slot per token
    dropped = np.stack([(flag[..., sample == s] == 1).sum(-1) for s in labels], -1)  # (C, L, S)
    slots = np.stack([(flag[..., sample == s] >= 0).sum(-1) for s in labels], -1)
    w = np.random.default_rng(seed).integers(0, len(labels), size=(n_boot, len(labels)))
    counts = np.stack([np.bincount(row, minlength=len(labels)) for row in w])  # (boot, S)
    reps = np.einsum("cls,bs->clb", dropped, counts) / np.einsum("cls,bs->clb", slots, counts)
    np.testing.assert_allclose(got["drop_rate_lo"].values, np.quantile(reps, 0.025, axis=-1))
    np.testing.assert_allclose(got["drop_rate_hi"].values, np.quantile(reps, 0.975, axis=-1))
    assert bs.bootstrap_weights(len(labels), n_boot, seed).tolist() == counts.tolist()


def test_capacity_is_skipped_without_capacity_dropped():
    ds = small_cube(n_checkpoints=1)
    reason = skip_reason("capacity", ds)
    assert reason and "capacity_dropped" in reason
    with pytest.raises(ValueError, match="capacity_dropped"):
        analyses.run("capacity", ds)
    assert skip_reason("capacity", small_cube(n_checkpoints=1, capacity_factor=1.0)) is None


def test_capacity_refuses_flags_outside_the_schema():
    ds = small_cube(n_checkpoints=1, capacity_factor=1.0)
    ds["capacity_dropped"].values[0, 1, 4, 0] = 3
    with pytest.raises(ValueError, match="capacity_dropped outside -1..1.*layer 1"):
        analyses.run("capacity", ds, n_boot=0)


def _replayed_drops(ds, factor):
    """The capacity rule replayed token by token: a dict per (sample, expert) of slots taken so far."""
    E, K = ds.sizes["expert"], ds.sizes["k"]
    sample = ds["sample"].values
    lengths = np.bincount(sample)
    ids = ds["expert_ids"].values
    out = np.zeros(ids.shape, dtype=np.int8)
    for c in range(ids.shape[0]):
        for layer in range(ids.shape[1]):
            taken = {}
            for t in range(ids.shape[2]):
                cap = int(np.ceil(factor * lengths[sample[t]] * K / E))
                for j in range(K):
                    key = (sample[t], ids[c, layer, t, j])
                    out[c, layer, t, j] = taken.get(key, 0) >= cap
                    taken[key] = taken.get(key, 0) + 1
    return out


@settings(max_examples=15, deadline=None)
@given(factor=st.sampled_from([0.5, 1.0, 1.25, 2.0]), seed=st.integers(0, 50), uniform=st.booleans())
def test_mock_capacity_follows_the_rule_and_the_analysis_counts_it(factor, seed, uniform):
    ds = mock_cube(n_checkpoints=1, n_layers=2, num_experts=4, top_k=2, n_samples=4, seq_len=9, with_lens=False,
                   capacity_factor=factor, uniform=uniform, seed=seed)
    want = _replayed_drops(ds, factor)
    np.testing.assert_array_equal(ds["capacity_dropped"].values, want)
    got = analyses.run("capacity", ds, n_boot=0)
    np.testing.assert_array_equal(got["dropped"].values, (want == 1).sum((-1, -2)))
    np.testing.assert_array_equal(got["slots"].values, np.full(got["slots"].shape, ds.sizes["token"] * 2))


def test_chance_level_no_drops_when_capacity_covers_every_token():
    # capacity factor E / k: an expert can take every token of its sample, so nothing is dropped
    ds = mock_cube(n_checkpoints=1, n_layers=2, num_experts=8, top_k=2, n_samples=6, seq_len=12, with_lens=False,
                   capacity_factor=4.0, uniform=True, seed=2)
    got = analyses.run("capacity", ds, n_boot=20)
    assert (got["drop_rate"].values == 0).all() and (got["dropped_by_expert"].values == 0).all()
    assert str(got.attrs["chance"]).startswith("0")
