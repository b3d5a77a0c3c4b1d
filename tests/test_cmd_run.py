"""``moe-atlas run/new/check/analyses/import`` and paths resolved at load (issue 13).

The end-to-end test does what a new user does, outside the repository: a fresh
venv that sees the project's dependencies (a ``.pth`` to the project venv's
site-packages) with the project ``pip install``ed into it, ``moe-atlas new``,
an edit, a tiny Mixtral checkpoint and tokenizer of its own, a run on an
external ``dask scheduler`` + ``dask worker`` started in another folder (so
relative paths only work when resolved at load), and a bad file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
import tomllib
import typing
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def moe_atlas(*args, cwd=None, exe=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    cmd = [exe] if exe else [sys.executable, "-m", "moe_atlas"]
    env = dict(os.environ if env is None else env)
    if not exe:
        env["PYTHONPATH"] = str(REPO)
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)


# ------------------------------------------------------------------ new / check / analyses / paths


def _fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "source_file":
            continue
        yield f"{prefix}{f.name}"
        tp = hints[f.name]
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list and typing.get_args(tp) else tp
        if dataclasses.is_dataclass(inner):
            yield from _fields(inner, f"{prefix}{f.name}.")


def test_new_writes_every_option_and_the_file_loads_as_the_defaults(tmp_path):
    from capture.demo import DemoConfig
    from experiments.spec import Experiment, load_experiment

    r = moe_atlas("new", "trial", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "trial.toml").read_text()
    table = tomllib.loads(text)
    # every key of the schema is there, written or commented (generated: it cannot drift)
    keys = set(re.findall(r"^#? ?(\w+) = ", text, flags=re.M))
    tables = set(re.findall(r"^#? ?\[+([\w.]+)\]+", text, flags=re.M))
    written = keys | {part for t in tables for part in t.split(".")}
    leaves = {k.rsplit(".", 1)[-1] for k in _fields(Experiment)} | {f.name for f in dataclasses.fields(DemoConfig)}
    assert leaves - written == set(), "analyses.params.<name> tables appear as [analyses.params.usage]"
    exp = load_experiment(tmp_path / "trial.toml")
    assert exp.name == "trial" and exp.output_dir == str(tmp_path / "runs" / "trial")
    assert dataclasses.asdict(DemoConfig(**table["model"]["demo"])) == dataclasses.asdict(DemoConfig())
    bare = tmp_path / "bare.toml"
    bare.write_text(f'name = "trial"\noutput_dir = "runs/trial"\n')
    assert dataclasses.replace(exp, source_file="", model=dataclasses.replace(exp.model, demo={})) == \
        dataclasses.replace(load_experiment(bare), source_file="")
    assert moe_atlas("new", "trial", cwd=tmp_path).returncode == 2  # no overwrite without --force


def test_paths_are_resolved_against_the_experiment_folder(tmp_path, monkeypatch):
    from experiments.spec import load_experiment

    (tmp_path / "sub").mkdir()
    f = tmp_path / "sub" / "e.toml"
    f.write_text('name = "x"\noutput_dir = "../runs/x"\n[model]\nsource = "checkpoints"\ntokenizer = "tok"\n'
                 '[[model.checkpoints]]\nname = "a"\npath = "ck/a"\nstep = 0\n'
                 '[[model.checkpoints]]\nname = "b"\npath = "/abs/b"\nstep = 1\n'
                 '[[datasets]]\nname = "d"\npath = "data/d.jsonl"\n'
                 '[masks]\nenabled = true\n[[masks.user]]\npath = "m/mask.npy"\ncomponent = "mlp.down_proj"\n'
                 '[[training.logs]]\npath = "logs/trainer_state.json"\n')
    monkeypatch.chdir("/")
    exp = load_experiment(os.path.relpath(f, "/"))
    assert exp.masks.user[0].path == str(tmp_path / "sub" / "m" / "mask.npy")
    assert exp.training.logs[0].path == str(tmp_path / "sub" / "logs" / "trainer_state.json")
    assert exp.output_dir == str(tmp_path / "runs" / "x")
    assert [c.path for c in exp.model.checkpoints] == [str(tmp_path / "sub" / "ck" / "a"), "/abs/b"]
    assert exp.model.tokenizer == str(tmp_path / "sub" / "tok")
    assert exp.datasets[0].path == str(tmp_path / "sub" / "data" / "d.jsonl")


def test_analyses_lists_every_registered_analysis_with_its_needs():
    from analyses import REGISTRY

    r = moe_atlas("analyses")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == sorted(REGISTRY)
    by = {line.split()[0]: line for line in lines}
    assert ">= 2 checkpoints" in by["change"] and "router logits" in by["router_probability"]
    assert "pairs" in by["divergence"] and "logit lens" in by["lens"] and ">= 2 domains" in by["specialization"]


def test_check_says_what_runs_and_what_is_skipped(tmp_path):
    (tmp_path / "e.toml").write_text(
        'name = "x"\noutput_dir = "out"\n[model.demo]\nsteps = 10\nwarmup_steps = 2\ncheckpoint_steps = [0, 10]\n'
        '[analyses]\nrun = ["usage", "divergence", "router_probability", "change"]\n')
    r = moe_atlas("check", "e.toml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"output_dir: {tmp_path / 'out'}" in out and "step_0010 (step 10)" in out
    assert "  usage: runs" in out and "  change: runs" in out
    assert "  divergence: skipped: needs two conditions" in out
    assert "  router_probability: skipped: needs router logits (capture.keep_router_logits)" in out
    assert "state: work to do" in out
    assert "stages beyond the analyses:\n  experts: off\n  masks: off\n  interventions: off\n" in out
    assert "  training: 0 log(s) + the demo's own, 0 score file(s)" in out
    (tmp_path / "s.toml").write_text(
        'name = "x"\noutput_dir = "out3"\n[model.demo]\nsteps = 10\nwarmup_steps = 2\ncheckpoint_steps = [0, 10]\n'
        '[analyses]\nrun = ["usage"]\n[interventions]\nenabled = true\ncheckpoints = ["last"]\n'
        'rankings = ["usage"]\n[masks]\nenabled = true\nmethods = ["magnitude"]\n'
        '[[masks.user]]\npath = "m.npy"\ncomponent = "mlp.down_proj"\n')
    r = moe_atlas("check", "s.toml", cwd=tmp_path)
    assert r.returncode == 1 and f"mask file {tmp_path / 'm.npy'} does not exist" in r.stderr
    assert ("  interventions: router masks at step_0010: 4 sweeps per checkpoint (router.drop_top1, router.single, "
            "router.rank.usage, router.random)") in r.stdout
    assert "  masks: magnitude on self_attn.q_proj, experts.down_proj of layer(s) [1] at sparsity 0.5" in r.stdout
    (tmp_path / "c.toml").write_text('name = "x"\noutput_dir = "out2"\n[model]\nsource = "checkpoints"\n'
                                     '[[model.checkpoints]]\nname = "a"\npath = "nowhere"\nstep = 0\n'
                                     '[[datasets]]\nname = "d"\npath = "d.jsonl"\n')
    r = moe_atlas("check", "c.toml", cwd=tmp_path)
    assert r.returncode == 1
    assert f"checkpoint 'a': {tmp_path / 'nowhere'} has no config.json" in r.stderr
    assert f"dataset 'd': {tmp_path / 'd.jsonl'} does not exist" in r.stderr


def test_bad_file_is_one_line_and_exit_2_from_any_folder(tmp_path):
    (tmp_path / "bad.toml").write_text('name = "x"\noutput_dir = "o"\n[capture]\nbatchsize = 4\n')
    for cmd, named in (("run", tmp_path / "bad.toml"), ("check", "bad.toml")):
        r = moe_atlas(cmd, "bad.toml", cwd=tmp_path)
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr.strip().splitlines() == [
            f"moe-atlas {cmd}: error: {named}: unknown key 'capture.batchsize'; expected one of: batch_size, "
            "device, dtype, js_divergence, keep_router_logits, logit_lens, max_length"]
    r = moe_atlas("--debug", "run", "bad.toml", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_every_command_has_help():
    from moe_atlas.cli import COMMANDS

    for name in COMMANDS:
        r = moe_atlas(name, "--help")
        assert r.returncode == 0 and "usage: moe-atlas" in r.stdout, (name, r.stderr)


def test_import_option_values_are_toml():
    from moe_atlas.cmd_import import parse_option

    assert parse_option("top_k=4") == ("top_k", 4)
    assert parse_option("keep_warmup=true") == ("keep_warmup", True)
    assert parse_option("semantics=softmax") == ("semantics", "softmax")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_option("top_k")


# ------------------------------------------------------------------ a new user, outside the repository


def _tiny_checkpoints(root: Path) -> list[Path]:
    """Two tiny Mixtral checkpoints (different seeds) and a BPE tokenizer saved with the first."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoModelForCausalLM, MixtralConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def f(x):\n    return x + 1\n", "The cat sat on the mat."] * 20, trainer)
    cfg = MixtralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=300,
                        max_position_embeddings=64)
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        d = root / f"step{seed}"
        AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
        out.append(d)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>").save_pretrained(out[0])
    return out


def _start(cmd, cwd, env, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.mark.slow
def test_new_user_outside_the_repo_with_an_external_dask_cluster(tmp_path):
    # 1. a fresh venv that sees the project's dependencies, and the project pip-installed into it
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "project-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg")
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(REPO)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    exe = str(venv / "bin" / "moe-atlas")
    assert Path(exe).is_file()

    # 2. the user's own model and data, next to the experiment file
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    ckpts = _tiny_checkpoints(work / "ckpts")
    samples = [{"id": f"s{i}", "text": t, "domain": d} for i, (t, d) in enumerate(
        [("def g(y):\n    return y * 2\n", "code"), ("A dog ran in the park.", "prose")] * 3)]
    (work / "data" / "eval.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))

    # 3. moe-atlas new, then the edit a user makes
    r = moe_atlas("new", "mine", cwd=work, exe=exe, env=env)
    assert r.returncode == 0, r.stderr
    text = (work / "mine.toml").read_text()
    text = re.sub(r"(?ms)^\[model\.demo\]\n.*?\n\n", "", text).replace('source = "demo"', 'source = "checkpoints"')
    text = re.sub(r'(?m)^run = \[.*\]$', 'run = ["usage", "change"]', text)
    text = re.sub(r"(?m)^max_length = \d+$", "max_length = 32", text)
    text += "".join(f'\n[[model.checkpoints]]\nname = "{c.name}"\npath = "ckpts/{c.name}"\nstep = {i}\n'
                    for i, c in enumerate(ckpts))
    text += '\n[[datasets]]\nname = "eval"\npath = "data/eval.jsonl"\n'
    (work / "mine.toml").write_text(text)

    # 4. an external scheduler and worker, started in another folder: relative paths would miss there
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    sched_file = tmp_path / "scheduler.json"
    procs = [_start([str(py), "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                     "--no-dashboard", "--scheduler-file", str(sched_file)], elsewhere, env, tmp_path / "sched.log")]
    try:
        deadline = time.monotonic() + 120
        while not sched_file.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        address = json.loads(sched_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        procs.append(_start([str(py), "-m", "distributed.cli.dask_worker", "--scheduler-file", str(sched_file),
                             "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"], elsewhere, env,
                            tmp_path / "worker.log"))
        r = moe_atlas("run", "mine.toml", "--scheduler-address", address, cwd=work, exe=exe, env=env, timeout=600)
        assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
        assert (work / "runs" / "mine" / "report" / "index.html").is_file()
        assert "moe-atlas: Analyse(usage) done in" in r.stdout and "moe-atlas: FullReport done in" in r.stdout
        assert not list(elsewhere.iterdir())  # the worker wrote nothing where it runs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()

    # 4b. the same command again: nothing to run (no stage, no cluster), exit 0; the JSONL ids are in the cube
    r = moe_atlas("run", "mine.toml", cwd=work, exe=exe, env=env)
    assert r.returncode == 0 and "nothing to run" in r.stdout and " done in " not in r.stdout, r.stdout[-2000:]
    import xarray as xr

    ids = xr.open_zarr(work / "runs" / "mine" / "routing.zarr").sample_id.values
    assert sorted(set(map(str, ids))) == sorted({s["id"] for s in samples})

    # 5. a bad file: one line naming file and key, exit status != 0
    (work / "bad.toml").write_text(text.replace("batch_size = 16", "batchsize = 16", 1))
    r = moe_atlas("run", "bad.toml", cwd=work, exe=exe, env=env)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "bad.toml: unknown key 'capture.batchsize'" in r.stderr


@pytest.mark.slow
def test_failed_task_exits_1_with_one_line_and_no_traceback(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"id": "a", "text": "x y", "domain": "p"}\n')
    (tmp_path / "e.toml").write_text('name = "x"\noutput_dir = "out"\n[model]\nsource = "checkpoints"\n'
                                     '[[model.checkpoints]]\nname = "a"\npath = "nowhere"\nstep = 0\n'
                                     '[[datasets]]\nname = "d"\npath = "d.jsonl"\n[analyses]\nrun = ["usage"]\n'
                                     '[dask]\nn_workers = 1\ndashboard_port = 0\n')
    r = moe_atlas("run", "e.toml", cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stdout + r.stderr
    failed = [line for line in r.stderr.splitlines() if line.startswith("moe-atlas: PrepareModel FAILED")]
    assert len(failed) == 1 and f"checkpoint 'a'" in failed[0], r.stderr[-2000:]
    assert "Dask dashboard: http://127.0.0.1:" in r.stdout
    assert "still alive after" not in r.stdout + r.stderr  # clean cluster shutdown


def test_one_check_of_the_graph_asks_each_task_once():
    """``moe-atlas run`` decides "nothing to do" with one complete() per task (the demo asked Capture 52 times)."""
    import tasks

    class Stub:
        def __init__(self, task_id, answer):
            self.task_id, self.answer, self.calls = task_id, answer, 0

        def complete(self):
            self.calls += 1
            return self.answer

    a, b = Stub("A", True), Stub("B", False)
    with tasks.checking_once():
        assert [tasks._done(t) for t in (a, b, a, b, a)] == [True, False, True, False, True]
    assert (a.calls, b.calls) == (1, 1)
    assert tasks._done(a) and tasks._done(a) and a.calls == 3  # outside the block (a run): asked every time
