"""The routing cube, declared once.

Every producer (capture, importers) writes this layout and every consumer
(analyses, report) reads it. ``mock_cube`` builds a seeded, in-memory cube with
the same layout for tests.

Dims
----
checkpoint : one entry per model checkpoint (coordinate ``step``)
layer      : the model's own layer index, MoE layers only
token      : every (sample, position) of every dataset, samples contiguous
k          : routing slot, sorted by weight (slot 0 = top-1)
expert     : expert index 0..E-1 (only for ``router_logits``)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import xarray as xr

FILL_ID = -1  # an unwritten chunk must never read as expert 0
SCHEMA_VERSION = 1

ROUTING_DIMS = ("checkpoint", "layer", "token", "k")
LOGIT_DIMS = ("checkpoint", "layer", "token", "expert")


@dataclass(frozen=True)
class VarSpec:
    dims: tuple[str, ...]
    dtype: str
    fill: object
    optional: bool
    description: str


VARIABLES: dict[str, VarSpec] = {
    "expert_ids": VarSpec(
        ROUTING_DIMS, "int16", FILL_ID, False,
        "selected expert per routing slot, slots sorted by weight (top-1 first); -1 = not written",
    ),
    "expert_weights": VarSpec(
        ROUTING_DIMS, "float32", np.nan, True,
        "weight the expert actually receives in the layer output (after the router's own normalisation)",
    ),
    "router_logits": VarSpec(
        LOGIT_DIMS, "float16", np.nan, True,
        "raw router logits over all experts (before softmax/sigmoid)",
    ),
    "lens_logprob": VarSpec(
        ("checkpoint", "layer", "token"), "float32", np.nan, True,
        "logit lens: log p(next token) read out after this layer (final norm + LM head)",
    ),
    "lens_js": VarSpec(
        ("checkpoint", "layer", "token"), "float32", np.nan, True,
        "logit lens: Jensen-Shannon divergence (nats) between the next-token distribution read out here and the "
        "one at the partner position (the position before aligned_token of the next token); NaN where the next "
        "token is not aligned",
    ),
    "nll": VarSpec(
        ("checkpoint", "token"), "float32", np.nan, True,
        "the model's own next-token NLL in nats (NaN at the last position of a sample)",
    ),
    "capacity_dropped": VarSpec(
        ROUTING_DIMS, "int8", -1, True,
        "1 where expert capacity dropped this routing slot (capacity-limited routers, e.g. Switch Transformers: "
        "the expert in expert_ids was chosen but did not run, expert_weights is 0), 0 where it ran; -1 = not written",
    ),
    "complete": VarSpec(
        ("checkpoint",), "int8", 0, False,
        "1 once every variable of this checkpoint's region is written; written last",
    ),
    # Per-layer aggregates of sources that log no per-token expert ids (LibMoE analyst logs);
    # only importers write them, in cubes without 'expert_ids' (attrs has_token_ids=False).
    "agg_entropy_topk": VarSpec(
        ("checkpoint", "layer"), "float32", np.nan, True,
        "entropy (nats) of the top-k routing weights as the source logged it, averaged over samples",
    ),
    "agg_entropy_all": VarSpec(
        ("checkpoint", "layer"), "float32", np.nan, True,
        "entropy (nats) of the router's distribution over all experts as logged, averaged over samples",
    ),
    "agg_margin": VarSpec(
        ("checkpoint", "layer"), "float32", np.nan, True,
        "top-1 minus top-2 routing weight, averaged over the logged tokens",
    ),
    "agg_samples": VarSpec(
        ("checkpoint", "layer"), "int32", -1, True,
        "number of samples pooled into this layer's aggregates",
    ),
    "agg_top1_counts": VarSpec(
        ("checkpoint", "layer", "expert"), "int64", -1, True,
        "tokens whose top-1 expert is this expert, summed over samples (-1 = not logged)",
    ),
    "agg_topk_counts": VarSpec(
        ("checkpoint", "layer", "expert"), "int64", -1, True,
        "routing slots (all k) assigned to this expert, summed over samples (-1 = not logged)",
    ),
}
AGGREGATE_VARIABLES = tuple(name for name in VARIABLES if name.startswith("agg_"))

# The aggregate-counts cube: sources that publish only how many routing slots each expert
# received per layer and domain (OLMoE's expert_counts pickles) have no tokens, so this is
# its own small layout instead of a routing cube with an empty token dim. attrs
# ``cube_kind = "counts"`` marks it; analyses that accept it say so in the registry.
COUNTS_KIND = "counts"
COUNTS_DIMS = ("checkpoint", "layer", "domain", "expert")
COUNT_VARIABLES: dict[str, VarSpec] = {
    "slot_counts": VarSpec(
        COUNTS_DIMS, "int64", -1, False,
        "routing slots (token × top-k position) of the domain's tokens assigned to the expert; -1 = not recorded",
    ),
    "complete": VarSpec(("checkpoint",), "int8", 0, False, "1 once the checkpoint's counts are written"),
}

# Coordinates along ``token``: name -> (dtype, description)
TOKEN_COORDS: dict[str, tuple[str, str]] = {
    "sample": ("int32", "global sample index (samples are contiguous along token)"),
    "sample_id": ("str", "the dataset's own id of the sample (JSONL 'id', a pair's id, an imported trace's sample "
                         "key); '' where the source names none"),
    "position": ("int32", "position of the token inside its sample"),
    "token_id": ("int32", "input token id"),
    "token_text": ("str", "the text span of the token"),
    "char_start": ("int32", "character offset of the token's span in the sample text"),
    "char_end": ("int32", "end character offset (exclusive)"),
    "dataset": ("str", "name of the dataset the sample comes from"),
    "domain": ("str", "domain label of the sample"),
    "condition": ("str", "condition label of the sample ('' when unpaired)"),
    "pair": ("str", "pair id linking samples across conditions ('' when unpaired)"),
    "canonical": ("bool", "token span contains non-whitespace characters"),
    "aligned_token": ("int64", "index along token of the token with the same canonical content in the other "
                               "condition of the pair (capture.align); -1 when unpaired or unmatched"),
    "last_canonical": ("bool", "the last canonical token of its sample"),
    "phase": ("str", "inference phase of the token where the source records it: 'prefill' (prompt, processed in "
                     "one forward pass) or 'decode' (generated one at a time); '' when unknown or not applicable"),
}
# Coordinates added after cubes were first written: a cube without them still opens
# (they are filled when the template is built; analyses that need them say so).
OPTIONAL_TOKEN_COORDS = frozenset({"aligned_token", "last_canonical", "phase", "sample_id"})

# Values of the ``phase`` token coordinate. Capture leaves '' on purpose: its tokens are
# teacher-forced text, neither a served prompt nor generated output, so calling them
# 'prefill' would put them in the same view as a serving log's prompts. Importers of
# serving logs (llama.cpp, vLLM, SGLang) fill 'prefill'/'decode' where the format says.
PHASES = ("prefill", "decode")

# Attributes a reader needs to trust the numbers.
REQUIRED_ATTRS = (
    "schema_version",
    "model_family",
    "num_experts",
    "top_k",
    "router_semantics",
    "source",
    "inputs_hash",
)


def token_table(
    *,
    sample: np.ndarray,
    position: np.ndarray,
    token_id: np.ndarray,
    sample_id=None,
    token_text=None,
    char_start=None,
    char_end=None,
    dataset=None,
    domain=None,
    condition=None,
    pair=None,
    canonical=None,
    aligned_token=None,
    last_canonical=None,
    phase=None,
) -> xr.Dataset:
    """Build the token table: a Dataset with dim ``token`` and only coordinates.

    Missing optional columns get neutral defaults ('' for labels, ``sample_id`` and ``phase``,
    True for ``canonical``, -1 for character offsets and ``aligned_token``,
    False for ``last_canonical``). ``phase`` values must be among
    :data:`PHASES` or ''.
    """
    n = len(sample)
    def _col(v, dtype, default):
        if v is None:
            return np.full(n, default, dtype=object if dtype == "str" else dtype)
        a = np.asarray(v)
        if len(a) != n:
            raise ValueError(f"token table column has {len(a)} rows, expected {n}")
        return a.astype(object if dtype == "str" else dtype)

    cols = {
        "sample": _col(sample, "int32", 0),
        "sample_id": _col(sample_id, "str", ""),
        "position": _col(position, "int32", 0),
        "token_id": _col(token_id, "int32", -1),
        "token_text": _col(token_text, "str", ""),
        "char_start": _col(char_start, "int32", -1),
        "char_end": _col(char_end, "int32", -1),
        "dataset": _col(dataset, "str", ""),
        "domain": _col(domain, "str", ""),
        "condition": _col(condition, "str", ""),
        "pair": _col(pair, "str", ""),
        "canonical": _col(canonical, "bool", True),
        "aligned_token": _col(aligned_token, "int64", -1),
        "last_canonical": _col(last_canonical, "bool", False),
        "phase": _col(phase, "str", ""),
    }
    bad = sorted(set(map(str, pd_unique(cols["phase"]))) - {"", *PHASES})
    if bad:
        raise ValueError(f"token table column 'phase' has value(s) {bad[:5]}; expected one of {list(PHASES)} or ''")
    coords = {name: ("token", values) for name, values in cols.items()}
    coords["token"] = ("token", np.arange(n, dtype=np.int64))
    ds = xr.Dataset(coords=coords)
    for name, (_, desc) in TOKEN_COORDS.items():
        ds[name].attrs["description"] = desc
    return ds


def pd_unique(values: np.ndarray) -> np.ndarray:
    """Distinct values of a 1-d object array by hashing (np.unique would sort strings)."""
    import pandas as pd

    return pd.unique(pd.Series(values, dtype=object)) if len(values) else np.zeros(0, dtype=object)


def phases_present(ds: xr.Dataset) -> list[str]:
    """The known phases (:data:`PHASES` order) that label at least one token of ``ds``; [] without ``phase``."""
    if "phase" not in ds.coords or "token" not in ds["phase"].dims:
        return []
    have = set(map(str, pd_unique(np.asarray(ds["phase"].values, dtype=object))))
    return [p for p in PHASES if p in have]


def tokens_hash(tokens: xr.Dataset) -> str:
    """Hash of the inputs every checkpoint must see identically.

    The alignment across conditions (``aligned_token``) counts once any token is
    aligned, so a cube never mixes two pairings; unpaired tables hash as before.
    """
    h = hashlib.sha256()
    for name in ("sample", "position", "token_id"):
        h.update(np.ascontiguousarray(tokens[name].values.astype(np.int64)).tobytes())
    if "aligned_token" in tokens.coords:
        aligned = np.asarray(tokens["aligned_token"].values).astype(np.int64)
        if (aligned >= 0).any():
            h.update(b"aligned_token")
            h.update(np.ascontiguousarray(aligned).tobytes())
    return h.hexdigest()[:16]


# Raw bytes of the widest per-token variable in one stored chunk.
TARGET_CHUNK_BYTES = 4 * 2**20


def token_chunk_size(n_tokens: int, *, top_k: int, num_experts: int, keep_logits: bool) -> int:
    """Tokens per stored chunk so that the widest variable's chunk holds ~4 MiB raw.

    The row is one token of one layer: ``top_k`` int16 ids / float32 weights,
    or ``num_experts`` float16 logits when they are kept.
    """
    row = max(top_k * 4, num_experts * 2 if keep_logits else 0, 4)
    return int(max(1, min(n_tokens, TARGET_CHUNK_BYTES // row)))


def storage_chunks(dims: tuple[str, ...], sizes: dict, token_chunk: int) -> tuple[int, ...]:
    """The one chunk shape of a cube variable, used both as Zarr chunks and as the template's Dask chunks.

    One checkpoint × one layer × ``token_chunk`` tokens × every slot / expert:
    a checkpoint's region is a set of whole chunks (writers never share one),
    and a layer's tokens read without touching the other layers.

    Parameters
    ----------
    dims : the variable's dims (subset of checkpoint, layer, token, k, expert).
    sizes : dim -> length.
    token_chunk : tokens per chunk (``token_chunk_size``).
    """
    out = []
    for d in dims:
        if d in ("checkpoint", "layer"):
            out.append(1)
        elif d == "token":
            out.append(int(max(1, min(token_chunk, sizes[d]))))
        else:
            out.append(int(max(1, sizes[d])))
    return tuple(out)


def empty_routing(
    tokens: xr.Dataset,
    *,
    checkpoints: list[str],
    steps: list[int],
    layers: list[int],
    num_experts: int,
    top_k: int,
    keep_logits: bool = False,
    keep_weights: bool = True,
    keep_lens: bool = False,
    keep_js: bool = False,
    keep_nll: bool = True,
    keep_capacity: bool = False,
    attrs: dict | None = None,
    lazy: bool = True,
    token_chunk: int | None = None,
) -> xr.Dataset:
    """The routing cube filled with fill values (the template).

    With ``lazy=True`` data variables are dask arrays so that writing the
    template with ``compute=False`` stores only metadata; their Dask chunks
    are the stored chunks (``storage_chunks``, ``token_chunk`` tokens, default
    ``token_chunk_size``), recorded in ``attrs["token_chunk"]``, so that
    ``storage.cube.prepare_routing`` writes them without any rechunking.
    """
    import dask.array as da

    shape = {
        "checkpoint": len(checkpoints),
        "layer": len(layers),
        "token": tokens.sizes["token"],
        "k": top_k,
        "expert": num_experts,
    }
    if token_chunk is None:
        token_chunk = token_chunk_size(shape["token"], top_k=top_k, num_experts=num_experts, keep_logits=keep_logits)
    wanted = {
        "expert_ids": True,
        "expert_weights": keep_weights,
        "router_logits": keep_logits,
        "lens_logprob": keep_lens,
        "lens_js": keep_js,
        "nll": keep_nll,
        "capacity_dropped": keep_capacity,
        "complete": True,
    }
    data_vars = {}
    for name, spec in VARIABLES.items():
        if not wanted.get(name, False):  # aggregate variables are added by their importer
            continue
        shp = tuple(shape[d] for d in spec.dims)
        if lazy:
            arr = da.full(shp, spec.fill, dtype=spec.dtype, chunks=storage_chunks(spec.dims, shape, token_chunk))
        else:
            arr = np.full(shp, spec.fill, dtype=spec.dtype)
        data_vars[name] = xr.Variable(spec.dims, arr, attrs={"description": spec.description})
    ds = xr.Dataset(data_vars, coords=tokens.coords)
    ds = ds.assign_coords(
        checkpoint=("checkpoint", np.asarray(checkpoints, dtype=object)),
        step=("checkpoint", np.asarray(steps, dtype=np.int64)),
        layer=("layer", np.asarray(layers, dtype=np.int32)),
        k=("k", np.arange(top_k, dtype=np.int32)),
        expert=("expert", np.arange(num_experts, dtype=np.int32)),
    )
    base = {
        "schema_version": SCHEMA_VERSION,
        "num_experts": int(num_experts),
        "top_k": int(top_k),
        "inputs_hash": tokens_hash(tokens),
        "usage_normalisation": "",
    }
    apply_cf_attrs(ds)
    if lazy:  # the chunking the dask arrays were built with, for prepare_routing
        base["token_chunk"] = int(max(1, min(token_chunk, max(shape["token"], 1))))
    base.update(attrs or {})
    ds.attrs.update(base)
    return ds


#: CF-style ``long_name`` and ``units`` of every variable and coordinate of the routing cube (issue 13):
#: ``xr.open_zarr("routing.zarr")`` explains itself. Units "1" = dimensionless, "" = a label or an index.
CF_ATTRS: dict[str, tuple[str, str]] = {
    "expert_ids": ("selected expert (top-k slot)", ""),
    "expert_weights": ("weight the selected expert receives", "1"),
    "router_logits": ("router logit", "1"),
    "lens_logprob": ("logit-lens log-probability of the next token", "nats"),
    "lens_js": ("logit-lens Jensen-Shannon divergence between conditions", "nats"),
    "nll": ("next-token negative log-likelihood", "nats"),
    "capacity_dropped": ("routing slot dropped by expert capacity", "1"),
    "complete": ("checkpoint fully written", "1"),
    # per-layer aggregates of importers whose sources log no per-token ids (LibMoE), and the counts cube
    "agg_entropy_topk": ("entropy of the top-k routing weights, mean over samples", "nats"),
    "agg_entropy_all": ("entropy of the router distribution over all experts, mean over samples", "nats"),
    "agg_margin": ("top-1 minus top-2 routing weight, mean over tokens", "1"),
    "agg_samples": ("samples pooled into the layer's aggregates", "samples"),
    "agg_top1_counts": ("tokens whose top-1 expert is this expert", "tokens"),
    "agg_topk_counts": ("routing slots assigned to this expert", "slots"),
    "slot_counts": ("routing slots of the domain's tokens assigned to the expert", "slots"),
    "checkpoint": ("checkpoint name", ""),
    "step": ("training step of the checkpoint", "steps"),
    "layer": ("MoE layer index (decoder layer of the model)", ""),
    "k": ("routing slot, 0 = top-1", ""),
    "expert": ("expert index", ""),
    "token": ("token index along the cube (all samples, concatenated)", ""),
    "sample": ("sample index (samples are contiguous along token)", ""),
    "sample_id": ("the dataset's own sample id", ""),
    "position": ("token position in its sample", "tokens"),
    "token_id": ("input token id", ""),
    "token_text": ("text of the token", ""),
    "char_start": ("start character offset of the token in its sample", "characters"),
    "char_end": ("end character offset of the token in its sample (exclusive)", "characters"),
    "dataset": ("dataset name", ""),
    "domain": ("domain label", ""),
    "condition": ("condition label", ""),
    "pair": ("pair id linking samples across conditions", ""),
    "canonical": ("token has non-whitespace characters", "1"),
    "aligned_token": ("index of the aligned token in the other condition", ""),
    "last_canonical": ("last canonical token of its sample", "1"),
    "phase": ("inference phase (prefill/decode)", ""),
}


#: ``long_name``/``units`` of coordinates that analysis results share (``storage.cube.write_result`` sets them
#: where the analysis did not): bucket edges are stated as coordinates of their own dim.
RESULT_COORD_ATTRS: dict[str, tuple[str, str]] = {
    "checkpoint": CF_ATTRS["checkpoint"],
    "step": CF_ATTRS["step"],
    "layer": CF_ATTRS["layer"],
    "expert": CF_ATTRS["expert"],
    "expert_b": ("second expert of the pair", ""),
    "expert_next": ("expert of the next token", ""),
    "k": CF_ATTRS["k"],
    "domain": CF_ATTRS["domain"],
    "dataset": CF_ATTRS["dataset"],
    "condition": CF_ATTRS["condition"],
    "view": ("token view (all tokens, or a subset such as canonical or one phase)", ""),
    "lag": ("distance to the later token in the same sample", "tokens"),
    "position_bin": ("token-position bucket", ""),
    "position_start": ("first token position of the bucket", "tokens"),
    "position_end": ("token position after the bucket (exclusive)", "tokens"),
    "bin": ("bucket of the binned quantity", ""),
    "bin_start": ("lower edge of the bucket", "1"),
    "bin_end": ("upper edge of the bucket", "1"),
    "run": ("training run", ""),
    "metric": ("metric name", ""),
    "task": ("evaluation task", ""),
}


def apply_result_coord_attrs(ds: xr.Dataset) -> xr.Dataset:
    """Set ``long_name``/``units`` (:data:`RESULT_COORD_ATTRS`) on the coordinates of a result lacking them, in place."""
    for name, (long_name, units) in RESULT_COORD_ATTRS.items():
        if name in ds.coords:
            ds[name].attrs.setdefault("long_name", long_name)
            ds[name].attrs.setdefault("units", units)
    return ds


def apply_cf_attrs(ds: xr.Dataset) -> xr.Dataset:
    """Set ``long_name`` and ``units`` (:data:`CF_ATTRS`) on every variable and coordinate of ``ds`` present, in place."""
    for name, (long_name, units) in CF_ATTRS.items():
        if name in ds.variables:
            ds[name].attrs.setdefault("long_name", long_name)
            ds[name].attrs.setdefault("units", units)
            if name in TOKEN_COORDS:
                ds[name].attrs.setdefault("description", TOKEN_COORDS[name][1])
    return ds


def validate_routing(ds: xr.Dataset, *, where: str = "routing cube") -> None:
    """Raise ValueError naming ``where`` and the field when ``ds`` breaks the schema.

    ``expert_ids`` may be absent only from an imported cube that declares
    ``attrs["has_token_ids"] = False`` and holds router logits or aggregate
    variables instead (analyses needing ids then report them missing).
    An aggregate-counts cube (``attrs["cube_kind"] == "counts"``) is checked
    by :func:`validate_counts`.
    """
    if is_counts_cube(ds):
        validate_counts(ds, where=where)
        return
    if "expert_ids" not in ds:
        ids_free = not ds.attrs.get("has_token_ids", True) and any(
            v in ds.data_vars for v in ("router_logits", *AGGREGATE_VARIABLES)
        )
        if not ids_free:
            raise ValueError(f"{where}: variable 'expert_ids' is missing (expected dims {ROUTING_DIMS})")
    for name, var in ds.data_vars.items():
        spec = VARIABLES.get(name)
        if spec is None:
            continue
        if tuple(var.dims) != spec.dims:
            raise ValueError(f"{where}: variable '{name}' has dims {tuple(var.dims)}, expected {spec.dims}")
    for name in TOKEN_COORDS:
        if name not in ds.coords and name not in OPTIONAL_TOKEN_COORDS:
            raise ValueError(f"{where}: token coordinate '{name}' is missing")
    for name in REQUIRED_ATTRS:
        if name not in ds.attrs:
            raise ValueError(f"{where}: attribute '{name}' is missing")
    E = int(ds.attrs["num_experts"])
    if ds.sizes.get("k") != int(ds.attrs["top_k"]):
        raise ValueError(f"{where}: dim 'k' has size {ds.sizes.get('k')}, attrs say top_k={ds.attrs['top_k']}")
    if "expert" in ds.sizes and ds.sizes["expert"] != E:
        raise ValueError(f"{where}: dim 'expert' has size {ds.sizes['expert']}, attrs say num_experts={E}")


def is_counts_cube(ds: xr.Dataset) -> bool:
    """True for an aggregate-counts cube (layer × expert × domain slot counts, no tokens)."""
    return ds.attrs.get("cube_kind") == COUNTS_KIND


def validate_counts(ds: xr.Dataset, *, where: str = "counts cube") -> None:
    """Raise ValueError naming ``where`` and the field when ``ds`` breaks the counts-cube schema."""
    for name, spec in COUNT_VARIABLES.items():
        if name not in ds.data_vars:
            raise ValueError(f"{where}: variable '{name}' is missing (expected dims {spec.dims})")
        if tuple(ds[name].dims) != spec.dims:
            raise ValueError(f"{where}: variable '{name}' has dims {tuple(ds[name].dims)}, expected {spec.dims}")
    for name in ("checkpoint", "step", "layer", "domain", "expert"):
        if name not in ds.coords:
            raise ValueError(f"{where}: coordinate '{name}' is missing")
    for name in REQUIRED_ATTRS:
        if name not in ds.attrs:
            raise ValueError(f"{where}: attribute '{name}' is missing")
    E = int(ds.attrs["num_experts"])
    if ds.sizes["expert"] != E:
        raise ValueError(f"{where}: dim 'expert' has size {ds.sizes['expert']}, attrs say num_experts={E}")


def counts_cube(
    slot_counts: np.ndarray,
    *,
    checkpoints: list[str],
    steps: list[int],
    layers: list[int],
    domains: list[str],
    top_k: int,
    attrs: dict,
) -> xr.Dataset:
    """The aggregate-counts cube in memory.

    Parameters
    ----------
    slot_counts : (checkpoint, layer, domain, expert) integer routing-slot counts
        (-1 where a cell was not recorded).
    attrs : at least model_family, router_semantics, source; ``cube_kind``,
        ``schema_version``, ``num_experts``, ``top_k`` and ``inputs_hash`` are set here.

    Returns
    -------
    xr.Dataset with ``slot_counts`` (checkpoint, layer, domain, expert) and
    ``complete`` (checkpoint,) = 1.
    """
    a = np.asarray(slot_counts, dtype=np.int64)
    C, L, D, E = a.shape
    if (C, L, D) != (len(checkpoints), len(layers), len(domains)):
        raise ValueError(f"counts_cube: slot_counts has shape {a.shape}, expected "
                         f"({len(checkpoints)}, {len(layers)}, {len(domains)}, E)")
    h = hashlib.sha256(np.ascontiguousarray(a).tobytes())
    h.update(json.dumps([list(map(str, domains)), list(map(int, layers))]).encode())
    ds = xr.Dataset(
        {
            "slot_counts": (COUNTS_DIMS, a, {"description": COUNT_VARIABLES["slot_counts"].description}),
            "complete": (("checkpoint",), np.ones(C, np.int8), {"description": COUNT_VARIABLES["complete"].description}),
        },
        coords={
            "checkpoint": ("checkpoint", np.asarray(checkpoints, dtype=object)),
            "step": ("checkpoint", np.asarray(steps, dtype=np.int64)),
            "layer": ("layer", np.asarray(layers, dtype=np.int32)),
            "domain": ("domain", np.asarray(domains, dtype=object)),
            "expert": ("expert", np.arange(E, dtype=np.int32)),
        },
    )
    apply_cf_attrs(ds)
    ds.attrs.update(attrs)
    ds.attrs.update(cube_kind=COUNTS_KIND, schema_version=SCHEMA_VERSION, num_experts=int(E), top_k=int(top_k),
                    inputs_hash=h.hexdigest()[:16], has_token_ids=False)
    validate_counts(ds, where="counts cube")
    return ds


def mock_cube(
    *,
    n_checkpoints: int = 3,
    n_layers: int = 4,
    num_experts: int = 8,
    top_k: int = 2,
    n_samples: int = 24,
    seq_len: int = 32,
    domains: tuple[str, ...] = ("code", "prose", "math"),
    specialization: float = 1.5,
    drift: float = 0.5,
    with_logits: bool = True,
    uniform: bool = False,
    ragged: bool = True,
    paired: bool = True,
    with_lens: bool = True,
    capacity_factor: float | None = None,
    seed: int = 0,
) -> xr.Dataset:
    """A seeded routing cube in memory, with realistic structure.

    Router logits = domain bias (scaled by ``specialization``) + token noise
    + a per-checkpoint perturbation (scaled by ``drift``, shrinking toward the
    final checkpoint). Routing follows Mixtral semantics: softmax over all
    experts, top-k, renormalised weights. ``uniform=True`` gives i.i.d.
    uniformly random k-subsets in random order (for chance-level tests).

    ``capacity_factor``: add ``capacity_dropped`` as a capacity-limited router
    would set it (Switch Transformers rule): within each sample, slots in
    position order (then slot order), an expert takes at most
    ceil(capacity_factor · tokens · k / E) slots and later ones are dropped.
    Ids and weights are left as routed (no random draw: the routing is the same).

    ``paired``: consecutive samples of a domain form pairs (conditions 'A' and
    'B', attrs ``condition_a``/``condition_b``); tokens at the same position
    that are canonical in both are aligned (``aligned_token``). ``with_lens``:
    ``lens_logprob`` rising with depth to −nll at the last layer, and (with
    ``paired``) a symmetric ``lens_js`` at the aligned positions. Both use
    their own random stream, so the routing is the same with or without them.

    Returns
    -------
    xr.Dataset with dims (checkpoint, layer, token, k, expert) and the token
    coordinates of ``TOKEN_COORDS``.
    """
    rng = np.random.default_rng(seed)
    C, L, E, K = n_checkpoints, n_layers, num_experts, top_k
    lengths = (
        rng.integers(max(2, seq_len // 2), seq_len + 1, size=n_samples) if ragged else np.full(n_samples, seq_len)
    )
    T = int(lengths.sum())
    sample = np.repeat(np.arange(n_samples), lengths)
    position = np.concatenate([np.arange(n) for n in lengths])
    sample_domain = np.array([domains[i % len(domains)] for i in range(n_samples)], dtype=object)
    domain = sample_domain[sample]
    vocab = 50
    dom_idx = np.array([domains.index(d) for d in domain])
    token_id = (rng.integers(0, vocab // 2, size=T) + dom_idx * 7) % vocab
    canonical = rng.random(T) > 0.15
    text = np.array([f"t{t}" if c else " " for t, c in zip(token_id, canonical)], dtype=object)
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    cond = np.full(n_samples, "", dtype=object)
    pair_id = np.full(n_samples, "", dtype=object)
    aligned = np.full(T, -1, dtype=np.int64)
    if paired:
        for d in domains:
            members = [i for i in range(n_samples) if sample_domain[i] == d]
            for a, b in zip(members[0::2], members[1::2]):
                cond[a], cond[b] = "A", "B"
                pair_id[a] = pair_id[b] = f"{d}-{a}"
                n = min(lengths[a], lengths[b])
                ta, tb = starts[a] + np.arange(n), starts[b] + np.arange(n)
                both = canonical[ta] & canonical[tb]
                aligned[ta[both]], aligned[tb[both]] = tb[both], ta[both]
    last_canonical = np.zeros(T, dtype=bool)
    for s0, n in zip(starts, lengths):
        hit = np.flatnonzero(canonical[s0:s0 + n])
        if hit.size:
            last_canonical[s0 + hit[-1]] = True
    tokens = token_table(
        sample=sample, position=position, token_id=token_id, token_text=text,
        char_start=position * 2, char_end=position * 2 + 2,
        dataset=np.full(T, "mock", dtype=object), domain=domain, canonical=canonical,
        condition=cond[sample], pair=pair_id[sample], aligned_token=aligned, last_canonical=last_canonical,
    )

    if uniform:
        logits = rng.standard_normal((C, L, T, E)).astype(np.float32)
        ids = np.argsort(rng.random((C, L, T, E)), axis=-1)[..., :K].astype(np.int16)
        w = rng.dirichlet(np.ones(K), size=(C, L, T)).astype(np.float32)
        w = -np.sort(-w, axis=-1)
    else:
        dom_bias = rng.standard_normal((L, len(domains), E)) * specialization
        tok_bias = rng.standard_normal((L, vocab, E)) * 0.8
        base = dom_bias[:, dom_idx, :] + tok_bias[:, token_id, :] + rng.standard_normal((L, T, E)) * 0.7
        logits = np.empty((C, L, T, E), dtype=np.float32)
        for c in range(C):
            scale = drift * (C - 1 - c) / max(C - 1, 1)
            logits[c] = base + scale * rng.standard_normal((L, T, E)) * 2.0
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        order = np.argsort(-p, axis=-1, kind="stable")[..., :K]
        ids = order.astype(np.int16)
        top = np.take_along_axis(p, order, axis=-1)
        w = (top / top.sum(-1, keepdims=True)).astype(np.float32)

    nll = rng.gamma(2.0, 1.5, size=(C, T)).astype(np.float32)
    last = np.r_[np.diff(sample) != 0, True]
    nll[:, last] = np.nan

    ds = empty_routing(
        tokens,
        checkpoints=[f"step{100 * c}" for c in range(C)],
        steps=[100 * c for c in range(C)],
        layers=list(range(L)),
        num_experts=E,
        top_k=K,
        keep_logits=with_logits,
        keep_lens=with_lens,
        keep_js=with_lens and paired,
        keep_capacity=capacity_factor is not None,
        attrs={
            "model_family": "mock",
            "router_semantics": "softmax over all experts, top-k, renormalised (Mixtral)",
            "source": "mock_cube",
            **({"condition_a": "A", "condition_b": "B"} if paired else {}),
        },
        lazy=False,
    )
    ds["expert_ids"].values[...] = ids
    ds["expert_weights"].values[...] = w
    if with_logits:
        ds["router_logits"].values[...] = logits.astype(np.float16)
    ds["nll"].values[...] = nll
    if capacity_factor is not None:
        # rank of each slot among the slots of its sample that chose the same expert, in position order
        cap = np.ceil(capacity_factor * lengths * K / E).astype(np.int64)[sample]
        flat_sample = np.repeat(sample, K)
        for c in range(C):
            for layer in range(L):
                key = flat_sample * E + ids[c, layer].reshape(-1).astype(np.int64)
                order = np.argsort(key, kind="stable")
                starts_g = np.r_[0, np.flatnonzero(np.diff(key[order])) + 1]
                rank = np.empty(key.size, dtype=np.int64)
                rank[order] = np.arange(key.size) - np.repeat(starts_g, np.diff(np.r_[starts_g, key.size]))
                ds["capacity_dropped"].values[c, layer] = (rank.reshape(T, K) >= cap[:, None]).astype(np.int8)
    if with_lens:
        lrng = np.random.default_rng([seed, 1])
        depth = (L - 1 - np.arange(L, dtype=np.float32)) / max(L - 1, 1)  # 1 at the first layer, 0 at the last
        gap = lrng.gamma(2.0, 1.0, size=(C, L, T)).astype(np.float32) * depth[None, :, None]
        ds["lens_logprob"].values[...] = -(nll[:, None, :] + gap)
        if paired:
            # JS sits at the position before each aligned target, equal on both sides of the pair.
            tgt = np.flatnonzero((aligned >= 0) & (position > 0))
            tgt = tgt[(cond[sample[tgt]] == "A") & (position[aligned[tgt]] > 0)]
            js = np.full((C, L, T), np.nan, dtype=np.float32)
            vals = lrng.uniform(0.0, np.log(2.0), size=(C, L, tgt.size)) * (0.3 + 0.7 * depth[None, :, None])
            js[:, :, tgt - 1] = vals
            js[:, :, aligned[tgt] - 1] = vals
            ds["lens_js"].values[...] = js
    ds["complete"].values[...] = 1
    return ds
