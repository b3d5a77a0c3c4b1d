"""Peers' variants of metrics whose names clash with ours, each against the peer's own
computation: transformers' ``load_balancing_loss_func`` (run for real), LibMoE's
``average_switch_fraction``, OLMoE's adjacent-pair co-activation and top-1 token
specialization (brute-force loops written the way their scripts are)."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from analyses.balance import balance
from analyses.change import change
from analyses.coactivation import coactivation
from analyses.specialization import specialization
from cube_helpers import forbid_cube_compute, lazy, punch_holes, small_cube
from storage.schema import mock_cube
from strategies import SEEDS


def _distinct_logits(ds, seed):
    """The cube with float32 logits drawn afresh: no ties, so any top-k selection is the same set."""
    ds = ds.copy(deep=True)
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, ds["router_logits"].shape).astype(np.float32)
    logits[np.isnan(ds["router_logits"].values)] = np.nan
    ds["router_logits"] = (ds["router_logits"].dims, logits, ds["router_logits"].attrs)
    return ds


# ----------------------------------------------------------------------------- transformers' LB loss


@pytest.mark.parametrize(("top_k", "sigmoid"), [(2, False), (3, False), (2, True)])
def test_lb_loss_hf_is_transformers_function_per_layer(top_k, sigmoid):
    ds = _distinct_logits(punch_holes(small_cube(top_k=top_k, seed=11), seed=4), seed=2)
    if sigmoid:  # transformers' function softmaxes whatever the router does; our lb_loss follows the router
        ds.attrs["router_semantics"] = "sigmoid scores, top-k"
    E = ds.attrs["num_experts"]
    r = balance(ds, n_boot=0)
    ids, logits = ds["expert_ids"].values, ds["router_logits"].values
    for c in range(ds.sizes["checkpoint"]):
        for layer in range(ds.sizes["layer"]):
            # the tokens lb_loss uses: written top-1 and logits; the rest are padding for transformers
            ok = (ids[c, layer, :, 0] >= 0) & ~np.isnan(logits[c, layer]).any(-1)
            gate = torch.from_numpy(np.nan_to_num(logits[c, layer]))
            ref = load_balancing_loss_func((gate,), E, top_k, attention_mask=torch.from_numpy(ok)[None, :])
            np.testing.assert_allclose(r["lb_loss_hf"].values[c, layer], float(ref), rtol=1e-5)
    assert "transformers" in r["lb_loss_hf"].attrs["long_name"]


def test_lb_loss_hf_all_layers_is_the_models_aux_loss():
    ds = _distinct_logits(small_cube(top_k=2, seed=8), seed=3)  # no holes: every layer has the same rows
    E, k = ds.attrs["num_experts"], ds.attrs["top_k"]
    r = balance(ds, n_boot=0)
    for c in range(ds.sizes["checkpoint"]):
        gates = tuple(torch.from_numpy(ds["router_logits"].values[c, layer]) for layer in range(ds.sizes["layer"]))
        ref = load_balancing_loss_func(gates, E, k)
        np.testing.assert_allclose(r["lb_loss_hf_all_layers"].values[c], float(ref), rtol=1e-5)
    # pooling rows before the product is not the mean of the per-layer values
    assert not np.allclose(r["lb_loss_hf_all_layers"].values, r["lb_loss_hf"].mean("layer").values, rtol=1e-9)


def test_lb_loss_hf_reads_k_where_ours_reads_one_at_balance():
    ds = mock_cube(uniform=True, n_checkpoints=1, n_layers=2, num_experts=8, top_k=2, n_samples=200, seq_len=40,
                   seed=13)
    r = balance(ds, n_boot=0)
    assert abs(r["lb_loss"] - 1).max() < 0.05
    assert abs(r["lb_loss_hf"] - 2).max() < 0.1
    assert r["lb_loss_hf"].attrs["ideal"] == 2.0 and "≈ k" in r["lb_loss_hf"].attrs["description"]
    assert "lb_loss_hf" in r["lb_loss"].attrs["description"]


def test_lb_loss_hf_lazy_equals_in_memory():
    ds = _distinct_logits(punch_holes(small_cube(seed=2), seed=9), seed=5)
    with forbid_cube_compute():
        lr = balance(lazy(ds), n_boot=0)
    mem = balance(ds, n_boot=0)
    for v in ("lb_loss_hf", "lb_loss_hf_all_layers"):
        xr.testing.assert_allclose(lr[v].compute(), mem[v])


# ----------------------------------------------------------------------------- LibMoE's switch fraction


def _libmoe_average_switch_fraction(epoch_a, epoch_b):
    """LibMoE's selection_metrics.average_switch_fraction: per token, slots whose id differs, / len."""
    fractions = []
    for token_a, token_b in zip(epoch_a, epoch_b):
        if not token_a:
            continue
        switches = sum(a != b for a, b in zip(token_a, token_b))
        fractions.append(switches / len(token_a))
    return float(np.average(fractions)) if fractions else float("nan")


def test_switch_fraction_libmoe_is_libmoes_rank_aware_loop():
    ds = punch_holes(small_cube(top_k=3, n_checkpoints=4, seed=21), seed=6)
    ids = ds["expert_ids"].values
    # make some tokens keep their set but swap ranks: set-based and rank-aware switch fractions part there
    ids[2, :, ::3, :] = ids[1, :, ::3, ::-1]
    r = change(ds, n_boot=0)
    for c in range(1, ds.sizes["checkpoint"]):
        for layer in range(ds.sizes["layer"]):
            # LibMoE's selections hold no -1: an unwritten token is an empty selection, skipped
            sel = [[int(e) for e in row if e >= 0] for row in ids[c, layer]]
            prev = [[int(e) for e in row if e >= 0] for row in ids[c - 1, layer]]
            ref = _libmoe_average_switch_fraction(sel, prev)
            np.testing.assert_allclose(r["switch_fraction_libmoe"].values[c, layer], ref, rtol=1e-12)
    assert np.isnan(r["switch_fraction_libmoe"].values[0]).all()
    assert (r["switch_fraction_libmoe"].values[2] > r["switch_fraction"].values[2]).all()
    assert "rank-aware" in r["switch_fraction_libmoe"].attrs["long_name"]


@settings(max_examples=8, deadline=None)
@given(seed=SEEDS, top_k=st.integers(1, 4))
def test_rank_aware_switch_fraction_is_never_below_the_set_based_one(seed, top_k):
    # a slot keeping its expert at the same rank keeps it in the set: position match <= set overlap
    ds = small_cube(top_k=top_k, n_checkpoints=3, n_layers=2, n_samples=6, seed=seed)
    r = change(ds, n_boot=0).isel(checkpoint=slice(1, None))
    assert (r["switch_fraction_libmoe"] >= r["switch_fraction"] - 1e-12).all()
    if top_k == 1:  # one slot: rank and set are the same thing
        np.testing.assert_allclose(r["switch_fraction_libmoe"], r["switch_fraction"], rtol=1e-12)


# ----------------------------------------------------------------------------- OLMoE's co-activation


def _olmoe_coactivation(rows, E):
    """OLMoE's do_correlation_analysis: adjacent ranked pairs (both orders) / count(a in S)."""
    pairwise, single = Counter(), Counter()
    for indices in rows:
        indices = [int(i) for i in indices if i >= 0]
        for i in indices:
            single[i] += 1
        for a, b in zip(indices, indices[1:]):  # more_itertools.pairwise
            pairwise[(a, b)] += 1
            pairwise[(b, a)] += 1
    out = np.full((E, E), np.nan)
    for a in range(E):
        for b in range(E):
            if a != b and single[a]:
                out[a, b] = pairwise[(a, b)] / single[a]
    return out


@pytest.mark.parametrize("top_k", [3, 4])
def test_coactivation_olmoe_is_olmoes_adjacent_pair_loop(top_k):
    ds = punch_holes(small_cube(top_k=top_k, seed=17), seed=2)
    E = ds.attrs["num_experts"]
    r = coactivation(ds, n_boot=0)
    for c in range(ds.sizes["checkpoint"]):
        for layer in range(ds.sizes["layer"]):
            ref = _olmoe_coactivation(ds["expert_ids"].values[c, layer], E)
            np.testing.assert_allclose(r["coactivation_olmoe"].values[c, layer], ref, rtol=1e-12)
    # a token gives a at most two adjacent partners (one at either end of the ranking): rows sum to
    # 1..2, ours to k − 1; every adjacent pair is also a pair, so cell by cell OLMoE's is never larger
    rows = r["coactivation_olmoe"].sum("expert_b").values[r["active_count"].values > 0]
    assert ((rows >= 1 - 1e-12) & (rows <= 2 + 1e-12)).all() and (rows < top_k - 1).any()
    assert (r["coactivation_olmoe"] <= r["coactivation"] + 1e-12).sum() == np.isfinite(r["coactivation"]).sum()
    assert "adjacent" in r["coactivation_olmoe"].attrs["long_name"]


def test_coactivation_olmoe_equals_ours_when_k_is_2():
    ds = punch_holes(small_cube(top_k=2, seed=4), seed=3)
    r = coactivation(ds, n_boot=0)
    xr.testing.assert_allclose(r["coactivation_olmoe"], r["coactivation"], check_dim_order=True)


def test_coactivation_olmoe_lazy_equals_in_memory():
    ds = punch_holes(small_cube(top_k=3, seed=12), seed=8)
    with forbid_cube_compute():
        lr = coactivation(lazy(ds), n_boot=5)
    xr.testing.assert_allclose(lr["coactivation_olmoe"].compute(), coactivation(ds, n_boot=5)["coactivation_olmoe"])


# ----------------------------------------------------------------------------- OLMoE's token specialization


def _olmoe_print_avg(id_to_exp):
    """OLMoE's do_token_analysis print_avg: mean over ids of (most frequent top-1 count) / occurrences."""
    probs = []
    for _id, exp_ids in id_to_exp.items():
        most_freq_id, val = sorted(Counter(exp_ids).items(), key=lambda x: -x[1])[0]
        probs.append(val / len(exp_ids))
    return float(np.mean(probs))


def test_token_specialization_olmoe_is_olmoes_top1_loop():
    ds = punch_holes(small_cube(top_k=2, n_checkpoints=2, seed=31), seed=5)
    r = specialization(ds, n_shuffle=5, n_boot=0)
    tid, sample = ds["token_id"].values, ds["sample"].values
    starts = np.flatnonzero(np.r_[True, sample[1:] != sample[:-1]])
    bounds = list(zip(starts, np.r_[starts[1:], len(sample)]))
    for c in range(ds.sizes["checkpoint"]):
        for layer in range(ds.sizes["layer"]):
            top1 = ds["expert_ids"].values[c, layer, :, 0]
            inputs, nexts = defaultdict(list), defaultdict(list)
            for lo, hi in bounds:  # one OLMoE "result" per sample
                input_ids, exp_ids = tid[lo:hi].tolist(), top1[lo:hi].tolist()
                for _id, e in zip(input_ids, exp_ids):
                    if e >= 0:  # OLMoE has no unwritten slot; ours are left out
                        inputs[_id].append(e)
                for _id, e in zip(input_ids[1:], exp_ids):
                    if e >= 0:
                        nexts[_id].append(e)
            np.testing.assert_allclose(r["token_specialization_olmoe_input"].values[c, layer],
                                       _olmoe_print_avg(inputs), rtol=1e-12)
            np.testing.assert_allclose(r["token_specialization_olmoe_next"].values[c, layer],
                                       _olmoe_print_avg(nexts), rtol=1e-12)
    assert "top-1" in r["token_specialization_olmoe_input"].attrs["description"]


def test_token_specialization_olmoe_lazy_equals_in_memory():
    ds = punch_holes(small_cube(top_k=2, seed=7), seed=1)
    with forbid_cube_compute():
        lr = specialization(lazy(ds), n_shuffle=5, n_boot=0)
    mem = specialization(ds, n_shuffle=5, n_boot=0)
    for v in ("token_specialization_olmoe_input", "token_specialization_olmoe_next"):
        xr.testing.assert_allclose(lr[v].compute(), mem[v])


def test_demo_models_aux_loss_is_lb_loss_hf_all_layers():
    """The demo logs a real Mixtral's ``aux_loss``: the balance analysis names that quantity lb_loss_hf_all_layers."""
    from transformers import MixtralConfig, MixtralForCausalLM

    ds = small_cube(n_checkpoints=1, n_layers=2, top_k=2, seed=14)
    T, E, k = ds.sizes["token"], ds.attrs["num_experts"], ds.attrs["top_k"]
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=T, num_local_experts=E, num_experts_per_tok=k,
        router_jitter_noise=0.0,
    )).eval()
    ids = torch.randint(0, 64, (1, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    logits = np.stack([g.float().numpy() for g in out.router_logits])[None]  # (checkpoint, layer, token, expert)
    ds["router_logits"] = (("checkpoint", "layer", "token", "expert"), logits)
    ds["expert_ids"].values[...] = np.argsort(-logits, axis=-1)[..., :k]  # what the model routed to
    r = balance(ds, n_boot=0)
    np.testing.assert_allclose(r["lb_loss_hf_all_layers"].values[0], float(out.aux_loss), rtol=1e-5)
    # and it is not our lb_loss: ≈ k apart at balance
    assert float(r["lb_loss_hf_all_layers"][0]) > 1.5 * float(r["lb_loss"].mean())
