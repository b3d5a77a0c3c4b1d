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
    "nll": VarSpec(
        ("checkpoint", "token"), "float32", np.nan, True,
        "the model's own next-token NLL in nats (NaN at the last position of a sample)",
    ),
    "complete": VarSpec(
        ("checkpoint",), "int8", 0, False,
        "1 once every variable of this checkpoint's region is written; written last",
    ),
}

# Coordinates along ``token``: name -> (dtype, description)
TOKEN_COORDS: dict[str, tuple[str, str]] = {
    "sample": ("int32", "global sample index (samples are contiguous along token)"),
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
}

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
    token_text=None,
    char_start=None,
    char_end=None,
    dataset=None,
    domain=None,
    condition=None,
    pair=None,
    canonical=None,
) -> xr.Dataset:
    """Build the token table: a Dataset with dim ``token`` and only coordinates.

    Missing optional columns get neutral defaults ('' for labels, True for
    ``canonical``, -1 for character offsets).
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
    }
    coords = {name: ("token", values) for name, values in cols.items()}
    coords["token"] = ("token", np.arange(n, dtype=np.int64))
    ds = xr.Dataset(coords=coords)
    for name, (_, desc) in TOKEN_COORDS.items():
        ds[name].attrs["description"] = desc
    return ds


def tokens_hash(tokens: xr.Dataset) -> str:
    """Hash of the inputs every checkpoint must see identically."""
    h = hashlib.sha256()
    for name in ("sample", "position", "token_id"):
        h.update(np.ascontiguousarray(tokens[name].values.astype(np.int64)).tobytes())
    return h.hexdigest()[:16]


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
    keep_nll: bool = True,
    attrs: dict | None = None,
    lazy: bool = True,
) -> xr.Dataset:
    """The routing cube filled with fill values (the template).

    With ``lazy=True`` data variables are dask arrays so that writing the
    template with ``compute=False`` stores only metadata.
    """
    import dask.array as da

    shape = {
        "checkpoint": len(checkpoints),
        "layer": len(layers),
        "token": tokens.sizes["token"],
        "k": top_k,
        "expert": num_experts,
    }
    wanted = {
        "expert_ids": True,
        "expert_weights": keep_weights,
        "router_logits": keep_logits,
        "lens_logprob": keep_lens,
        "nll": keep_nll,
        "complete": True,
    }
    data_vars = {}
    for name, spec in VARIABLES.items():
        if not wanted[name]:
            continue
        shp = tuple(shape[d] for d in spec.dims)
        make = da.full if lazy else np.full
        arr = make(shp, spec.fill, dtype=spec.dtype)
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
    base.update(attrs or {})
    ds.attrs.update(base)
    return ds


def validate_routing(ds: xr.Dataset, *, where: str = "routing cube") -> None:
    """Raise ValueError naming ``where`` and the field when ``ds`` breaks the schema."""
    if "expert_ids" not in ds:
        raise ValueError(f"{where}: variable 'expert_ids' is missing (expected dims {ROUTING_DIMS})")
    for name, var in ds.data_vars.items():
        spec = VARIABLES.get(name)
        if spec is None:
            continue
        if tuple(var.dims) != spec.dims:
            raise ValueError(f"{where}: variable '{name}' has dims {tuple(var.dims)}, expected {spec.dims}")
    for name in TOKEN_COORDS:
        if name not in ds.coords:
            raise ValueError(f"{where}: token coordinate '{name}' is missing")
    for name in REQUIRED_ATTRS:
        if name not in ds.attrs:
            raise ValueError(f"{where}: attribute '{name}' is missing")
    E = int(ds.attrs["num_experts"])
    if ds.sizes.get("k") != int(ds.attrs["top_k"]):
        raise ValueError(f"{where}: dim 'k' has size {ds.sizes.get('k')}, attrs say top_k={ds.attrs['top_k']}")
    if "expert" in ds.sizes and ds.sizes["expert"] != E:
        raise ValueError(f"{where}: dim 'expert' has size {ds.sizes['expert']}, attrs say num_experts={E}")


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
    seed: int = 0,
) -> xr.Dataset:
    """A seeded routing cube in memory, with realistic structure.

    Router logits = domain bias (scaled by ``specialization``) + token noise
    + a per-checkpoint perturbation (scaled by ``drift``, shrinking toward the
    final checkpoint). Routing follows Mixtral semantics: softmax over all
    experts, top-k, renormalised weights. ``uniform=True`` gives i.i.d.
    uniformly random k-subsets in random order (for chance-level tests).

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
    tokens = token_table(
        sample=sample, position=position, token_id=token_id, token_text=text,
        char_start=position * 2, char_end=position * 2 + 2,
        dataset=np.full(T, "mock", dtype=object), domain=domain, canonical=canonical,
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
        attrs={
            "model_family": "mock",
            "router_semantics": "softmax over all experts, top-k, renormalised (Mixtral)",
            "source": "mock_cube",
        },
        lazy=False,
    )
    ds["expert_ids"].values[...] = ids
    ds["expert_weights"].values[...] = w
    if with_logits:
        ds["router_logits"].values[...] = logits.astype(np.float16)
    ds["nll"].values[...] = nll
    ds["complete"].values[...] = 1
    return ds
