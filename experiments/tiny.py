"""The tiny demo experiment: the embedded demo at test size (it prepares in seconds, not minutes).

One definition for the tests that run the pipeline (``tests/pipeline_helpers.py``) and the
benchmarks' smoke modes (``bench/e2e.py --tiny``, ``bench/parallel_capture.py --tiny``).
Its model is :data:`capture.demo.train.TINY`; everything else is the smallest capture
and a one-worker local Dask cluster.
"""

from __future__ import annotations

from pathlib import Path

from capture.demo.train import TINY

from .toml_writer import dumps, to_toml

#: Capture settings of the tiny demo (small batches; router logits kept for the analyses that need them).
CAPTURE = {"keep_router_logits": True, "batch_size": 4, "max_length": 64}


def demo_table(**overrides) -> dict:
    """The tiny demo's ``[model.demo]`` table, with ``overrides``."""
    return {**TINY, **overrides}


def demo_section(**overrides) -> str:
    """The ``[model.demo]`` table as TOML text (to put in place of another experiment's)."""
    return "\n".join(to_toml({"model": {"demo": demo_table(**overrides)}})[1:]) + "\n"


def tiny_experiment(output_dir: Path | str, *, name: str = "tiny", analyses=("usage",), port: int | None = None,
                    demo: dict | None = None, capture: dict | None = None, **tables) -> str:
    """The tiny demo as the text of an experiment file.

    ``demo`` and ``capture`` update the tiny model and capture settings; ``port`` is the Dask
    dashboard's (tests that run at once need different ones); ``tables`` adds top-level keys
    or tables as they are (``conditions={...}``, ``runs=[{...}]``, ``training={"scores": [...]}``).
    """
    dask = {"n_workers": 1, **({"dashboard_port": port} if port is not None else {})}
    return dumps({
        "name": name, "output_dir": str(output_dir),
        "model": {"source": "demo", "demo": demo_table(**(demo or {}))},
        "capture": {**CAPTURE, **(capture or {})},
        "analyses": {"run": list(analyses)},
        "dask": dask,
        **tables,
    })
