"""Real-size routing cubes: the template's Dask chunks and the Zarr chunks are one (issue 11, item 1).

``prepare_routing`` used to build the template with dask's "auto" chunks and
the Zarr encoding from ``token_chunk_size``; for real shapes (48 MoE layers ×
128 experts × top-8 over 50k tokens, with logits) the two disagreed and xarray
refused to write. Both now come from ``storage.schema.storage_chunks``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import cube as cubes
from storage.schema import VARIABLES, empty_routing, storage_chunks, token_chunk_size, token_table

ATTRS = {"model_family": "test", "router_semantics": "softmax", "source": "test_cube_shapes"}


def _tokens(n_tokens: int, n_samples: int) -> xr.Dataset:
    """A token table of ``n_tokens`` in ``n_samples`` contiguous samples of near-equal length."""
    n_samples = max(1, min(n_samples, n_tokens))
    lengths = np.full(n_samples, n_tokens // n_samples)
    lengths[: n_tokens - lengths.sum()] += 1
    sample = np.repeat(np.arange(n_samples), lengths)
    position = np.concatenate([np.arange(n) for n in lengths])
    return token_table(sample=sample, position=position, token_id=(np.arange(n_tokens) * 7) % 1000)


def _template(tokens, *, L, E, K, logits, lens, nll=True, checkpoints=("c0",), token_chunk=None):
    return empty_routing(
        tokens, checkpoints=list(checkpoints), steps=list(range(len(checkpoints))), layers=list(range(0, 2 * L, 2)),
        num_experts=E, top_k=K, keep_logits=logits, keep_lens=lens, keep_nll=nll, attrs=dict(ATTRS),
        token_chunk=token_chunk,
    )


def _stored_chunks(path: Path) -> dict:
    g = zarr.open_group(str(path), mode="r")
    return {name: tuple(g[name].chunks) for name in VARIABLES if name in g}


def _expected_chunks(template: xr.Dataset, token_chunk: int) -> dict:
    sizes = dict(template.sizes)
    return {name: storage_chunks(template[name].dims, sizes, token_chunk) for name in template.data_vars}


def _data(rng, *, L, T, E, K, names) -> dict:
    """Random arrays in the RoutingWriter's layouts (no checkpoint dim), all finite and in range."""
    out = {"expert_ids": rng.integers(0, E, size=(L, T, K)).astype(np.int16),
           "expert_weights": rng.random((L, T, K), dtype=np.float32)}
    if "router_logits" in names:
        out["router_logits"] = rng.standard_normal((L, T, E)).astype(np.float16)
    if "lens_logprob" in names:
        out["lens_logprob"] = -rng.random((L, T), dtype=np.float32)
    if "nll" in names:
        out["nll"] = rng.random(T, dtype=np.float32)
    return out


def _write(path, name, arrays, cuts):
    """Append ``arrays`` to checkpoint ``name`` in batches ending at ``cuts`` (token offsets), then close."""
    with cubes.RoutingWriter(path, name) as w:
        start = 0
        for stop in [*cuts, arrays["expert_ids"].shape[1]]:
            if stop <= start:
                continue
            w.append(**{k: (v[start:stop] if k == "nll" else v[:, start:stop]) for k, v in arrays.items()})
            start = stop


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    L=st.integers(1, 64),
    E=st.integers(2, 256),
    logits=st.booleans(),
    lens=st.booleans(),
    style=st.sampled_from(["schema", "dask-auto", "other-chunk"]),
    data=st.data(),
)
def test_template_writer_open_roundtrip(L, E, logits, lens, style, data):
    """Any shape: the template writes, a RoutingWriter fills it in ragged batches, open_routing reads it back."""
    K = data.draw(st.integers(1, min(8, E)), label="top_k")
    chunk = data.draw(st.integers(1, 16), label="token_chunk")
    T = data.draw(st.integers(chunk + 1, 3 * chunk + 2), label="tokens")  # spans 2..4 chunks, last one partial
    cuts = sorted(data.draw(st.lists(st.integers(1, T - 1), max_size=6), label="batch ends"))
    tokens = _tokens(T, data.draw(st.integers(1, 6), label="samples"))
    if style == "schema":  # the template carries its chunking; prepare_routing uses it
        template = _template(tokens, L=L, E=E, K=K, logits=logits, lens=lens, token_chunk=chunk)
        prep = {}
    elif style == "dask-auto":  # as an importer adds variables: plain da.full, dask's own chunks
        template = _template(tokens, L=L, E=E, K=K, logits=logits, lens=lens)
        for name in template.data_vars:
            v = template[name]
            template[name] = xr.Variable(v.dims, da.full(v.shape, VARIABLES[name].fill, dtype=v.dtype), v.attrs)
        prep = {"token_chunk": chunk}
    else:  # built for one chunking, stored with another
        template = _template(tokens, L=L, E=E, K=K, logits=logits, lens=lens, token_chunk=chunk + 3)
        prep = {"token_chunk": chunk}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "routing.zarr"
        assert cubes.prepare_routing(path, template, **prep) == ["c0"]
        assert _stored_chunks(path) == _expected_chunks(template, chunk)
        names = [v for v in template.data_vars if v != "complete"]
        arrays = _data(np.random.default_rng(L * 1000 + E), L=L, T=T, E=E, K=K, names=names)
        _write(path, "c0", arrays, cuts)
        ds = cubes.open_routing(path)
        assert list(ds.checkpoint.values) == ["c0"] and int(ds.attrs["token_chunk"]) == chunk
        for name, want in arrays.items():
            np.testing.assert_array_equal(ds[name].values[0], want, err_msg=name)
        ds.close()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    L=st.integers(1, 64),
    E=st.integers(2, 256),
    K=st.integers(1, 8),
    T=st.integers(20_000, 80_000),
    logits=st.booleans(),
    lens=st.booleans(),
)
def test_default_chunking_of_large_templates_writes(L, E, K, T, logits, lens):
    """Metadata only, at real token counts: the default chunking spans several token chunks and still writes."""
    K = min(K, E)
    tokens = _tokens(T, 64)
    template = _template(tokens, L=L, E=E, K=K, logits=logits, lens=lens)
    chunk = token_chunk_size(T, top_k=K, num_experts=E, keep_logits=logits)
    assert template.attrs["token_chunk"] == chunk
    for name, v in template.data_vars.items():  # the dask blocks are the stored chunks
        assert tuple(c[0] for c in v.chunks) == storage_chunks(v.dims, dict(template.sizes), chunk), name
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "routing.zarr"
        cubes.prepare_routing(path, template)
        assert _stored_chunks(path) == _expected_chunks(template, chunk)
        ds = cubes.open_routing(path, complete_only=False)
        assert ds.sizes["token"] == T and int(ds["complete"].values[0]) == 0


REAL_SHAPES = {  # (MoE layers, experts, top-k)
    "qwen3-30b-a3b": (48, 128, 8),
    "deepseek-v2-lite": (26, 64, 6),
    "olmoe-1b-7b": (16, 64, 8),
}


@pytest.mark.parametrize("shape", list(REAL_SHAPES))
def test_real_shapes_with_logits_prepare_and_take_region_writes(tmp_path, shape):
    """The issue's failing cases: ~50k tokens in 64 samples with router logits (and lens), then a few regions."""
    L, E, K = REAL_SHAPES[shape]
    T = 50_123
    tokens = _tokens(T, 64)
    template = _template(tokens, L=L, E=E, K=K, logits=True, lens=True, checkpoints=("a", "b"))
    path = tmp_path / "routing.zarr"
    assert cubes.prepare_routing(path, template) == ["a", "b"]
    chunk = int(template.attrs["token_chunk"])
    assert chunk < T  # several token chunks: the case that failed
    assert _stored_chunks(path) == _expected_chunks(template, chunk)

    # A few chunk-aligned regions (one layer, one token chunk each, the last one partial) through xarray.
    rng = np.random.default_rng(L)
    starts = [0, chunk, (T - 1) // chunk * chunk]
    written = []
    for ci, li, t0 in [(0, 0, starts[0]), (1, L - 1, starts[1]), (0, L // 2, starts[2])]:
        t1 = min(T, t0 + chunk)
        n = t1 - t0
        region = xr.Dataset({
            "expert_ids": (("checkpoint", "layer", "token", "k"), rng.integers(0, E, (1, 1, n, K)).astype(np.int16)),
            "router_logits": (("checkpoint", "layer", "token", "expert"),
                              rng.standard_normal((1, 1, n, E)).astype(np.float16)),
        })
        region.to_zarr(path, region={"checkpoint": slice(ci, ci + 1), "layer": slice(li, li + 1),
                                     "token": slice(t0, t1)}, mode="r+")
        written.append((ci, li, t0, t1, region))
    ds = cubes.open_routing(path, complete_only=False)
    for ci, li, t0, t1, region in written:
        for name in ("expert_ids", "router_logits"):
            got = ds[name].isel(checkpoint=ci, layer=li, token=slice(t0, t1)).values
            np.testing.assert_array_equal(got, region[name].values[0, 0], err_msg=f"{name} c{ci} l{li} t{t0}")
    # a chunk nobody wrote still reads as "not written"
    assert (ds["expert_ids"].isel(checkpoint=1, layer=0, token=slice(0, 10)).values == -1).all()
    assert not ds["complete"].values.any()


def test_extending_a_cube_keeps_its_chunks(tmp_path):
    """A new checkpoint is appended with the store's chunks, whatever the new template was built with."""
    tokens = _tokens(300, 5)
    path = tmp_path / "routing.zarr"
    first = _template(tokens, L=3, E=16, K=2, logits=True, lens=False, checkpoints=("a",), token_chunk=64)
    cubes.prepare_routing(path, first)
    before = _stored_chunks(path)
    both = _template(tokens, L=3, E=16, K=2, logits=True, lens=False, checkpoints=("a", "b"), token_chunk=50)
    assert cubes.prepare_routing(path, both) == ["b"]
    assert _stored_chunks(path) == before and zarr.open_group(str(path)).attrs["token_chunk"] == 64
    arrays = _data(np.random.default_rng(1), L=3, T=300, E=16, K=2, names=["router_logits", "nll"])
    _write(path, "b", arrays, cuts=[7, 150, 299])
    ds = cubes.open_routing(path)
    assert list(ds.checkpoint.values) == ["b"]
    for name, want in arrays.items():
        np.testing.assert_array_equal(ds[name].values[0], want, err_msg=name)
