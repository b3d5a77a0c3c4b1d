"""Issue 15's stages: ablation sweeps on the model, and observational vs causal.

For every checkpoint named in ``[interventions] checkpoints``::

    Capture(c) ─ InterventionBaseline(c) ─┬─ InterventionSweep(c, "<kind>.drop_top1")
    Analyse(usage | specialization | ...) ┼─ InterventionSweep(c, "<kind>.single")          (each expert alone)
                                          ├─ InterventionSweep(c, "<kind>.rank.<ranking>")  (top-n of a ranking)
                                          └─ InterventionSweep(c, "<kind>.random")          (the chance band, every seed)
    all of them ─ Interventions ─ FullReport

``InterventionBaseline`` scores the unmasked model on the captured tokens (and the output-aware importance
when a ranking needs it) and counts the captured routing per sample: ``interventions/<c>/baseline.zarr``.
Each ``InterventionSweep`` is one target, ``interventions/<c>/<sweep>.zarr``, keyed by that sweep's own
parameters: adding a ranking runs only its sweeps (and the cheap gather). A sweep submits one Dask job per
group of mask sets that start at the same MoE layer ``L > 0`` (their batches reuse the unmasked hidden states
before ``L``) and one per set that masks layer 0 (``capture.interventions.sweep_job``; ``resources={"GPU": 1}``
when capture.device is CUDA).
``Interventions`` gathers every sweep into the labelled cube ``interventions/interventions.zarr``
(``analyses.interventions.checkpoint_cube``). Numbers live in capture/ and analyses/; this module wires.
"""

from __future__ import annotations

import dataclasses
import json
import time

import luigi

from storage import cube as cubes

from . import Analyse, Capture, _client, _experiment, _Stage, checkpoints


def _by_step(exp):
    return sorted(checkpoints(exp), key=lambda c: c.step)


def intervened_checkpoints(exp) -> list:
    """The checkpoints ``[interventions] checkpoints`` names ("first"/"last" by step), in step order."""
    ck = _by_step(exp)
    if not ck:
        return []
    by_name = {c.name: c for c in ck}
    out = []
    for name in exp.interventions.checkpoints:
        c = ck[0] if name == "first" else ck[-1] if name == "last" else by_name.get(name)
        if c is None:
            raise KeyError(f"{exp.source_file}: 'interventions.checkpoints' names {name!r}, not a checkpoint of the "
                           f"experiment ({', '.join(by_name)})")
        if c not in out:
            out.append(c)
    return sorted(out, key=lambda c: c.step)


def sweeps(exp) -> dict[str, dict]:
    from analyses.interventions import sweep_names

    iv = exp.interventions
    return sweep_names(iv.kinds, drop_top1=iv.drop_top1, causal=iv.causal, rankings=iv.rankings,
                       random_seeds=iv.random_seeds)


def _ranking_analysis(ranking: str) -> str:
    from experiments.spec import INTERVENTION_RANKINGS

    base, _, arg = ranking.partition(":")
    return INTERVENTION_RANKINGS.get(f"{base}:<domain>" if base in ("usage", "lift") and arg else ranking, "")


def job_groups(sets: list[dict], reuse: bool = True) -> list[list[int]]:
    """Indices of ``sets`` per Dask job: the sets whose first masked layer is the same ``L > 0`` share a job
    (its batches reuse the unmasked states before ``L``: ``capture.interventions.sweep_scores``); a set
    masking layer 0 (nothing to reuse), or any set when ``reuse`` is off, is a job of its own, so those fan
    out one per worker."""
    if not reuse:
        return [[i] for i in range(len(sets))]
    by_start: dict[int, list[int]] = {}
    for i, m in enumerate(sets):
        mask = m["mask"]
        start = min([int(l) for l in mask.get("static") or {}] + [int(l) for l in mask.get("drop_top") or ()],
                    default=0)
        by_start.setdefault(start, []).append(i)
    return [[i] for i in by_start.pop(0, [])] + [by_start[L] for L in sorted(by_start)]


def _gpu(exp) -> bool:
    return exp.capture.device.startswith("cuda")


class _Checkpointed(_Stage):
    checkpoint = luigi.Parameter()

    def _spec(self):
        for c in checkpoints(self.exp):
            if c.name == self.checkpoint:
                return c
        raise KeyError(f"{self.exp.source_file}: no checkpoint named {self.checkpoint!r}")

    def complete(self):
        return self._stored_matches(cubes.result_fingerprint(self.output().path))


class InterventionBaseline(_Checkpointed):
    """interventions/<checkpoint>/baseline.zarr: unmasked scores, captured routing per sample, importance."""

    def requires(self):
        return Capture(experiment=self.experiment, checkpoint=self.checkpoint)

    def _importance(self) -> bool:
        iv = self.exp.interventions
        return "importance" in iv.rankings or iv.causal

    def fingerprint(self) -> str:
        from analyses.interventions import VERSION

        iv, cap, c = self.exp.interventions, self.exp.capture, self._spec()
        attrs, _ = cubes.routing_head(self.layout.routing)  # metadata only: complete() must stay cheap (issue 13)
        return cubes.fingerprint("intervention-baseline", VERSION, c.name, c.path, c.step, iv.max_samples,
                                 iv.batch_size, cap.device, cap.dtype, self._importance(), attrs.get("inputs_hash"))

    def output(self):
        return luigi.LocalTarget(str(self.layout.intervention(f"{self.checkpoint}/baseline")))

    def run(self):
        import numpy as np

        import deploy
        from analyses.interventions import baseline_dataset, observed, select_tokens
        from capture.interventions import score_job

        exp, c = self.exp, self._spec()
        iv = exp.interventions
        routing = cubes.open_routing(self.layout.routing)
        cols = {k: np.asarray(routing[k].values) for k in ("sample", "position", "token_id", "dataset", "domain",
                                                           "condition")}
        keep = np.flatnonzero(select_tokens(cols["sample"], [cols["dataset"], cols["domain"], cols["condition"]],
                                            iv.max_samples))
        tokens = {k: v[keep] for k, v in cols.items()}
        sel = routing.sel(checkpoint=c.name).isel(token=keep)
        samples = np.unique(tokens["sample"])
        slots, weights = observed(sel["expert_ids"].transpose("layer", "token", "k").values,
                                  sel["expert_weights"].transpose("layer", "token", "k").values,
                                  tokens["sample"], samples, int(routing.sizes["expert"]))
        client = _client(exp)
        plain = {k: tokens[k] for k in ("sample", "position", "token_id")}
        with deploy.cluster_errors(f"intervention baseline of checkpoint {c.name!r}"):
            fut = client.submit(score_job, c.path, plain, None, batch_size=iv.batch_size, device=exp.capture.device,
                                dtype=exp.capture.dtype, trust_remote_code=exp.model.trust_remote_code,
                                importance=self._importance(), pure=False,
                                key=f"intervention-{exp.name}-{c.name}-baseline-{time.time_ns()}",
                                resources={"GPU": 1} if _gpu(exp) else None)
            res = fut.result()
        layers = [int(x) for x in routing["layer"].values]
        if "layers" in res and [int(x) for x in res["layers"]] != layers:
            raise ValueError(f"{c.path}: the model's MoE layers {list(res['layers'])} differ from the routing cube's "
                             f"{layers}")
        ds = baseline_dataset(res, tokens, layers=layers, slots=slots, weights=weights,
                              importance=res.get("importance"))
        ds.attrs.update({"checkpoint": c.name, "step": int(c.step), "forward_passes": int(res["forward_passes"]),
                         "batch_size": iv.batch_size})
        cubes.write_result(ds, self.output().path, fingerprint=self.fingerprint())


class InterventionSweep(_Checkpointed):
    """interventions/<checkpoint>/<sweep>.zarr: per-sample scores of every mask set of one sweep."""

    sweep = luigi.Parameter()

    def _sweep(self) -> dict:
        s = sweeps(self.exp).get(self.sweep)
        if s is None:
            raise KeyError(f"{self.exp.source_file}: [interventions] declares no sweep {self.sweep!r}")
        return s

    def _analysis(self) -> str:
        s = self._sweep()
        return _ranking_analysis(s["ranking"]) if s["sweep"] == "mask" and s["ranking"] != "random" else ""

    def requires(self):
        reqs = [InterventionBaseline(experiment=self.experiment, checkpoint=self.checkpoint)]
        if self._analysis():
            reqs.append(Analyse(experiment=self.experiment, analysis=self._analysis()))
        return reqs

    def fingerprint(self) -> str:
        """The sweep's parameters, the baseline, and the *values* of its ranking.

        Not the ranked-from analysis' own fingerprint (which changes with any analysis code): an analysis
        recomputed to the same ranking leaves the sweep done.
        """
        from analyses.interventions import VERSION

        iv = self.exp.interventions
        s = self._sweep()
        params = dict(s)
        params.pop("file", None)  # a points file counts by its values (below), not by where it lies
        if s["sweep"] in ("mask", "random"):
            params.update(n_values=list(iv.n_values), scopes=list(iv.scopes))
            if s["ranking"].startswith("divergence"):
                params["view"] = iv.divergence_view
        base = cubes.result_fingerprint(self.requires()[0].output().path)
        ranking = self._score().tobytes().hex() if s["sweep"] == "mask" and base else None
        return cubes.fingerprint("intervention-sweep", VERSION, params, base, ranking)

    def _score(self):
        """(layer, expert) ranking score at this checkpoint (from the baseline and the ranked-from analysis)."""
        import numpy as np

        from analyses.interventions import ranking_score

        s, iv, c = self._sweep(), self.exp.interventions, self._spec()
        base = cubes.open_result(self.requires()[0].output().path)
        if s.get("file"):
            from analyses.interventions import read_points

            return read_points(s["file"], layers=[int(x) for x in base["layer"].values],
                               num_experts=int(base.sizes["expert"]))
        results = {}
        if self._analysis():
            if not self.requires()[1].complete():
                return np.asarray([np.nan])  # not ranked yet: the sweep is not done either
            results[self._analysis()] = cubes.open_result(self.layout.analysis(self._analysis()))
        return ranking_score(s["ranking"], c.name, layers=[int(x) for x in base["layer"].values],
                             num_experts=int(base.sizes["expert"]), seed=s["seed"], usage=results.get("usage"),
                             specialization=results.get("specialization"), divergence=results.get("divergence"),
                             importance=base["importance"] if "importance" in base else None,
                             divergence_view=iv.divergence_view, where=f"{self.exp.source_file}: interventions")

    def output(self):
        return luigi.LocalTarget(str(self.layout.intervention(f"{self.checkpoint}/{self.sweep}")))

    def run(self):
        import numpy as np

        import deploy
        from analyses.interventions import mask_sets, sweep_dataset
        from capture.interventions import MASK_ATTRS, ROUTER_PASS_NOTE, sweep_job

        exp, c, s = self.exp, self._spec(), self._sweep()
        iv = exp.interventions
        base = cubes.open_result(self.requires()[0].output().path)
        layers = [int(x) for x in base["layer"].values]
        E = int(base.sizes["expert"])
        score = self._score() if s["sweep"] == "mask" else None
        sets = mask_sets(s, layers=layers, num_experts=E, n_values=iv.n_values, scopes=iv.scopes, score=score)
        tokens = {"sample": base["token_sample"].values, "position": base["token_position"].values,
                  "token_id": base["token_id"].values}
        client = _client(exp)
        jobs = job_groups(sets, reuse=iv.reuse_hidden_states)
        with deploy.cluster_errors(f"intervention sweep {self.sweep!r} of checkpoint {c.name!r}"):
            shared = client.scatter([tokens], broadcast=True)[0]
            futures = [client.submit(sweep_job, c.path, shared, [sets[i]["mask"] for i in job],
                                     batch_size=iv.batch_size, device=exp.capture.device, dtype=exp.capture.dtype,
                                     trust_remote_code=exp.model.trust_remote_code, reuse=iv.reuse_hidden_states,
                                     pure=False, key=f"intervention-{exp.name}-{c.name}-{self.sweep}-{j}-{time.time_ns()}",
                                     resources={"GPU": 1} if _gpu(exp) else None)
                       for j, job in enumerate(jobs)]
            done = client.gather(futures)
        scores = [None] * len(sets)
        for job, res in zip(jobs, done):
            for i, sc in zip(job, res["scores"]):
                scores[i] = sc
        ds = sweep_dataset(scores, sets, np.asarray(tokens["sample"]))
        if score is not None:
            ds["ranking_score"] = (("layer", "expert"), np.asarray(score, dtype=np.float64))
            ds = ds.assign_coords(layer=layers, expert=np.arange(E))
        n_layers = max([r["decoder_layers"] for r in done] + [1])
        ds.attrs.update({"checkpoint": c.name, "sweep": self.sweep, "mask": MASK_ATTRS[s["kind"]],
                         "forward_passes": int(sum(r["forward_passes"] for r in done)),
                         "forward_equivalents": round(sum(r["layer_passes"] for r in done) / n_layers, 2),
                         "hidden_state_reuse": json.dumps([{"sets": len(j), "reuse": r["reuse"], "why": r["why"]}
                                                           for j, r in zip(jobs, done)]),
                         "mask_sets": len(sets), "note": ROUTER_PASS_NOTE if s["sweep"] == "drop_top1" else ""})
        cubes.write_result(ds, self.output().path, fingerprint=self.fingerprint())


class Interventions(_Stage):
    """interventions/interventions.zarr: Δ per run, domain and condition; observational vs causal; cost."""

    def _lift(self) -> bool:
        return "specialization" in self.exp.analyses.run

    def requires(self):
        exp = self.exp
        reqs = []
        for c in intervened_checkpoints(exp):
            reqs.append(InterventionBaseline(experiment=self.experiment, checkpoint=c.name))
            reqs += [InterventionSweep(experiment=self.experiment, checkpoint=c.name, sweep=s) for s in sweeps(exp)]
        if self._lift():
            reqs.append(Analyse(experiment=self.experiment, analysis="specialization"))
        return reqs

    def fingerprint(self) -> str:
        from analyses.interventions import VERSION

        iv = self.exp.interventions
        return cubes.fingerprint("interventions", VERSION, iv.n_boot, iv.seed, list(self.exp.conditions.__dict__.values()),
                                 [cubes.result_fingerprint(r.output().path) for r in self.requires()])

    def output(self):
        return luigi.LocalTarget(str(self.layout.intervention("interventions")))

    def complete(self):
        return self._stored_matches(cubes.result_fingerprint(self.output().path))

    def run(self):
        from analyses.interventions import COST_NOTE, combine

        exp = self.exp
        iv = exp.interventions
        lift = cubes.open_result(self.layout.analysis("specialization"))["lift"] if self._lift() else None
        parts, cost, equiv, masks = {}, {}, {}, {}
        for c in intervened_checkpoints(exp):
            base = cubes.open_result(self.layout.intervention(f"{c.name}/baseline"))
            runs = {s: cubes.open_result(self.layout.intervention(f"{c.name}/{s}")) for s in sweeps(exp)}
            parts[(c.name, c.step)] = (base, list(runs.values()))
            # what each mask kind does, as the sweeps recorded it (no torch import in this process for it)
            masks.update({r.attrs["sweep"].split(".")[0]: r.attrs["mask"] for r in runs.values()})
            cost[c.name] = {"baseline": int(base.attrs["forward_passes"]),
                            **{s: int(r.attrs["forward_passes"]) for s, r in runs.items()}}
            equiv[c.name] = {"baseline": float(base.attrs["forward_passes"]),
                             **{s: float(r.attrs.get("forward_equivalents", r.attrs["forward_passes"]))
                                for s, r in runs.items()}}
        conditions = (exp.conditions.a, exp.conditions.b) if exp.conditions.a else None
        ds = combine(parts, n_boot=iv.n_boot, seed=iv.seed, lift=lift, conditions=conditions)
        ds.attrs.update({"analysis": "interventions", "forward_passes": json.dumps(cost),
                         "forward_passes_total": int(sum(sum(v.values()) for v in cost.values())),
                         "forward_equivalents": json.dumps(equiv),
                         "forward_equivalents_total": round(sum(sum(v.values()) for v in equiv.values()), 2),
                         "cost": COST_NOTE, "spec": json.dumps(dataclasses.asdict(iv)),
                         "masks": json.dumps(masks)})
        cubes.write_result(ds, self.output().path, fingerprint=self.fingerprint())


def report_requires(experiment: str) -> list:
    """The stage FullReport needs for the interventions section (none unless [interventions] is enabled)."""
    exp = _experiment(experiment)
    return [Interventions(experiment=experiment)] if exp.interventions.enabled else []
