"""OLMoE's published expert counts: ``routing_output/<model>/expert_counts/<domain>.pkl`` → a counts cube.

OLMoE's routing analysis (``run_routing_analysis.py`` in allenai/OLMoE) runs
each domain's text through the model, takes the top-k experts of every token
at every MoE layer, and pickles, per domain, the per-layer
``collections.Counter`` of those expert ids (keys numpy int64, values slot
counts)::

    pickle.dump([layer_counters[0], layer_counters[7], layer_counters[15]], f)   # a list: layers 0, 7, 15
    pickle.dump(dict(layer_counters), f)                                         # or a dict: layer -> Counter

Every token fills top_k slots at every layer, so a layer's counts sum to
top_k × tokens. There are no tokens or samples in these files, so the result
is an aggregate-counts cube (``storage.schema.COUNT_VARIABLES``: ``slot_counts``
(checkpoint, layer, domain, expert)), on which usage, balance and domain
specialization run; the other analyses are skipped with that reason.

Sources (one per checkpoint): a model folder holding ``expert_counts/``, the
``expert_counts`` folder itself, or one ``<domain>.pkl`` (one domain). The
sibling ``expert_counts_crosslayer`` files (Counters of (expert, expert) pairs)
are not per-layer counts and are refused by their keys.

Options
-------
top_k : experts per token (OLMoE 8, Mixtral 2); needed: the counts do not say it.
layers : the MoE layer ids of a *list* pickle, in order (OLMoE's published
    files hold layers [0, 7, 15] of 16); default 0..n-1, recorded in attrs
    ``layers_assumed``. A dict pickle names its layers itself.

Safety: pickles are read with a restricted unpickler that resolves only
``collections.Counter``, numpy's scalar reconstructor (integer dtypes only),
``numpy.dtype`` and, for protocol-2 files, ``_codecs.encode`` to latin-1;
any other global (``os.system``, ``builtins.eval``, ``subprocess.Popen``...)
stops the import naming the file and the global, before anything runs.
"""

from __future__ import annotations

import io
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import xarray as xr

from .. import atomic
from ..schema import counts_cube
from ._core import Trace, TraceError, fail

FORMAT = "olmoe_counts"
VERSION = 1
MAX_PICKLE_BYTES = 1 << 30  # a counts file is a few KB; refuse to unpickle something absurd


class _Refused(pickle.UnpicklingError):
    """An allowed global called with arguments an expert-counts file never uses."""


def _numpy_scalar():
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar
    return scalar


def _safe_scalar(dtype, data=None):
    """numpy's scalar reconstructor, for integer dtypes only (the keys of expert counters)."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "iu":
        raise _Refused(f"numpy scalar of dtype {dtype!r}; only integer expert ids are expected")
    if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
        raise _Refused(f"numpy scalar with {type(data).__name__} data; expected {dtype.itemsize} bytes")
    return _numpy_scalar()(dtype, bytes(data))


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as protocol-2 pickles use it for bytes: latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode with encoding {encoding!r}; only latin1 is expected")
    return text.encode("latin1")


def _safe_dtype(*args):
    if not args or not isinstance(args[0], str):
        raise _Refused(f"numpy.dtype{args!r}; expected a dtype string")
    return np.dtype(args[0])


ALLOWED_GLOBALS = {
    ("collections", "Counter"): Counter,
    ("numpy._core.multiarray", "scalar"): _safe_scalar,
    ("numpy.core.multiarray", "scalar"): _safe_scalar,
    ("numpy", "dtype"): _safe_dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolve only :data:`ALLOWED_GLOBALS`; any other global is refused before it can run."""

    def __init__(self, file, *, where: str):
        super().__init__(file)
        self.where = where

    def find_class(self, module, name):
        import _compat_pickle

        # protocol 0-2 pickles name Python 2 modules (__builtin__.eval): name them as Python 3 does
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        obj = ALLOWED_GLOBALS.get((module, name))
        if obj is None:
            raise TraceError(
                f"{self.where}: refused to unpickle global '{module}.{name}': an expert-counts pickle holds only "
                f"collections.Counter and numpy integers (allowed: "
                f"{sorted(f'{m}.{n}' for m, n in ALLOWED_GLOBALS)}); the file is not an OLMoE counts file "
                "or is unsafe"
            )
        return obj

    def persistent_load(self, pid):
        raise TraceError(f"{self.where}: refused a persistent id in the pickle; not an OLMoE counts file")


def load_counts_pickle(path: str | os.PathLike):
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (TraceError naming the file on any refusal)."""
    p = Path(path)
    size = p.stat().st_size
    if size > MAX_PICKLE_BYTES:
        raise TraceError(f"{p}: {size} bytes; an expert-counts pickle is small (refusing more than {MAX_PICKLE_BYTES})")
    data = p.read_bytes()
    try:
        return RestrictedUnpickler(io.BytesIO(data), where=str(p)).load()
    except TraceError:
        raise
    except _Refused as exc:
        raise TraceError(f"{p}: refused: {exc}") from None
    except Exception as exc:  # truncated or not a pickle at all
        raise TraceError(f"{p}: not a readable pickle ({type(exc).__name__}: {exc})") from None


def _expert_id(key, where: str) -> int:
    if isinstance(key, (bool, np.bool_)) or not isinstance(key, (int, np.integer)):
        if isinstance(key, tuple):
            raise fail(where, None, f"counter key {key!r} is a tuple: this looks like an expert_counts_crosslayer "
                                    "file (pairs of experts), not per-layer expert counts")
        raise fail(where, None, f"counter key {key!r} ({type(key).__name__}); expected an integer expert id")
    if int(key) < 0:
        raise fail(where, None, f"negative expert id {int(key)}")
    return int(key)


def _count(value, where: str, key) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or int(value) < 0:
        raise fail(where, None, f"count {value!r} for expert {key}; expected a non-negative integer")
    return int(value)


def parse_counts(obj, where: str, layers: list[int] | None) -> tuple[list[int], list[dict[int, int]], bool]:
    """Per-layer {expert: slots} from an unpickled OLMoE counts object.

    Returns (layer ids, counts per layer, whether the layer ids were assumed).
    """
    if isinstance(obj, dict) and not isinstance(obj, Counter):
        items = sorted(obj.items(), key=lambda kv: kv[0] if isinstance(kv[0], (int, np.integer)) else -1)
        ids = []
        for k, _ in items:
            if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
                raise fail(where, None, f"layer key {k!r}; a dict pickle maps integer layer ids to Counters")
            ids.append(int(k))
        if layers is not None and [int(x) for x in layers] != ids:
            raise fail(where, "layers", f"option layers {list(layers)} differs from the file's layer keys {ids}")
        counters, assumed = [v for _, v in items], False
    elif isinstance(obj, (list, tuple)):
        counters = list(obj)
        if layers is None:
            ids, assumed = list(range(len(counters))), True
        else:
            ids, assumed = [int(x) for x in layers], False
            if len(ids) != len(counters):
                raise fail(where, "layers", f"option layers lists {len(ids)} layer ids, the file holds "
                                            f"{len(counters)} per-layer counters")
            if len(set(ids)) != len(ids):
                raise fail(where, "layers", f"option layers has duplicates: {ids}")
    else:
        raise fail(where, None, f"holds a {type(obj).__name__}; expected a list of per-layer Counters "
                                "(or a dict layer -> Counter)")
    if not counters:
        raise fail(where, None, "no per-layer counters")
    out = []
    for li, c in zip(ids, counters):
        if not isinstance(c, dict):
            raise fail(where, None, f"layer {li}: a {type(c).__name__}; expected a Counter of expert ids")
        out.append({_expert_id(k, f"{where}: layer {li}"): _count(v, f"{where}: layer {li}", k) for k, v in c.items()})
    return ids, out, assumed


def _domain_files(source: Path) -> tuple[list[Path], str]:
    """The per-domain pickles of one source and a default checkpoint name."""
    if source.is_file():
        return [source], source.parent.parent.name if source.parent.name.startswith("expert_counts") else source.stem
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: does not exist")
    folder = source / "expert_counts" if (source / "expert_counts").is_dir() else source
    files = sorted(folder.glob("*.pkl"))
    if not files:
        raise TraceError(f"{folder}: no <domain>.pkl files (expected OLMoE's routing_output/<model>/expert_counts/)")
    name = source.parent.name if folder == source and source.name.startswith("expert_counts") else source.name
    return files, name


def read(source, *, top_k: int | None = None, layers: list[int] | None = None) -> Trace:
    """Read one checkpoint's OLMoE expert counts (see the module docstring).

    Returns
    -------
    Trace with ``events=None`` and ``aggregates`` = Dataset ``slot_counts``
    (layer, domain, expert) int64.
    """
    source = Path(source)
    if top_k is None or int(top_k) < 1:
        raise TraceError(f"{source}: format {FORMAT!r} needs option top_k (experts per token: OLMoE 8, Mixtral 2); "
                         "the counts do not record it")
    k = int(top_k)
    files, name = _domain_files(source)
    per_domain = {}
    layer_ids = None
    assumed = False
    for f in files:
        ids, counts, assumed_here = parse_counts(load_counts_pickle(f), str(f), layers)
        if layer_ids is None:
            layer_ids, first, assumed = ids, f, assumed_here
        elif ids != layer_ids:
            raise TraceError(f"{f}: layers {ids} differ from {first}'s {layer_ids}; every domain must cover the "
                             "same layers")
        totals = [sum(c.values()) for c in counts]
        if len(set(totals)) != 1:
            raise TraceError(f"{f}: the layers count different numbers of slots {dict(zip(ids, totals))}; every "
                             "token is routed at every layer, so they must be equal")
        if totals[0] % k:
            raise TraceError(f"{f}: {totals[0]} slots per layer is not a multiple of top_k={k}; wrong top_k?")
        per_domain[f.stem] = counts
    E = max((max(c) for counts in per_domain.values() for c in counts if c), default=-1) + 1
    if E < 1:
        raise TraceError(f"{source}: every counter is empty")
    domains = list(per_domain)
    arr = np.zeros((len(layer_ids), len(domains), E), dtype=np.int64)
    for di, d in enumerate(domains):
        for li, c in enumerate(per_domain[d]):
            for e, n in c.items():
                arr[li, di, e] = n
    agg = xr.Dataset(
        {"slot_counts": (("layer", "domain", "expert"), arr)},
        coords={"layer": np.asarray(layer_ids, dtype=np.int32), "domain": np.asarray(domains, dtype=object),
                "expert": np.arange(E, dtype=np.int32)},
    )
    attrs = {"olmoe_counts_files": [str(f) for f in files],
             "olmoe_counts_tokens": {d: int(arr[0, i].sum() // k) for i, d in enumerate(domains)}}
    if assumed:
        attrs["layers_assumed"] = (f"layer ids 0..{len(layer_ids) - 1} assumed (the file is a list); OLMoE's "
                                   "published files hold layers [0, 7, 15]: pass option layers to say so")
    return Trace(
        format=FORMAT, version=VERSION, paths=[str(f) for f in files],
        router_semantics=f"top-{k} experts per token as counted by the source (slot counts only; weights unknown)",
        events=None, model_family="olmoe", num_experts=None, top_k=k, checkpoint=name, attrs=attrs, aggregates=agg,
    )


def write_counts_cube(parts, out_path: Path, *, side: dict, num_experts: int | None, model_family: str | None,
                      options: dict, overwrite: bool) -> dict:
    """Write the counts cube of ``parts`` (one :class:`._core.Collected` per checkpoint) at ``out_path``.

    Domains are the union over checkpoints (a domain a checkpoint lacks is -1,
    "not recorded"); a side table may relabel a file's domain (key = file
    stem, column ``domain``). Written to a temporary sibling and renamed into
    place, like every import.
    """
    import json

    first = parts[0].trace
    layers = [int(x) for x in first.aggregates["layer"].values]
    k = int(first.top_k)
    for p in parts[1:]:
        other = [int(x) for x in p.trace.aggregates["layer"].values]
        if other != layers:
            raise TraceError(f"{p.trace.paths[0]}: layers {other} differ from {first.paths[0]}'s {layers}")
    stems = []
    for p in parts:
        stems += [str(d) for d in p.trace.aggregates["domain"].values if str(d) not in stems]
    unknown = [key for key in side if key not in stems]
    if unknown:
        raise TraceError(f"side table names domain file(s) {unknown[:3]} that no source has; the files are {stems}")
    E_seen = max(int(p.trace.aggregates.sizes["expert"]) for p in parts)
    E = int(num_experts) if num_experts else E_seen
    if E_seen > E:
        raise TraceError(f"{first.paths[0]}: expert id {E_seen - 1} >= num_experts={E}")
    arr = np.full((len(parts), len(layers), len(stems), E), -1, dtype=np.int64)
    for ci, p in enumerate(parts):
        agg = p.trace.aggregates["slot_counts"]
        for d in agg["domain"].values:
            arr[ci, :, stems.index(str(d)), : agg.sizes["expert"]] = agg.sel(domain=d).transpose("layer", "expert").values
            arr[ci, :, stems.index(str(d)), agg.sizes["expert"]:] = 0
    labels = [str(side.get(s, {}).get("domain", s)) or s for s in stems]
    if len(set(labels)) != len(labels):
        # two files relabelled to one domain: pool their counts
        merged = sorted(set(labels), key=labels.index)
        pooled = np.zeros(arr.shape[:2] + (len(merged), E), dtype=np.int64)
        for j, lab in enumerate(merged):
            cols = [i for i, x in enumerate(labels) if x == lab]
            sub = arr[:, :, cols]
            pooled[:, :, j] = np.where((sub < 0).any(axis=2), -1, sub.sum(axis=2))
        arr, labels = pooled, merged
    attrs = {
        "model_family": model_family or first.model_family,
        "router_semantics": first.router_semantics,
        "source": f"moe-atlas importer '{first.format}' v{first.version}",
        "num_experts_inferred": bool(not num_experts),
        "import_paths": json.dumps([x for p in parts for x in p.trace.paths]),
        "import_options": json.dumps(options, sort_keys=True, default=str),
        "usage_normalisation": "slots: each token contributes k routing slots",
        "domain_files": json.dumps(dict(zip(stems, [str(side.get(s, {}).get("domain", s)) or s for s in stems]))),
    }
    if "layers_assumed" in first.attrs:
        attrs["layers_assumed"] = first.attrs["layers_assumed"]
    for key in ("step_inferred",):
        for p in parts:
            if key in p.trace.attrs:
                attrs[key] = p.trace.attrs[key]
    ds = counts_cube(arr, checkpoints=[p.checkpoint for p in parts], steps=[int(p.step) for p in parts],
                     layers=layers, domains=labels, top_k=k, attrs=attrs)
    from .. import manifest as manifests
    from ..cube import seal_region

    out_path = Path(out_path)
    with atomic.staged(out_path, "import") as tmp:
        # one chunk per checkpoint, like every region of a routing cube; each checkpoint is sealed
        # (manifest of its chunks, then complete = 1) as the importers do, so readers verify it
        ds["complete"].values[:] = 0
        C, L, D, E_ = ds["slot_counts"].shape
        ds.to_zarr(tmp, mode="w", consolidated=True,
                   encoding={"slot_counts": {"chunks": (1, L, D, E_)}, "complete": {"chunks": (C,)}})
        manifests.seal_template(tmp)
        for ci in range(C):
            seal_region(tmp, ci)
        if out_path.exists() and not overwrite:
            raise FileExistsError(f"{out_path}: already exists (pass overwrite=True to replace it)")
    return {
        "path": str(out_path), "checkpoints": [p.checkpoint for p in parts], "steps": [int(p.step) for p in parts],
        "tokens": 0, "samples": 0, "layers": layers, "num_experts": E, "top_k": k, "variables": ["slot_counts"],
        "has_token_ids": False, "domains": labels, "router_semantics": attrs["router_semantics"],
        "source": attrs["source"],
    }
