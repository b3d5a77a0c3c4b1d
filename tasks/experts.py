"""Issue 14's stages: experts as objects (weights, no forward pass) and pruned-weight masks.

``ExpertWeights``: every checkpoint's expert embeddings and their similarity structure,
one Dask task per (checkpoint, layer), gathered with one compute; then drift toward the
last checkpoint and Mantel tests against co-activation / domain usage when those
analyses ran → ``<output_dir>/experts/experts.zarr``.

``Masks``: magnitude / Wanda masks of the chosen components and layers of one
checkpoint (Wanda calibrated on the experiment's datasets), stored bit-packed in
``experts/masks.zarr`` with their parameters in attrs, then seed 003's Hamming
clustering per (method, component, layer), one Dask task each →
``experts/mask_clusters.zarr`` (+ ``experts/metrics_summary.json``).

``FullReport`` requires both through :func:`report_requires` when ``[experts]`` /
``[masks]`` are enabled. Numerics live in analyses/experts.py and analyses/masks.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import luigi

from storage import cube as cubes

from . import Analyse, PrepareModel, Tokenize, _client, _Stage, checkpoints, datasets


def experts_dir(layout) -> Path:
    return Path(layout.root) / "experts"


def _moe_layers(path: str) -> list[int]:
    from storage.weights import _ROUTER, tensor_names

    return sorted({int(m.group("layer")) for n in tensor_names(path) if (m := _ROUTER.search(n))})


class ExpertWeights(_Stage):
    """experts/experts.zarr: embeddings, similarity, diversity, hierarchy, k-means, drift, Mantel."""

    def _routing_analyses(self) -> list[str]:
        return [a for a in ("coactivation", "usage") if a in self.exp.analyses.run]

    def requires(self):
        return [PrepareModel(experiment=self.experiment)] + [
            Analyse(experiment=self.experiment, analysis=a) for a in self._routing_analyses()]

    def fingerprint(self) -> str:
        import dataclasses

        from analyses.experts import VERSION

        return cubes.fingerprint("experts", VERSION, dataclasses.asdict(self.exp.experts),
                                 [(c.name, c.path, c.step) for c in checkpoints(self.exp)],
                                 [cubes.result_fingerprint(r.output().path) for r in self.requires()[1:]])

    def output(self):
        return luigi.LocalTarget(str(experts_dir(self.layout) / "experts.zarr"))

    def complete(self):
        return cubes.result_fingerprint(self.output().path) == self.fingerprint()

    def run(self):
        import dask
        import numpy as np
        import xarray as xr

        from analyses.experts import drift, layer_structure, mantel_against

        e = self.exp.experts
        ckpts = sorted(checkpoints(self.exp), key=lambda c: c.step)
        layers = list(e.layers) or _moe_layers(ckpts[0].path)
        if not layers:
            raise ValueError(f"{ckpts[0].path}: no router weights found; [experts] needs an MoE checkpoint")
        # Dask runs functions of analyses/ only: a worker never imports tasks/ (see analyses.experts.layer_structure)
        jobs = [[dask.delayed(layer_structure)(c.path, layer, ffn_dim=e.ffn_dim, seed=e.seed, k_values=tuple(e.k_values),
                                               kmeans_seeds=e.kmeans_seeds, random_draws=e.random_draws)
                 for layer in layers] for c in ckpts]
        client = _client(self.exp)
        done = dask.compute(jobs, scheduler=client)[0]  # one compute over (checkpoint, layer)
        per_ckpt = [xr.concat(parts, "layer", combine_attrs="drop_conflicts") for parts in done]
        ds = xr.concat(per_ckpt, "checkpoint", combine_attrs="drop_conflicts").assign_coords(
            checkpoint=[c.name for c in ckpts], step=("checkpoint", np.asarray([c.step for c in ckpts], dtype=np.int64)))
        ds = xr.merge([ds, drift(ds)], compat="override", combine_attrs="override")
        for name in self._routing_analyses():
            res = cubes.open_result(self.layout.analysis(name))
            if name == "coactivation" and "coactivation" in res:
                mat = res["coactivation"].fillna(0.0)
            elif name == "usage" and "usage" in res:
                u = res["usage"]
                if "view" in u.dims:
                    u = u.sel(view="all") if "all" in u.view.values else u.isel(view=0)
                u = u.fillna(0.0)
                norm = np.sqrt((u**2).sum("domain"))
                un = u / norm.where(norm > 0)
                mat = xr.dot(un, un.rename(expert="expert_b"), dim="domain").fillna(0.0)
            else:
                continue
            m = mantel_against(ds["similarity"], mat, n_perm=e.n_perm, seed=e.seed)
            ds = ds.assign({f"{v}_{name}": m[v] for v in m.data_vars})
        ds.attrs.update({"analysis": "experts", "ffn_dim": e.ffn_dim, "seed": e.seed,
                         "definition": "see analyses/experts.py; diversity = 1 − mean off-diagonal cosine"})
        cubes.write_result(ds, self.output().path, fingerprint=self.fingerprint())


class Masks(_Stage):
    """experts/masks.zarr (bit-packed masks) and experts/mask_clusters.zarr (Hamming clustering)."""

    def requires(self):
        return [PrepareModel(experiment=self.experiment)] + [
            Tokenize(experiment=self.experiment, dataset=d.name) for d in datasets(self.exp)]

    def _checkpoint(self):
        ck = sorted(checkpoints(self.exp), key=lambda c: c.step)
        name = self.exp.masks.checkpoint
        for c in ck:
            if c.name == name:
                return c
        if name:
            raise KeyError(f"{self.exp.source_file}: masks.checkpoint {name!r} is not a checkpoint of the experiment")
        return ck[-1]

    def fingerprint(self) -> str:
        import dataclasses

        from analyses.masks import VERSION

        c = self._checkpoint()
        return cubes.fingerprint("masks", VERSION, dataclasses.asdict(self.exp.masks), c.name, c.path, c.step,
                                 [cubes.result_fingerprint(r.output().path) for r in self.requires()[1:]])

    def output(self):
        return luigi.LocalTarget(str(experts_dir(self.layout) / "mask_clusters.zarr"))

    def complete(self):
        return cubes.result_fingerprint(self.output().path) == self.fingerprint()

    def run(self):
        import dask

        from analyses import masks as M

        m = self.exp.masks
        ck = self._checkpoint()
        weights = {(c, layer): M.component_matrix(ck.path, c, layer) for c in m.components for layer in m.layers}
        norms, grams = self._calibrate(ck) if weights and {"wanda", "sparsegpt"} & set(m.methods) else ({}, {})
        mats = M.compute_masks(weights, m.methods, m.sparsity, norms=norms, grams=grams)
        for u in m.user:
            mats[(u.method, u.component, u.layer)] = (M.load_mask(u.path, u.key or None), None)
        out = experts_dir(self.layout)
        cubes.write_result(M.masks_dataset(mats, {"sparsity": m.sparsity, "checkpoint": ck.name, "checkpoint_path": ck.path,
                                                  "methods": list(m.methods), "calibration_samples": m.calibration_samples}),
                           out / "masks.zarr", fingerprint=self.fingerprint())
        keys = list(mats)
        jobs = [dask.delayed(M.cluster_rows)(M.pack_rows(mats[k][0]), mats[k][0].shape[1], n=m.n_similar,
                                             k_values=tuple(m.k_values), seeds=m.seeds, keep_rows=True) for k in keys]
        results = dask.compute(jobs, scheduler=_client(self.exp))[0]
        res = M.combine_clusters(keys, results, {"analysis": "masks", "figure_seeds": int(m.figure_seeds),
                                                 "figure_k": [int(k) for k in m.figure_k or m.k_values],
                                                 "n": int(m.n_similar), "sparsity": m.sparsity, "checkpoint": ck.name})
        (out / "metrics_summary.json").write_text(json.dumps(M.json_summary(res, {"sparsity": m.sparsity,
                                                                                  "checkpoint": ck.name}), indent=2))
        cubes.write_result(res, self.output().path, fingerprint=self.fingerprint())

    def _calibrate(self, ck):
        """Calibration statistics of the pruned layers on the experiment's token tables: (Wanda norms, SparseGPT Grams)."""
        import numpy as np

        from capture.calibrate import input_grams, input_norms
        from capture.job import load_token_tables
        from capture.load import load_model

        m = self.exp.masks
        table = load_token_tables([t.output().path for t in self.requires()[1:]])
        sample, ids = table["sample"].values, table["token_id"].values
        samples = list(dict.fromkeys(sample.tolist()))[: m.calibration_samples]
        calib = [ids[sample == s] for s in samples]
        model = load_model(ck.path, trust_remote_code=self.exp.model.trust_remote_code)
        if "sparsegpt" in m.methods:  # one pass: Wanda's ‖X_j‖₂ is the root of the Gram matrix's diagonal
            grams = input_grams(model, calib, list(m.components), layers=list(m.layers), where=ck.path)
            return {k: np.sqrt(np.diagonal(g, axis1=-2, axis2=-1)) for k, g in grams.items()}, grams
        return input_norms(model, calib, list(m.components), layers=list(m.layers), where=ck.path), {}


def report_requires(experiment: str) -> list:
    """The stages FullReport needs for the experts section (none unless [experts] / [masks] are enabled)."""
    from . import _experiment

    exp = _experiment(experiment)
    out = []
    if exp.experts.enabled:
        out.append(ExpertWeights(experiment=experiment))
    if exp.masks.enabled:
        out.append(Masks(experiment=experiment))
    return out
