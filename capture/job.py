"""Glue between the model side and the routing cube: what a Capture job runs.

``capture_into_cube`` is submitted to a Dask worker, one job per checkpoint.
It reads the token table from the cube itself (so every checkpoint sees
identical inputs) and streams routing into that checkpoint's region.
``submit_captures`` submits the jobs of several checkpoints at once (they run
side by side; regions are disjoint whole chunks) and ``wait_captures`` waits
for all of them, reporting every failure in one error.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import xarray as xr

from storage import cube as cubes
from storage.schema import empty_routing


def load_token_tables(paths: list[str]) -> xr.Dataset:
    """Concatenate per-dataset token tables along ``token``; sample ids stay unique.

    dims in: (token,) per table; dims out: (token,) with ``token`` renumbered.
    """
    tables = []
    offset = 0
    for p in paths:
        t = cubes.open_result(p)
        t = t.assign_coords(sample=("token", t["sample"].values - t["sample"].values.min() + offset))
        offset = int(t["sample"].values.max()) + 1
        tables.append(t)
    ds = xr.concat(tables, dim="token", data_vars="all", coords="all", compat="override", join="override")
    ds = ds.assign_coords(token=("token", np.arange(ds.sizes["token"], dtype=np.int64)))
    ds.attrs = {}
    if ds.sizes["token"] == 0:
        raise ValueError(f"no tokens in datasets {paths}")
    return ds


def aligned_token_tables(token_paths: list[str], conditions: tuple[str, str] = ("", "")):
    """The concatenated token tables with ``aligned_token``/``last_canonical`` set (``capture.align``).

    Returns (tokens, AlignmentStats).
    """
    from .align import align_tokens

    a, b = conditions
    return align_tokens(load_token_tables(token_paths), a, b, where=f"token tables {[str(p) for p in token_paths]}")


def _versions() -> dict:
    import tokenizers
    import torch
    import transformers
    import zarr

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "xarray": xr.__version__,
        "zarr": zarr.__version__,
    }


def build_template(token_paths: list[str], *, checkpoints, keep_logits: bool, trust_remote_code: bool = False,
                   conditions: tuple[str, str] = ("", ""), keep_lens: bool = False, keep_js: bool = False):
    """The lazy routing template for these token tables and checkpoints.

    Layers, experts, top-k and router semantics come from the first
    checkpoint's config (no weights are loaded). Tokens of the two
    ``conditions`` (A, B) are aligned here (``capture.align``), so the cube
    carries ``aligned_token`` and ``last_canonical``; ``keep_lens``/``keep_js``
    add the logit-lens variables.
    """
    from .load import describe_checkpoint

    if keep_js and not all(conditions):
        raise ValueError("capture.js_divergence needs the two conditions named in [conditions] (a and b)")
    tokens, stats = aligned_token_tables(token_paths, conditions)
    info = describe_checkpoint(checkpoints[0].path, trust_remote_code=trust_remote_code)
    versions = _versions()
    attrs = {
        "model_family": info.family,
        "router_semantics": info.router_semantics,
        "shared_experts": int(info.shared_experts),
        "dtype": info.dtype,
        "source": "capture (moe-atlas forward hooks on the routers)",
        "usage_normalisation": "slots: each token contributes k routing slots",
        "software": ", ".join(f"{k} {v}" for k, v in versions.items()),
    }
    # Facts that apply to some families only (zero-computation experts, scaling after the experts,
    # capacity-limited routing): capture.load.ModelInfo.attrs() states them.
    attrs.update({k: v for k, v in info.attrs().items()
                  if k in ("zero_experts", "post_expert_scale", "capacity")})
    if all(conditions):
        attrs.update(condition_a=conditions[0], condition_b=conditions[1], alignment=stats.to_json())
    return empty_routing(
        tokens,
        checkpoints=[c.name for c in checkpoints],
        steps=[int(c.step) for c in checkpoints],
        layers=list(info.moe_layers),
        num_experts=info.num_experts,
        top_k=info.top_k,
        keep_logits=keep_logits,
        keep_lens=keep_lens,
        keep_js=keep_js,
        keep_capacity=info.capacity is not None,
        attrs=attrs,
        lazy=True,
    )


WEIGHT_SELF_TEST_ATTR = "weight_self_test"


def weight_self_test(info, *, n_tokens: int) -> dict:
    """The per-token weight-sum self-test of one capture, as stored in the cube attr ``weight_self_test``.

    Parameters
    ----------
    info : the ``capture.load.ModelInfo`` that ``capture_model`` returned
        (``weight_sum_min`` / ``weight_sum_max``: per-token sum of the k
        captured weights over every token and layer).
    n_tokens : tokens captured.

    Returns
    -------
    dict with ``weight_sum_min``, ``weight_sum_max`` (None when no weight was
    seen), ``sums_constant`` (one constant, rounding in the model's dtype
    aside), ``claim`` (what the router semantics say: ``renormalised``, ``not
    renormalised`` or ``none``) and ``verdict``: ``consistent``,
    ``contradicts the router semantics``, or ``not tested: <why>``. The rule is
    ``capture.run``'s self-test (which also warns and marks ``router_semantics``).
    """
    from .load import weight_sums_constant

    lo, hi = info.weight_sum_min, info.weight_sum_max
    claim = {True: "renormalised", False: "not renormalised", None: "none"}[info.renormalised_claim]
    out = {"weight_sum_min": None if lo is None else float(lo), "weight_sum_max": None if hi is None else float(hi),
           "sums_constant": None, "claim": claim}
    if lo is None:
        return {**out, "verdict": "not tested: no routing weight was captured"}
    constant = weight_sums_constant(lo, hi, info.dtype)
    out["sums_constant"] = constant
    if info.capacity is not None:
        return {**out, "verdict": "not tested: capacity-dropped slots weigh 0, so sums vary by design"}
    if n_tokens < 2:
        return {**out, "verdict": "not tested: one token always has one sum"}
    if info.renormalised_claim is None:
        return {**out, "verdict": "not tested: the router semantics make no claim about the sum"}
    # top-1 of a full softmax is not renormalised yet may look constant only by accident: no contradiction then
    contradicts = (info.renormalised_claim and not constant) or (
        not info.renormalised_claim and constant and info.top_k > 1)
    return {**out, "verdict": "contradicts the router semantics" if contradicts else "consistent"}


def capture_into_cube(
    model_dir: str,
    routing_path: str,
    checkpoint: str,
    *,
    batch_size: int = 16,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    progress: bool = True,
) -> dict:
    """Capture one checkpoint into its region of ``routing_path``.

    The checkpoint's architecture must match the template (same MoE layers,
    experts and top-k); its ``complete`` flag is set only after every token is
    written. Returns a small dict describing what was captured.
    """
    import torch

    from .load import describe_checkpoint, load_model
    from .run import capture_model

    ds = cubes.open_routing(routing_path, complete_only=False)
    info = describe_checkpoint(model_dir, trust_remote_code=trust_remote_code)
    layers = [int(x) for x in ds.layer.values]
    if list(info.moe_layers) != layers or info.num_experts != ds.sizes["expert"] or info.top_k != ds.sizes["k"]:
        raise ValueError(
            f"{model_dir}: MoE layers {info.moe_layers}, {info.num_experts} experts, top-{info.top_k} do not match "
            f"the routing cube {routing_path} (layers {layers}, {ds.sizes['expert']} experts, top-{ds.sizes['k']})"
        )
    tokens = ds.drop_vars(list(ds.data_vars)).drop_dims([d for d in ds.dims if d != "token"])
    model = load_model(model_dir, device=device, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    with cubes.RoutingWriter(routing_path, checkpoint) as writer:
        seen = capture_model(
            model, tokens, writer,
            keep_logits="router_logits" in ds, keep_nll="nll" in ds,
            keep_lens="lens_logprob" in ds, keep_js="lens_js" in ds,
            batch_size=batch_size, progress=progress, desc=f"capture {checkpoint}", where=str(model_dir),
        )
        # before the writer closes (and sets ``complete``): a complete checkpoint always carries its self-test,
        # since a rerun never recaptures it. Merged under the cube's lock: other checkpoints write theirs at once.
        test = weight_self_test(seen, n_tokens=int(ds.sizes["token"]))
        cubes.set_routing_attrs(routing_path, {}, merge_json={WEIGHT_SELF_TEST_ATTR: {checkpoint: test}})
    return {"checkpoint": checkpoint, "tokens": int(ds.sizes["token"]), "model_dir": str(Path(model_dir)),
            "weight_self_test": test["verdict"]}


def submit_captures(client, jobs: list[dict], *, run_key: str, gpu: bool = False) -> dict:
    """Submit one capture job per checkpoint, all at once, so that they run side by side on the cluster.

    Parameters
    ----------
    client : distributed.Client
    jobs : list of dict
        Keyword arguments of :func:`capture_into_cube`, one per checkpoint
        (``model_dir``, ``routing_path``, ``checkpoint``, ``batch_size``, ...).
    run_key : str
        Prefix of the Dask keys (``capture-<run_key>-<checkpoint>-<n>``): the
        dashboard's task stream shows each capture under its checkpoint.
    gpu : bool
        Each job asks for one ``GPU`` resource: a worker advertising GPU=1
        runs one capture at a time, on its own device. On CPU a job takes one
        worker thread, so as many run at once as the workers have threads.

    Returns
    -------
    dict : checkpoint name -> future, in the order of ``jobs``.
    """
    import time

    futures = {}
    for job in jobs:
        job = dict(job)
        model_dir, routing_path, checkpoint = job.pop("model_dir"), job.pop("routing_path"), job.pop("checkpoint")
        futures[checkpoint] = client.submit(
            capture_into_cube, model_dir, routing_path, checkpoint, **job,
            key=f"capture-{run_key}-{checkpoint}-{time.time_ns()}", pure=False,
            resources={"GPU": 1} if gpu else None,
        )
    return futures


def wait_captures(futures: dict, *, explain=None) -> dict:
    """Wait for every capture future; raise one error naming each checkpoint that failed.

    A failed capture does not stop the others (their regions are finished and
    marked complete, so a rerun captures only what failed).

    Parameters
    ----------
    futures : checkpoint name -> future (from :func:`submit_captures`).
    explain : callable(exc, what) -> str or None, optional
        Turns cluster failures (a worker that died, no worker able to run the
        job) into one line (``deploy.explain``).

    Returns
    -------
    dict : checkpoint name -> what :func:`capture_into_cube` returned.

    Raises
    ------
    RuntimeError (or the single failure's own type when one checkpoint failed
    with an ordinary error), listing each failed checkpoint with its reason.
    """
    results, failures = {}, {}
    for name, future in futures.items():
        try:
            results[name] = future.result()
        except Exception as exc:  # noqa: BLE001 - collected, reported together below
            line = explain(exc, f"capture of checkpoint {name!r}") if explain is not None else None
            failures[name] = (exc, line)
    if not failures:
        return results
    if len(failures) == 1:
        (name, (exc, line)), = failures.items()
        if line is None:
            raise exc  # an ordinary error (e.g. a CubeError naming the cube): its own type and message
        raise RuntimeError(line) from exc
    lines = [line or f"capture of checkpoint {name!r}: {type(exc).__name__}: {exc}"
             for name, (exc, line) in failures.items()]
    done = f" ({len(results)} others finished)" if results else ""
    raise RuntimeError(f"{len(failures)} of {len(futures)} captures failed{done}: " + " | ".join(lines)) \
        from next(iter(failures.values()))[0]
