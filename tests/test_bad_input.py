"""Bad input, one table: every case stops with an error naming the file and the problem, and leaves nothing done.

Each row sets up one kind of bad input next to a good tiny-demo checkpoint and
runs the code a user would hit first with it:

- ``pipeline`` rows run the Luigi DAG in-process (``luigi.build``) on an
  experiment that uses the bad file; afterwards no stage from the failing one
  on has written or marked anything (no prepared.json / token table / routing
  cube / result / report);
- ``capture`` rows run a capture job (``capture.job.capture_into_cube``, what
  the Dask worker runs) or the cube writer into a fresh routing template;
  afterwards no checkpoint is complete and the routing cube reads as empty;
- ``read`` rows open a damaged cube (``storage.cube.open_routing`` /
  ``open_result``) or load a damaged checkpoint; afterwards the input is byte
  for byte unchanged.

Expected messages are checked for the offending path (the file or directory)
and a phrase that says what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import tasks
from experiments.spec import SpecError, load_experiment
from pipeline_helpers import build, tiny_model  # noqa: F401  (fixture)
from storage import cube as cubes

pytestmark = pytest.mark.slow

GOOD = "step_0012"


# ------------------------------------------------------------------ context


@dataclass
class Ctx:
    tmp: Path
    model: Path  # the tiny demo's model dir
    template: Path  # a routing template for GOOD (router logits kept), nothing captured
    captured: Path  # the same cube with GOOD captured (checkpoint "a")
    template_no_logits: Path  # a template that does not keep router logits

    @property
    def ckpt(self) -> Path:
        return self.model / "checkpoints" / GOOD

    @property
    def data(self) -> Path:
        return self.model / "data" / "eval.jsonl"

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def copy_ckpt(self, name: str = "ckpt") -> Path:
        d = self.tmp / name
        shutil.copytree(self.ckpt, d)
        return d

    def copy_cube(self, which: str = "captured") -> Path:
        d = self.tmp / "routing.zarr"
        shutil.copytree(getattr(self, which), d)
        return d

    def experiment(self, *, checkpoint: Path | None = None, dataset: Path | None = None, extra: str = "",
                   tokenizer: Path | None = None, keep_logits: bool = True) -> Path:
        """A source = "checkpoints" experiment on one checkpoint and one dataset (defaults: the good ones)."""
        body = (
            f'name = "bad"\noutput_dir = "{self.out}"\n'
            f'[model]\nsource = "checkpoints"\ntokenizer = "{tokenizer or self.ckpt}"\n'
            f'[[model.checkpoints]]\nname = "a"\npath = "{checkpoint or self.ckpt}"\nstep = 0\n'
            f'[[datasets]]\nname = "d"\npath = "{dataset or self.data}"\n{extra}'
            f'[capture]\nkeep_router_logits = {str(keep_logits).lower()}\n'
            f'[analyses]\nrun = ["usage"]\n[dask]\nn_workers = 1\ndashboard_port = 18950\n'
        )
        exp = self.tmp / "bad.toml"
        exp.write_text(body)
        return exp


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_model):
    """A routing template for the good checkpoint (built by the DAG's own RoutingTemplate), and a captured copy."""
    from capture.job import capture_into_cube

    root = tmp_path_factory.mktemp("bad_input_shared")
    ctx = Ctx(root, tiny_model, root / "template.zarr", root / "captured.zarr", root / "template_no_logits.zarr")
    for keep, dest in ((True, ctx.template), (False, ctx.template_no_logits)):
        shutil.rmtree(ctx.out, ignore_errors=True)
        exp = ctx.experiment(keep_logits=keep)
        ok, errors = build(exp, [tasks.RoutingTemplate(experiment=str(exp))])
        assert ok, errors
        shutil.copytree(ctx.out / "routing.zarr", dest)
    assert "router_logits" not in cubes.open_routing(ctx.template_no_logits, complete_only=False)
    shutil.copytree(ctx.template, ctx.captured)
    capture_into_cube(str(ctx.ckpt), str(ctx.captured), "a", batch_size=4, progress=False)
    assert cubes.completed_checkpoints(ctx.captured) == ["a"]
    return ctx


@pytest.fixture
def ctx(shared, tmp_path) -> Ctx:
    return Ctx(tmp_path, shared.model, shared.template, shared.captured, shared.template_no_logits)


# ------------------------------------------------------------------ how a case runs


def pipeline(exp: Path) -> Callable[[], None]:
    def run():
        ok, errors = build(exp)
        assert not ok, "the pipeline accepted bad input"
        assert errors, "the pipeline failed without a task error"
        raise errors[0]

    return run


def capture(ckpt: Path, routing: Path) -> Callable[[], None]:
    from capture.job import capture_into_cube

    return lambda: capture_into_cube(str(ckpt), str(routing), "a", batch_size=4, progress=False)


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _unchanged(path: Path, before: str) -> Callable[[], None]:
    def check():
        assert digest(path) == before, f"{path} was modified"

    return check


STAGES = ["PrepareModel", "Tokenize", "RoutingTemplate", "Capture", "Analyse", "FullReport"]


def assert_nothing_from(out: Path, stage: str) -> None:
    """No output of ``stage`` or any later stage exists or is marked complete under the run dir ``out``."""
    later = STAGES[STAGES.index(stage):]
    if "PrepareModel" in later:
        assert not (out / "model" / "prepared.json").exists()
    if "Tokenize" in later:
        assert [cubes.result_fingerprint(p) for p in (out / "tokens").glob("*.zarr")] in ([], [None])
    if "RoutingTemplate" in later:
        assert not (out / "routing.zarr").exists()
    if "Capture" in later:
        assert cubes.completed_checkpoints(out / "routing.zarr") == []
    assert not list(out.glob("analyses/*.zarr"))
    assert not (out / "report").exists() and not (out / "summary.json").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


# ------------------------------------------------------------------ the cases
#
# Each builder sets up the bad input and returns (thunk, the path the message must name, check-after).


def _exp_file(text: str):
    def make(ctx: Ctx):
        exp = ctx.tmp / "exp.toml"
        exp.write_bytes(text.format(out=ctx.out).encode() if isinstance(text, str) else text)

        def run():
            load_experiment(exp)

        def after():
            ok, _ = build(exp)  # the DAG refuses it too, before creating anything
            assert not ok and not ctx.out.exists()

        return run, exp, after

    return make


def _ckpt(damage: Callable[[Path], Path | None]):
    def make(ctx: Ctx):
        d = ctx.copy_ckpt()
        named = damage(d) or d
        exp = ctx.experiment(checkpoint=d)
        return pipeline(exp), named, lambda: assert_nothing_from(ctx.out, "PrepareModel")

    return make


def _truncate(d: Path) -> Path:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return f


def _missing_shard(d: Path) -> Path:
    f = d / "model.safetensors"
    f.rename(d / "model-00001-of-00002.safetensors")
    index = d / "model.safetensors.index.json"
    names = load_file(d / "model-00001-of-00002.safetensors")
    index.write_text(json.dumps({"metadata": {}, "weight_map": {
        k: ("model-00002-of-00002.safetensors" if i % 2 else "model-00001-of-00002.safetensors")
        for i, k in enumerate(names)}}))
    return index


def _pickle_bin(d: Path) -> None:
    state = {k: torch.from_numpy(v) for k, v in load_file(d / "model.safetensors").items()}
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")


def _safetensors_is_torch_save(d: Path) -> Path:
    f = d / "model.safetensors"
    state = {k: torch.from_numpy(v) for k, v in load_file(f).items()}
    torch.save(state, f)
    return f


def _safetensors_is_pickle(d: Path) -> Path:
    f = d / "model.safetensors"
    f.write_bytes(pickle.dumps({k: v for k, v in load_file(f).items()}, protocol=4))
    return f


def _bad_config(d: Path) -> Path:
    (d / "config.json").write_text('{"model_type": "mixtral", "hidden_size": ')
    return d / "config.json"


def _dense(ctx: Ctx):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = ctx.tmp / "dense"
    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=384)).save_pretrained(d)
    exp = ctx.experiment(checkpoint=d)
    return pipeline(exp), d, lambda: assert_nothing_from(ctx.out, "PrepareModel")


def _lacks_weights(ctx: Ctx):
    """Safetensors without a tensor the model needs: transformers would fill it at random."""
    from capture.load import load_model

    d = ctx.copy_ckpt()
    f = d / "model.safetensors"
    w = load_file(f)
    del w["model.layers.1.block_sparse_moe.gate.weight"]
    save_file(w, f, metadata={"format": "pt"})
    before = digest(d)
    return lambda: load_model(d), d, _unchanged(d, before)


def _dataset(text: str | None, *, stage: str = "Tokenize"):
    def make(ctx: Ctx):
        data = ctx.tmp / "data.jsonl"
        if text is not None:
            data.write_text(text)
        exp = ctx.experiment(dataset=data)
        return pipeline(exp), data, lambda: assert_nothing_from(ctx.out, stage)

    return make


def _dataset_bytes(raw: bytes):
    def make(ctx: Ctx):
        data = ctx.tmp / "data.jsonl"
        data.write_bytes(raw)
        exp = ctx.experiment(dataset=data)
        return pipeline(exp), data, lambda: assert_nothing_from(ctx.out, "Tokenize")

    return make


def _nested_header(d: Path) -> Path:
    f = d / "model.safetensors"
    header = b"[" * 200_000 + b"]" * 200_000
    f.write_bytes(struct.pack("<Q", len(header)) + header)
    return f


def _top_k_over_experts(d: Path) -> Path:
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_experts_per_tok"] = cfg["num_local_experts"] + 1
    (d / "config.json").write_text(json.dumps(cfg))
    return d / "config.json"


def _pairs(entry: dict):
    """A pair_tokens.json file (capture/pairs.py) with one good pair and one bad one."""

    def make(ctx: Ctx):
        f = ctx.tmp / "pair_tokens.json"
        good = {"id": "p0", "domain": "code", "agentic_ids": [1, 20, 21, 22], "assisted_ids": [1, 20, 21, 22],
                "canonical_non_ws_positions": [1, 2, 3]}
        f.write_text(json.dumps([good, {"id": "p1", "domain": "code", **entry}]))
        exp = ctx.experiment(dataset=f, extra='format = "pair_tokens"\n[conditions]\na = "agentic"\nb = "assisted"\n')
        return pipeline(exp), f, lambda: assert_nothing_from(ctx.out, "Tokenize")

    return make


def _router_weights(layer: int, value: float, template: str = "template"):
    """A checkpoint whose router at ``layer`` has every weight set to ``value`` (NaN/inf logits).

    Captured into a template that keeps router logits, or (``template_no_logits``)
    one that does not: the weights the experts receive are then the ones refused.
    """

    def make(ctx: Ctx):
        d = ctx.copy_ckpt()
        f = d / "model.safetensors"
        w = load_file(f)
        w[f"model.layers.{layer}.block_sparse_moe.gate.weight"][:] = value
        save_file(w, f, metadata={"format": "pt"})
        routing = ctx.copy_cube(template)
        return capture(d, routing), routing, lambda: _nothing_captured(routing)

    return make


def _nothing_captured(routing: Path) -> None:
    assert cubes.completed_checkpoints(routing) == []
    assert cubes.open_routing(routing).sizes["checkpoint"] == 0
    # Only the 'complete' flags were touched: no routing data reached the store.
    assert not list(routing.glob("expert_ids/c/*"))


def _ids_out_of_range(ctx: Ctx):
    routing = ctx.copy_cube("template")
    T = xr_sizes(routing)["token"]

    def run():
        with cubes.RoutingWriter(routing, "a") as w:
            ids = np.zeros((2, T, 2), np.int16)
            ids[1, 5, 1] = 4  # E = 4: ids run 0..3
            w.append(expert_ids=ids, expert_weights=np.full((2, T, 2), 0.5, np.float32),
                     router_logits=np.zeros((2, T, 4), np.float16), nll=np.zeros(T, np.float32))

    return run, routing, lambda: _nothing_captured(routing)


def xr_sizes(routing: Path) -> dict:
    return dict(cubes.open_routing(routing, complete_only=False).sizes)


def _damaged_cube(damage: Callable[[Path], Path | None], opener=cubes.open_routing, which: str = "captured"):
    def make(ctx: Ctx):
        routing = ctx.copy_cube(which)
        named = damage(routing) or routing
        before = digest(routing)
        return lambda: opener(routing), named, _unchanged(routing, before)

    return make


def _drop_chunks(routing: Path) -> None:
    for f in (routing / "expert_ids" / "c" / "0" / "1").rglob("*"):
        if f.is_file():
            f.unlink()


def _cut_metadata(routing: Path) -> None:
    meta = routing / "zarr.json"
    meta.write_bytes(meta.read_bytes()[: meta.stat().st_size // 3])


def _token_table(damage: Callable[[Path], None]):
    def make(ctx: Ctx):
        src = ctx.out  # a token table written by the DAG's Tokenize
        table = ctx.tmp / "tokens.zarr"
        exp = ctx.experiment()
        ok, errors = build(exp, [tasks.Tokenize(experiment=str(exp), dataset="d")])
        assert ok, errors
        shutil.copytree(src / "tokens" / "d.zarr", table)
        damage(table)
        before = digest(table)
        return lambda: cubes.open_result(table), table, _unchanged(table, before)

    return make


def _garble_chunk(table: Path) -> None:
    chunk = next(p for p in sorted((table / "token_id").rglob("*")) if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(b"\x00garbage" * 7)


@dataclass
class Case:
    id: str
    make: Callable[[Ctx], tuple]
    error: type
    problem: str  # regex the message must match


CASES = [
    # experiment files
    Case("experiment-not-toml", _exp_file('name = "x"\noutput_dir = \n'), SpecError, "not valid TOML"),
    Case("experiment-not-utf8", _exp_file(b'name = "\xff\xfe"\n'), SpecError, "not a UTF-8 text file"),
    Case("experiment-unknown-key", _exp_file('name = "x"\noutput_dir = "{out}"\n[capture]\nkeep_logits = true\n'),
         SpecError, r"unknown key 'capture\.keep_logits'"),
    Case("experiment-wrong-type", _exp_file('name = "x"\noutput_dir = "{out}"\n[capture]\nbatch_size = "8"\n'),
         SpecError, r"'capture\.batch_size' must be an integer"),
    Case("experiment-missing-key", _exp_file('name = "x"\n'), SpecError, r"missing required key 'output_dir'"),
    Case("experiment-unknown-analysis",
         _exp_file('name = "x"\noutput_dir = "{out}"\n[analyses]\nrun = ["usage", "nope"]\n'),
         SpecError, r"unknown analysis 'nope'"),
    Case("experiment-param-type",
         _exp_file('name = "x"\noutput_dir = "{out}"\n[analyses.params.usage]\nn_boot = "many"\n'),
         SpecError, r"analyses\.params\.usage\.n_boot: expected an integer in \[0, 100000\], got 'many'"),
    Case("experiment-param-range",
         _exp_file('name = "x"\noutput_dir = "{out}"\n[analyses.params.change]\nci = 5.0\n'),
         SpecError, r"analyses\.params\.change\.ci: expected a number in \(0, 1\), got 5\.0"),
    Case("experiment-no-analyses", _exp_file('name = "x"\noutput_dir = "{out}"\n[analyses]\nrun = []\n'),
         SpecError, r"'analyses\.run' is empty"),
    Case("experiment-remote-host", _exp_file('name = "x"\noutput_dir = "{out}"\n[dask]\nhost = "0.0.0.0"\n'),
         SpecError, r"'dask\.host' = '0\.0\.0\.0' exposes .*allow_remote = true"),
    Case("experiment-device", _exp_file('name = "x"\noutput_dir = "{out}"\n[capture]\ndevice = "tpu:9"\n'),
         SpecError, r"'capture\.device' must be 'cpu', 'cuda', 'cuda:N' or 'mps', got 'tpu:9'"),
    # checkpoints: missing, truncated, not MoE, pickles
    Case("checkpoint-missing", _ckpt(lambda d: shutil.rmtree(d)), FileNotFoundError, "does not exist"),
    Case("checkpoint-no-config", _ckpt(lambda d: (d / "config.json").unlink()), FileNotFoundError,
         "has no config.json"),
    Case("checkpoint-no-weights", _ckpt(lambda d: (d / "model.safetensors").unlink()), FileNotFoundError,
         r"no \*\.safetensors weights"),
    Case("checkpoint-truncated", _ckpt(_truncate), ValueError, "truncated safetensors file"),
    Case("checkpoint-missing-shard", _ckpt(_missing_shard), FileNotFoundError,
         r"shard model-00002-of-00002\.safetensors listed in weight_map is missing"),
    Case("checkpoint-bad-config", _ckpt(_bad_config), ValueError, "cannot read the model config"),
    Case("checkpoint-header-nested", _ckpt(_nested_header), ValueError,
         "corrupt safetensors header: JSON nested too deeply"),
    Case("checkpoint-top-k-over-experts", _ckpt(_top_k_over_experts), ValueError,
         r"num_experts_per_tok=\d+ is larger than num_local_experts=\d+"),
    Case("checkpoint-lacks-weights", _lacks_weights, ValueError,
         r"lack 1 weight\(s\) the model needs, e\.g\. \['model\.layers\.1\.(mlp|block_sparse_moe)\.gate\.weight'\]"),
    Case("checkpoint-dense", _dense, ValueError, "no MoE router"),
    Case("weights-pytorch-model-bin", _ckpt(_pickle_bin), ValueError,
         r"only pickle-based weights \['pytorch_model\.bin'\]; refusing to unpickle"),
    Case("weights-safetensors-is-torch-save", _ckpt(_safetensors_is_torch_save), ValueError,
         r"not a safetensors file but a zip archive \(the torch\.save format.*refusing to unpickle"),
    Case("weights-safetensors-is-pickle", _ckpt(_safetensors_is_pickle), ValueError,
         r"not a safetensors file but a Python pickle; refusing to unpickle"),
    # datasets
    Case("dataset-empty", _dataset(""), ValueError, "no samples"),
    Case("dataset-missing", _dataset(None), FileNotFoundError, "does not exist"),
    Case("dataset-bad-json", _dataset('{"text": "a", "domain": "x"}\n{"text": \n'), ValueError, r":2: invalid JSON"),
    Case("dataset-no-text", _dataset('{"text": "a", "domain": "x"}\n{"domain": "x"}\n'), ValueError,
         r":2: field 'text' is missing"),
    Case("dataset-not-utf8", _dataset_bytes(b'{"text": "a", "domain": "x"}\n{"text": "\xff", "domain": "x"}\n'),
         ValueError, r":2: not valid UTF-8 at byte 10"),
    Case("dataset-lone-surrogate", _dataset('{"text": "a", "domain": "x"}\n{"text": "a\\udc00", "domain": "x"}\n'),
         ValueError, r":2: field 'text' holds a lone surrogate"),
    Case("dataset-deep-nesting", _dataset('{"text": "a", "domain": "x", "m": ' + "[" * 200_000 + "]" * 200_000 + "}\n"),
         ValueError, r":1: invalid JSON \(nested too deeply to parse\)"),
    # paired samples that do not pair (capture/pairs.py)
    Case("pairs-unequal-ids", _pairs({"agentic_ids": [1, 5, 6], "assisted_ids": [1, 5],
                                      "canonical_non_ws_positions": [1]}),
         ValueError, r"'agentic_ids' has 3 ids and 'assisted_ids' has 2"),
    Case("pairs-unequal-positions", _pairs({"agentic_ids": [1, 5, 6], "assisted_ids": [1, 5],
                                            "agentic_canonical_non_ws_positions": [1, 2],
                                            "assisted_canonical_non_ws_positions": [1]}),
         ValueError, r"lists 2 positions and .* lists 1; aligned canonical positions must pair one to one"),
    # capture: routing values that must never be stored
    Case("router-logits-nan", _router_weights(1, float("nan")), cubes.CubeError,
         r"checkpoint 'a', layer 1: \d+ non-finite \(NaN/inf\) values in 'router_logits'"),
    Case("router-logits-inf", _router_weights(0, float("inf")), cubes.CubeError,
         r"checkpoint 'a', layer 0: \d+ non-finite \(NaN/inf\) values in 'router_logits'"),
    Case("router-logits-nan-not-kept", _router_weights(1, float("nan"), "template_no_logits"), cubes.CubeError,
         r"checkpoint 'a', layer 1: \d+ non-finite \(NaN/inf\) values in 'expert_weights'"),
    Case("expert-id-out-of-range", _ids_out_of_range, cubes.CubeError,
         r"checkpoint 'a', layer 1: expert id out of range \[0, 4\], expected 0\.\.3"),
    # damaged cubes given as input
    Case("routing-no-metadata", _damaged_cube(lambda r: (r / "zarr.json").unlink()), cubes.CubeError,
         r"no routing cube here \(zarr\.json missing\)"),
    Case("routing-metadata-cut", _damaged_cube(_cut_metadata), cubes.CubeError, "cannot open routing cube"),
    Case("routing-chunks-missing", _damaged_cube(_drop_chunks), cubes.CubeError,
         r"variable 'expert_ids', checkpoint 'a' \(index 0\), chunk expert_ids/c/0/\d/0/0: chunk object missing "
         r"\(would read as fill\); fix: capture checkpoint 'a' again$"),
    Case("routing-variable-dir-gone", _damaged_cube(lambda r: shutil.rmtree(r / "expert_ids")), cubes.CubeError,
         r"variable 'expert_ids', checkpoint 'a' \(index 0\), chunk expert_ids/c/0/0/0/0: chunk object missing "
         r".*\(and 1 more problem\(s\): moe-atlas verify lists them\)"),
    Case("result-no-metadata", _damaged_cube(lambda r: (r / "zarr.json").unlink(), opener=cubes.open_result),
         cubes.CubeError, r"no result cube here \(zarr\.json missing\)"),
    Case("result-chunk-garbled", _token_table(_garble_chunk), cubes.CubeError,
         r"variable 'token_id', object token_id/c/0: is \d+ bytes, \d+ were written \(truncated or overwritten\)"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, ctx: Ctx):
    run, named, after = case.make(ctx)
    with pytest.raises(case.error) as info:
        run()
    message = str(info.value)
    assert str(named) in message, f"the message does not name {named}: {message}"
    assert re.search(case.problem, message), f"the message does not say {case.problem!r}: {message}"
    after()
