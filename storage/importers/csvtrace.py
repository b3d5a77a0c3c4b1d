"""The llama.cpp ``moe-trace`` CSV variants.

Three layouts exist (the header tells them apart; ``variant=`` forces one):

``layer,expert`` (llama.cpp PR #28544 ``examples/moe-trace``)
    one row per activation; the order is implicit: for each evaluated batch,
    for each MoE layer in order, the k ids of each token of the batch (a decode
    step is a batch of one token). Rows are grouped into runs of one layer; a
    run of ``n*k`` rows is n tokens; the layer sequence wrapping around starts
    the next batch. ``top_k`` should be given; otherwise it is inferred as the
    shortest run (recorded in attrs). One file = one sample.
``pos,layer,id0,id1,..`` (thecodacus fork)
    one row per (token, layer) with the k ids in slot order. A new sample
    starts when a (pos, layer) pair repeats. Sample keys ``<file stem>/<i>``.
``phase,token,layer,rank,expert`` (vvsotnikov fork)
    one row per (token, layer, slot), ``rank`` the slot (0- or 1-based, any row
    order within a token); rows of one token must be contiguous. Token ids and
    text come from the companion token CSV (``tokens=``: columns ``token`` and
    ``token_id``/``id``, optional ``text``/``piece``). One file = one sample.

``source`` is a CSV file or a folder of them (one sample or more per file).
No weights are recorded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ._core import Block, SampleMeta, Samples, Trace, TraceError, fail

VERSION = 1
SEMANTICS = "llama.cpp MoE graph: top-k expert ids as selected by the router (order as traced); weights not recorded"
VARIANTS = {
    "layer_expert": ["layer", "expert"],
    "pos_layer_ids": ["pos", "layer"],
    "phase_token": ["phase", "token", "layer", "rank", "expert"],
}
CHUNK_ROWS = 1 << 20


def _detect(path: Path, variant: str | None) -> tuple[str, list[str]]:
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        first = f.readline().strip()
    if not first:
        raise TraceError(f"{path}: line 1: empty file")
    header = [c.strip() for c in first.split(",")]
    if len(header) == 2 and all(h.isdigit() for h in header) and variant in (None, "layer_expert"):
        return "layer_expert", None  # written without a header line
    if variant is None:
        if header == VARIANTS["layer_expert"]:
            variant = "layer_expert"
        elif header[:2] == ["pos", "layer"] and len(header) > 2 and all(h.startswith("id") for h in header[2:]):
            variant = "pos_layer_ids"
        elif header == VARIANTS["phase_token"]:
            variant = "phase_token"
        else:
            raise TraceError(
                f"{path}: line 1: header {header} is none of the moe-trace layouts "
                f"('layer,expert'; 'pos,layer,id0,id1,...'; 'phase,token,layer,rank,expert')"
            )
    elif variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} unknown; known: {sorted(VARIANTS)}")
    want = VARIANTS[variant]
    if header[: len(want)] != want:
        raise TraceError(f"{path}: line 1: header {header} does not start with {want} (variant {variant})")
    return variant, header


def _chunks(path: Path, header: list[str] | None, int_cols: list[str], usecols=None):
    """(first data line number, DataFrame) chunks with integer columns checked; ``header`` None: no header line."""
    line = 2 if header is not None else 1
    names = None if header is not None else VARIANTS["layer_expert"]
    reader = pd.read_csv(path, chunksize=CHUNK_ROWS, usecols=usecols, skipinitialspace=True, dtype=str, engine="c",
                         header=0 if header is not None else None, names=names)
    try:
        for df in reader:
            for col in int_cols:
                if col not in df.columns:
                    continue
                raw = df[col]
                num = pd.to_numeric(raw, errors="coerce")
                bad = num.isna() | (num != np.floor(num))
                if bad.any():
                    i = int(np.flatnonzero(bad.to_numpy())[0])
                    val = raw.iloc[i]
                    what = "missing (truncated line?)" if pd.isna(val) else f"{val!r} is not an integer"
                    raise fail(f"{path}: line {line + i}", col, what)
                df[col] = num.astype(np.int64)
            yield line, df
            line += len(df)
    except pd.errors.ParserError as exc:
        raise TraceError(f"{path}: malformed CSV ({exc})") from None


def _count_lines(path: Path) -> int:
    n = 0
    last = b"\n"
    with open(path, "rb") as f:
        while True:
            buf = f.read(1 << 24)
            if not buf:
                break
            n += buf.count(b"\n")
            last = buf[-1:]
    return n + (last != b"\n")


# --------------------------------------------------------------------------- layer,expert


def _runs(layer: np.ndarray):
    start = np.flatnonzero(np.r_[True, layer[1:] != layer[:-1]])
    length = np.diff(np.r_[start, layer.size])
    return start, length, layer[start]


def _layer_expert(path: Path, header, top_k: int | None, attrs: dict):
    cols = VARIANTS["layer_expert"]
    # first pass (cheap): the layer cycle and k from the head, the token count from the line count
    head = next(_chunks(path, header, cols))[1]
    lay = head["layer"].to_numpy()
    start, length, rlayer = _runs(lay)
    k = top_k
    if k is None:
        k = int(length.min())
        attrs["top_k_inferred"] = "shortest run of one layer's rows (a decode step); pass top_k to be sure"
    wrap = np.flatnonzero(np.r_[False, rlayer[1:] <= rlayer[:-1]])
    cycle = rlayer[: wrap[0]] if wrap.size else rlayer
    if top_k is None and cycle.size == 1:
        raise ValueError(f"{path}: one MoE layer only, so runs of rows do not reveal k; pass top_k")
    L = cycle.size
    rows = _count_lines(path) - (header is not None)
    if rows % (L * k):
        raise fail(
            f"{path}: line {rows + (header is not None)}", "expert",
            f"{rows} rows are not a whole number of tokens × {L} layers × k={k} (truncated file, or wrong top_k?)",
        )
    n = rows // (L * k)
    yield Samples([SampleMeta(key=path.stem, n=n)], where=str(path))

    carry, carry_line = None, 2
    for line, df in _chunks(path, header, cols):
        lay = df["layer"].to_numpy()
        exp = df["expert"].to_numpy()
        if carry is not None:
            lay, exp, line = np.r_[carry[0], lay], np.r_[carry[1], exp], carry_line
        start, length, rlayer = _runs(lay)
        wraps = np.flatnonzero(np.r_[False, rlayer[1:] <= rlayer[:-1]])
        cut = int(wraps[-1]) if wraps.size else 0  # runs before the last wrap belong to complete batches
        if cut:
            yield from _emit_batches(path, line, start[:cut], length[:cut], rlayer[:cut], exp, cycle, k)
        rest = int(start[cut])
        carry, carry_line = (lay[rest:], exp[rest:]), line + rest
    if carry is not None and carry[0].size:
        lay, exp = carry
        start, length, rlayer = _runs(lay)
        yield from _emit_batches(path, carry_line, start, length, rlayer, exp, cycle, k)


def _emit_batches(path, line, start, length, rlayer, exp, cycle, k):
    L = cycle.size
    if rlayer.size % L:
        raise fail(f"{path}: line {line + int(start[-1])}", "layer",
                   f"the layer sequence does not cycle through the MoE layers {cycle.tolist()} (a layer missing?)")
    rl = rlayer.reshape(-1, L)
    bad = np.flatnonzero((rl != cycle[None, :]).any(axis=1))
    if bad.size:
        b = int(bad[0])
        raise fail(f"{path}: line {line + int(start[b * L])}", "layer",
                   f"batch visits layers {rl[b].tolist()}, expected {cycle.tolist()} (a layer missing or out of order)")
    ln = length.reshape(-1, L)
    uneven = np.flatnonzero((ln != ln[:, :1]).any(axis=1) | (ln[:, 0] % k != 0))
    if uneven.size:
        b = int(uneven[0])
        raise fail(f"{path}: line {line + int(start[b * L])}", "expert",
                   f"rows per layer in this batch are {ln[b].tolist()}, expected equal multiples of k={k} (ragged top-k)")
    for li, layer in enumerate(cycle):
        s = start.reshape(-1, L)[:, li]
        c = ln[:, li]
        idx = np.repeat(s - np.r_[0, np.cumsum(c)[:-1]], c) + np.arange(int(c.sum()))
        yield Block(layer=int(layer), where=f"{path}: lines from {line + int(start[0])}",
                    ids=exp[idx].reshape(-1, k), fields={"ids": "expert"})


# --------------------------------------------------------------------------- pos,layer,id0..


def _pos_layer_ids(path: Path, header: list[str], top_k: int | None):
    idcols = header[2:]
    if top_k is not None and top_k != len(idcols):
        raise fail(f"{path}: line 1", idcols[0], f"{len(idcols)} id columns, top_k={top_k}")
    pending: list[pd.DataFrame] = []
    seen: set[int] = set()
    sample_i = 0
    sample_line = 2

    def emit(frames, line0, i):
        df = pd.concat(frames, ignore_index=True)
        pos = df["pos"].to_numpy()
        lay = df["layer"].to_numpy()
        ids = df[idcols].to_numpy()
        order = np.lexsort((lay, pos))
        pos, lay, ids = pos[order], lay[order], ids[order]
        upos = np.unique(pos)
        ulay = np.unique(lay)
        if upos.size * ulay.size != pos.size:
            have = {(int(p), int(l_)) for p, l_ in zip(pos, lay)}
            miss = next((int(p), int(l_)) for p in upos for l_ in ulay if (int(p), int(l_)) not in have)
            raise fail(f"{path}: sample starting at line {line0}", "layer",
                       f"no row for pos {miss[0]}, layer {miss[1]} (every position needs every MoE layer {ulay.tolist()})")
        yield Samples([SampleMeta(key=f"{path.stem}/{i}", n=int(upos.size), position=upos.astype(np.int32))],
                      where=f"{path}: sample starting at line {line0}")
        grid = ids.reshape(upos.size, ulay.size, len(idcols))
        for li, layer in enumerate(ulay):
            yield Block(layer=int(layer), where=f"{path}: sample starting at line {line0}",
                        ids=grid[:, li, :], fields={"ids": "id0.."})

    for line, df in _chunks(path, header, header):
        key = (df["pos"].to_numpy() << 20) + df["layer"].to_numpy()
        begin = 0
        for j, kv in enumerate(key.tolist()):
            if kv in seen:  # a (pos, layer) pair repeats: the next sample starts here
                pending.append(df.iloc[begin:j])
                yield from emit(pending, sample_line, sample_i)
                pending, seen = [], set()
                sample_i += 1
                sample_line = line + j
                begin = j
            seen.add(kv)
        pending.append(df.iloc[begin:])
    if pending and sum(len(p) for p in pending):
        yield from emit(pending, sample_line, sample_i)


# --------------------------------------------------------------------------- phase,token,layer,rank,expert


def _token_table(path: Path | None):
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: token CSV not found")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    cols = {c.strip().lower(): c for c in df.columns}
    tok = cols.get("token") or cols.get("index") or cols.get("pos")
    tid = cols.get("token_id") or cols.get("id")
    txt = cols.get("text") or cols.get("piece") or cols.get("token_text")
    if tok is None or tid is None:
        raise TraceError(f"{path}: line 1: expected columns 'token' and 'token_id' (or 'id'), got {list(df.columns)}")
    try:
        index = df[tok].astype(np.int64).to_numpy()
        ids = df[tid].astype(np.int64).to_numpy()
    except ValueError as exc:
        raise TraceError(f"{path}: columns '{tok}'/'{tid}' must be integers ({exc})") from None
    text = df[txt].to_numpy(dtype=object) if txt else None
    return index, ids, text


def _phase_token(path: Path, top_k: int | None, tokens_csv):
    header = VARIANTS["phase_token"]
    # first pass (cheap, token column only): the token indices in file order
    groups, last = [], None
    for _, df in _chunks(path, header, ["token"], usecols=["token"]):
        t = df["token"].to_numpy()
        groups.append(t[np.r_[last is None or t[0] != last, t[1:] != t[:-1]]])
        last = t[-1]
    order = np.concatenate(groups) if groups else np.zeros(0, np.int64)
    if order.size == 0:
        raise TraceError(f"{path}: no data rows")
    back = np.flatnonzero(np.diff(order) <= 0)
    if back.size:
        t = int(order[back[0] + 1])
        raise fail(str(path), "token", f"token {t} comes after token {int(order[back[0]])}: rows of a token must be "
                                       "contiguous and token indices increasing")
    meta = SampleMeta(key=path.stem, n=int(order.size), position=order.astype(np.int32))
    table = _token_table(tokens_csv)
    if table is not None:
        index, ids, text = table
        lookup = pd.Series(np.arange(index.size), index=index)
        if lookup.index.has_duplicates:
            raise TraceError(f"{tokens_csv}: token indices repeat")
        missing = np.setdiff1d(order, index)
        if missing.size:
            raise fail(str(tokens_csv), "token", f"no row for token {int(missing[0])} of {path}")
        at = lookup.loc[order].to_numpy()
        meta.token_id = ids[at].astype(np.int32)
        if text is not None:
            meta.token_text = text[at]
    yield Samples([meta], where=str(path))

    int_cols = ["token", "layer", "rank", "expert"]
    carry, carry_line = None, 2
    for line, df in _chunks(path, header, int_cols):
        if carry is not None:
            df = pd.concat([carry, df], ignore_index=True)
            line = carry_line
        tok = df["token"].to_numpy()
        cut = int(np.flatnonzero(np.r_[True, tok[1:] != tok[:-1]])[-1])  # the last token may go on
        if cut:
            yield from _phase_blocks(path, df.iloc[:cut], line, top_k)
        carry, carry_line = df.iloc[cut:], line + cut
    if carry is not None and len(carry):
        yield from _phase_blocks(path, carry, carry_line, top_k)


def _phase_blocks(path: Path, df: pd.DataFrame, line0: int, top_k: int | None):
    where = f"{path}: rows from line {line0}"
    tok = df["token"].to_numpy()
    lay = df["layer"].to_numpy()
    rank = df["rank"].to_numpy()
    exp = df["expert"].to_numpy()
    order = np.lexsort((rank, lay, tok))
    tok, lay, rank, exp = tok[order], lay[order], rank[order], exp[order]
    utok = np.unique(tok)
    ulay = np.unique(lay)
    per = tok.size // max(utok.size * ulay.size, 1)
    if per < 1 or per * utok.size * ulay.size != tok.size:
        raise fail(where, "layer", f"every token needs the same rows: one per slot at each MoE layer {ulay.tolist()} "
                                   "(a layer missing in some token, or ragged top-k)")
    grid_l = lay.reshape(utok.size, ulay.size, per)
    if (grid_l != ulay[None, :, None]).any():
        raise fail(where, "layer", f"a token lacks one of the MoE layers {ulay.tolist()}")
    if top_k is not None and per != top_k:
        raise fail(where, "rank", f"{per} slots per (token, layer), top_k={top_k}")
    r = rank.reshape(utok.size, ulay.size, per)
    base = r[:, :, :1]
    if (r - base != np.arange(per)[None, None, :]).any() or base.min() != base.max() or int(base.min()) not in (0, 1):
        raise fail(where, "rank", f"ranks of a (token, layer) must be 0..{per - 1} (or 1..{per}), each once")
    grid = exp.reshape(utok.size, ulay.size, per)
    for li, layer in enumerate(ulay):
        yield Block(layer=int(layer), where=where, ids=grid[:, li, :], fields={"ids": "expert"})


def read(source: Path, *, variant: str | None = None, top_k: int | None = None, tokens: str | None = None) -> Trace:
    """One moe-trace CSV (or a folder of them, one checkpoint)."""
    if not source.exists():
        raise FileNotFoundError(f"{source}: CSV trace not found")
    files = sorted(source.glob("*.csv")) if source.is_dir() else [source]
    if tokens is not None:
        files = [f for f in files if f.resolve() != Path(tokens).resolve()]
    if not files:
        raise FileNotFoundError(f"{source}: no .csv files")
    detected = [_detect(f, variant) for f in files]
    kinds = {d[0] for d in detected}
    if len(kinds) > 1:
        raise TraceError(f"{source}: mixes CSV layouts {sorted(kinds)}")
    kind = kinds.pop()
    attrs: dict = {"csv_variant": kind}
    if tokens is not None and kind != "phase_token":
        raise ValueError(f"{source}: option tokens= is for the 'phase,token,layer,rank,expert' layout, not {kind}")

    def events():
        for f, (_, header) in zip(files, detected):
            if kind == "layer_expert":
                yield from _layer_expert(f, header, top_k, attrs)
            elif kind == "pos_layer_ids":
                yield from _pos_layer_ids(f, header, top_k)
            else:
                yield from _phase_token(f, top_k, tokens)

    return Trace(
        format="moe_trace_csv", version=VERSION, paths=[str(f) for f in files], router_semantics=SEMANTICS,
        events=events(), model_family="llama.cpp (GGUF)",
        slot_order="as traced" if kind != "phase_token" else "by the 'rank' column",
        top_k=top_k, attrs=attrs,
    )

