"""Every fenced code block of the project's Markdown docs works (issue 13.1).

- ```python blocks run, in a fresh interpreter, in a directory whose
  ``runs/demo`` is a real run of the pipeline: a small demo shaped like the
  documented one (checkpoints ``step_0000`` and ``step_0300``, three MoE
  layers, four domains), so that the README's paths and labels are the ones
  the snippet meets.
- ```toml blocks are experiment files: the project's validator
  (``experiments.spec.load_experiment``) must accept them.
- ```bash blocks: every command names an entry point that exists, with flags
  it accepts (``--help`` of the project's modules and of luigi/luigid, the
  extras of setup.cfg for pip, files for kubectl/docker); nothing long runs.
- A block that cannot run here is preceded by
  ``<!-- docs-test: skip (reason) -->`` and listed in :data:`SKIPPED`; a
  block in any other language fails until it is handled here.
"""

from __future__ import annotations

import configparser
import functools
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXCLUDED_DIRS = {".venv", ".venv-ci", "venv", "runs", ".git", ".pytest_cache", ".hypothesis", "build", "dist",
                 "node_modules"}
SKIP_MARK = re.compile(r"<!--\s*docs-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->")
#: (doc, first line of the block) of every block marked skip: adding one means adding it here, on purpose.
SKIPPED: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Block:
    doc: str  # path relative to the repository
    line: int  # line of the opening fence
    lang: str
    code: str
    skip: str | None  # the marker's reason

    def __str__(self) -> str:
        return f"{self.doc}:{self.line} ({self.lang})"


def docs() -> list[Path]:
    """Every Markdown file of the repository, outside virtualenvs, runs and caches."""
    out = []
    for here, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS and not d.endswith(".egg-info")]
        out += [Path(here) / f for f in files if f.endswith(".md")]
    return sorted(out)


def blocks_of(path: Path) -> list[Block]:
    """Fenced blocks of a Markdown file, with the skip marker that precedes each (blank lines between allowed)."""
    out, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(```+)\s*([\w+-]*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        start, body = i, []
        i += 1
        while i < len(lines) and not re.match(rf"^\s*{fence}\s*$", lines[i]):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        assert i < len(lines), f"{path.relative_to(REPO)}:{start + 1}: code block never closed"
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        mark = SKIP_MARK.search(lines[j]) if j >= 0 else None
        out.append(Block(str(path.relative_to(REPO)), start + 1, lang.lower(), "\n".join(body) + "\n",
                         mark.group("reason").strip() if mark else None))
        i += 1
    return out


ALL = [b for p in docs() for b in blocks_of(p)]


def _of(lang: str) -> list[Block]:
    return [b for b in ALL if b.lang == lang and not b.skip]


def test_docs_are_found_and_every_block_is_handled():
    found = {b.doc for b in ALL}
    assert {"README.md", "deploy/README.md", "deploy/luigid.md", "bench/README.md"} <= found
    # text: output shown to the reader (what a command prints), nothing to run
    unhandled = [str(b) for b in ALL if not b.skip and b.lang not in ("python", "toml", "bash", "sh", "text")]
    assert not unhandled, f"code blocks in a language this test does not check (handle it or mark skip): {unhandled}"
    skipped = {(b.doc, b.code.splitlines()[0] if b.code.strip() else "") for b in ALL if b.skip}
    assert skipped == SKIPPED, "a docs-test: skip marker was added or removed: update SKIPPED on purpose"


# ------------------------------------------------------------------ python: against a real run


# The tiny demo (experiments/tiny.py), smaller still and trained longer, without router logits.
DOCS_DEMO = dict(steps=300, checkpoint_steps=[0, 300], hidden_size=16, intermediate_size=32, num_layers=3,
                 vocab_size=300, seq_len=32, batch_size=4, eval_samples_per_domain=2, eval_max_chars=200,
                 train_chars_per_domain=5000)


@pytest.fixture(scope="module")
def docs_root(tmp_path_factory) -> Path:
    """A directory with ``runs/demo``: the pipeline run on a small demo with the documented labels."""
    from pipeline_helpers import build

    import deploy

    root = tmp_path_factory.mktemp("docs")
    exp = root / "demo.toml"
    from experiments.tiny import tiny_experiment

    exp.write_text(tiny_experiment(root / "runs" / "demo", name="demo", port=0, demo=DOCS_DEMO,
                                   capture={"keep_router_logits": False}))
    try:
        ok, errors = build(exp)
    finally:
        deploy.close_client()
    assert ok, errors
    return root


def _run_python(code: str, cwd: Path) -> dict:
    """Run ``code`` as a script in ``cwd``; the dims and sizes of the xarray objects it leaves, by name."""
    epilogue = textwrap.dedent("""
        import json as _json, xarray as _xr
        print("\\n__DOCS__" + _json.dumps({k: {"dims": list(v.dims), "sizes": dict(v.sizes)}
                                            for k, v in dict(globals()).items()
                                            if isinstance(v, (_xr.DataArray, _xr.Dataset))}))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO)] + [os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code + epilogue], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.rsplit("__DOCS__", 1)[1])


@pytest.mark.slow
@pytest.mark.parametrize("block", _of("python"), ids=str)
def test_python_block_runs_against_a_real_run(block, docs_root):
    _run_python(block.code, docs_root)


@pytest.mark.slow
def test_readme_xarray_example_selects_the_code_tokens(docs_root):
    """The README's selection, against the same tokens counted another way (zarr arrays, numpy)."""
    import numpy as np
    import zarr

    (block,) = [b for b in _of("python") if b.doc == "README.md" and "routing.zarr" in b.code]
    out = _run_python(block.code + "\nids = ids.compute()\nassert set(ids.domain.values) == {'code'}\n", docs_root)
    g = zarr.open_group(str(docs_root / "runs" / "demo" / "routing.zarr"), mode="r")
    domains = np.array([str(d) for d in g["domain"][:]])
    assert out["ids"]["dims"] == ["token", "k"]
    assert out["ids"]["sizes"] == {"token": int((domains == "code").sum()), "k": 2}
    assert 0 < out["ids"]["sizes"]["token"] < len(domains)


# ------------------------------------------------------------------ toml: experiment files


@pytest.mark.parametrize("block", _of("toml"), ids=str)
def test_toml_block_is_a_valid_experiment(block, tmp_path, monkeypatch):
    from experiments.spec import load_experiment

    import capture.load

    if "cuda" in block.code:
        import torch

        if not torch.cuda.is_available():
            # The documented file is for a GPU machine; the device name is still checked against the
            # validator's pattern, only "this torch has no CUDA" is an answer about this machine.
            monkeypatch.setattr(capture.load, "device_problem", lambda device: None)
    path = tmp_path / "doc.toml"
    path.write_text(block.code)
    exp = load_experiment(path)
    assert exp.name and exp.output_dir


# ------------------------------------------------------------------ bash: entry points and flags


def _commands(code: str) -> list[list[str]]:
    """Simple commands of a bash block: continuation lines joined, comments dropped, split at && || ; |."""
    text = code.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lex.whitespace_split = True
        lex.commenters = "#"
        cmd: list[str] = []
        for tok in lex:
            if tok in (";", "&&", "||", "|", "&"):
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(tok)
        if cmd:
            out.append(cmd)
    return out


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg


def _requirement_names() -> set[str]:
    cfg = _setup_cfg()
    lines = cfg["options"]["install_requires"].splitlines()
    for v in cfg["options.extras_require"].values():
        lines += v.splitlines()
    names = {re.split(r"[<>=!~\[ ;]", line.strip(), maxsplit=1)[0].lower() for line in lines}
    return {n for n in names if n and not n.startswith("#")}


@functools.lru_cache(maxsize=None)
def _help(*argv: str) -> str:
    r = subprocess.run(list(argv) + ["--help"], cwd=REPO, capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, f"{' '.join(argv)} --help failed: {r.stderr[-2000:]}"
    return r.stdout + r.stderr


def _flags(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--")]


def _check_flags(argv: list[str], help_text: str, what: str) -> None:
    known = set(re.findall(r"--[\w][\w-]*", help_text))
    unknown = [f for f in _flags(argv) if f not in known]
    assert not unknown, f"{what}: flags {unknown} are not accepted (see --help)"


def _check_python_m(module: str, args: list[str]) -> None:
    import importlib.util

    modules = [module]
    if "<" in module:  # `python -m bench.<name> --tiny`: every module of the package
        pkg = module.split(".<", 1)[0]
        modules = [f"{pkg}.{p.stem}" for p in sorted((REPO / pkg.replace(".", "/")).glob("*.py"))
                   if not p.stem.startswith("_")]
        assert modules, module
    for mod in modules:
        assert importlib.util.find_spec(mod) is not None, f"python -m {mod}: no such module"
        top = mod.split(".")[0]
        if (REPO / top).is_dir():  # the project's own entry points: their flags too
            _check_flags(args, _help(sys.executable, "-m", mod), f"python -m {mod}")


def _check_pip(args: list[str]) -> None:
    assert args and args[0] == "install", f"pip {args}: only `pip install` is documented"
    names = _requirement_names()
    it = iter(args[1:])
    for a in it:
        if a in ("-q", "--quiet", "-U", "--upgrade"):
            continue
        if a == "-e":
            a = next(it)
        m = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", a)
        if m:  # the project itself, with extras that must exist
            extras = set(filter(None, (m.group(1) or "").split(",")))
            missing = extras - set(_setup_cfg()["options.extras_require"])
            assert not missing, f"pip install {a}: setup.cfg has no extra {sorted(missing)}"
            continue
        name, version = a.split("==", 1) if "==" in a else (re.split(r"[<>=!~\[]", a)[0], "")
        name = name.lower()
        if name == "torch":  # the pin the README installs must be the torch the project is tested with
            import torch

            assert torch.__version__.split("+")[0] == version, f"pip install {a}: tests run torch {torch.__version__}"
            continue
        assert name in names, f"pip install {a}: not a dependency or extra of setup.cfg"


def _repo_file(path: str, what: str, *, executable: bool = False) -> None:
    p = REPO / path
    assert p.is_file(), f"{what}: {path} does not exist"
    if executable:
        assert os.access(p, os.X_OK), f"{what}: {path} is not executable"


#: Tools of the user's machine or cluster (not this project's): their file arguments must exist.
EXTERNAL = {"kubectl", "docker", "ssh", "sbatch", "srun", "cd", "export", "chmod", "mkdir", "eval"}


def _check_command(cmd: list[str]) -> None:
    env = {}
    while cmd and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", cmd[0]):
        k, v = cmd.pop(0).split("=", 1)
        env[k] = v
    if "LUIGI_CONFIG_PATH" in env:
        _repo_file(env["LUIGI_CONFIG_PATH"], "LUIGI_CONFIG_PATH")
    if not cmd:
        return
    prog, args = cmd[0], cmd[1:]
    what = " ".join(cmd)
    if prog in (".", "source"):
        assert args == [".venv/bin/activate"], f"{what}: activate the venv the README creates (.venv)"
    elif re.fullmatch(r"python(3(\.\d+)?)?", prog):
        assert prog in ("python", "python3.11"), f"{what}: the project runs on python3.11 (setup.cfg)"
        assert args[:1] == ["-m"], f"{what}: only `python -m module` is documented"
        module, rest = args[1], args[2:]
        if module == "venv":
            assert rest, what
        elif module == "pip":
            _check_pip(rest)
        else:
            _check_python_m(module, rest)
    elif prog == "pip":
        _check_pip(args)
    elif prog == "luigi":
        assert args[:1] == ["--module"], f"{what}: luigi --module <module> <Task>"
        module, task = args[1], args[2]
        text = _help(str(Path(sys.executable).with_name("luigi")), "--module", module, task)
        assert f"--{task}-" in text, f"{what}: luigi does not know task {task} in module {module}"
        _check_flags(args[3:], text, what)
    elif prog == "luigid":
        _check_flags(args, _help(str(Path(sys.executable).with_name("luigid"))), what)
    elif prog == "moe-atlas":
        sub = [a for a in args if not a.startswith("-")][:1]
        _check_flags(args, _help(sys.executable, "-m", "moe_atlas", *sub), what)
    elif "/" in prog:  # a script of the repository, e.g. deploy/luigid.sh
        _repo_file(prog, what, executable=True)
        r = subprocess.run(["bash", "-n", str(REPO / prog)], capture_output=True, text=True)
        assert r.returncode == 0, f"{what}: {r.stderr}"
    elif prog in EXTERNAL:
        for flag in ("-f",):
            if flag in args:
                _repo_file(args[args.index(flag) + 1], what)
    else:
        pytest.fail(f"{what}: no check for {prog!r}; teach tests/test_docs.py, or mark the block "
                    "<!-- docs-test: skip (reason) -->")


@pytest.mark.parametrize("block", _of("bash") + _of("sh"), ids=str)
def test_bash_block_names_entry_points_and_flags_that_exist(block):
    cmds = _commands(block.code)
    assert cmds, f"{block}: no command"
    for cmd in cmds:
        _check_command(list(cmd))


@pytest.mark.parametrize("cmd, message", [
    ("luigi --module tasks FullReprt", "does not know task FullReprt"),
    ("luigi --module tasks FullReport --experimnt x.toml", "--experimnt"),
    ("python -m bench.analyses --decisons 10", "--decisons"),
    ('pip install -e ".[tests]"', "no extra ['tests']"),
    ("pip install dask-kubernets", "not a dependency"),
    ("python -m deploy.slurm --gpu 1", "--gpu"),
    ("frobnicate --all", "no check for 'frobnicate'"),
    ("kubectl apply -f deploy/k8s.yaml", "deploy/k8s.yaml does not exist"),
])
def test_bash_checker_catches_broken_commands(cmd, message):
    """The checks above can fail: misspelt tasks, flags, extras and files are caught."""
    with pytest.raises((AssertionError, pytest.fail.Exception), match=re.escape(message)):
        for c in _commands(cmd):
            _check_command(c)
