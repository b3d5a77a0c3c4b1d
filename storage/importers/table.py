"""Long routing tables: one row per (sample, layer, token), as JSONL, CSV/TSV or Parquet (format ``table``).

Research scripts around vLLM and transformers write routing as a long table
(FORMATS.md item 9), under varying field names. Recognised names (case and
surrounding spaces ignored; ``columns={"role": "name"}`` names them
explicitly, and must when two candidates of one role are present):

=========== ==================================================================
role        recognised column names
=========== ==================================================================
sample      problem_id, req_id, request_id, doc_id, document_id, sample_id, sample, prompt_id, question_id
layer       layer, layer_id, layer_idx, layer_index
token       token_idx, pos, position, token_index, token_pos, tok_idx
ids         experts, topk_ids, selected_experts, expert_ids, topk_indices, topk_experts, expert_indices
weights     gating_probs, topk_weights, probs, expert_weights, routing_weights, weights, topk_probs, gate_probs
phase       phase, stage (prefill/prompt or decode/generate)
token_id    token_id, input_id, vocab_id (the vocabulary id)
token_text  token_text, token_str, piece
dataset     dataset, dataset_name
domain      domain
=========== ==================================================================

sample, layer, token and ids are required. A sample is a request or a
document (never a forward batch): its key is the sample column's value, or
``<dataset>/<value>`` when a dataset column is present (problem ids repeat
across datasets); rows of one sample may be anywhere in the file. Tokens are
ordered by the token column, which becomes ``position``.

Cells: CSV cells may hold lists as ``[1, 5]``, ``1 5``, ``1;5`` (or ``1,5``
when quoted); Parquet list columns and JSON lists are read as they are;
integers may be written as floats (``3.0``) or strings. Files may carry a BOM,
CRLF, blank lines, trailing whitespace and unknown columns; a truncated last
line is refused by number.

Tokens that miss a layer that other tokens have are counted and reported in
attrs (``tokens_missing_layers``); ``missing_layers="drop"`` (default) drops
them, ``"fill"`` keeps them with ids -1 and weights NaN at the missing layers.
A (sample, token, layer) given twice is refused, naming both rows.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ._core import Block, SampleMeta, Samples, Trace, TraceError, fail
from ._text import ends_with_line_break, float_list, int_list, iter_jsonl, phase_name, to_int

VERSION = 1
SEMANTICS = "as the table's writer recorded it: top-k expert ids per (token, layer), weights where given"
MISSING_CHOICES = ("drop", "fill")
ROLES: dict[str, tuple[str, ...]] = {
    "sample": ("problem_id", "req_id", "request_id", "doc_id", "document_id", "sample_id", "sample", "prompt_id",
               "question_id"),
    "layer": ("layer", "layer_id", "layer_idx", "layer_index"),
    "token": ("token_idx", "pos", "position", "token_index", "token_pos", "tok_idx"),
    "ids": ("experts", "topk_ids", "selected_experts", "expert_ids", "topk_indices", "topk_experts", "expert_indices"),
    "weights": ("gating_probs", "topk_weights", "probs", "expert_weights", "routing_weights", "weights", "topk_probs",
                "gate_probs"),
    "phase": ("phase", "stage"),
    "token_id": ("token_id", "input_id", "vocab_id"),
    "token_text": ("token_text", "token_str", "piece"),
    "dataset": ("dataset", "dataset_name"),
    "domain": ("domain",),
}
REQUIRED = ("sample", "layer", "token", "ids")
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet"}


def check_missing_option(value: str) -> None:
    if value not in MISSING_CHOICES:
        raise ValueError(f"missing_layers={value!r}; expected one of {list(MISSING_CHOICES)}")


# --------------------------------------------------------------------------- rows -> samples


class Rows:
    """Routing rows collected in file order (one per sample, token, layer)."""

    def __init__(self):
        self.sample: list[str] = []
        self.token: list[int] = []
        self.layer: list[int] = []
        self.ids: list[list[int]] = []
        self.weights: list[list[float] | None] = []
        self.phase: list[str] = []
        self.token_id: list[int] = []
        self.token_text: list[str] = []
        self.where: list[str] = []
        self.labels: dict[str, dict[str, str]] = {}

    @property
    def n(self) -> int:
        return len(self.sample)

    @property
    def all_weights(self) -> bool:
        return bool(self.weights) and all(w is not None for w in self.weights)

    def add(self, *, sample: str, token: int, layer: int, ids: list[int], weights, phase: str, where: str,
            token_id: int = -1, token_text: str = "", labels: dict | None = None) -> None:
        if token < 0:
            raise fail(where, "token", f"negative token index {token}")
        if layer < 0:
            raise fail(where, "layer", f"negative layer {layer}")
        if not ids:
            raise fail(where, "ids", "no expert ids")
        self.sample.append(sample)
        self.token.append(token)
        self.layer.append(layer)
        self.ids.append(ids)
        self.weights.append(weights)
        self.phase.append(phase)
        self.token_id.append(token_id)
        self.token_text.append(token_text)
        self.where.append(where)
        if labels:
            self.labels.setdefault(sample, labels)


@dataclass
class Columns:
    """Routing rows as arrays: (n,) per-row columns, ids / weights (n, k); ``where(i)`` names row i."""

    sample: np.ndarray
    token: np.ndarray
    layer: np.ndarray
    ids: np.ndarray
    weights: np.ndarray | None
    phase: np.ndarray
    token_id: np.ndarray
    token_text: np.ndarray
    labels: dict
    where: Callable[[int], str]
    ids_field: str = "ids"

    @property
    def n(self) -> int:
        return int(self.token.size)

    @staticmethod
    def concat(parts: list["Columns"]) -> "Columns":
        if len(parts) == 1:
            return parts[0]
        k = {p.ids.shape[1] for p in parts}
        if len(k) > 1:
            first = parts[0]
            odd = next(p for p in parts if p.ids.shape[1] != first.ids.shape[1])
            raise fail(odd.where(0), odd.ids_field, f"{odd.ids.shape[1]} experts, {first.where(0)} has "
                                                   f"{first.ids.shape[1]} (ragged top-k)")
        if len({p.weights is None for p in parts}) > 1:
            a = next(p for p in parts if p.weights is None)
            b = next(p for p in parts if p.weights is not None)
            raise fail(a.where(0), "weights", f"missing here, present at {b.where(0)}; weights must be on every row or none")
        offsets = np.cumsum([0] + [p.n for p in parts])

        def where(i: int) -> str:
            j = int(np.searchsorted(offsets, i, side="right")) - 1
            return parts[j].where(i - int(offsets[j]))

        labels: dict = {}
        for p in parts:
            for key, value in p.labels.items():
                labels.setdefault(key, value)
        cat = np.concatenate
        return Columns(
            sample=cat([p.sample for p in parts]), token=cat([p.token for p in parts]),
            layer=cat([p.layer for p in parts]), ids=cat([p.ids for p in parts]),
            weights=None if parts[0].weights is None else cat([p.weights for p in parts]),
            phase=cat([p.phase for p in parts]), token_id=cat([p.token_id for p in parts]),
            token_text=cat([p.token_text for p in parts]), labels=labels, where=where, ids_field=parts[0].ids_field,
        )


def rows_to_columns(rows: Rows, ids_field: str) -> Columns:
    """The collected rows as arrays; ragged top-k and weights on some rows only are refused, naming the row."""
    n = rows.n
    k = len(rows.ids[0])
    lens = np.fromiter((len(x) for x in rows.ids), dtype=np.int64, count=n)
    bad = np.flatnonzero(lens != k)
    if bad.size:
        i = int(bad[0])
        raise fail(rows.where[i], ids_field, f"{lens[i]} experts, the first row ({rows.where[0]}) has {k} (ragged top-k)")
    have_w = np.fromiter((w is not None for w in rows.weights), dtype=bool, count=n)
    weights = None
    if have_w.any():
        if not have_w.all():
            i = int(np.flatnonzero(~have_w)[0])
            j = int(np.flatnonzero(have_w)[0])
            raise fail(rows.where[i], "weights", f"missing here, present at {rows.where[j]}; weights must be on every row or none")
        wl = np.fromiter((len(w) for w in rows.weights), dtype=np.int64, count=n)
        if (wl != k).any():
            i = int(np.flatnonzero(wl != k)[0])
            raise fail(rows.where[i], "weights", f"{wl[i]} weights for {k} experts")
        weights = np.asarray(rows.weights, dtype=np.float64)
    where_list = rows.where
    return Columns(
        sample=np.asarray(rows.sample, dtype=object), token=np.asarray(rows.token, dtype=np.int64),
        layer=np.asarray(rows.layer, dtype=np.int64), ids=np.asarray(rows.ids, dtype=np.int64), weights=weights,
        phase=np.asarray(rows.phase, dtype=object), token_id=np.asarray(rows.token_id, dtype=np.int64),
        token_text=np.asarray(rows.token_text, dtype=object), labels=rows.labels,
        where=lambda i: where_list[i], ids_field=ids_field,
    )


def emit_samples(cols: Columns, *, layers: list[int] | None, missing: str, attrs: dict, where: str,
                 split_repeats: bool = False):
    """Check the rows and return the event generator of their samples (one per sample key, first-seen order).

    All checks run here, before any event, so a bad table fails before anything is spooled;
    ``attrs`` receives what was counted (missing layers, dropped tokens, repeated request ids).
    """
    n = cols.n
    k = cols.ids.shape[1]
    ids = cols.ids
    weights = cols.weights
    ids_field = cols.ids_field
    token = cols.token
    layer = cols.layer
    keys = pd.Series(cols.sample, dtype=object)

    if split_repeats:
        # a (req_id, token, layer) seen again: the log put a batch under one id; its n-th repeat is another request
        occ = pd.DataFrame({"s": keys, "t": token, "l": layer}).groupby(["s", "t", "l"], sort=False).cumcount().to_numpy()
        if occ.max() > 0:
            repeated = sorted(set(keys[occ > 0]))
            attrs["repeated_request_ids"] = (f"{len(repeated)} req_id(s) log one (token_idx, layer) more than once, "
                                             f"e.g. {repeated[:3]}; the n-th repeat is imported as sample '<req_id>#<n>'")
            keys = pd.Series([s if o == 0 else f"{s}#{o}" for s, o in zip(keys, occ)], dtype=object)
    codes, uniq = pd.factorize(keys, sort=False)
    order = np.lexsort((layer, token, codes))
    sc, tk, ly = codes[order], token[order], layer[order]
    dup = np.flatnonzero((sc[1:] == sc[:-1]) & (tk[1:] == tk[:-1]) & (ly[1:] == ly[:-1]))
    if dup.size:
        a, b = int(order[dup[0]]), int(order[dup[0] + 1])
        a, b = min(a, b), max(a, b)
        raise fail(cols.where(b), "layer",
                   f"sample {uniq[codes[b]]!r}, token {token[b]}, layer {layer[b]} was already given at {cols.where(a)}")
    all_layers = sorted(set(layer.tolist()))
    if layers is not None:
        extra = sorted(set(all_layers) - set(layers))
        if extra:
            i = int(np.flatnonzero(np.isin(layer, extra))[0])
            raise fail(cols.where(i), "layer", f"layer {layer[i]} is not among the layers the log declares {layers}")
        all_layers = sorted(layers)
    L = len(all_layers)
    li_of = np.searchsorted(np.asarray(all_layers), ly)

    plans = []
    n_missing, n_dropped_samples, example = 0, 0, ""
    bounds = np.flatnonzero(np.r_[True, sc[1:] != sc[:-1], True])
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        t = tk[s0:s1]
        ut, tpos = np.unique(t, return_inverse=True)
        present = np.zeros((ut.size, L), dtype=bool)
        present[tpos, li_of[s0:s1]] = True
        lacking = ~present.all(axis=1)
        if lacking.any():
            n_missing += int(lacking.sum())
            if not example:
                j = int(np.flatnonzero(lacking)[0])
                example = (f"e.g. sample {uniq[sc[s0]]!r} token {int(ut[j])} lacks layers "
                           f"{[all_layers[x] for x in np.flatnonzero(~present[j])]}")
        keep_tok = ~lacking if missing == "drop" else np.ones(ut.size, bool)
        if not keep_tok.any():
            n_dropped_samples += 1
            continue
        plans.append((s0, s1, ut, tpos, present, keep_tok))
    if n_missing:
        attrs["tokens_missing_layers"] = (
            f"{n_missing} token(s) miss a layer others have ({example}); "
            + ("dropped" if missing == "drop" else "kept with ids -1 / weights NaN at the missing layers")
            + (f"; {n_dropped_samples} sample(s) had no complete token and were dropped" if n_dropped_samples else "")
        )
    if not plans:
        raise TraceError(f"{where}: no token has routing at every layer {all_layers} "
                         "(pass missing_layers='fill' to keep tokens with missing layers)")

    phase_all = cols.phase
    pcode = pd.factorize(pd.Series(phase_all, dtype=object))[0]

    def events():
        for s0, s1, ut, tpos, present, keep_tok in plans:
            rows_idx = order[s0:s1]
            T = ut.size
            grid = np.full((T, L, k), -1, dtype=np.int64)
            grid[tpos, li_of[s0:s1]] = ids[rows_idx]
            wgrid = None
            if weights is not None:
                wgrid = np.full((T, L, k), np.nan, dtype=np.float64)
                wgrid[tpos, li_of[s0:s1]] = weights[rows_idx]
            first_row = np.full(T, -1, dtype=np.int64)
            first_row[tpos[::-1]] = rows_idx[::-1]  # one row per token (the lowest layer's) for token labels
            phase = np.asarray(phase_all[first_row], dtype=object)
            clash = np.flatnonzero(pcode[rows_idx] != pcode[first_row[tpos]])
            if clash.size:  # every layer of one token must agree on its phase
                i = int(rows_idx[clash[0]])
                j = int(first_row[tpos[clash[0]]])
                raise fail(cols.where(i), "phase", f"{phase_all[i]!r}, but {cols.where(j)} gives this token {phase_all[j]!r}")
            tid = cols.token_id[first_row]
            text = cols.token_text[first_row]
            key = str(uniq[sc[s0]])
            labels = cols.labels.get(key, {})
            keep = keep_tok
            meta = SampleMeta(
                key=key, n=int(keep.sum()), position=ut[keep].astype(np.int32), phase=phase[keep],
                token_id=tid[keep].astype(np.int32) if (tid >= 0).any() else None,
                token_text=text[keep] if any(text) else None,
                dataset=labels.get("dataset", ""), domain=labels.get("domain", ""),
            )
            w = f"{cols.where(int(rows_idx.min()))} ff. (sample {key!r})"
            yield Samples([meta], where=w)
            for li, lay in enumerate(all_layers):
                miss = ~present[keep, li]
                yield Block(layer=int(lay), where=w, ids=grid[keep, li], fields={"ids": ids_field, "weights": "weights"},
                            weights=None if wgrid is None else wgrid[keep, li],
                            missing=miss if miss.any() else None)

    return events()


# --------------------------------------------------------------------------- reading the table files


def _norm(name) -> str:
    return str(name).strip().lstrip("\ufeff").strip().lower()


def _resolve(names: list[str], columns: dict | None, where: str) -> dict[str, str]:
    """role -> actual column name, from the recognised names or the explicit mapping."""
    by_norm = {}
    for c in names:
        by_norm.setdefault(_norm(c), c)
    out: dict[str, str] = {}
    explicit = dict(columns or {})
    unknown = sorted(set(explicit) - set(ROLES))
    if unknown:
        raise ValueError(f"columns: unknown role(s) {unknown}; roles are {sorted(ROLES)}")
    for role, cands in ROLES.items():
        if role in explicit:
            col = explicit[role]
            if col is None:
                continue
            if col not in names and _norm(col) not in by_norm:
                raise fail(where, str(col), f"column named for role '{role}' is not in the table; it has {names[:20]}")
            out[role] = col if col in names else by_norm[_norm(col)]
            continue
        found = [by_norm[c] for c in cands if c in by_norm and by_norm[c] not in out.values()]
        if len(found) > 1:
            raise fail(where, None, f"columns {found} could each be the {role}; name one with columns={{'{role}': ...}}")
        if found:
            out[role] = found[0]
    lacking = [r for r in REQUIRED if r not in out]
    if lacking:
        raise fail(where, None, f"no column for {lacking} among {names[:20]}; recognised names: "
                                + "; ".join(f"{r}: {', '.join(ROLES[r])}" for r in lacking)
                                + " (or pass columns={role: name})")
    return out


def _sample_key(value, where: str, col: str) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)) or (isinstance(value, str) and not value.strip()):
        raise fail(where, col, "empty sample id")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (dict, list)):
        raise fail(where, col, f"expected a sample id, got {value!r}")
    return str(value).strip()


def _add_row(rows: Rows, rec: dict, roles: dict[str, str], where: str, top_k: int | None) -> None:
    def get(role, required=True):
        col = roles.get(role)
        if col is None:
            return None
        if col not in rec:
            if required:
                raise fail(where, col, f"missing; the row has fields {sorted(map(str, rec))[:12]}")
            return None
        v = rec[col]
        if isinstance(v, str) and not v.strip() and not required:
            return None
        return v

    key = _sample_key(get("sample"), where, roles["sample"])
    labels = {}
    ds = get("dataset", required=False)
    if ds is not None:
        labels["dataset"] = str(ds).strip()
        key = f"{labels['dataset']}/{key}"
    dom = get("domain", required=False)
    if dom is not None:
        labels["domain"] = str(dom).strip()
    ids = int_list(get("ids"), where, roles["ids"])
    if top_k is not None and len(ids) != top_k:
        raise fail(where, roles["ids"], f"{len(ids)} experts, top_k={top_k}")
    w = get("weights", required=False)
    weights = None if w is None else float_list(w, where, roles["weights"])
    tid = get("token_id", required=False)
    text = get("token_text", required=False)
    rows.add(sample=key, token=to_int(get("token"), where, roles["token"]),
             layer=to_int(get("layer"), where, roles["layer"]), ids=ids, weights=weights,
             phase=phase_name(get("phase", required=False), where, roles.get("phase", "phase")), where=where,
             token_id=-1 if tid is None else to_int(tid, where, roles["token_id"]),
             token_text="" if text is None else str(text), labels=labels)


def _read_jsonl(path: Path, rows: Rows, columns, top_k):
    roles = None
    for line, rec in iter_jsonl(path):
        where = f"{path}: line {line}"
        if not isinstance(rec, dict):
            raise fail(where, None, f"expected a JSON object (one row), got {type(rec).__name__}")
        if roles is None:
            roles = _resolve(list(rec), columns, where)
        _add_row(rows, rec, roles, where, top_k)


def _read_csv(path: Path, rows: Rows, columns, top_k, delimiter: str):
    ends_nl = ends_with_line_break(path)
    with open(path, "r", encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, skipinitialspace=True)
        header = None
        roles = None
        pending = None
        try:
            for cells in reader:
                line = reader.line_num
                if pending is not None:
                    raise pending
                if not cells or all(not c.strip() for c in cells):
                    continue
                cells = [c.strip() for c in cells]
                if header is None:
                    header = cells
                    roles = _resolve(header, columns, f"{path}: line {line}")
                    continue
                where = f"{path}: line {line}"
                while len(cells) > len(header) and cells[-1] == "":
                    cells.pop()  # a trailing delimiter
                last_where = where
                if len(cells) != len(header):
                    pending = fail(where, None, f"{len(cells)} cells, the header has {len(header)}")
                    continue
                try:
                    _add_row(rows, dict(zip(header, cells)), roles, where, top_k)
                except TraceError as exc:  # raised once we know whether it is the file's cut-off last line
                    pending = exc
        except csv.Error as exc:
            raise TraceError(f"{path}: line {reader.line_num}: malformed CSV ({exc})") from None
        if pending is not None:
            if not ends_nl:
                why = str(pending).split(f"{last_where}: ", 1)[-1]
                raise TraceError(f"{last_where}: truncated last line (the file ends inside a row: {why}); "
                                 "the writer was interrupted - remove the line to import the rest")
            raise pending
    if header is None:
        raise TraceError(f"{path}: line 1: empty file (expected a header row)")


def _read_parquet(path: Path, rows: Rows, columns, top_k):
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is in the test and parquet extras
        raise ImportError(f"{path}: reading Parquet needs pyarrow (pip install 'moe-atlas[parquet]')") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise TraceError(f"{path}: not a readable Parquet file ({exc})") from None
    names = pf.schema_arrow.names
    roles = _resolve(names, columns, str(path))
    i = 0
    for batch in pf.iter_batches(batch_size=1 << 16):
        for rec in batch.to_pylist():
            _add_row(rows, rec, roles, f"{path}: row {i}", top_k)
            i += 1


# --------------------------------------------------------------------------- fast paths (whole columns at once)
# A regular file is read column-wise (pandas / pyarrow); anything irregular (a bad cell, a ragged list, an
# unknown phase, a short or long row, embedded newlines) returns None and the row-by-row reader above runs,
# which names the exact line and field. Both give the same Columns for a regular file.

_WS = np.zeros(256, dtype=bool)
_WS[[9, 10, 13, 32]] = True
_LIST_SEP = np.zeros(256, dtype=bool)
_LIST_SEP[[ord(c) for c in " \t\r\n,;[]()'\""]] = True


def _data_lines(path: Path) -> np.ndarray:
    """1-based numbers of the file's non-blank lines (whitespace-only lines are blank)."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0:
        return np.zeros(0, np.int64)
    nl = np.flatnonzero(raw == 10)
    starts = np.r_[0, nl + 1]
    starts = starts[starts < raw.size]  # a final newline opens no line
    ink = np.maximum.reduceat((~_WS[raw]).view(np.uint8), starts)  # 1 where a line holds a non-blank byte
    return np.flatnonzero(ink) + 1


def _num_lists(cells: pd.Series, k: int | None) -> np.ndarray | None:
    """Cells holding number lists ("[1, 5]", "1 5", "1;5") -> (n, k) float array; None if irregular.

    Byte-level: the cells joined by newlines, separators found with a lookup table, numbers per row
    counted from separator-to-number transitions, values parsed in one ``np.fromstring``.
    """
    vals = cells.tolist()
    try:
        b = np.frombuffer("\n".join(vals).encode("ascii"), dtype=np.uint8)
    except (UnicodeEncodeError, TypeError):
        return None
    if b.size == 0:
        return None
    sep = _LIST_SEP[b]
    first = ~sep & np.r_[True, sep[:-1]]
    row = np.searchsorted(np.flatnonzero(b == 10), np.flatnonzero(first), side="right")
    lens = np.bincount(row, minlength=len(vals))
    if lens.size != len(vals) or (lens != lens[0]).any() or lens[0] < 1 or (k is not None and lens[0] != k):
        return None
    text = np.where(sep, np.uint8(32), b).tobytes().decode("ascii")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            flat = np.fromstring(text, sep=" ", dtype=np.float64)
        except (DeprecationWarning, ValueError):
            return None
    if flat.size != len(vals) * lens[0] or not np.isfinite(flat).all():
        return None
    return flat.reshape(len(vals), int(lens[0]))


def _int_col(values) -> np.ndarray | None:
    v = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=np.float64)
    if np.isnan(v).any() or (v != np.round(v)).any() or (v < 0).any():
        return None
    return v.astype(np.int64)


def _phase_col(values) -> np.ndarray | None:
    from ._text import PHASE_NAMES

    low = pd.Series(values, dtype=object).fillna("").astype(str).str.strip().str.lower()
    known = {"": "", **PHASE_NAMES}
    if not low.isin(list(known)).all():
        return None
    return low.map(known).to_numpy(dtype=object)


def _frame_columns(df: pd.DataFrame, roles: dict, top_k, where, ids=None, weights=None) -> Columns | None:
    """Columns of a frame of strings (CSV) or typed values (Parquet), or None when anything is irregular.

    ``ids`` / ``weights`` (n, k): already parsed (Parquet list columns); otherwise parsed from list cells.
    """
    n = len(df)
    if n == 0:
        return None
    sample = df[roles["sample"]]
    if sample.dtype.kind == "f":
        sv = sample.to_numpy()
        if np.isnan(sv).any() or (sv != np.round(sv)).any():
            return None
        sample = pd.Series(sv.astype(np.int64))
    sample = sample.astype(str).str.strip()
    if (sample == "").any() or sample.isin(["None", "nan"]).any():
        return None
    labels_df = {}
    if "dataset" in roles:
        ds = df[roles["dataset"]].astype(str).str.strip()
        sample = ds + "/" + sample
        labels_df["dataset"] = ds
    if "domain" in roles:
        labels_df["domain"] = df[roles["domain"]].astype(str).str.strip()
    token, layer = _int_col(df[roles["token"]]), _int_col(df[roles["layer"]])
    if token is None or layer is None:
        return None
    if ids is None:
        ids_raw = df[roles["ids"]]
        if not isinstance(ids_raw.iloc[0], str):
            return None
        ids = _num_lists(ids_raw.astype(str), top_k)
    if ids is None or (ids != np.round(ids)).any():
        return None
    if weights is None and "weights" in roles:
        w = df[roles["weights"]].astype(str)
        if (w.str.strip() == "").any():
            return None  # some rows without weights: the row reader decides
        weights = _num_lists(w, ids.shape[1])
        if weights is None:
            return None
    phase = np.full(n, "", dtype=object)
    if "phase" in roles:
        phase = _phase_col(df[roles["phase"]])
        if phase is None:
            return None
    token_id = np.full(n, -1, dtype=np.int64)
    if "token_id" in roles:
        tcol = df[roles["token_id"]].astype(str).str.strip()
        have = tcol != ""
        got = _int_col(tcol[have])
        if got is None:
            return None
        token_id[have.to_numpy()] = got
    text = np.full(n, "", dtype=object)
    if "token_text" in roles:
        text = df[roles["token_text"]].astype(str).to_numpy(dtype=object)
    labels = {}
    if labels_df:
        lab = pd.DataFrame({"key": sample, **labels_df}).drop_duplicates("key")
        labels = {r["key"]: {c: r[c] for c in labels_df} for r in lab.to_dict("records")}
    return Columns(sample=sample.to_numpy(dtype=object), token=token, layer=layer, ids=ids.astype(np.int64),
                   weights=weights, phase=phase, token_id=token_id, token_text=text, labels=labels, where=where,
                   ids_field=roles["ids"])


def _fast_csv(path: Path, columns, top_k, delimiter: str) -> Columns | None:
    try:
        df = pd.read_csv(path, sep=delimiter, dtype=str, keep_default_na=False, skipinitialspace=True,
                         encoding="utf-8-sig", skip_blank_lines=True, engine="c")
        lines = _data_lines(path)
        if lines.size != len(df) + 1:  # blank-only rows pandas kept, or newlines inside cells
            return None
        df.columns = [str(c).strip() for c in df.columns]
        df = df.apply(lambda c: c.str.strip())
        roles = _resolve(list(df.columns), columns, f"{path}: line {int(lines[0])}")
        data_lines = lines[1:]
        return _frame_columns(df, roles, top_k, lambda i: f"{path}: line {int(data_lines[i])}")
    except Exception:  # any irregularity: the row reader names it
        return None


def _fast_parquet(path: Path, columns, top_k) -> Columns | None:
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        t = pq.read_table(path)
        roles = _resolve(t.column_names, columns, str(path))
        n = t.num_rows

        def lists(col, k):
            c = t.column(col).combine_chunks()
            if not (pa.types.is_list(c.type) or pa.types.is_large_list(c.type)) or c.null_count:
                return None
            lens = pc.list_value_length(c).to_numpy(zero_copy_only=False)
            if n == 0 or (lens != lens[0]).any() or lens[0] < 1 or (k is not None and lens[0] != k):
                return None
            flat = pc.list_flatten(c)
            if flat.null_count or not (pa.types.is_integer(flat.type) or pa.types.is_floating(flat.type)):
                return None
            return flat.to_numpy(zero_copy_only=False).astype(np.float64).reshape(n, int(lens[0]))

        ids = lists(roles["ids"], top_k)
        if ids is None or (ids != np.round(ids)).any():
            return None
        weights = None
        if "weights" in roles:
            weights = lists(roles["weights"], ids.shape[1])
            if weights is None or not np.isfinite(weights).all():
                return None
        plain = {r: t.column(c).to_pandas() for r, c in roles.items() if r not in ("ids", "weights")}
        if any(v.isna().any() for v in plain.values()):
            return None
        df = pd.DataFrame({roles[r]: v for r, v in plain.items()})
        if "token_id" in roles:
            df[roles["token_id"]] = df[roles["token_id"]].astype("int64").astype(str)
        return _frame_columns(df, roles, top_k, lambda i: f"{path}: row {i}", ids=ids, weights=weights)
    except Exception:
        return None


def read(source: Path, *, columns: dict | None = None, missing_layers: str = "drop", top_k: int | None = None,
         kind: str | None = None) -> Trace:
    """A routing table (a file, or a folder of them of one kind): one checkpoint.

    Parameters
    ----------
    columns : role -> column name, for names not recognised or ambiguous (roles: see the module docstring).
    missing_layers : "drop" (default) or "fill" for tokens that miss a layer.
    top_k : the model's experts per token; every row's ids must have that many.
    kind : "jsonl", "csv", "tsv" or "parquet"; default from the file suffix.
    """
    check_missing_option(missing_layers)
    if kind is not None and kind not in set(SUFFIXES.values()):
        raise ValueError(f"kind={kind!r}; expected one of {sorted(set(SUFFIXES.values()))}")
    if not source.exists():
        raise FileNotFoundError(f"{source}: routing table not found")
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and (p.suffix.lower() in SUFFIXES))
        if not files:
            raise FileNotFoundError(f"{source}: no {', '.join(SUFFIXES)} files")
    else:
        files = [source]
    top_k = None if top_k is None else int(top_k)
    parts: list[Columns] = []
    for path in files:
        fk = kind or SUFFIXES.get(path.suffix.lower())
        if fk is None:
            raise ValueError(f"{path}: cannot tell the table kind from the suffix {path.suffix!r}; pass kind=")
        cols = None
        if fk in ("csv", "tsv"):
            cols = _fast_csv(path, columns, top_k, "\t" if fk == "tsv" else ",")
        elif fk == "parquet":
            cols = _fast_parquet(path, columns, top_k)
        if cols is None:
            rows = Rows()
            if fk == "jsonl":
                _read_jsonl(path, rows, columns, top_k)
            elif fk in ("csv", "tsv"):
                _read_csv(path, rows, columns, top_k, "\t" if fk == "tsv" else ",")
            else:
                _read_parquet(path, rows, columns, top_k)
            if not rows.n:
                raise TraceError(f"{path}: no rows")
            cols = rows_to_columns(rows, "ids")
        parts.append(cols)
    cols = Columns.concat(parts)
    attrs = {"position_meaning": "the table's token index column", "missing_layers": missing_layers,
             "token_id_meaning": "the table's token id column" if (cols.token_id >= 0).any()
             else "unknown (-1): the table has no token id column"}
    events = emit_samples(cols, layers=None, missing=missing_layers, attrs=attrs, where=str(source))
    return Trace(
        format="table", version=VERSION, paths=[str(p) for p in files], router_semantics=SEMANTICS, events=events,
        model_family="unknown", slot_order="by weight, top-1 first" if cols.weights is not None
        else "as written in the table", top_k=top_k, attrs=attrs,
    )
