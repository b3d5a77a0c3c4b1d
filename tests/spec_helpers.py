"""Experiment-file text for the spec and validation tests."""

#: The smallest valid experiment a user writes: one checkpoint, one dataset. Tests append tables to it.
MINIMAL = """
name = "x"
output_dir = "runs/x"
[model]
source = "checkpoints"
[[model.checkpoints]]
name = "a"
path = "/ckpt/a"
step = 0
[[datasets]]
name = "d"
path = "d.jsonl"
"""


def import_experiment(out_dir, trace: dict, *, run, port: int, name: str = "imported"):
    """An experiment that imports a trace (``[trace]`` = ``trace``) into ``out_dir/run`` and runs ``run``;
    written to ``out_dir/<name>.toml``, whose path it returns (the experiment cache cleared)."""
    import tasks
    from experiments.toml_writer import dumps

    exp = out_dir / f"{name}.toml"
    exp.write_text(dumps({
        "name": name, "output_dir": str(out_dir / "run"), "model": {"source": "import"}, "trace": trace,
        "analyses": {"run": list(run)}, "dask": {"n_workers": 1, "dashboard_port": port},
    }))
    tasks._experiment.cache_clear()
    return exp
