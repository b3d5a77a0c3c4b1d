"""The Luigi DAG of moe-atlas, and nothing else.

``luigi --module tasks FullReport`` (defaults in ``luigi.cfg``) runs::

    PrepareModel ─ Tokenize(dataset)… ─ RoutingTemplate ─ Capture(checkpoint)…
        ─ Analyse(name)… ─ FullReport

Each task has one target and an input fingerprint; ``complete()`` compares
fingerprints, so editing the experiment reruns exactly what depends on the
edit (adding a checkpoint captures only that checkpoint, then recomputes the
analyses and the report). Numbers are computed in ``capture``/``analyses``;
paths come from ``storage.RunLayout``; Dask clients from ``deploy``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
from pathlib import Path

import luigi

from experiments import DEFAULT_EXPERIMENT
from experiments.spec import CheckpointSpec, DatasetSpec, Experiment, load_experiment
from storage import RunLayout, atomic
from storage import cube as cubes

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@functools.lru_cache(maxsize=None)
def _experiment(path: str) -> Experiment:
    return load_experiment(path)


def _layout(exp: Experiment) -> RunLayout:
    return RunLayout(Path(exp.output_dir))


def _demo_config(exp: Experiment):
    from capture.demo import DemoConfig

    return DemoConfig(**exp.model.demo)


def checkpoints(exp: Experiment) -> list[CheckpointSpec]:
    """The experiment's checkpoints; for the demo, the ones its training saves."""
    if exp.model.source == "checkpoints":
        return list(exp.model.checkpoints)
    if exp.model.source == "import":
        return []  # the traces name their own checkpoints
    from capture.demo import demo_checkpoints

    return [CheckpointSpec(**c) for c in demo_checkpoints(_layout(exp).model_dir, _demo_config(exp))]


def datasets(exp: Experiment) -> list[DatasetSpec]:
    if exp.datasets or exp.model.source != "demo":
        return list(exp.datasets)
    from capture.demo import demo_datasets

    # With [conditions], also the demo's two-condition set (capture/demo/paired.py).
    return [DatasetSpec(**d) for d in demo_datasets(_layout(exp).model_dir, paired=bool(exp.conditions.a))]


def _conditions(exp: Experiment) -> tuple[str, str]:
    return (exp.conditions.a, exp.conditions.b)


def tokenizer_dir(exp: Experiment) -> str:
    if exp.model.tokenizer:
        return exp.model.tokenizer
    return checkpoints(exp)[0].path


def run_identity(exp: Experiment) -> dict:
    """What makes a run folder this experiment's (``storage.ownership``): name, model source, tokenizer, datasets.

    Not the checkpoints, analyses, capture or report settings: adding a
    checkpoint or an analysis later continues the same run (and captures or
    computes only what is new); another model, tokenizer or data set is
    another experiment and gets its own output_dir.
    """
    ident = {"experiment": exp.name, "source": exp.model.source}
    if exp.model.source == "checkpoints":
        tok = exp.model.tokenizer or (exp.model.checkpoints[0].path if exp.model.checkpoints else "")
        ident["tokenizer"] = str(Path(tok).resolve()) if tok else ""
    elif exp.model.source == "import":
        ident["trace_format"] = exp.trace.format
    ident["datasets"] = [[d.name, str(Path(d.path).resolve())] for d in exp.datasets]
    return ident


def _under_run_lock(run):
    """Wrap a stage's ``run`` in the run directory's lock (storage/lock.py: wait, then give up with a clear error).

    A run that waited re-checks ``complete()``: the other run may have done this stage meanwhile.
    """
    import inspect

    if inspect.isgeneratorfunction(run):  # the lock would be released before the generator runs
        raise TypeError(f"{run.__qualname__}: dynamic dependencies (a generator run) are not supported")

    @functools.wraps(run)
    def locked(self):
        from storage.lock import run_lock
        from storage.ownership import check_output_dir, claim_run, precheck_run

        # Before the lock file is made: a folder that is not this experiment's run is refused untouched.
        check_output_dir(self.exp.output_dir, where=self.exp.source_file or self.experiment)
        identity = run_identity(self.exp)
        precheck_run(self.layout.root, identity, experiment_file=self.exp.source_file or self.experiment)
        with run_lock(self.layout.lock):
            # Under the lock: of two experiments that both found the folder empty, the second is refused here.
            claim_run(self.layout.root, identity, experiment_file=self.exp.source_file or self.experiment)
            with checking_once():  # one read-only look at the graph: each requirement's check counted once
                done = self.complete()
            if done:
                logging.getLogger("luigi-interface").info("%s: done by another run while this one waited; skipped", self)
            else:
                run(self)

    return locked


# Within ``checking_once()``: task_id -> complete(). A parent's complete() asks its requirements again
# (13 analyses x 4 captures = 52 Capture checks on the demo); one read-only check of the whole graph
# (``moe-atlas run`` deciding whether there is anything to do) needs each answer once.
_CHECKED: dict[str, bool] | None = None


@contextlib.contextmanager
def checking_once():
    """Memoise each task's ``complete()`` inside the block: for one read-only check of the graph, not a run."""
    global _CHECKED
    outer, _CHECKED = _CHECKED, {}
    try:
        yield
    finally:
        _CHECKED = outer


def _done(task) -> bool:
    """``task.complete()``, once per task inside ``checking_once()``."""
    if _CHECKED is None:
        return task.complete()
    if task.task_id not in _CHECKED:
        _CHECKED[task.task_id] = bool(task.complete())
    return _CHECKED[task.task_id]


class _Stage(luigi.Task):
    """A stage of one experiment: identity = (experiment file, stage parameters)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "run" in cls.__dict__:
            cls.run = _under_run_lock(cls.__dict__["run"])

    experiment = luigi.Parameter(description="path of the experiment TOML file")

    @property
    def exp(self) -> Experiment:
        return _experiment(self.experiment)

    @property
    def layout(self) -> RunLayout:
        return _layout(self.exp)

    def on_failure(self, exception):
        # The one-line reason appears in Luigi's summary; the traceback is logged too.
        return f"{type(exception).__name__}: {exception}"

    def _stored_matches(self, stored: str | None) -> bool:
        """Complete: the fingerprint stored with this stage's output (``stored``; None when there is no
        output) is current, and every requirement is complete. The output is looked at first: with none
        yet (a fresh run, the re-check under the run lock) the requirements, whose checks cost more
        (captures, analyses), are not walked."""
        if stored is None or not all(_done(r) for r in luigi.task.flatten(self.requires())):
            return False
        return stored == self.fingerprint()


class PrepareModel(_Stage):
    """Demo: corpus → BPE tokenizer → tiny MoE training → checkpoints. Real: check the checkpoint dirs."""

    def fingerprint(self) -> str:
        exp = self.exp
        if exp.model.source == "demo":
            from capture.demo.paired import PAIRED_VERSION

            # With [conditions] the run needs the paired set: re-check it when conditions are added.
            return cubes.fingerprint("demo", dataclasses.asdict(_demo_config(exp)), PAIRED_VERSION,
                                     *(["paired"] if exp.conditions.a else []))
        return cubes.fingerprint("checkpoints", [dataclasses.asdict(c) for c in exp.model.checkpoints])

    def output(self):
        return luigi.LocalTarget(str(self.layout.prepared))

    def complete(self):
        return _json_fingerprint(self.output().path) == self.fingerprint()

    def run(self):
        exp = self.exp
        info = {"fingerprint": self.fingerprint()}
        if exp.model.source == "demo":
            from capture.demo import prepare_demo

            info["manifest"] = prepare_demo(self.layout.model_dir, _demo_config(exp), progress=True)
            paired = info["manifest"].get("paired", {})
            if exp.conditions.a and not paired.get("path"):
                raise ValueError(f"{exp.source_file}: [conditions] compares the demo's paired set, which this "
                                 f"model.demo config cannot build: {paired.get('error', 'no paired data')}")
        else:
            from capture.load import check_checkpoints

            try:
                models = check_checkpoints([(c.name, c.path) for c in exp.model.checkpoints],
                                           trust_remote_code=exp.model.trust_remote_code)
            except (OSError, ValueError) as exc:
                raise type(exc)(f"{exp.source_file}: {exc}") from exc
            info["models"] = [dataclasses.asdict(m) for m in models]
        atomic.write_json(self.output().path, info)


class Tokenize(_Stage):
    """Token table of one dataset: sample, position, token id, text span, domain, canonical flag."""

    dataset = luigi.Parameter()

    def requires(self):
        return PrepareModel(experiment=self.experiment)

    def _spec(self) -> DatasetSpec:
        for d in datasets(self.exp):
            if d.name == self.dataset:
                return d
        raise KeyError(f"{self.exp.source_file}: no dataset named {self.dataset!r}")

    def fingerprint(self) -> str:
        d = self._spec()
        return cubes.fingerprint(
            dataclasses.asdict(d), _file_digest(d.path), self.exp.capture.max_length,
            # pair_tokens files name their id fields after the conditions
            _conditions(self.exp) if d.format == "pair_tokens" else None,
            # The tokenizer's content, not its path: re-saving an identical tokenizer changes nothing.
            [_file_digest(p) for p in sorted(Path(tokenizer_dir(self.exp)).glob("*.json"))],
        )

    def output(self):
        return luigi.LocalTarget(str(self.layout.tokens(self.dataset)))

    def complete(self):
        return cubes.result_fingerprint(self.output().path) == self.fingerprint()

    def run(self):
        from capture.tokenize import tokenize_jsonl

        d = self._spec()
        if d.format == "pair_tokens":
            from capture.load import load_tokenizer
            from capture.pairs import read_pair_tokens

            a, b = _conditions(self.exp)
            table = read_pair_tokens(
                d.path, condition_a=a, condition_b=b, dataset=d.name, max_length=self.exp.capture.max_length,
                max_samples=d.max_samples,
                tokenizer=load_tokenizer(tokenizer_dir(self.exp), trust_remote_code=self.exp.model.trust_remote_code),
            )
            cubes.write_result(table, self.output().path, fingerprint=self.fingerprint())
            return
        table = tokenize_jsonl(
            d.path, tokenizer_dir(self.exp), dataset=d.name, max_length=self.exp.capture.max_length,
            text_field=d.text_field, domain_field=d.domain_field, max_samples=d.max_samples,
            trust_remote_code=self.exp.model.trust_remote_code,
        )
        cubes.write_result(table, self.output().path, fingerprint=self.fingerprint())


class RoutingTemplate(_Stage):
    """Write (or extend with new checkpoints) the routing cube's template."""

    def requires(self):
        return [PrepareModel(experiment=self.experiment)] + [
            Tokenize(experiment=self.experiment, dataset=d.name) for d in datasets(self.exp)
        ]

    def fingerprint(self) -> str:
        """The token tables (their own fingerprints: content of data and tokenizer) and the pairing of conditions."""
        # Only the token tables matter here: PrepareModel reruns when checkpoints are added.
        return cubes.fingerprint([cubes.result_fingerprint(t.output().path, verify=False) for t in self.requires()[1:]],
                                 _conditions(self.exp))

    def output(self):
        # What the template was built from; the cube itself is shared with Capture (one region each).
        return luigi.LocalTarget(str(self.layout.template_marker))

    def _current_cube(self) -> list[str] | None:
        """The cube's checkpoint names, if it exists and was built from the current token tables; else None.

        Cheap: compares fingerprints kept in the marker (no token table is read or aligned again) and
        reads the cube's metadata only (``cubes.routing_head``; a no-op re-run stays fast).
        """
        if not all(_done(r) for r in self.requires()[1:]):
            return None
        mark = _read_json(self.output().path) or {}
        if mark.get("fingerprint") != self.fingerprint():
            return None
        try:
            attrs, names = cubes.routing_head(self.layout.routing)
        except cubes.CubeError:
            return None
        return names if attrs.get("inputs_hash") == mark.get("inputs_hash") else None

    def inputs_current(self) -> bool:
        """The cube exists and was built from the current token tables."""
        return self._current_cube() is not None

    def complete(self):
        names = self._current_cube()
        return names is not None and {c.name for c in checkpoints(self.exp)} <= set(names)

    def run(self):
        from capture.job import build_template

        exp = self.exp
        fingerprint = self.fingerprint()
        template = build_template(
            [t.output().path for t in self.requires()[1:]],
            checkpoints=checkpoints(exp),
            keep_logits=exp.capture.keep_router_logits,
            trust_remote_code=exp.model.trust_remote_code,
            conditions=_conditions(exp),
            keep_lens=exp.capture.logit_lens,
            keep_js=exp.capture.js_divergence,
        )
        cubes.clean_temporaries(self.layout.root)
        cubes.prepare_routing(self.layout.routing, template)
        atomic.write_json(self.output().path, {"fingerprint": fingerprint, "inputs_hash": template.attrs["inputs_hash"]})


def _batch_checkpoints(names) -> str:
    """Luigi ``batch_method`` of ``Capture.checkpoint``: the pending captures of an experiment, as one task."""
    names = list(names)
    # No spaces: Luigi's log lines separate parameters with ", ".
    return names[0] if len(names) == 1 else json.dumps(names, separators=(",", ":"))


class Capture(_Stage):
    """One checkpoint's region of routing.zarr, computed as one job on the Dask cluster.

    Captures of different checkpoints run concurrently: Luigi runs one task at
    a time (one Luigi worker; the fan-out is Dask's), but the scheduler hands
    every pending ``Capture`` of an experiment to that worker as one *batch*
    (``checkpoint`` has a ``batch_method``), whose ``run`` submits all the jobs
    at once and waits for all of them. Each checkpoint stays its own task in
    the graph (``Analyse`` requires one per checkpoint; adding a checkpoint
    captures only that one). Jobs that ask for a GPU get one device each
    (Dask resources); on CPU, as many run at once as the workers have threads.
    A failed job leaves the others' finished regions complete.
    """

    checkpoint = luigi.Parameter(batch_method=_batch_checkpoints,
                                 description="checkpoint name (a JSON list of names when Luigi batches captures)")

    def requires(self):
        return RoutingTemplate(experiment=self.experiment)

    def _names(self) -> list[str]:
        known = [c.name for c in checkpoints(self.exp)]
        if self.checkpoint in known:
            return [self.checkpoint]
        try:
            names = json.loads(self.checkpoint)
        except ValueError:
            names = None
        if isinstance(names, list) and names and all(n in known for n in names):
            return names
        raise KeyError(f"{self.exp.source_file}: no checkpoint named {self.checkpoint!r}")

    def _spec(self) -> CheckpointSpec:
        return self._specs()[0]

    def _specs(self) -> list[CheckpointSpec]:
        by_name = {c.name: c for c in checkpoints(self.exp)}
        return [by_name[n] for n in self._names()]

    def output(self):
        # This checkpoint's region of routing.zarr (one per checkpoint of a batch), not the whole cube.
        routing = self.layout.routing
        try:
            names = self._names()
        except KeyError:
            names = [self.checkpoint]
        return [_Check(routing, lambda n=n: n in cubes.completed_checkpoints(routing), f"region {n}") for n in names]

    def complete(self):
        # Not RoutingTemplate.complete(): a template missing *another* checkpoint leaves this capture valid.
        done = set(cubes.completed_checkpoints(self.layout.routing))
        try:
            names = self._names()
        except KeyError:
            return False
        return set(names) <= done and self.requires().inputs_current()

    def run(self):
        import deploy
        from capture.job import submit_captures, wait_captures

        exp = self.exp
        done = set(cubes.completed_checkpoints(self.layout.routing))
        # A batch that waited for the run lock may find some of its checkpoints done by another run.
        specs = [c for c in self._specs() if c.name not in done]
        client = _client(exp)
        futures = submit_captures(client, [
            dict(model_dir=c.path, routing_path=str(self.layout.routing), checkpoint=c.name,
                 batch_size=exp.capture.batch_size, device=exp.capture.device, dtype=exp.capture.dtype,
                 trust_remote_code=exp.model.trust_remote_code)
            for c in specs
        ], run_key=exp.name, gpu=exp.capture.device.startswith("cuda"))
        wait_captures(futures, explain=deploy.explain)


class ImportTrace(_Stage):
    """routing.zarr from traces another system wrote (storage/importers), instead of capture."""

    MARK = "import_fingerprint"

    def fingerprint(self) -> str:
        t = self.exp.trace
        return cubes.fingerprint(
            dataclasses.asdict(t), [_path_stamp(p) for p in t.paths], _path_stamp(t.side_table) if t.side_table else "",
        )

    def output(self):
        # routing.zarr stamped with this import's fingerprint (attribute MARK, written last).
        return _Check(self.layout.routing, self.complete, "imported routing")

    def complete(self):
        try:
            attrs, _ = cubes.routing_head(self.layout.routing)
        except cubes.CubeError:
            return False
        return attrs.get(self.MARK) == self.fingerprint() and bool(cubes.completed_checkpoints(self.layout.routing))

    def run(self):
        from storage.importers import import_trace

        t = self.exp.trace
        for p in t.paths:
            if not Path(p).exists():
                raise FileNotFoundError(f"{self.exp.source_file}: trace {p} does not exist")
        import_trace(
            t.format, list(t.paths), self.layout.routing, checkpoint=list(t.checkpoints) or None,
            step=list(t.steps) or None, side_table=t.side_table or None, num_experts=t.num_experts or None,
            overwrite=True, **t.options,
        )
        # Written last: an interrupted import is never taken for a finished one.
        cubes.set_routing_attrs(self.layout.routing, {self.MARK: self.fingerprint()})


class Analyse(_Stage):
    """One registered analysis over all captured checkpoints → analyses/<name>.zarr."""

    analysis = luigi.Parameter()

    def requires(self):
        if self.exp.model.source == "import":
            return [ImportTrace(experiment=self.experiment)]
        return [Capture(experiment=self.experiment, checkpoint=c.name) for c in checkpoints(self.exp)]

    def params(self) -> dict:
        from analyses import get

        p = dict(get(self.analysis).params)
        p.update(self.exp.analyses.params.get(self.analysis, {}))
        return p

    def fingerprint(self) -> str:
        from analyses import get, module_version

        attrs, _ = cubes.routing_head(self.layout.routing)  # metadata only: complete() must stay cheap
        if self.exp.model.source == "import":
            inputs = [attrs.get(ImportTrace.MARK)]
        else:
            inputs = sorted((c.name, c.step) for c in checkpoints(self.exp))
        # this analysis' own code (and what it imports), so that editing another stage leaves it done
        VERSION = module_version(get(self.analysis).func.__module__)
        return cubes.fingerprint(self.analysis, self.params(), attrs.get("inputs_hash"), inputs, VERSION)

    def output(self):
        return luigi.LocalTarget(str(self.layout.analysis(self.analysis)))

    def complete(self):
        return self._stored_matches(cubes.result_fingerprint(self.output().path))

    def run(self):
        import xarray as xr

        from analyses.registry import skip_reason
        from analyses.runner import compute_analysis

        # Imported traces often lack weights or logits, hold one checkpoint or one domain, or only
        # aggregate counts: the report says what was skipped and why instead of the run failing.
        reason = skip_reason(self.analysis, cubes.open_routing(self.layout.routing, complete_only=False))
        if reason:
            result = xr.Dataset(attrs={"analysis": self.analysis, "skipped": reason})
        else:
            names = None if self.exp.model.source == "import" else [c.name for c in checkpoints(self.exp)]
            import deploy

            client = _client(self.exp)
            # A worker that died (KilledWorker) or no worker left: one line saying so, not "reading the cube failed".
            with deploy.cluster_errors(f"analysis {self.analysis!r}"):
                result = compute_analysis(
                    self.layout.routing, self.analysis, self.params(), checkpoints=names, client=client,
                )
        cubes.write_result(result, self.output().path, fingerprint=self.fingerprint())


class FullReport(_Stage):
    """report/index.html with figures, tables/*.csv and summary.json."""

    experiment = luigi.Parameter(default=DEFAULT_EXPERIMENT, description="path of the experiment TOML file (default: the demo)")

    def requires(self):
        from .training import report_requires  # issue 16: the training-runs stage (tasks/training.py)

        from .experts import report_requires as weights_requires  # issue 14: tasks/experts.py
        from .interventions import report_requires as interventions_requires  # issue 15: tasks/interventions.py

        return ([Analyse(experiment=self.experiment, analysis=a) for a in self.exp.analyses.run]
                + report_requires(self.experiment) + weights_requires(self.experiment)
                + interventions_requires(self.experiment))

    def fingerprint(self) -> str:
        from analyses import REPORT_VERSION, VERSION

        return cubes.fingerprint(
            [cubes.result_fingerprint(r.output().path) for r in self.requires()], self.exp.report.formats,
            self.exp.report.title, VERSION, REPORT_VERSION,
        )

    def output(self):
        return luigi.LocalTarget(str(self.layout.report_index))

    def complete(self):
        # summary.json is written last: its fingerprint marks the report (index.html and all) complete
        return Path(self.output().path).exists() and self._stored_matches(_json_fingerprint(self.layout.summary))

    def run(self):
        from analyses.report import build_report

        build_report(
            self.exp, self.layout, [r.analysis for r in self.requires() if isinstance(r, Analyse)], fingerprint=self.fingerprint(),
            dashboard=_dashboard(),
        )


# ------------------------------------------------------------------ helpers


def _client(exp: Experiment):
    import deploy

    d = exp.dask
    return deploy.client(
        scheduler=d.scheduler, n_workers=d.n_workers, threads_per_worker=d.threads_per_worker, host=d.host,
        dashboard_port=d.dashboard_port, memory_limit=d.memory_limit,
        gpus_per_worker=1 if exp.capture.device.startswith("cuda") else 0,
        allow_remote=bool(getattr(d, "allow_remote", False)),
        # An external scheduler's TLS files ([dask] tls_ca_file/tls_cert/tls_key when the spec has them;
        # otherwise distributed's own config, distributed.comm.tls.*).
        tls={k: getattr(d, f"tls_{k}", "") for k in ("ca_file", "cert", "key")} if getattr(d, "tls_ca_file", "") else None,
    )


def _dashboard() -> str:
    import deploy

    return deploy.dashboard_link()


class _Check(luigi.Target):
    """A target that is a check on the run's files (a cube region, a stamp), not the existence of a path."""

    def __init__(self, path, check, what: str):
        self.path, self._check, self.what = str(path), check, what

    def exists(self) -> bool:
        return bool(self._check())

    def __repr__(self) -> str:
        return f"<{self.what} of {self.path}>"


def _read_json(path) -> dict | None:
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _json_fingerprint(path) -> str | None:
    return (_read_json(path) or {}).get("fingerprint")


def _path_stamp(path) -> list:
    """Cheap identity of a trace file or directory (sizes and mtimes; traces can be many GB)."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return [p.name, st.st_size, st.st_mtime_ns]
    if p.is_dir():
        return sorted([str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns] for f in p.rglob("*") if f.is_file())
    return ["missing", str(p)]


_DIGESTS: dict[tuple, str] = {}


def _file_digest(path) -> str:
    """SHA-256 of the file's content (16 hex digits), hashed once per process while its size and mtime stay.

    Completeness checks ask for it many times per run (every Capture checks the token tables): a
    large dataset must not be read again each time, nor on a no-op re-run more than once.
    """
    import hashlib

    p = Path(path)
    if not p.is_file():
        return "missing"
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()[:16]
    return _DIGESTS[key]
