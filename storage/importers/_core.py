"""The machinery every importer shares: events, validation, spooling, cube writing.

An importer's ``read`` function parses one source (one checkpoint) and returns a
:class:`Trace`: what the format implies about the router, plus a generator of
events in file order:

* :class:`Samples` opens a group of consecutive samples (their token count,
  token ids, labels);
* :class:`Block` carries the routing of some of that group's tokens at one
  layer: ``ids`` (n, k), optionally ``weights`` (n, k) and ``logits`` (n, E).

Blocks of one layer arrive in token order; the layers of a group may come in
any order (token-major formats such as llama.cpp traces and layer-major ones
such as Megatron's per-layer records both fit). :class:`Collector` checks every
block (ragged slots, ids outside 0..E-1, duplicated ids, layers missing from a
record) and appends it to one raw file per (variable, layer) in a spool
directory, so memory stays bounded by one block whatever the trace size and the
input is parsed once. :func:`write_cube` then builds the template from the
token table, writes every checkpoint's region from the spool, marks each
checkpoint complete only after its data is written, and renames the finished
store into place (nothing partial ever sits at the output path).
"""

from __future__ import annotations

import csv
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr

from .. import atomic
from ..schema import VARIABLES, apply_cf_attrs, empty_routing, token_table, tokens_hash


class TraceError(ValueError):
    """A trace does not match its format. The message names file, record and field."""


def fail(where: str, field_name: str | None, problem: str) -> TraceError:
    """A :class:`TraceError` reading ``<where>: field '<field>': <problem>``."""
    if field_name:
        return TraceError(f"{where}: field '{field_name}': {problem}")
    return TraceError(f"{where}: {problem}")


# --------------------------------------------------------------------------- events


@dataclass
class SampleMeta:
    """One sample (a prompt, a document, a 2048-token chunk, a decode step...).

    ``key`` is what a side table refers to. Arrays have one entry per token;
    None means unknown (token ids -1, positions 0..n-1, empty text).
    """

    key: str
    n: int
    token_id: np.ndarray | None = None
    position: np.ndarray | None = None
    token_text: np.ndarray | None = None
    dataset: str = ""
    domain: str = ""
    condition: str = ""
    pair: str = ""
    # per token "prefill" / "decode" / "" (unknown), where the format records the phase; None = all unknown
    phase: np.ndarray | None = None


@dataclass
class Samples:
    """Opens a group of consecutive samples; the following blocks cover its tokens."""

    metas: list[SampleMeta]
    where: str

    @property
    def n(self) -> int:
        return sum(m.n for m in self.metas)


@dataclass
class Block:
    """Routing of consecutive tokens of the current group at one layer.

    ids : (n, k) integer expert ids, slots in the order the importer established
    weights : (n, k) weight each selected expert receives, or None
    logits : (n, E) router logits, or None
    where : file and record, for error messages
    fields : the source field names of ids / weights / logits, for error messages
    missing : (n,) bool, tokens the source has no routing for at this layer (kept with fill:
        ids -1, weights NaN; their rows are not validated), or None
    """

    layer: int
    where: str
    ids: np.ndarray | None = None
    weights: np.ndarray | None = None
    logits: np.ndarray | None = None
    fields: dict = field(default_factory=dict)
    missing: np.ndarray | None = None


@dataclass
class Trace:
    """What a format's ``read`` function returns for one source (one checkpoint).

    ``events`` is None for an aggregates-only source, which sets ``aggregates``
    instead (a Dataset with dims (layer[, expert]) of schema aggregate variables).
    """

    format: str
    version: int
    paths: list[str]
    router_semantics: str
    events: Iterator | None = None
    model_family: str = "unknown"
    slot_order: str = "by weight, top-1 first"
    num_experts: int | None = None
    top_k: int | None = None
    checkpoint: str | None = None
    step: int | None = None
    attrs: dict = field(default_factory=dict)
    aggregates: xr.Dataset | None = None


SPOOL_DTYPES = {"expert_ids": np.int16, "expert_weights": np.float32, "router_logits": np.float16}
_BLOCK_VARS = {"ids": "expert_ids", "weights": "expert_weights", "logits": "router_logits"}


# --------------------------------------------------------------------------- collector


class Collector:
    """Validate events and spool them to disk, one raw file per (variable, layer).

    After :meth:`feed`, ``metas`` lists the samples in order, ``layers`` the
    layer ids, ``k`` the slots, ``num_logits`` the width of the logits,
    ``max_id`` the largest expert id seen and ``variables`` the cube variables.
    """

    def __init__(self, spool_dir: Path, *, num_experts: int | None):
        self.dir = Path(spool_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.num_experts = num_experts
        self.files: dict[tuple[str, int], object] = {}
        self.rows: dict[tuple[str, int], int] = {}
        self.metas: list[SampleMeta] = []
        self.layers: list[int] | None = None
        self._seen_layers: set[int] = set()
        self.k: int | None = None
        self.num_logits: int | None = None
        self.max_id = -1
        self.variables: tuple[str, ...] | None = None
        self._group: Samples | None = None
        self._start = 0
        self._end = 0
        self._first_where = ""

    # -- events
    def feed(self, events: Iterable) -> "Collector":
        try:
            for ev in events:
                if isinstance(ev, Samples):
                    self._close_group()
                    self._open_group(ev)
                elif isinstance(ev, Block):
                    self._block(ev)
                else:  # an importer bug, not bad input
                    raise TypeError(f"importer yielded {type(ev).__name__}, expected Samples or Block")
            self._close_group()
        finally:
            for f in self.files.values():
                f.close()
        if not self.metas:
            raise TraceError(f"{self._first_where or 'trace'}: no routing records found")
        return self

    @property
    def n_tokens(self) -> int:
        return self._end

    def _open_group(self, ev: Samples) -> None:
        if ev.n <= 0 and ev.metas:
            raise fail(ev.where, None, "a sample with no tokens")
        self._group = ev
        self._start = self._end
        self._end = self._start + ev.n
        self.metas.extend(ev.metas)
        if not self._first_where:
            self._first_where = ev.where

    def _close_group(self) -> None:
        g = self._group
        if g is None:
            return
        if self.layers is None:
            if not self._seen_layers:
                raise fail(g.where, None, "no MoE layer records for this sample")
            self.layers = sorted(self._seen_layers)
        for layer in self.layers:
            for var in self.variables or ():
                got = self.rows.get((var, layer), 0)
                if got != self._end:
                    have = got - self._start
                    raise fail(
                        g.where, None,
                        f"layer {layer} has {max(have, 0)} token(s) of routing, expected {g.n} "
                        f"(layer missing or short in this record; every sample must cover the same MoE layers "
                        f"{self.layers})",
                    )
        self._group = None

    def _block(self, b: Block) -> None:
        g = self._group
        if g is None:
            raise fail(b.where, None, "routing record before any sample (importer bug)")
        present = tuple(v for attr, v in _BLOCK_VARS.items() if getattr(b, attr) is not None)
        if self.variables is None:
            if not present:
                raise fail(b.where, None, "record has neither expert ids nor logits")
            self.variables = present
        elif present != self.variables:
            raise fail(b.where, None, f"record carries {list(present)}, earlier records carried {list(self.variables)}")
        if self.layers is not None and b.layer not in self.layers:
            raise fail(
                b.where, b.fields.get("layer", "layer"),
                f"layer {b.layer} does not occur in earlier samples (layers {self.layers})",
            )
        self._seen_layers.add(b.layer)
        n = None
        for attr, var in _BLOCK_VARS.items():
            a = getattr(b, attr)
            if a is None:
                continue
            a = np.asarray(a)
            fname = b.fields.get(attr, attr)
            if a.ndim != 2:
                raise fail(b.where, fname, f"expected a 2-d array (tokens, {'experts' if attr == 'logits' else 'k'}), got shape {a.shape}")
            if n is None:
                n = a.shape[0]
            elif a.shape[0] != n:
                raise fail(b.where, fname, f"{a.shape[0]} tokens, but the expert ids cover {n}")
            if attr == "ids":
                a = self._check_ids(a, b, fname)
            elif attr == "weights":
                if a.shape[1] != self.k:
                    raise fail(b.where, fname, f"{a.shape[1]} weights per token, expected {self.k} (one per slot)")
                ok = np.isfinite(a)
                if b.missing is not None:
                    ok |= np.asarray(b.missing, dtype=bool)[:, None]
                if not np.all(ok):
                    raise fail(b.where, fname, "non-finite weight")
            else:
                if self.num_logits is None:
                    self.num_logits = int(a.shape[1])
                elif a.shape[1] != self.num_logits:
                    raise fail(b.where, fname, f"{a.shape[1]} logits per token, earlier records had {self.num_logits}")
                if self.num_experts is not None and a.shape[1] != self.num_experts:
                    raise fail(b.where, fname, f"{a.shape[1]} logits per token, num_experts is {self.num_experts}")
                if not np.all(np.isfinite(a)):
                    raise fail(b.where, fname, "non-finite (NaN/inf) router logit")
            key = (var, b.layer)
            done = self.rows.get(key, self._start)
            if done < self._start:
                raise fail(b.where, None, f"layer {b.layer} is missing from an earlier sample")
            if done + a.shape[0] > self._end:
                raise fail(
                    b.where, fname,
                    f"layer {b.layer} gets {done + a.shape[0] - self._start} tokens, the sample has {g.n}",
                )
            if attr == "logits" and b.ids is not None and np.size(b.ids) and int(np.max(b.ids)) >= a.shape[1]:
                raise fail(b.where, b.fields.get("ids", "ids"),
                           f"expert id {int(np.max(b.ids))} outside the {a.shape[1]} experts of the record's logits")
            f = self.files.get(key)
            if f is None:
                f = self.files[key] = open(self.dir / f"{var}.{b.layer}.bin", "ab")
            np.ascontiguousarray(a, dtype=SPOOL_DTYPES[var]).tofile(f)
            self.rows[key] = done + a.shape[0]

    def _check_ids(self, a: np.ndarray, b: Block, fname: str) -> np.ndarray:
        if a.dtype.kind not in "iu":
            if a.dtype.kind == "f" and a.size and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
                a = a.astype(np.int64)
            else:
                raise fail(b.where, fname, f"expert ids must be integers, got dtype {a.dtype}")
        if self.k is None:
            if a.shape[1] < 1:
                raise fail(b.where, fname, "no expert slots")
            self.k = int(a.shape[1])
        elif a.shape[1] != self.k:
            raise fail(b.where, fname, f"{a.shape[1]} experts per token, earlier records had {self.k} (ragged top-k)")
        if a.size == 0:
            return a
        if b.missing is not None and np.any(b.missing):
            # tokens kept with fill: validate the others, write -1 (the cube's "not written") for these
            miss = np.asarray(b.missing, dtype=bool)
            if miss.all():
                return np.full(a.shape, -1, dtype=np.int64)
            keep = Block(layer=b.layer, where=b.where, ids=a[~miss], fields=b.fields,
                         weights=None if b.weights is None else np.asarray(b.weights)[~miss])
            out = np.full(a.shape, -1, dtype=np.int64)
            out[~miss] = self._check_ids(a[~miss], keep, fname)
            if b.weights is not None:
                w = np.full(np.shape(b.weights), np.nan, dtype=np.float64)
                w[~miss] = keep.weights
                b.weights = w
            return out
        lo, hi = int(a.min()), int(a.max())
        if lo < 0:
            row = int(np.argwhere(a < 0)[0][0])
            raise fail(b.where, fname, f"negative expert id {lo} (token {row} of the record)")
        if self.num_experts is not None and hi >= self.num_experts:
            row = int(np.argwhere(a >= self.num_experts)[0][0])
            raise fail(
                b.where, fname,
                f"expert id {hi} >= num_experts={self.num_experts} (token {row} of the record); "
                "expected ids 0..num_experts-1",
            )
        if hi > np.iinfo(np.int16).max:
            raise fail(b.where, fname, f"expert id {hi} does not fit the cube's int16 ids")
        if self.k > 1:
            s = np.sort(a, axis=1)
            dup = np.flatnonzero((s[:, 1:] == s[:, :-1]).any(axis=1))
            if dup.size:
                raise fail(b.where, fname, f"token {int(dup[0])} of the record selects the same expert twice: {a[dup[0]].tolist()}")
        if b.weights is not None:
            # slots sorted by weight, top-1 first; ties keep the importer's order
            order = np.argsort(-np.asarray(b.weights, dtype=np.float64), axis=1, kind="stable")
            a = np.take_along_axis(a, order, axis=1)
            b.weights = np.take_along_axis(np.asarray(b.weights), order, axis=1)
        self.max_id = max(self.max_id, hi)
        return a

    # -- results
    def read(self, var: str, layer: int) -> np.ndarray:
        """The spooled rows of ``var`` at ``layer`` as a read-only memmap (tokens, width)."""
        width = self.num_logits if var == "router_logits" else self.k
        path = self.dir / f"{var}.{layer}.bin"
        if self.n_tokens == 0:
            return np.zeros((0, width), SPOOL_DTYPES[var])
        return np.memmap(path, dtype=SPOOL_DTYPES[var], mode="r", shape=(self.n_tokens, width))

    def tokens(self, side: dict | None = None) -> xr.Dataset:
        """The token table of the collected samples, labels overridden by the side table."""
        return build_token_table(self.metas, side)


# --------------------------------------------------------------------------- token tables and side tables

SIDE_COLUMNS = ("dataset", "domain", "condition", "pair")


def build_token_table(metas: Sequence[SampleMeta], side: dict | None = None) -> xr.Dataset:
    """Token table (dim ``token``) for ``metas``, samples numbered 0.. in order; ``sample_id`` = each sample's key."""
    side = side or {}
    n = np.array([m.n for m in metas], dtype=np.int64)
    T = int(n.sum())
    sample = np.repeat(np.arange(len(metas), dtype=np.int32), n)

    def cat(attr, dtype, default_fn):
        parts = []
        for m in metas:
            v = getattr(m, attr)
            parts.append(default_fn(m) if v is None else np.asarray(v, dtype=dtype))
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    token_id = cat("token_id", np.int32, lambda m: np.full(m.n, -1, np.int32))
    position = cat("position", np.int32, lambda m: np.arange(m.n, dtype=np.int32))
    text = cat("token_text", object, lambda m: np.full(m.n, "", dtype=object))
    phase = cat("phase", object, lambda m: np.full(m.n, "", dtype=object))
    labels = {}
    for col in SIDE_COLUMNS:
        per_sample = np.array([str(side.get(m.key, {}).get(col, getattr(m, col))) for m in metas], dtype=object)
        labels[col] = per_sample[sample] if T else np.zeros(0, object)
    keys = np.array([str(m.key) for m in metas], dtype=object)
    return token_table(
        sample=sample, sample_id=keys[sample] if T else np.zeros(0, object),
        position=position, token_id=token_id, token_text=text,
        dataset=labels["dataset"], domain=labels["domain"], condition=labels["condition"], pair=labels["pair"],
        phase=phase,
    )


def read_side_table(path: str | os.PathLike | dict | None) -> dict[str, dict[str, str]]:
    """Sample key -> {dataset, domain, condition, pair} from a CSV or JSON file (or a dict).

    CSV: a header with ``sample`` and any of dataset/domain/condition/pair.
    JSON: a list of such objects, or an object mapping sample key -> labels.
    """
    if path is None:
        return {}
    if isinstance(path, dict):
        raw, where = path, "side table"
        rows = [{"sample": k, **v} for k, v in raw.items()]
    else:
        p = Path(path)
        where = str(p)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: side table not found")
        if p.suffix.lower() == ".csv":
            with open(p, newline="") as f:
                reader = csv.DictReader(f)
                rows = [dict(r) for r in reader]
                header = reader.fieldnames or []
            if "sample" not in header:
                raise TraceError(f"{p}: line 1: field 'sample': missing from the header {header}; expected a 'sample' column")
        else:
            try:
                raw = json.loads(p.read_text())
            except ValueError as exc:
                raise TraceError(f"{p}: not valid JSON ({exc})") from None
            if isinstance(raw, dict):
                rows = []
                for k, v in raw.items():
                    if not isinstance(v, dict):
                        raise TraceError(f"{p}: entry {k!r}: expected an object of labels, got {type(v).__name__}")
                    rows.append({"sample": k, **v})
            elif isinstance(raw, list):
                rows = raw
            else:
                raise TraceError(f"{p}: expected a JSON list or object, got {type(raw).__name__}")
    out: dict[str, dict[str, str]] = {}
    for i, r in enumerate(rows):
        rec = f"{where}: row {i + 1}"
        if not isinstance(r, dict) or "sample" not in r:
            raise TraceError(f"{rec}: field 'sample': missing")
        unknown = sorted(set(r) - {"sample", *SIDE_COLUMNS})
        if unknown:
            raise TraceError(f"{rec}: field '{unknown[0]}': unknown column; expected sample and any of {list(SIDE_COLUMNS)}")
        key = str(r["sample"])
        if key in out:
            raise TraceError(f"{rec}: field 'sample': duplicate sample {key!r}")
        out[key] = {c: "" if r[c] is None else str(r[c]) for c in SIDE_COLUMNS if c in r}
    return out


def check_side_keys(side: dict, keys: Iterable[str], where: str) -> None:
    """Refuse a side table that names samples the trace does not have (a wrong key scheme)."""
    if not side:
        return
    known = set(keys)
    unknown = [k for k in side if k not in known]
    if unknown:
        sample = sorted(known)[:5]
        raise TraceError(
            f"{where}: side table names {len(unknown)} sample(s) not in the trace, e.g. {unknown[:3]}; "
            f"the trace's sample keys look like {sample}"
        )


# --------------------------------------------------------------------------- routing from logits

SEMANTICS = {
    "softmax_topk": "softmax over all experts, then top-k by probability; weights = those probabilities",
    "topk_softmax": "top-k by logit, then softmax over the k selected logits (weights sum to 1)",
    "sigmoid_topk": "sigmoid score per expert, then top-k by score; weights = those scores",
}


def check_semantics(semantics: str | None, top_k, renormalize, where: str) -> None:
    """Refuse incomplete or unknown router semantics before any work is done."""
    if semantics is None:
        return
    if semantics not in SEMANTICS:
        raise ValueError(
            f"{where}: semantics {semantics!r} is not one that can be rebuilt from logits; known: {sorted(SEMANTICS)}. "
            "Routers with selection biases, expert groups or capacity limits cannot be rebuilt: import logits only."
        )
    if top_k is None or int(top_k) < 1:
        raise ValueError(f"{where}: semantics={semantics!r} needs top_k (the number of experts per token)")
    if semantics != "topk_softmax" and renormalize is None:
        raise ValueError(
            f"{where}: semantics={semantics!r} needs renormalize=True/False (whether the k weights are renormalised "
            "to sum to 1, e.g. Mixtral True, OLMoE and Qwen2-MoE False); it cannot be guessed"
        )


def describe_semantics(semantics: str, top_k: int, renormalize) -> str:
    text = f"{SEMANTICS[semantics]}; top-{top_k}"
    if semantics != "topk_softmax":
        text += ", renormalised over the k" if renormalize else ", not renormalised"
    return text


def _scores(logits: np.ndarray, semantics: str) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    if semantics == "sigmoid_topk":
        return 1.0 / (1.0 + np.exp(-x))
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def weights_for(logits: np.ndarray, ids: np.ndarray, semantics: str, renormalize) -> np.ndarray:
    """Weights the experts ``ids`` (n, k) receive under ``semantics`` given ``logits`` (n, E)."""
    if semantics == "topk_softmax":
        sel = np.take_along_axis(np.asarray(logits, np.float64), ids.astype(np.int64), axis=1)
        sel = np.exp(sel - sel.max(axis=1, keepdims=True))
        return (sel / sel.sum(axis=1, keepdims=True)).astype(np.float32)
    w = np.take_along_axis(_scores(logits, semantics), ids.astype(np.int64), axis=1)
    if renormalize:
        w = w / w.sum(axis=1, keepdims=True)
    return w.astype(np.float32)


def route_from_logits(logits: np.ndarray, semantics: str, top_k: int, renormalize) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ids (n, k), highest score first (ties: lower id first), and their weights (n, k)."""
    scores = _scores(logits, "sigmoid_topk" if semantics == "sigmoid_topk" else "softmax_topk")
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    return ids.astype(np.int64), weights_for(logits, ids, semantics, renormalize)


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 values."""
    return (np.asarray(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


# --------------------------------------------------------------------------- cube writing


@dataclass
class Collected:
    """One parsed source: its trace metadata and spooled data."""

    trace: Trace
    collector: Collector | None
    checkpoint: str
    step: int


def spool_dir_for(out_path: Path) -> Path:
    # ".tmp-" in the name: storage.cube.clean_temporaries removes what a killed import leaves behind
    return atomic.temp_path(out_path, "spool")


def write_cube(
    parts: list[Collected],
    out_path: Path,
    *,
    side: dict,
    num_experts: int | None,
    top_k: int | None,
    model_family: str | None,
    options: dict,
    overwrite: bool,
    exclude_tokens: np.ndarray | None = None,
    extra_attrs: dict | None = None,
) -> dict:
    """Build the routing cube of ``parts`` (one per checkpoint) at ``out_path``.

    Written into a temporary sibling and renamed into place only once every
    checkpoint's region is written and marked complete. ``exclude_tokens``
    (tokens,) bool leaves those tokens out of every checkpoint (warm-up
    batches, :mod:`.warmup`); ``extra_attrs`` are added to the cube's attrs.
    """
    from ..cube import prepare_routing, seal_region
    import zarr

    first = parts[0]
    tr = first.trace
    aggregates_only = first.collector is None
    keep_idx = None  # token rows written (None: all), after warm-up exclusion
    for p in parts[1:]:
        if (p.collector is None) != aggregates_only:
            raise TraceError(f"{p.trace.paths[0]}: mixes aggregates-only and per-token sources in one cube")
    if aggregates_only and "slot_counts" in tr.aggregates:
        # per-domain slot counts (OLMoE's expert_counts pickles): their own cube layout, no tokens
        from .olmoe_counts import write_counts_cube

        return write_counts_cube(parts, out_path, side=side, num_experts=num_experts, model_family=model_family,
                                 options=options, overwrite=overwrite)

    if aggregates_only:
        tokens = build_token_table([])
        layers = sorted(set(int(x) for x in tr.aggregates["layer"].values))
        for p in parts[1:]:
            other = sorted(set(int(x) for x in p.trace.aggregates["layer"].values))
            if other != layers:
                raise TraceError(f"{p.trace.paths[0]}: layers {other} differ from {tr.paths[0]}'s {layers}")
        E = num_experts or max(int(p.trace.aggregates.sizes.get("expert", 0)) for p in parts) or (tr.num_experts or 0)
        k = top_k or tr.top_k or 0
        variables: tuple[str, ...] = tuple(tr.aggregates.data_vars)
    else:
        c0 = first.collector
        tokens = c0.tokens(side)
        h0 = tokens_hash(tokens)
        keys0 = [m.key for m in c0.metas]
        check_side_keys(side, keys0, tr.paths[0])
        for p in parts[1:]:
            c = p.collector
            keys = [m.key for m in c.metas]
            if keys != keys0 or tokens_hash(c.tokens(side)) != h0:
                raise TraceError(
                    f"{p.trace.paths[0]}: its samples/tokens differ from those of {tr.paths[0]} "
                    f"({len(keys)} samples / {c.n_tokens} tokens vs {len(keys0)} / {c0.n_tokens}); "
                    "checkpoints of one cube must see identical inputs"
                )
            for attr in ("layers", "k", "variables", "num_logits"):
                if getattr(c, attr) != getattr(c0, attr):
                    raise TraceError(
                        f"{p.trace.paths[0]}: {attr} {getattr(c, attr)} differ from {getattr(c0, attr)} in {tr.paths[0]}"
                    )
        if exclude_tokens is not None:
            from .warmup import drop_tokens

            keep_idx = np.flatnonzero(~np.asarray(exclude_tokens, dtype=bool))
            if keep_idx.size == 0:
                raise TraceError(f"{tr.paths[0]}: every token looks like a warm-up/dummy batch (see "
                                 "storage/importers/warmup.py); set keep_warmup = true to import them anyway")
            tokens = drop_tokens(tokens, keep_idx)
        layers = c0.layers
        variables = c0.variables
        max_id = max(p.collector.max_id for p in parts)
        E = num_experts or tr.num_experts or c0.num_logits or (max_id + 1)
        if c0.num_logits is not None and E != c0.num_logits:
            raise TraceError(f"{tr.paths[0]}: logits have {c0.num_logits} experts, num_experts is {E}")
        if max_id >= E:
            raise TraceError(f"{tr.paths[0]}: expert id {max_id} >= num_experts={E}")
        k = c0.k if c0.k is not None else (top_k or tr.top_k or 0)
        if "expert_ids" in variables and top_k is not None and int(top_k) != k:
            raise TraceError(f"{tr.paths[0]}: records have {k} experts per token, top_k={top_k} was given")

    has_ids = "expert_ids" in variables
    attrs = {
        "model_family": model_family or tr.model_family,
        "router_semantics": tr.router_semantics,
        "source": f"moe-atlas importer '{tr.format}' v{tr.version}"
        + ("" if has_ids else (" (aggregates only: no per-token expert ids)" if aggregates_only
                               else " (router logits only: no per-token expert ids)")),
        "has_token_ids": bool(has_ids),
        "slot_order": tr.slot_order if has_ids else "",
        "num_experts_inferred": bool(
            not aggregates_only and num_experts is None and tr.num_experts is None and first.collector.num_logits is None
        ),
        "import_paths": json.dumps([p for part in parts for p in part.trace.paths]),
        "import_options": json.dumps(options, sort_keys=True, default=str),
        "usage_normalisation": "slots: each token contributes k routing slots" if has_ids else "",
    }
    for key, value in tr.attrs.items():
        attrs.setdefault(key, value)
    attrs.update(extra_attrs or {})

    template = empty_routing(
        tokens,
        checkpoints=[p.checkpoint for p in parts],
        steps=[p.step for p in parts],
        layers=layers,
        num_experts=int(E),
        top_k=int(k),
        keep_logits="router_logits" in variables,
        keep_weights="expert_weights" in variables,
        keep_lens=False,
        keep_nll=False,
        attrs=attrs,
        lazy=True,
    )
    if not has_ids:
        template = template.drop_vars("expert_ids")
    if aggregates_only:
        import dask.array as da

        for name in variables:
            spec = VARIABLES[name]
            shape = tuple(template.sizes[d] for d in spec.dims)
            template[name] = xr.Variable(spec.dims, da.full(shape, spec.fill, dtype=spec.dtype),
                                         attrs={"description": spec.description})
        apply_cf_attrs(template)  # long_name/units of the aggregates too

    with atomic.staged(out_path, "import") as tmp:
        prepare_routing(tmp, template)
        group = zarr.open_group(str(tmp), mode="r+")
        for ci, part in enumerate(parts):
            if aggregates_only:
                agg = part.trace.aggregates
                for name in variables:
                    spec = VARIABLES[name]
                    arr = agg[name].reindex(layer=layers, fill_value=spec.fill)
                    if "expert" in spec.dims:
                        arr = arr.reindex(expert=np.arange(E), fill_value=spec.fill)
                    group[name][ci] = np.asarray(arr.transpose(*spec.dims[1:]).values).astype(spec.dtype)
            else:
                c = part.collector
                T = c.n_tokens if keep_idx is None else keep_idx.size
                for name in variables:
                    arr = group[name]
                    step = arr.chunks[2]
                    for li, layer in enumerate(layers):
                        mm = c.read(name, layer)
                        for t0 in range(0, T, step):
                            rows = mm[t0:t0 + step] if keep_idx is None else mm[keep_idx[t0:t0 + step]]
                            arr[ci, li, t0:t0 + step] = np.asarray(rows).astype(arr.dtype, copy=False)
                        del mm
            seal_region(tmp, ci)  # manifest, then complete = 1, written last: the region is whole
        if out_path.exists() and not overwrite:
            raise FileExistsError(f"{out_path}: already exists (pass overwrite=True to replace it)")
    return {
        "path": str(out_path),
        "checkpoints": [p.checkpoint for p in parts],
        "steps": [int(p.step) for p in parts],
        "tokens": int(tokens.sizes["token"]),
        "samples": 0 if aggregates_only else int(np.unique(tokens["sample"].values).size),
        "layers": [int(x) for x in layers],
        "num_experts": int(E),
        "top_k": int(k),
        "variables": list(variables),
        "has_token_ids": bool(has_ids),
        "router_semantics": attrs["router_semantics"],
        "source": attrs["source"],
    }


# --------------------------------------------------------------------------- small parsing helpers


def need(record: dict, key: str, where: str, expected: str = "present"):
    """``record[key]``, or a TraceError naming the field and the keys the record has."""
    if not isinstance(record, dict):
        raise fail(where, None, f"expected a JSON object, got {type(record).__name__}")
    if key not in record:
        keys = sorted(record)[:12]
        raise fail(where, key, f"missing ({expected}); the record has fields {keys}")
    return record[key]


def int_array(value, where: str, field_name: str, ndim: int) -> np.ndarray:
    """A nested JSON list as an integer array of ``ndim`` dims; ragged lists are refused."""
    try:
        a = np.asarray(value)
    except ValueError:
        raise fail(where, field_name, f"ragged nested list (rows of different lengths); expected a regular {ndim}-d array") from None
    if a.dtype == object:
        raise fail(where, field_name, f"ragged nested list (rows of different lengths); expected a regular {ndim}-d array")
    if a.ndim != ndim:
        raise fail(where, field_name, f"expected a {ndim}-d array, got shape {a.shape}")
    if a.size and a.dtype.kind not in "iu":
        if a.dtype.kind == "f" and np.all(a == np.round(a)):
            return a.astype(np.int64)
        raise fail(where, field_name, f"expected integers, got {a.dtype}")
    return a.astype(np.int64) if a.size == 0 else a


def check_layers_option(layers, n: int, where: str) -> list[int]:
    if layers is None:
        return list(range(n))
    layers = [int(x) for x in layers]
    if len(layers) != n:
        raise fail(where, "layers", f"option layers lists {len(layers)} layer ids, the record has {n} layers")
    if len(set(layers)) != n:
        raise fail(where, "layers", f"option layers has duplicates: {layers}")
    return layers


_BRACKETS_TO_SPACE = str.maketrans("[]", "  ")
_OPEN_BRACKETS = re.compile(r"\s*((?:\[\s*)+)")


def slice_int_array(line: str, key: str) -> str | None:
    """The text of the integer array under ``key`` (no JSON parse), or None."""
    i = line.find(f'"{key}"')
    if i < 0:
        return None
    m = _OPEN_BRACKETS.match(line, line.find(":", i) + 1)
    if not m:
        return None
    depth = m.group(1).count("[")
    # arrays of ints hold no strings: only the outermost array ends in `depth` consecutive closers
    close = re.compile(r"\]" + r"\s*\]" * (depth - 1)).search(line, m.end())
    return line[m.start(1):close.end()] if close else None


def fast_ints(text: str) -> np.ndarray | None:
    """All integers of a nested JSON int array's text, flattened; None when the text is not that."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            return np.fromstring(text.translate(_BRACKETS_TO_SPACE), sep=",", dtype=np.int64)
        except (DeprecationWarning, ValueError):
            return None


def total_size(paths: Iterable[str | Path]) -> int:
    return sum(Path(p).stat().st_size for p in paths if Path(p).is_file())


__all__ = [
    "Block",
    "Collected",
    "Collector",
    "SEMANTICS",
    "SampleMeta",
    "Samples",
    "Trace",
    "TraceError",
    "bf16_to_float32",
    "build_token_table",
    "check_semantics",
    "describe_semantics",
    "fail",
    "read_side_table",
    "route_from_logits",
    "weights_for",
    "write_cube",
]
