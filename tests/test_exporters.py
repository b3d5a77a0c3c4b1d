"""Exporters: cube -> OLMoE / Megatron files -> importer gives the same cube for what each format keeps,
and OLMoE's own checkpoint comparison on the exported files agrees with the 'change' analysis."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest

import analyses
from storage import cube as cubes
from storage.exporters import export_megatron_jsonl, export_olmoe_jsonl
from storage.importers import import_trace
from storage.schema import FILL_ID, mock_cube


@pytest.fixture(scope="module")
def cube():
    return mock_cube(n_checkpoints=2, n_layers=3, num_experts=8, top_k=2, n_samples=6, seq_len=12,
                     paired=False, with_lens=False, seed=11)


def _boundaries(ds):
    return np.asarray(ds["sample"].values), np.asarray(ds["position"].values)


def test_olmoe_roundtrip(cube, tmp_path):
    files = export_olmoe_jsonl(cube, tmp_path / "olmoe", prefix="c4")
    assert [f.name for f in files] == ["c4_results_0.jsonl", "c4_results_100.jsonl"]
    line = json.loads(files[0].read_text().splitlines()[0])
    n0 = int((cube["sample"].values == 0).sum())
    assert np.asarray(line["exp_ids"]).shape == (n0, 2, 3)  # [n][k][L]: layer axis last
    out = tmp_path / "back.zarr"
    import_trace("olmoe_jsonl", files, out, num_experts=8)
    back = cubes.open_routing(out).load()
    np.testing.assert_array_equal(back["expert_ids"].values, cube["expert_ids"].values)
    np.testing.assert_array_equal(back["token_id"].values, cube["token_id"].values)
    for a, b in zip(_boundaries(back), _boundaries(cube)):
        np.testing.assert_array_equal(a, b)
    assert list(back["step"].values) == [0, 100] and list(back["layer"].values) == [0, 1, 2]


def test_olmoe_main_file_and_own_checkpoint_comparison(cube, tmp_path):
    """OLMoE's compare_with_early_results (top-k overlap with the main revision, per layer), re-stated here,
    run on the exported files equals the saturation of our 'change' analysis."""
    files = export_olmoe_jsonl(cube, tmp_path, prefix="c4", main="step100")
    assert sorted(f.name for f in files) == ["c4_results.jsonl", "c4_results_0.jsonl"]
    results = [json.loads(x) for x in (tmp_path / "c4_results.jsonl").read_text().splitlines()]
    early = [json.loads(x) for x in (tmp_path / "c4_results_0.jsonl").read_text().splitlines()]
    k = 2
    ratio_per_layer = defaultdict(list)
    for r, er in zip(results, early):
        assert r["input_ids"] == er["input_ids"]
        exp_ids, e_exp_ids = np.array(r["exp_ids"]), np.array(er["exp_ids"])
        for layer_idx in range(exp_ids.shape[2]):
            for a, b in zip(exp_ids[:, :, layer_idx].tolist(), e_exp_ids[:, :, layer_idx].tolist()):
                ratio_per_layer[layer_idx].append(len(set(a) & set(b)) / k)
    theirs = np.array([np.mean(ratio_per_layer[i]) for i in range(3)])
    ours = analyses.run("change", cube, n_boot=0)["saturation"].sel(checkpoint="step0").values
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)


def test_megatron_roundtrip_ids_exact_without_logits(cube, tmp_path):
    files = export_megatron_jsonl(cube, tmp_path / "mg", with_logits=False)
    assert [f.parent.name for f in files] == ["step0", "step100"]
    rec = json.loads(files[0].read_text().splitlines()[0])
    assert list(rec) == ["step", "stage", "block", "layer", "rank", "num_tokens", "topk", "top_indices"]
    assert not (files[0].parent / "logits_rank0.bin").exists()
    out = tmp_path / "back.zarr"
    import_trace("megatron", [f.parent for f in files], out, num_experts=8, step=[0, 100])
    back = cubes.open_routing(out).load()
    np.testing.assert_array_equal(back["expert_ids"].values, cube["expert_ids"].values)
    for a, b in zip(_boundaries(back), _boundaries(cube)):
        np.testing.assert_array_equal(a, b)
    assert list(back["checkpoint"].values) == ["step0", "step100"]


def test_megatron_roundtrip_logits_at_bf16(cube, tmp_path):
    files = export_megatron_jsonl(cube, tmp_path / "mg")
    rec = json.loads(files[1].read_text().splitlines()[1])
    n = rec["num_tokens"]
    assert rec["logit_shape"] == [n, 8] and rec["logit_bytes"] == 2 * n * 8 and rec["logit_offset"] == 2 * n * 8
    out = tmp_path / "back.zarr"
    import_trace("megatron", [f.parent for f in files], out, semantics="softmax_topk", top_k=2, renormalize=True,
                 step=[0, 100])
    back = cubes.open_routing(out).load()
    logits = cube["router_logits"].values.astype(np.float32)
    np.testing.assert_allclose(back["router_logits"].values.astype(np.float32), logits, rtol=2**-8, atol=1e-3)
    # the sets are exact; slots are re-sorted by the bf16 logits
    np.testing.assert_array_equal(np.sort(back["expert_ids"].values, -1), np.sort(cube["expert_ids"].values, -1))
    np.testing.assert_allclose(back["expert_weights"].values.sum(-1), 1.0, rtol=1e-5)
    assert "semantics_check" in back.attrs


def test_exporters_refuse_what_the_format_cannot_say(cube, tmp_path):
    holed = cube.copy(deep=True)
    holed["expert_ids"].values[1, 2, 5, :] = FILL_ID
    with pytest.raises(ValueError, match=r"checkpoint 'step100', layer 2, token 5: unwritten"):
        export_olmoe_jsonl(holed, tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written: files are renamed into place only when all are whole
    with pytest.raises(ValueError, match="unwritten"):
        export_megatron_jsonl(holed, tmp_path / "mg")
    with pytest.raises(ValueError, match="no 'expert_ids'"):
        export_olmoe_jsonl(cube.drop_vars("expert_ids"), tmp_path)
