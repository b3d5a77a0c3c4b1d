"""The experiment spec: a TOML file, validated up front.

Every table maps onto a frozen dataclass below; the validator walks the
dataclass fields, so an unknown key, a missing field or a wrong type stops the
run with one message naming the file, the key and what was expected. Relative
paths (``output_dir``, dataset, checkpoint, tokenizer, trace and side-table
paths, TLS files; :data:`PATH_KEYS`) are resolved at load to absolute ones,
relative to the folder of the experiment file (not the working directory), so
that a run means the same wherever it is started and Dask workers on other
machines get paths they can open (they must see the same filesystem).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path


class SpecError(ValueError):
    """The experiment file is malformed; the message names file and key."""


@dataclass(frozen=True)
class CheckpointSpec:
    name: str
    """Label of the checkpoint in cubes and figures (letters, digits, '_', '-', '.')."""
    path: str
    """Directory written by ``save_pretrained`` (config.json + *.safetensors)."""
    step: int
    """Training step; orders checkpoints in change-over-training analyses."""


@dataclass(frozen=True)
class TraceSpec:
    format: str = ""
    """Importer name (storage.importers.IMPORTERS): llamacpp_json, llamacpp_bin, moe_trace_csv, libmoe,
    olmoe_jsonl, megatron, vllm_npy, sglang, router_logits, segments_json."""
    paths: list[str] = field(default_factory=list)
    """One trace (file or directory) per checkpoint."""
    checkpoints: list[str] = field(default_factory=list)
    """Checkpoint names, one per path (default: from the files)."""
    steps: list[int] = field(default_factory=list)
    """Training steps, one per path (default: from the files, else the path's index)."""
    side_table: str = ""
    """CSV/JSON mapping sample key -> dataset/domain/condition/pair."""
    num_experts: int = 0
    """E when the format does not record it (0 = infer from the largest id)."""
    options: dict = field(default_factory=dict)
    """The format's own options ([trace.options]), e.g. semantics/top_k for router logits."""


@dataclass(frozen=True)
class ModelSpec:
    source: str = "demo"
    """'demo' (train the embedded tiny MoE), 'checkpoints' (the list below) or 'import' (a [trace])."""
    checkpoints: list[CheckpointSpec] = field(default_factory=list)
    """For source = 'checkpoints': [[model.checkpoints]] tables with name, path, step."""
    tokenizer: str = ""
    """Tokenizer directory; default: the first checkpoint's directory."""
    trust_remote_code: bool = False
    """Run code shipped with the checkpoint. Off unless the experiment needs it."""
    demo: dict = field(default_factory=dict)
    """Options of the embedded demo (fields of capture.demo.DemoConfig)."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    """Label of the dataset (coordinate 'dataset' of the token axis)."""
    path: str
    """JSONL file, one sample per line: {"id", "text", "domain", optional "condition", "pair"};
    or, with format = "pair_tokens", a JSON file of pre-tokenized pairs (capture/pairs.py)."""
    format: str = "jsonl"
    """'jsonl' (text, tokenized here) or 'pair_tokens' (token ids of conditions A and B + canonical positions)."""
    text_field: str = "text"
    domain_field: str = "domain"
    max_samples: int = 0
    """Use only the first N samples (0 = all)."""


@dataclass(frozen=True)
class CaptureSpec:
    keep_router_logits: bool = False
    """Store all E router logits per token and layer (needed for per-token entropy)."""
    batch_size: int = 16
    max_length: int = 256
    """Samples are truncated to this many tokens."""
    device: str = "cpu"
    """'cpu', 'cuda', 'cuda:N' or 'mps'; checked against this torch's devices when the cluster is local."""
    dtype: str = "float32"
    logit_lens: bool = False
    """Store lens_logprob: log p(next token) read out after every MoE layer (final norm + LM head)."""
    js_divergence: bool = False
    """Store lens_js: JS divergence between the two conditions' lens distributions at aligned positions
    (needs [conditions]; both samples of a pair then run in one forward)."""


@dataclass(frozen=True)
class ConditionsSpec:
    a: str = ""
    """Condition A (the 'condition' label of its samples); compared against B, pairs linked by 'pair'."""
    b: str = ""
    """Condition B."""


@dataclass(frozen=True)
class AnalysesSpec:
    run: list[str] = field(default_factory=lambda: ["usage", "confidence", "change"])
    """Registered analysis names to compute and report."""
    params: dict = field(default_factory=dict)
    """Per-analysis parameter tables: [analyses.params.<name>]."""


@dataclass(frozen=True)
class ReportSpec:
    formats: list[str] = field(default_factory=lambda: ["png"])
    """Figure formats: png (always, 300 dpi), pdf, svg."""
    title: str = ""


@dataclass(frozen=True)
class DaskSpec:
    scheduler: str = ""
    """Address of a running scheduler (tcp://host:8786); empty = a LocalCluster."""
    n_workers: int = 2
    threads_per_worker: int = 1
    host: str = "127.0.0.1"
    """Interface the LocalCluster's scheduler, workers and dashboard bind to."""
    dashboard_port: int = 8787
    """First port tried for the dashboard; the next free one is used if taken."""
    memory_limit: str = "auto"
    allow_remote: bool = False
    """Allow ``host`` to be a non-loopback interface (or set MOE_ATLAS_ALLOW_REMOTE_DASK=1). The scheduler
    and workers run code for whoever reaches them, so binding them beyond this machine must be asked for;
    the cluster then warns loudly when it starts (deploy.cluster.check_settings)."""
    tls_ca_file: str = ""
    """With ``scheduler = "tls://..."``: the CA certificate the scheduler's certificate is signed by (PEM).
    Empty = distributed's own config (``distributed.comm.tls.*``)."""
    tls_cert: str = ""
    """With ``scheduler``: this client's certificate (PEM; may also hold the key)."""
    tls_key: str = ""
    """With ``scheduler``: this client's private key (PEM), if not inside ``tls_cert``."""


@dataclass(frozen=True)
class TrainingLogSpec:
    path: str
    """A training log: trainer_state.json, W&B CSV, TensorBoard event file/folder, CSV, JSONL (storage/training.py)."""
    format: str = "auto"
    """hf_trainer, wandb_csv, tensorboard, csv, jsonl, demo, or auto (from the name and content)."""
    run: str = ""
    """Run name in the training cube (default: the file's name; W&B panel exports name their own runs)."""


@dataclass(frozen=True)
class ScoreFileSpec:
    path: str
    """lm-evaluation-harness results JSON (one per run and checkpoint) or a CSV (run,checkpoint,step,task,metric,value)."""
    format: str = "lm_eval"
    """lm_eval or csv."""
    run: str = ""
    """For lm_eval: the run these scores belong to (default: this experiment's name)."""
    checkpoint: str = ""
    """For lm_eval: the checkpoint scored."""
    step: int = 0
    """For lm_eval: its training step."""


@dataclass(frozen=True)
class TrainingSpec:
    logs: list[TrainingLogSpec] = field(default_factory=list)
    """[[training.logs]]: training logs to import (the demo's own log is always read)."""
    scores: list[ScoreFileSpec] = field(default_factory=list)
    """[[training.scores]]: evaluation scores (the demo's held-out NLL and accuracy are always used)."""
    enabled: bool = True
    """Compute the training section (logs, router weights, scores, composition, run comparison)."""


@dataclass(frozen=True)
class RunSpec:
    name: str
    """Label of the run in comparisons (letters, digits, '_', '-', '.')."""
    experiment: str
    """Another experiment file: that run keeps its own output_dir and pipeline; this one compares against it."""


@dataclass(frozen=True)
class ExpertsSpec:
    """[experts]: weight-space analyses of the routed experts (tasks/experts.py, analyses/experts.py)."""

    enabled: bool = False
    """Read every checkpoint's expert weights (safetensors, streamed) and compare the experts."""
    layers: list[int] = field(default_factory=list)
    """Layer indices to read (empty = every MoE layer)."""
    ffn_dim: int = 256
    """Dimension of the seeded sparse random projection of each expert's FFN weights."""
    seed: int = 0
    """Seed of that projection, of k-means and of the random reference."""
    k_values: list[int] = field(default_factory=lambda: [2, 3, 4])
    """k of the k-means over experts (each < the number of experts)."""
    kmeans_seeds: int = 5
    """k-means restarts (one seed each) per k."""
    random_draws: int = 20
    """Gaussian random matrices behind the diversity reference level."""
    n_perm: int = 999
    """Permutations of the Mantel test (weight similarity vs co-activation / domain usage)."""


@dataclass(frozen=True)
class UserMaskSpec:
    path: str
    """A mask file: .safetensors, .npy or .pt (read with torch.load(weights_only=True)); nonzero = kept."""
    component: str
    """The component it belongs to (any label, e.g. mlp.down_proj)."""
    layer: int = 0
    key: str = ""
    """Tensor name inside a safetensors / .pt file holding several."""
    method: str = "user"
    """Label of the pruning method in tables and figures."""


@dataclass(frozen=True)
class MasksSpec:
    """[masks]: pruned-weight masks and the Hamming clustering of their rows (seed 003; analyses/masks.py)."""

    enabled: bool = False
    methods: list[str] = field(default_factory=lambda: ["magnitude", "wanda"])
    """Pruning criteria computed here: magnitude, wanda, sparsegpt (calibrated on the experiment's datasets)."""
    components: list[str] = field(default_factory=lambda: ["self_attn.q_proj", "experts.down_proj"])
    """Module-name suffixes of linear layers, or experts.<gate_proj|up_proj|down_proj> (all experts stacked)."""
    layers: list[int] = field(default_factory=lambda: [1])
    sparsity: float = 0.5
    """Fraction of weights pruned, in [0, 1)."""
    checkpoint: str = ""
    """Checkpoint whose weights are pruned (default: the last)."""
    calibration_samples: int = 64
    """Samples of the experiment's datasets whose activations Wanda uses."""
    seeds: int = 10
    n_similar: int = 128
    """Nearest rows by Hamming distance per seed (clamped to rows − 1)."""
    k_values: list[int] = field(default_factory=lambda: [4, 8, 16])
    figure_seeds: int = 1
    """Seeds drawn per-seed figures for (spy plot, statistics, t-SNE, distance heatmap), per k."""
    figure_k: list[int] = field(default_factory=list)
    """k values those per-seed figures are drawn for (empty = every k of k_values)."""
    user: list[UserMaskSpec] = field(default_factory=list)
    """[[masks.user]]: masks computed elsewhere, analysed the same way."""


#: Rankings of [interventions] (capture.interventions masks the top-n experts of each): name -> analysis it reads.
INTERVENTION_RANKINGS = {
    "usage": "usage", "weighted_usage": "usage", "usage:<domain>": "usage", "lift:<domain>": "specialization",
    "lift": "specialization", "importance": "", "divergence:a_minus_b": "divergence",
    "divergence:b_minus_a": "divergence", "divergence:usage_a": "divergence", "points:<file>": "",
}


@dataclass(frozen=True)
class InterventionsSpec:
    """[interventions]: ablation sweeps and observational vs causal (issue 15; tasks/interventions.py)."""

    enabled: bool = False
    checkpoints: list[str] = field(default_factory=lambda: ["first", "last"])
    """Checkpoints intervened on: names, or "first" / "last" (by step)."""
    kinds: list[str] = field(default_factory=lambda: ["router"])
    """Mask kinds: router (selection score -inf, tokens re-route) and/or output (slot weight 0, routing kept)."""
    drop_top1: bool = True
    """Per MoE layer, mask each token's own top-1 expert (seed 000's drop_top1)."""
    causal: bool = True
    """Mask every (layer, expert) alone: the causal effect compared with the observational measures."""
    rankings: list[str] = field(default_factory=lambda: ["usage", "importance"])
    """Mask sweeps over the top-n experts of: usage, weighted_usage, usage:<domain>, lift, lift:<domain>,
    importance (output-aware, EASY-EP), divergence:a_minus_b, divergence:b_minus_a, divergence:usage_a
    (divergence's points.json rankings), points:<file> (a points.json written elsewhere, e.g. seed 001's;
    relative to this file)."""
    n_values: list[int] = field(default_factory=lambda: [1, 2, 4])
    """Numbers of experts masked (top-n of each ranking)."""
    scopes: list[str] = field(default_factory=lambda: ["global"])
    """global (top-n (layer, expert) pairs over all layers) and/or layer (each layer's top-n, one layer at a time)."""
    random_seeds: int = 5
    """Random rankings (the chance band), seeds 0 .. random_seeds-1; at least 5 when rankings are swept."""
    max_samples: int = 0
    """Score only the first N samples of each (dataset, domain, condition) (0 = all)."""
    batch_size: int = 16
    reuse_hidden_states: bool = True
    """Mask sets that start at the same MoE layer L > 0 share one unmasked pass up to L per batch and skip
    the layers before L (checked bit-identical on the first batch; results never depend on this switch)."""
    n_boot: int = 200
    """Bootstrap replicates (over samples) of every interval."""
    seed: int = 0
    """Seed of the bootstrap."""
    divergence_view: str = "last_canonical"
    """View of the divergence analysis whose rankings the divergence:* sweeps use (last_canonical or canonical)."""


@dataclass(frozen=True)
class Experiment:
    name: str
    """Name of the run (used in the report)."""
    output_dir: str
    """Where routing.zarr, analyses/, report/, tables/ and summary.json go."""
    datasets: list[DatasetSpec] = field(default_factory=list)
    """[[datasets]] tables; may be empty for the demo (its held-out set is used)."""
    model: ModelSpec = field(default_factory=ModelSpec)
    capture: CaptureSpec = field(default_factory=CaptureSpec)
    trace: TraceSpec = field(default_factory=TraceSpec)
    """[trace]: routing traces written by another system (model.source = 'import')."""
    conditions: ConditionsSpec = field(default_factory=ConditionsSpec)
    """[conditions] a, b: the two conditions whose aligned tokens the paired analyses compare."""
    analyses: AnalysesSpec = field(default_factory=AnalysesSpec)
    report: ReportSpec = field(default_factory=ReportSpec)
    dask: DaskSpec = field(default_factory=DaskSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    """[training]: training logs and evaluation scores to import (tasks/training.py)."""
    runs: list[RunSpec] = field(default_factory=list)
    experts: ExpertsSpec = field(default_factory=ExpertsSpec)
    """[experts]: similarity, diversity, clustering and drift of the experts' weights (issue 14)."""
    masks: MasksSpec = field(default_factory=MasksSpec)
    """[masks]: pruned-weight masks clustered by Hamming distance (issue 14)."""
    interventions: InterventionsSpec = field(default_factory=InterventionsSpec)
    """[interventions]: ablation sweeps (drop-top-1, masks of ranked experts) and observational vs causal (issue 15)."""
    """[[runs]]: further training runs (other experiment files) compared side by side with this one."""
    description: str = ""
    source_file: str = ""
    """Filled in by the loader: the TOML file this came from."""


_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")
MAX_WORKERS = 256
"""Cap on dask.n_workers / threads_per_worker: beyond it a typo (10000) would fork thousands of processes."""
_TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a table"}


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return _TYPE_WORDS.get(tp, str(tp))


def _convert(value, tp, where: str, file: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SpecError(f"{file}: '{where}' must be a table, got {type(value).__name__}")
        return _build(tp, value, where, file)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise SpecError(f"{file}: '{where}' must be {_describe(tp)}, got {type(value).__name__} {value!r}")
        return [_convert(v, inner, f"{where}[{i}]", file) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise SpecError(f"{file}: '{where}' must be {_describe(tp)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, table: dict, prefix: str, file: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source_file"}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise SpecError(f"{file}: unknown key '{key}'; expected one of: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in table:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SpecError(f"{file}: missing required key '{key}' ({_describe(hints[name])})")
            continue
        kwargs[name] = _convert(table[name], hints[name], key, file)
    return cls(**kwargs)


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment file.

    Raises
    ------
    SpecError naming the file and the key for syntax errors, unknown keys,
    missing fields, wrong types and inconsistent values. Checkpoint directories
    are checked later, by the tasks that need them.
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: experiment file not found")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not a UTF-8 text file: {exc}") from exc
    exp = _build(Experiment, table, "", str(path))
    exp = dataclasses.replace(resolve_paths(exp, path.resolve().parent), source_file=str(path))
    _check(exp, str(path))
    return exp


#: The keys that hold paths, resolved by :func:`resolve_paths` ("[]" = every entry of a list).
PATH_KEYS = ("output_dir", "datasets[].path", "model.checkpoints[].path", "model.tokenizer", "trace.paths",
             "trace.side_table", "dask.tls_ca_file", "dask.tls_cert", "dask.tls_key",
             "training.logs[].path", "training.scores[].path", "runs[].experiment", "masks.user[].path",
             "interventions.rankings[] (points:<file>)")


def _absolute(value: str, base: Path) -> str:
    """``value`` made absolute against ``base`` (``~`` expanded); empty stays empty (= "not set")."""
    if not value or not value.strip():
        return value
    return os.path.normpath(base / Path(value).expanduser())


def resolve_paths(exp: Experiment, base: str | Path) -> Experiment:
    """``exp`` with every path of :data:`PATH_KEYS` made absolute, relative paths taken from ``base``."""
    base = Path(base)
    a = functools.partial(_absolute, base=base)
    model = dataclasses.replace(
        exp.model, tokenizer=a(exp.model.tokenizer),
        checkpoints=[dataclasses.replace(c, path=a(c.path)) for c in exp.model.checkpoints])
    trace = dataclasses.replace(exp.trace, paths=[a(p) for p in exp.trace.paths], side_table=a(exp.trace.side_table))
    dask = dataclasses.replace(exp.dask, tls_ca_file=a(exp.dask.tls_ca_file), tls_cert=a(exp.dask.tls_cert),
                               tls_key=a(exp.dask.tls_key))
    iv = dataclasses.replace(exp.interventions, rankings=[
        f"points:{a(r[7:])}" if r.startswith("points:") else r for r in exp.interventions.rankings])
    masks = dataclasses.replace(exp.masks, user=[dataclasses.replace(u, path=a(u.path)) for u in exp.masks.user])
    exp = dataclasses.replace(exp, runs=[dataclasses.replace(r, experiment=a(r.experiment)) for r in exp.runs],
                              training=_resolve_training(exp.training, a), interventions=iv, masks=masks)
    return dataclasses.replace(exp, output_dir=a(exp.output_dir), model=model, trace=trace, dask=dask,
                               datasets=[dataclasses.replace(d, path=a(d.path)) for d in exp.datasets])


def _check_weights(exp: Experiment, file: str) -> None:
    """[experts] and [masks] ranges (issue 14)."""
    e, m = exp.experts, exp.masks
    for key, value, lo in (("experts.ffn_dim", e.ffn_dim, 2), ("experts.kmeans_seeds", e.kmeans_seeds, 1),
                           ("experts.random_draws", e.random_draws, 1), ("experts.n_perm", e.n_perm, 0),
                           ("masks.calibration_samples", m.calibration_samples, 1), ("masks.seeds", m.seeds, 1),
                           ("masks.n_similar", m.n_similar, 2), ("masks.figure_seeds", m.figure_seeds, 0)):
        if value < lo or value > 1_000_000:
            raise SpecError(f"{file}: '{key}' must be an integer in [{lo}, 1000000], got {value}")
    for key, ks in (("experts.k_values", e.k_values), ("masks.k_values", m.k_values)):
        if not ks or any(k < 2 for k in ks):
            raise SpecError(f"{file}: '{key}' must be a non-empty list of integers ≥ 2, got {ks}")
    if not 0.0 <= m.sparsity < 1.0:
        raise SpecError(f"{file}: 'masks.sparsity' must be in [0, 1), got {m.sparsity}")
    if set(m.figure_k) - set(m.k_values):
        raise SpecError(f"{file}: 'masks.figure_k' {m.figure_k} must be among masks.k_values {m.k_values}")
    bad = [x for x in m.methods if x not in ("magnitude", "wanda", "sparsegpt")]
    if bad:
        raise SpecError(f"{file}: 'masks.methods' may hold magnitude, wanda, sparsegpt; got {bad}")
    if m.enabled and not m.components and not m.user:
        raise SpecError(f"{file}: [masks] is enabled but names no 'components' and no [[masks.user]]")
    for c in m.components:
        if c.startswith("experts.") and c not in ("experts.gate_proj", "experts.up_proj", "experts.down_proj"):
            raise SpecError(f"{file}: 'masks.components' entry {c!r}: experts components are experts.gate_proj, "
                            "experts.up_proj, experts.down_proj")
    if (e.enabled or m.enabled) and exp.model.source == "import":
        raise SpecError(f"{file}: [experts]/[masks] read checkpoint weights; model.source = 'import' has none")


def _check(exp: Experiment, file: str) -> None:
    _check_weights(exp, file)
    if not _NAME.match(exp.name):
        raise SpecError(f"{file}: 'name' must use letters, digits, '_', '-', '.', got {exp.name!r}")
    m = exp.model
    if m.source not in ("demo", "checkpoints", "import"):
        raise SpecError(f"{file}: 'model.source' must be 'demo', 'checkpoints' or 'import', got {m.source!r}")
    t = exp.trace
    if m.source == "import":
        from storage.importers import IMPORTERS, importer_options

        if t.format not in IMPORTERS:
            raise SpecError(f"{file}: 'trace.format' must be one of {', '.join(sorted(IMPORTERS))}, got {t.format!r}")
        if not t.paths:
            raise SpecError(f"{file}: 'trace.paths' is empty; source = 'import' needs at least one trace")
        for key, values in (("checkpoints", t.checkpoints), ("steps", t.steps)):
            if values and len(values) != len(t.paths):
                raise SpecError(f"{file}: 'trace.{key}' has {len(values)} entries, 'trace.paths' {len(t.paths)}")
        known = set(importer_options(t.format))
        for key in t.options:
            if key not in known:
                raise SpecError(f"{file}: unknown key 'trace.options.{key}' for format {t.format!r}; expected one "
                                f"of: {', '.join(sorted(known)) or '(none)'}")
        if m.checkpoints or m.demo:
            raise SpecError(f"{file}: 'model.checkpoints'/'model.demo' are not used with source = 'import'")
        if t.num_experts < 0:
            raise SpecError(f"{file}: 'trace.num_experts' must be >= 0 (0 = infer), got {t.num_experts}")
        if "top_k" in t.options:
            k = t.options["top_k"]
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise SpecError(f"{file}: 'trace.options.top_k' must be an integer >= 1, got {k!r}")
            if t.num_experts and k > t.num_experts:
                raise SpecError(f"{file}: 'trace.options.top_k' = {k} is larger than 'trace.num_experts' = "
                                f"{t.num_experts}; a token cannot be routed to more experts than there are")
    elif t != TraceSpec():
        raise SpecError(f"{file}: '[trace]' is only allowed with model.source = 'import'")
    if m.source == "checkpoints":
        if not m.checkpoints:
            raise SpecError(f"{file}: 'model.checkpoints' is empty; source = 'checkpoints' needs at least one")
        if not exp.datasets:
            raise SpecError(f"{file}: 'datasets' is empty; a model from checkpoints needs at least one dataset")
        if m.demo:
            raise SpecError(f"{file}: 'model.demo' is only allowed with source = 'demo'")
    elif m.checkpoints:
        raise SpecError(f"{file}: 'model.checkpoints' is only allowed with source = 'checkpoints'")
    if m.source == "demo":
        from capture.demo import DemoConfig

        demo_fields = {f.name: f for f in dataclasses.fields(DemoConfig)}
        hints = typing.get_type_hints(DemoConfig)
        for key, value in m.demo.items():
            if key not in demo_fields:
                raise SpecError(
                    f"{file}: unknown key 'model.demo.{key}'; expected one of: {', '.join(sorted(demo_fields))}"
                )
            _convert(value, hints[key], f"model.demo.{key}", file)
        try:
            DemoConfig(**m.demo)
        except (TypeError, ValueError) as exc:
            raise SpecError(f"{file}: 'model.demo': {exc}") from exc
    names = [c.name for c in m.checkpoints]
    for c in m.checkpoints:
        if not _NAME.match(c.name):
            raise SpecError(f"{file}: checkpoint name {c.name!r} must use letters, digits, '_', '-', '.'")
    if len(set(names)) != len(names):
        raise SpecError(f"{file}: 'model.checkpoints' has duplicate names: {names}")
    steps = [c.step for c in m.checkpoints]
    if len(set(steps)) != len(steps):
        raise SpecError(f"{file}: 'model.checkpoints' has duplicate steps: {steps}")
    ds_names = [d.name for d in exp.datasets]
    if len(set(ds_names)) != len(ds_names):
        raise SpecError(f"{file}: 'datasets' has duplicate names: {ds_names}")
    for d in exp.datasets:
        if not _NAME.match(d.name):
            raise SpecError(f"{file}: dataset name {d.name!r} must use letters, digits, '_', '-', '.'")
        if d.format not in ("jsonl", "pair_tokens"):
            raise SpecError(f"{file}: dataset {d.name!r}: 'format' must be 'jsonl' or 'pair_tokens', got {d.format!r}")
        if d.max_samples < 0:
            raise SpecError(f"{file}: dataset {d.name!r}: 'max_samples' must be >= 0 (0 = all), got {d.max_samples}")
        if d.format == "pair_tokens" and not exp.conditions.a:
            raise SpecError(f"{file}: dataset {d.name!r} has format 'pair_tokens', which needs [conditions] a and b "
                            f"(they name the token-id fields)")
    cond = exp.conditions
    if bool(cond.a) != bool(cond.b):
        raise SpecError(f"{file}: '[conditions]' needs both 'a' and 'b' (got a={cond.a!r}, b={cond.b!r})")
    if cond.a and cond.a == cond.b:
        raise SpecError(f"{file}: '[conditions]' a and b are both {cond.a!r}; name two different conditions")
    if exp.capture.js_divergence and not cond.a:
        raise SpecError(f"{file}: 'capture.js_divergence' needs the two conditions named in [conditions] a and b")
    if exp.capture.batch_size < 1 or exp.capture.max_length < 2:
        raise SpecError(f"{file}: 'capture.batch_size' must be >= 1 and 'capture.max_length' >= 2")
    if exp.capture.dtype not in ("float32", "bfloat16", "float16"):
        raise SpecError(f"{file}: 'capture.dtype' must be float32, bfloat16 or float16, got {exp.capture.dtype!r}")
    if m.source != "import":
        _check_device(exp.capture.device, local=not exp.dask.scheduler, file=file)
    from analyses import REGISTRY
    from analyses.registry import ParamError, validate_params

    if not exp.analyses.run:
        raise SpecError(f"{file}: 'analyses.run' is empty; name at least one analysis: {', '.join(sorted(REGISTRY))}")
    for name in exp.analyses.run:
        if name not in REGISTRY:
            raise SpecError(
                f"{file}: 'analyses.run' names unknown analysis {name!r}; known: {', '.join(sorted(REGISTRY))}"
            )
    if len(set(exp.analyses.run)) != len(exp.analyses.run):
        raise SpecError(f"{file}: 'analyses.run' names an analysis twice: {exp.analyses.run}")
    for name, params in exp.analyses.params.items():
        if name not in REGISTRY:
            raise SpecError(f"{file}: 'analyses.params.{name}': no analysis of that name")
        if not isinstance(params, dict):
            raise SpecError(f"{file}: 'analyses.params.{name}' must be a table")
        try:
            # types and ranges come from the analysis' own declared parameters (analyses.registry)
            validate_params(name, params)
        except ParamError as exc:
            raise SpecError(f"{file}: {exc}") from None
    if not exp.report.formats:
        raise SpecError(f"{file}: 'report.formats' is empty; give at least one of png, pdf, svg (e.g. [\"png\"])")
    for fmt in exp.report.formats:
        if fmt not in ("png", "pdf", "svg"):
            raise SpecError(f"{file}: 'report.formats' entries must be png, pdf or svg, got {fmt!r}")
    if len(set(exp.report.formats)) != len(exp.report.formats):
        raise SpecError(f"{file}: 'report.formats' lists a format twice: {exp.report.formats}")
    _check_dask(exp.dask, file)
    _check_training(exp, file)
    _check_interventions(exp, file)


def _check_device(device: str, *, local: bool, file: str) -> None:
    """A known torch device; with a local cluster, one this torch actually has.

    With a remote scheduler the workers' torch may differ from ours, so only the
    name is checked here and ``capture.load.load_model`` checks the rest there.
    """
    if not _DEVICE.match(device):
        raise SpecError(f"{file}: 'capture.device' must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")
    if device == "cpu" or not local:
        return
    from capture.load import device_problem  # imports torch: only for an accelerator

    problem = device_problem(device)
    if problem:
        raise SpecError(f"{file}: 'capture.device': {problem}")


def _check_dask(d: DaskSpec, file: str) -> None:
    for key in ("n_workers", "threads_per_worker"):
        v = getattr(d, key)
        if not 1 <= v <= MAX_WORKERS:
            raise SpecError(f"{file}: 'dask.{key}' must be in [1, {MAX_WORKERS}], got {v}")
    if not 0 <= d.dashboard_port <= 65535:
        raise SpecError(f"{file}: 'dask.dashboard_port' must be a TCP port in [0, 65535] (0 = any free port), "
                        f"got {d.dashboard_port}")
    if d.memory_limit != "auto":
        from dask.utils import parse_bytes

        try:
            ok = parse_bytes(d.memory_limit) > 0
        except (ValueError, TypeError):
            ok = False
        if not ok:
            raise SpecError(f"{file}: 'dask.memory_limit' must be 'auto' or a size such as '4GB', "
                            f"got {d.memory_limit!r}")
    tls = {k: getattr(d, f"tls_{k}") for k in ("ca_file", "cert", "key")}
    if any(tls.values()):
        if not d.scheduler:
            raise SpecError(f"{file}: 'dask.tls_*' only apply to an external 'dask.scheduler'; the LocalCluster "
                            f"moe-atlas starts makes its own per-run credentials")
        if bool(tls["ca_file"]) != bool(tls["cert"]):
            raise SpecError(f"{file}: 'dask.tls_ca_file' and 'dask.tls_cert' go together (got only "
                            f"{'tls_ca_file' if tls['ca_file'] else 'tls_cert'})")
        for k, v in tls.items():
            if v and not os.path.isfile(v):
                raise SpecError(f"{file}: 'dask.tls_{k}' = {v!r}: no such file")
    if d.scheduler:
        return  # host is where a LocalCluster binds; an external scheduler has its own
    if not d.host:
        raise SpecError(f"{file}: 'dask.host' is empty; use '127.0.0.1' (this machine only)")

    # the same opt-ins as deploy.cluster.check_settings, which warns loudly when the cluster starts
    from deploy.cluster import is_loopback  # the one definition, also used where the cluster starts

    if not is_loopback(d.host) and not d.allow_remote and os.environ.get("MOE_ATLAS_ALLOW_REMOTE_DASK") != "1":
        raise SpecError(
            f"{file}: 'dask.host' = {d.host!r} exposes the Dask scheduler and workers (which run code for whoever "
            f"reaches them) beyond this machine; use '127.0.0.1', or set 'dask.allow_remote = true' to do so on "
            f"purpose"
        )


def as_dict(obj) -> dict:
    return dataclasses.asdict(obj)



def _resolve_training(t: TrainingSpec, a) -> TrainingSpec:
    return dataclasses.replace(t, logs=[dataclasses.replace(x, path=a(x.path)) for x in t.logs],
                               scores=[dataclasses.replace(x, path=a(x.path)) for x in t.scores])


def _check_training(exp: Experiment, file: str) -> None:
    """[training] and [[runs]]: known formats, named runs, no run compared with itself."""
    from storage.training import LOG_FORMATS

    for i, log in enumerate(exp.training.logs):
        if log.format not in (*LOG_FORMATS, "auto"):
            raise SpecError(f"{file}: 'training.logs[{i}].format' must be one of {', '.join(LOG_FORMATS)} or auto, "
                            f"got {log.format!r}")
    for i, sc in enumerate(exp.training.scores):
        if sc.format not in ("lm_eval", "csv"):
            raise SpecError(f"{file}: 'training.scores[{i}].format' must be lm_eval or csv, got {sc.format!r}")
        if sc.format == "lm_eval" and not sc.checkpoint:
            raise SpecError(f"{file}: 'training.scores[{i}].checkpoint' is empty; an lm_eval results file scores "
                            f"one checkpoint: name it (and its 'step')")
        if sc.step < 0:
            raise SpecError(f"{file}: 'training.scores[{i}].step' must be >= 0, got {sc.step}")
    names = [r.name for r in exp.runs]
    for i, r in enumerate(exp.runs):
        if not _NAME.match(r.name):
            raise SpecError(f"{file}: 'runs[{i}].name' must use letters, digits, '_', '-', '.', got {r.name!r}")
        if not os.path.isfile(r.experiment):
            raise SpecError(f"{file}: 'runs[{i}].experiment' = {r.experiment!r}: no such experiment file")
        if os.path.abspath(r.experiment) == os.path.abspath(file):
            raise SpecError(f"{file}: 'runs[{i}].experiment' names this experiment itself")
    if len(set(names + [exp.name])) != len(names) + 1:
        raise SpecError(f"{file}: '[[runs]]' names must differ from each other and from 'name' ({exp.name!r}): {names}")


def _check_interventions(exp: Experiment, file: str) -> None:
    """[interventions] (issue 15): known kinds, scopes and rankings, each ranking's analysis in analyses.run."""
    iv = exp.interventions
    if not iv.enabled:
        return
    if exp.model.source == "import":
        raise SpecError(f"{file}: [interventions] runs the model; model.source = 'import' has no checkpoints")
    for key, values, known in (("kinds", iv.kinds, ("router", "output")), ("scopes", iv.scopes, ("global", "layer"))):
        bad = [v for v in values if v not in known]
        if not values or bad or len(set(values)) != len(values):
            raise SpecError(f"{file}: 'interventions.{key}' must be a non-empty list of distinct {', '.join(known)}; "
                            f"got {values}")
    if not iv.checkpoints:
        raise SpecError(f"{file}: 'interventions.checkpoints' is empty; name checkpoints, or \"first\" / \"last\"")
    for r in iv.rankings:
        base, _, arg = r.partition(":")
        form = f"{base}:<domain>" if base in ("usage", "lift") and arg else "points:<file>" if base == "points" else r
        if base == "points" and not Path(arg).is_file():
            raise SpecError(f"{file}: 'interventions.rankings' entry {r!r}: no points file at {arg}")
        if form not in INTERVENTION_RANKINGS:
            raise SpecError(f"{file}: 'interventions.rankings' entry {r!r} is not a ranking; expected one of: "
                            f"{', '.join(INTERVENTION_RANKINGS)}")
        need = INTERVENTION_RANKINGS[form]
        if need and need not in exp.analyses.run:
            raise SpecError(f"{file}: 'interventions.rankings' entry {r!r} ranks from the {need} analysis; add "
                            f"{need!r} to 'analyses.run'")
    from analyses.interventions import safe_name

    names = [safe_name(r) for r in iv.rankings]
    if len(set(names)) != len(names):
        raise SpecError(f"{file}: 'interventions.rankings' names a ranking twice (or two points files with one "
                        f"name): {iv.rankings}")
    if iv.rankings and not iv.n_values:
        raise SpecError(f"{file}: 'interventions.n_values' is empty; the rankings' sweeps need at least one n")
    if any(n < 1 for n in iv.n_values) or len(set(iv.n_values)) != len(iv.n_values):
        raise SpecError(f"{file}: 'interventions.n_values' must be distinct integers >= 1, got {iv.n_values}")
    if iv.rankings and not 5 <= iv.random_seeds <= 1000:
        raise SpecError(f"{file}: 'interventions.random_seeds' must be in [5, 1000] (random controls give the chance "
                        f"band of the ranked sweeps), got {iv.random_seeds}")
    for key, value, lo in (("batch_size", iv.batch_size, 1), ("n_boot", iv.n_boot, 10), ("max_samples", iv.max_samples, 0),
                           ("seed", iv.seed, 0)):
        if value < lo:
            raise SpecError(f"{file}: 'interventions.{key}' must be >= {lo}, got {value}")
    if iv.divergence_view not in ("last_canonical", "canonical"):
        raise SpecError(f"{file}: 'interventions.divergence_view' must be last_canonical or canonical, "
                        f"got {iv.divergence_view!r}")
    if not (iv.drop_top1 or iv.causal or iv.rankings):
        raise SpecError(f"{file}: [interventions] is enabled but runs nothing (drop_top1, causal and rankings all off)")
