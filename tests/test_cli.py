"""The ``moe-atlas`` command: ``verify RUN`` on a good and a damaged run, one-line errors, ``--debug``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from run_builder import build_run, capture, chunk

REPO = Path(__file__).resolve().parents[1]


def moe_atlas(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "moe_atlas", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("cli") / "run")


def test_console_script_is_declared_and_runs():
    import configparser
    import importlib

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    scripts = dict(line.split("=", 1) for line in cfg["options.entry_points"]["console_scripts"].split("\n") if line)
    target = scripts["moe-atlas "].strip()
    module, func = target.split(":")
    assert callable(getattr(importlib.import_module(module), func))
    assert "moe_atlas" in cfg["options.packages.find"]["include"].split()
    exe = shutil.which("moe-atlas")
    if exe:  # installed (pip install -e .): the script itself answers
        r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "verify" in r.stdout


def test_verify_good_run_exits_0(built):
    r = moe_atlas("verify", built.layout.root)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{built.layout.root}: ok (2 captured checkpoint(s), 2 result store(s) verified)"


def test_verify_damaged_run_one_line_per_problem_with_the_fix(built, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(built.layout.root, root)
    chunk(root / "routing.zarr", "nll", 1, 0).unlink()
    w = chunk(root / "routing.zarr", "expert_weights", 0, 1, 0, 0)
    w.write_bytes(w.read_bytes()[:5])
    u = chunk(root / "analyses" / "usage.zarr", "share", 0, 0)
    u.write_bytes(u.read_bytes() + b"x")
    r = moe_atlas("verify", root)
    assert r.returncode == 1
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3, r.stdout
    rerun = f"luigi --module tasks FullReport --experiment {built.experiment_file.resolve()}"
    expected = [
        (str(root / "routing.zarr"), "variable 'expert_weights'", "checkpoint 'step0'", "expert_weights/c/0/1/0/0",
         "truncated", f"fix: {rerun} (recaptures checkpoint 'step0')"),
        (str(root / "routing.zarr"), "variable 'nll'", "checkpoint 'step100'", "nll/c/1/0", "missing",
         f"fix: {rerun} (recaptures checkpoint 'step100')"),
        (str(root / "analyses" / "usage.zarr"), "variable 'share'", "share/c/0/0", "bytes", f"fix: {rerun}"),
    ]
    for parts in expected:
        assert sum(all(p in line for p in parts) for line in lines) == 1, (parts, lines)
    assert "3 problem(s)" in r.stderr


def test_verify_then_rerun_recaptures_what_was_damaged(built, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(built.layout.root, root)
    c = chunk(root / "routing.zarr", "router_logits", 1, 1, 0, 0)
    data = bytearray(c.read_bytes())
    data[3] ^= 0x10
    c.write_bytes(bytes(data))
    r = moe_atlas("verify", root, "--repair")
    assert r.returncode == 1 and "checksum" in r.stdout and "un-marked checkpoint 'step100'" in r.stderr
    capture(root / "routing.zarr", built.cube, 1, "step100")  # what the rerun's Capture(step100) does
    assert moe_atlas("verify", root).returncode == 0


def test_not_a_run_is_one_line_and_debug_shows_the_traceback(tmp_path):
    r = moe_atlas("verify", tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == f"moe-atlas verify: error: {tmp_path}: not a moe-atlas run folder (no .moe-atlas-run.json)"
    assert r.stdout == ""
    r = moe_atlas("--debug", "verify", tmp_path)
    assert r.returncode == 2 and "Traceback (most recent call last)" in r.stderr and "verify_run" in r.stderr
    r = moe_atlas("verify", tmp_path / "absent", "--debug")
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_usage_errors_name_the_command():
    r = moe_atlas("verify")
    assert r.returncode == 2 and "RUN" in r.stderr
    r = moe_atlas("nonsense")
    assert r.returncode == 2 and "invalid choice" in r.stderr
