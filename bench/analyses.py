"""Benchmark (issue 3): every registered analysis over a routing cube of >= 10^8 decisions.

A *decision* is one token routed at one layer of one checkpoint (it fills k
slots). The script

1. writes a synthetic but realistically skewed routing cube to disk through
   ``storage.cube.prepare_routing`` and one ``RoutingWriter`` per checkpoint
   (region writes), generating token chunk by token chunk so that memory stays
   bounded by one chunk whatever the cube size;
2. times one plain ``np.bincount`` over the flattened ``expert_ids`` of the
   whole cube held in memory (the floor: what counting slots costs without
   Dask, Zarr or labels);
3. runs every analysis of ``analyses.REGISTRY`` whose required variables the
   cube has through ``analyses.runner.compute_analysis`` on a 1-worker and on a
   2-worker Dask LocalCluster (threads_per_worker=1), repetitions interleaved
   (bincount, then each analysis on both clusters, the cluster order
   alternating between repetitions);
4. prints one JSON document: throughput per analysis, its slowdown against the
   bincount pass, the 2-over-1-worker speed-up, medians and every repeat, and
   the machine's load average before and after (other processes share it).

Run from the repository root::

    python -m bench.analyses                      # 10^8 decisions, 3 repeats
    python -m bench.analyses --logits             # also router_logits (E values per decision)
    python -m bench.analyses --tiny               # seconds; for the smoke test

The synthetic generator (:func:`write_synthetic_cube`) is also used by
``bench/storage.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DOMAINS = ("code", "prose", "math", "data", "chat")
DOMAIN_SHARE = (0.30, 0.25, 0.15, 0.20, 0.10)
ROUTER_SEMANTICS = "softmax over all experts, top-k, renormalised (Mixtral)"


# --------------------------------------------------------------------------- helpers shared by bench/*


def machine() -> dict:
    """What a reader needs to judge the timings: cores, load, library versions."""
    import dask
    import xarray
    import zarr

    return {
        "cpus": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "dask": dask.__version__,
        "xarray": xarray.__version__,
        "zarr": zarr.__version__,
        "platform": platform.platform(),
    }


def summary(seconds: list[float]) -> dict:
    """Median, min and every repeat of a list of wall times (seconds)."""
    return {
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "repeats_s": [round(s, 6) for s in seconds],
    }


def dir_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (apparent sizes, as ``du -b``)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def emit(doc: dict) -> None:
    json.dump(doc, sys.stdout, indent=2, default=_json_default)
    sys.stdout.write("\n")
    sys.stdout.flush()


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def log(msg: str) -> None:
    """Progress goes to stderr: stdout carries only the JSON document."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- synthetic cube


CONDITIONS = ("plain", "chat")  # condition B = condition A's content behind a short chat-template prefix


def synthetic_tokens(n_tokens: int, *, seed: int = 0, vocab: int = 32000, min_len: int = 32, max_len: int = 512,
                     max_prefix: int = 12):
    """A token table of ``n_tokens`` tokens: paired samples in two conditions, with domains.

    Samples come in pairs (same ``pair`` id and domain): condition ``plain``
    holds a content of uniform random length ``min_len..max_len``; condition
    ``chat`` holds the same content behind a prefix of 0..``max_prefix``
    template tokens. Canonical (non-whitespace) content tokens are aligned one
    to one (``aligned_token``), as ``capture.align`` would align them. The
    last tokens that do not fill a pair form unpaired samples (condition and
    pair ''), none longer than ``max_len``. Domains
    are drawn with :data:`DOMAIN_SHARE`; token ids are Zipf-distributed with a
    domain-dependent offset; ~11 % of the ids are whitespace tokens
    (``canonical`` False).

    Returns
    -------
    xr.Dataset with dim ``token`` (n_tokens) and the coordinates of
    ``storage.schema.TOKEN_COORDS``.
    """
    from storage.schema import token_table

    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    rng = np.random.default_rng(seed)
    lengths, conds, pairs, prefixes = [], [], [], []
    total, p = 0, 0
    while True:
        m = int(rng.integers(min_len, max_len + 1))
        pre = int(rng.integers(0, max_prefix + 1))
        if total + 2 * m + pre > n_tokens:
            break
        lengths += [m, m + pre]
        conds += [0, 1]
        pairs += [p, p]
        prefixes += [0, pre]
        total += 2 * m + pre
        p += 1
    while total < n_tokens:  # the remainder: unpaired samples of at most max_len tokens
        m = min(n_tokens - total, max_len)
        lengths.append(m)
        conds.append(-1)
        pairs.append(-1)
        prefixes.append(0)
        total += m
    lengths = np.asarray(lengths, dtype=np.int64)
    conds = np.asarray(conds)
    pairs = np.asarray(pairs)
    prefixes = np.asarray(prefixes, dtype=np.int64)
    ns = len(lengths)
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    sample = np.repeat(np.arange(ns, dtype=np.int32), lengths)
    position = (np.arange(n_tokens) - np.repeat(starts, lengths)).astype(np.int32)
    sample_domain = rng.choice(len(DOMAINS), size=ns, p=DOMAIN_SHARE)
    sample_domain[1:2 * p:2] = sample_domain[0:2 * p:2]  # a pair shares its domain
    dom = sample_domain[sample]
    rank = np.minimum(rng.zipf(1.15, size=n_tokens), vocab) - 1
    token_id = ((rank + dom * 997) % vocab).astype(np.int64)
    # A chat sample repeats its plain partner's content after its prefix.
    aligned = np.full(n_tokens, -1, dtype=np.int64)
    whitespace = token_id % 9 == 0
    for i in np.flatnonzero(conds == 1):
        a0, b0, m, pre = starts[i - 1], starts[i], lengths[i - 1], prefixes[i]
        token_id[b0:b0 + pre] = 3 + np.arange(pre) % 7  # template tokens (canonical, unaligned)
        token_id[b0 + pre:b0 + pre + m] = token_id[a0:a0 + m]
    whitespace = token_id % 9 == 0
    for i in np.flatnonzero(conds == 1):
        a0, b0, m, pre = starts[i - 1], starts[i], lengths[i - 1], prefixes[i]
        ia = np.arange(a0, a0 + m)[~whitespace[a0:a0 + m]]
        ib = ia - a0 + b0 + pre
        aligned[ia], aligned[ib] = ib, ia
    canonical = ~whitespace
    # last canonical token of each sample
    idx = np.where(canonical, np.arange(n_tokens), -1)
    last_idx = np.maximum.reduceat(idx, starts)
    last_canonical = np.zeros(n_tokens, dtype=bool)
    last_canonical[last_idx[last_idx >= 0]] = True
    # One shared str object per vocabulary entry: the table costs a pointer per token.
    texts = np.array([" " if i % 9 == 0 else f"t{i}" for i in range(vocab)], dtype=object)
    text_len = np.array([len(t) for t in texts], dtype=np.int64)
    tl = text_len[token_id]
    cs = np.cumsum(tl)
    char_end = cs - np.repeat(cs[starts] - tl[starts], lengths)
    cond_label = np.asarray(CONDITIONS + ("",), dtype=object)[conds]  # -1 -> ""
    pair_label = np.where(pairs >= 0, np.char.add("p", pairs.astype(str)), "").astype(object)
    return token_table(
        sample=sample, position=position, token_id=token_id.astype(np.int32), token_text=texts[token_id],
        char_start=(char_end - tl).astype(np.int32), char_end=char_end.astype(np.int32),
        dataset=np.full(n_tokens, "synthetic", dtype=object),
        domain=np.asarray(DOMAINS, dtype=object)[dom], condition=cond_label[sample], pair=pair_label[sample],
        canonical=canonical, aligned_token=aligned, last_canonical=last_canonical,
    )


class _RouterModel:
    """Seeded logits generator: domain, token, condition and popularity biases + AR(1) noise.

    Later checkpoints are more specialised (biases scaled up) and drift less,
    so routing is skewed, domain-dependent, token-dependent, differs a little
    between conditions, persists a little from token to token (noise
    correlated along the sequence) and changes over training, like a trained
    MoE's. Top-k and weights follow Mixtral semantics (softmax over all
    experts, top-k, renormalised).
    """

    BUCKETS = 2048  # token-id buckets with their own bias

    def __init__(self, *, n_checkpoints: int, n_layers: int, num_experts: int, seed: int,
                 specialization: float = 1.5, token_bias: float = 1.0, popularity: float = 0.8,
                 condition_bias: float = 0.4, drift: float = 0.6, noise: float = 1.0, persistence: float = 0.3):
        rng = np.random.default_rng(seed + 1)
        C, L, E, D, B = n_checkpoints, n_layers, num_experts, len(DOMAINS), self.BUCKETS
        dom = rng.standard_normal((L, 1, D, 1, E)) * specialization
        tok = rng.standard_normal((L, 1, 1, B, E)) * token_bias
        cond = np.concatenate([np.zeros((L, 1, 1, 1, E)), rng.standard_normal((L, 1, 1, 1, E)) * condition_bias], 1)
        pop = rng.standard_normal((L, 1, 1, 1, E)) * popularity
        # table[c, l, (cond * D + d) * B + b, :] = the deterministic part of the logits
        self.table = np.empty((C, L, 2 * D * B, E), dtype=np.float32)
        for c in range(C):
            frac = c / max(C - 1, 1)
            scale = 0.6 + 0.4 * frac
            wander = rng.standard_normal((L, 1, 1, 1, E)) * drift * (1 - frac)
            self.table[c] = ((dom + tok) * scale + cond + pop + wander).reshape(L, 2 * D * B, E)
        self.noise = noise
        self.persistence = persistence
        self.E = E

    @staticmethod
    def keys(tokens) -> np.ndarray:
        """(token,) row of the table for each token: condition, domain and token-id bucket."""
        lookup = {d: i for i, d in enumerate(DOMAINS)}
        dom = np.fromiter((lookup[d] for d in tokens["domain"].values), dtype=np.int64, count=tokens.sizes["token"])
        chat = (np.asarray(tokens["condition"].values).astype(str) == CONDITIONS[1]).astype(np.int64)
        bucket = tokens["token_id"].values.astype(np.int64) % _RouterModel.BUCKETS
        return (chat * len(DOMAINS) + dom) * _RouterModel.BUCKETS + bucket

    def route(self, rng, c: int, layer: int, key: np.ndarray, top_k: int):
        """Routing of the tokens whose table row is ``key`` (consecutive tokens).

        Returns
        -------
        ids (n, k) int16 sorted by weight, weights (n, k) float32, logits (n, E) float32
        """
        from scipy.signal import lfilter

        logits = self.table[c, layer][key]
        eps = rng.standard_normal(logits.shape, dtype=np.float32)
        rho = self.persistence
        # AR(1) along tokens with unit variance: a little stickiness from one token to the next
        eps = lfilter([np.sqrt(1 - rho * rho)], [1.0, -rho], eps, axis=0).astype(np.float32)
        logits += eps * np.float32(self.noise)
        work = logits.copy()
        n = len(key)
        rows = np.arange(n)
        ids = np.empty((n, top_k), dtype=np.int16)
        top = np.empty((n, top_k), dtype=np.float32)
        for j in range(top_k):
            a = work.argmax(axis=1)
            ids[:, j] = a
            top[:, j] = work[rows, a]
            work[rows, a] = -np.inf
        w = np.exp(top - top[:, :1])
        w /= w.sum(axis=1, keepdims=True)
        return ids, w.astype(np.float32), logits


def write_synthetic_cube(
    path, *, n_checkpoints: int = 2, n_layers: int = 16, n_tokens: int = 3_125_000, num_experts: int = 32,
    top_k: int = 2, keep_logits: bool = False, keep_lens: bool = True, keep_nll: bool = True, seed: int = 0,
    progress: bool = True,
) -> dict:
    """Write a synthetic routing cube of ``n_checkpoints × n_layers × n_tokens`` decisions.

    Goes through the production writers: ``storage.cube.prepare_routing`` for
    the template, then one ``RoutingWriter`` per checkpoint fed one cube token
    chunk at a time, so memory stays bounded by one chunk (all layers) plus the
    token table. With ``keep_lens`` both logit-lens variables are written
    (``lens_logprob``; ``lens_js`` where the next token is aligned).

    Returns
    -------
    dict describing the cube (sizes, variables, token chunk, seconds taken).
    """
    from storage import cube as cubes
    from storage.schema import empty_routing

    path = Path(path)
    t0 = time.perf_counter()
    tokens = synthetic_tokens(n_tokens, seed=seed)
    t_tokens = time.perf_counter() - t0
    C, L, E, K = n_checkpoints, n_layers, num_experts, top_k
    steps = [int(round(1000 * (c + 1) / C)) for c in range(C)]
    names = [f"step{s:06d}" for s in steps]
    template = empty_routing(
        tokens, checkpoints=names, steps=steps, layers=list(range(L)), num_experts=E, top_k=K,
        keep_logits=keep_logits, keep_weights=True, keep_lens=keep_lens, keep_js=keep_lens, keep_nll=keep_nll,
        attrs={"model_family": "synthetic", "router_semantics": ROUTER_SEMANTICS,
               "source": "bench.analyses synthetic generator", "usage_normalisation": "slots",
               "condition_a": CONDITIONS[0], "condition_b": CONDITIONS[1]},
        lazy=True,
    )
    t1 = time.perf_counter()
    cubes.prepare_routing(path, template)
    t_template = time.perf_counter() - t1

    key = _RouterModel.keys(tokens)
    sample = tokens["sample"].values
    last = np.r_[sample[1:] != sample[:-1], True]
    # lens_js is defined where the next token is aligned (capture.lens's definition)
    next_aligned = np.r_[tokens["aligned_token"].values[1:] >= 0, False] & ~last
    del tokens, template
    model = _RouterModel(n_checkpoints=C, n_layers=L, num_experts=E, seed=seed)
    rng = np.random.default_rng(seed + 2)

    t2 = time.perf_counter()
    token_chunk = None
    variables = None
    for c, name in enumerate(names):
        with cubes.RoutingWriter(path, name) as writer:
            token_chunk, variables = writer.chunk, list(writer.vars)
            for a in range(0, n_tokens, writer.chunk):
                z = min(n_tokens, a + writer.chunk)
                n = z - a
                ids = np.empty((L, n, K), dtype=np.int16)
                w = np.empty((L, n, K), dtype=np.float32)
                lg = np.empty((L, n, E), dtype=np.float16) if keep_logits else None
                for layer in range(L):
                    i_, w_, l_ = model.route(rng, c, layer, key[a:z], K)
                    ids[layer], w[layer] = i_, w_
                    if keep_logits:
                        lg[layer] = l_
                arrays = {"expert_ids": ids, "expert_weights": w}
                if keep_logits:
                    arrays["router_logits"] = lg
                if keep_lens:
                    # log p(next token) rising (toward 0) with depth and with training
                    depth = (np.arange(L, dtype=np.float32)[:, None] + 1) / L
                    shape = (1.5 - 0.5 * depth) * (1.3 - 0.3 * c / max(C - 1, 1))
                    lp = -rng.gamma(2.0, 1.0, size=(L, n)).astype(np.float32) * shape
                    lp[:, last[a:z]] = np.nan
                    arrays["lens_logprob"] = lp
                    js = (rng.gamma(1.5, 0.05, size=(L, n)) * (1.2 - depth)).astype(np.float32)
                    js[:, ~next_aligned[a:z]] = np.nan
                    arrays["lens_js"] = js
                if keep_nll:
                    nll = rng.gamma(2.0, 1.4 - 0.3 * c / max(C - 1, 1), size=n).astype(np.float32)
                    nll[last[a:z]] = np.nan
                    arrays["nll"] = nll
                writer.append(**arrays)
            if progress:
                log(f"wrote checkpoint {name} ({c + 1}/{C})")
    t_write = time.perf_counter() - t2
    return {
        "path": str(path),
        "checkpoints": C,
        "layers": L,
        "tokens": n_tokens,
        "num_experts": E,
        "top_k": K,
        "decisions": C * L * n_tokens,
        "variables": sorted(variables),
        "conditions": list(CONDITIONS),
        "token_chunk": int(token_chunk),
        "bytes_on_disk": dir_bytes(path),
        "seconds": {"token_table": t_tokens, "template": t_template, "generate_and_write": t_write},
    }


# --------------------------------------------------------------------------- benchmark


def _cluster(n_workers: int):
    """A private LocalCluster (not ``deploy.client``, a per-process singleton) like deploy's."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1", scheduler_port=0,
        dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR,
        env={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
             "TOKENIZERS_PARALLELISM": "false"},
    )
    return cluster, Client(cluster, set_as_default=False)


def _warm(client) -> None:
    """Import the analysis stack in every worker so that no timed run pays for it."""
    def _imports():
        import analyses  # noqa: F401
        import flox  # noqa: F401
        import storage.cube  # noqa: F401

        return True

    client.run(_imports)


def _bincount_seconds(ids_flat: np.ndarray, E: int) -> float:
    t = time.perf_counter()
    counts = np.bincount(ids_flat, minlength=E)
    dt = time.perf_counter() - t
    if counts.sum() != ids_flat.size:  # keeps the result alive and checks it
        raise RuntimeError("bincount lost slots")
    return dt


def _read_and_bincount_seconds(cube: Path, E: int) -> float:
    """Read every ``expert_ids`` chunk from the store (zarr's own decoding) and bincount them.

    The floor for an analysis that reads the ids from disk: what one numpy pass
    over the same data costs once decompression is included.
    """
    import zarr

    t = time.perf_counter()
    ids = zarr.open_array(str(Path(cube) / "expert_ids"), mode="r")[...]
    counts = np.bincount(ids.reshape(-1), minlength=E)
    dt = time.perf_counter() - t
    if counts.sum() != ids.size:
        raise RuntimeError("bincount lost slots")
    return dt


def run_benchmark(cube: Path, warm_cube: Path | None, *, repeats: int, only: list[str] | None = None,
                  boot_and_not: bool = True) -> dict:
    """Time bincount and every applicable registered analysis on ``cube``; see module doc.

    ``warm_cube`` is a small cube of the same layout, run once per analysis and
    cluster before timing (None: no warm-up run).
    """
    import analyses
    from analyses.runner import compute_analysis
    from storage import cube as cubes

    ds = cubes.open_routing(cube)
    sizes = dict(ds.sizes)
    E, K = int(ds.attrs["num_experts"]), int(ds.attrs["top_k"])
    decisions = sizes["checkpoint"] * sizes["layer"] * sizes["token"]
    have = set(ds.data_vars)

    runnable, skipped, not_selected = [], {}, []
    for name, a in sorted(analyses.REGISTRY.items()):
        if only and name not in only:
            not_selected.append(name)
            continue
        missing = [v for v in a.requires if v not in have]
        if missing:
            skipped[name] = f"needs cube variable(s) {missing}"
        else:
            runnable.append(name)

    # The floor: one bincount over all slots of the cube, held in memory (loaded once, not timed).
    t = time.perf_counter()
    ids = np.ascontiguousarray(ds["expert_ids"].values).reshape(-1)
    load_s = time.perf_counter() - t
    if ids.min() < 0:
        raise RuntimeError(f"{cube}: unwritten expert ids (-1) in the benchmark cube")
    ds.close()
    del ds

    clusters = {1: _cluster(1), 2: _cluster(2)}
    try:
        for _, client in clusters.values():
            _warm(client)
        errors: dict[str, str] = {}

        def attempt(name, nw, path, *, no_boot=False):
            client = clusters[nw][1]
            params = dict(analyses.get(name).params)
            if no_boot:
                params["n_boot"] = 0
            try:
                # as the default client too, as in the pipeline (deploy.client): an analysis may compute eagerly
                with client.as_current():
                    compute_analysis(path, name, params, client=client)
                return True
            except Exception as exc:  # an analysis under development must not sink the others
                errors[name] = f"{type(exc).__name__}: {exc}"
                log(f"{name} failed on {nw} worker(s) ({path}): {errors[name]}")
                log(traceback.format_exc(limit=4))
                return False

        # An untimed run of each analysis on each cluster over a small cube of the same layout:
        # warms imports and caches in the workers and surfaces failures before the long runs.
        for name in runnable if warm_cube is not None else []:
            for nw in clusters:
                if name not in errors:
                    t = time.perf_counter()
                    if attempt(name, nw, warm_cube):
                        log(f"warm-up {name} on {nw} worker(s): {time.perf_counter() - t:.1f}s")
        timed = [n for n in runnable if n not in errors]
        bincount_s: list[float] = []
        read_s: list[float] = []
        open_s: list[float] = []
        times = {n: {1: [], 2: [], "2_no_boot": []} for n in timed}
        for r in range(repeats):
            bincount_s.append(_bincount_seconds(ids, E))
            read_s.append(_read_and_bincount_seconds(cube, E))
            t = time.perf_counter()
            cubes.open_routing(cube).close()
            open_s.append(time.perf_counter() - t)
            order = (1, 2) if r % 2 == 0 else (2, 1)
            for name in timed:
                for nw in order:
                    if name in errors:
                        break
                    t = time.perf_counter()
                    if attempt(name, nw, cube):
                        times[name][nw].append(time.perf_counter() - t)
                # the point estimates alone: what the bootstrap intervals cost on top
                if name not in errors and boot_and_not and "n_boot" in analyses.get(name).params:
                    t = time.perf_counter()
                    if attempt(name, 2, cube, no_boot=True):
                        times[name]["2_no_boot"].append(time.perf_counter() - t)
                if name not in errors:
                    log(f"repeat {r + 1}/{repeats} {name}: 1w {times[name][1][-1]:.2f}s, "
                        f"2w {times[name][2][-1]:.2f}s"
                        + (f", 2w n_boot=0 {times[name]['2_no_boot'][-1]:.2f}s" if times[name]["2_no_boot"] else ""))
        timed = [n for n in timed if n not in errors]
    finally:
        logging.getLogger("distributed").setLevel(logging.ERROR)  # shutdown chatter is not a result
        for cluster, client in clusters.values():
            client.close()
            cluster.close()

    # Graph size explains most of the cost at this scale: Dask spends ~ms per task, the numbers per task are tiny.
    graph = {}
    ds = cubes.open_routing(cube)
    for name in timed:
        t = time.perf_counter()
        g = analyses.get(name).func(ds, **dict(analyses.get(name).params)).__dask_graph__()
        graph[name] = {"tasks": len(g), "build_s": time.perf_counter() - t}
    blocks = math.prod(len(c) for c in ds["expert_ids"].chunks[:3])
    ds.close()

    base = statistics.median(bincount_s)
    results = {}
    for name in timed:
        t1, t2 = statistics.median(times[name][1]), statistics.median(times[name][2])
        results[name] = {
            "params": dict(analyses.get(name).params),
            "workers_1": {**summary(times[name][1]), "decisions_per_s": decisions / t1},
            "workers_2": {**summary(times[name][2]), "decisions_per_s": decisions / t2},
            "slowdown_vs_bincount_1_worker": t1 / base,
            "slowdown_vs_bincount_2_workers": t2 / base,
            "slowdown_vs_read_and_bincount_2_workers": t2 / statistics.median(read_s),
            "speedup_2_over_1_workers": t1 / t2,
            "speedup_2_over_1_per_repeat": [a / b for a, b in zip(times[name][1], times[name][2])],
            **({"workers_2_no_bootstrap": {**summary(times[name]["2_no_boot"]),
                                           "decisions_per_s": decisions / statistics.median(times[name]["2_no_boot"]),
                                           "slowdown_vs_bincount": statistics.median(times[name]["2_no_boot"]) / base}}
               if times[name]["2_no_boot"] else {}),
            "graph_tasks": graph[name]["tasks"],
            "graph_tasks_per_block": graph[name]["tasks"] / blocks,
            "graph_build_s": graph[name]["build_s"],
        }
    return {
        "bincount": {
            **summary(bincount_s),
            "decisions_per_s": decisions / base,
            "slots_per_s": decisions * K / base,
            "load_ids_into_memory_s": load_s,
            "what": "np.bincount(expert_ids.ravel(), minlength=E) over the whole cube's ids held in memory "
                    "(int16, converted to intp by numpy); load not timed",
        },
        "read_and_bincount": {
            **summary(read_s),
            "over_bincount": statistics.median(read_s) / base,
            "what": "read expert_ids from the store with zarr (decompression included), then the same bincount",
        },
        "open_routing": summary(open_s),
        "cube_blocks": blocks,
        "cube_blocks_what": "chunks of expert_ids over (checkpoint, layer, token): the unit of parallel work",
        "analyses": results,
        "skipped": skipped,
        "errors": errors,
        "not_selected": not_selected,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decisions", type=float, default=1e8,
                   help="target number of decisions (checkpoint × layer × token); tokens = ceil(decisions / (C·L))")
    p.add_argument("--checkpoints", type=int, default=2)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--logits", action="store_true", help="also store router_logits (E float16 per decision)")
    p.add_argument("--no-lens", action="store_true", help="leave lens_logprob out of the cube")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--analyses", nargs="*", default=None, help="only these registered analyses (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for the cube (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the cube (the temporary directory is removed otherwise)")
    p.add_argument("--tiny", action="store_true", help="a cube of a few thousand decisions, 1 repeat (smoke test)")
    p.add_argument("--cube", default=None,
                   help="time this existing routing cube (e.g. one kept with --keep) instead of writing one; "
                        "it is never deleted")
    p.add_argument("--no-point-estimates", action="store_true",
                   help="skip the extra 2-worker run of each analysis with n_boot=0 (point estimates only)")
    p.add_argument("--write-only", action="store_true", help="write (and keep) the cube, time nothing")
    args = p.parse_args(argv)
    if args.tiny:
        args.decisions, args.checkpoints, args.layers, args.experts, args.repeats = 4000, 2, 2, 8, 1
    for name in ("checkpoints", "layers", "experts", "top_k", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.top_k > args.experts:
        raise SystemExit(f"--top-k {args.top_k} exceeds --experts {args.experts}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # A killed benchmark still removes its (large) temporary cube and its clusters.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    n_tokens = int(math.ceil(args.decisions / (args.checkpoints * args.layers)))
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="moe-atlas-bench-analyses-"))
    out.mkdir(parents=True, exist_ok=True)
    cube = out / "routing.zarr"
    doc = {"benchmark": "analyses", "issue": 3, "machine_start": machine(), "argv": sys.argv[1:] if argv is None else argv}
    if args.write_only:
        args.keep = True
    given = Path(args.cube) if args.cube else None
    if given is not None:
        from storage import cube as cubes

        cube = given
        args.keep = True  # never delete a cube we did not write
        ds = cubes.open_routing(cube)
        args.checkpoints, args.layers = ds.sizes["checkpoint"], ds.sizes["layer"]
        args.experts, args.top_k, n_tokens = int(ds.attrs["num_experts"]), int(ds.attrs["top_k"]), ds.sizes["token"]
        args.logits, args.no_lens = "router_logits" in ds, "lens_logprob" not in ds
        ds.close()
    try:
        if given is not None:
            doc["cube"] = {
                "path": str(cube), "given": True, "checkpoints": args.checkpoints, "layers": args.layers,
                "tokens": n_tokens, "num_experts": args.experts, "top_k": args.top_k,
                "decisions": args.checkpoints * args.layers * n_tokens, "bytes_on_disk": dir_bytes(cube),
            }
        else:
            if cube.exists():
                shutil.rmtree(cube)
            log(f"writing {args.checkpoints}×{args.layers}×{n_tokens} decisions to {cube}")
            doc["cube"] = write_synthetic_cube(
                cube, n_checkpoints=args.checkpoints, n_layers=args.layers, n_tokens=n_tokens,
                num_experts=args.experts, top_k=args.top_k, keep_logits=args.logits, keep_lens=not args.no_lens,
                seed=args.seed,
            )
        if args.write_only:
            doc["kept"] = str(cube)
            emit(doc)
            return 0
        doc["definitions"] = {
            "decision": "one token routed at one MoE layer of one checkpoint (fills top_k slots)",
            "decisions_per_s": "cube decisions / median wall seconds of compute_analysis (open + graph + compute)",
            "slowdown_vs_bincount": "median analysis seconds / median seconds of one np.bincount over all ids in memory",
            "slowdown_vs_read_and_bincount": "median analysis seconds / median seconds of reading expert_ids from "
                                             "the store with zarr and bincounting them",
            "workers_2_no_bootstrap": "the same analysis with n_boot=0 (point estimates, no intervals) on 2 workers",
            "speedup_2_over_1_workers": "median seconds on a 1-worker LocalCluster / on a 2-worker one "
                                        "(threads_per_worker=1, processes)",
        }
        doc["repeats"] = args.repeats
        warm = None
        if not args.tiny:  # the tiny cube is small enough to be its own warm-up
            warm = out / "warm.zarr"
            if warm.exists():
                shutil.rmtree(warm)
            # Few blocks: warming code paths costs little, whatever the size of the timed cube.
            write_synthetic_cube(
                warm, n_checkpoints=min(args.checkpoints, 2), n_layers=min(args.layers, 2),
                n_tokens=min(n_tokens, 2048),
                num_experts=args.experts, top_k=args.top_k, keep_logits=args.logits, keep_lens=not args.no_lens,
                seed=args.seed + 7, progress=False,
            )
        doc.update(run_benchmark(cube, warm, repeats=args.repeats, only=args.analyses,
                                 boot_and_not=not args.no_point_estimates))
    finally:
        doc["machine_end"] = machine()
        shutil.rmtree(out / "warm.zarr", ignore_errors=True)
        if not args.keep:
            shutil.rmtree(cube, ignore_errors=True)
            if not args.out:
                shutil.rmtree(out, ignore_errors=True)
        doc["kept"] = str(cube) if args.keep else None
        if given is not None and not args.out:
            shutil.rmtree(out, ignore_errors=True)  # only held the warm-up cube
    emit(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
