"""Security properties, each checked against what actually happens.

- weights load from safetensors with every unpickler disabled, and pickle
  checkpoints (``pytorch_model.bin``, a ``.safetensors`` that is really a
  pickle) are refused without being unpickled: their payload, which would
  create a file when unpickled, never runs;
- ``trust_remote_code`` reaches transformers as False in every config, model
  and tokenizer load of a whole DAG run, and as True only when the experiment
  sets it;
- the Dask scheduler, nanny, workers and dashboard made by ``deploy.client()``
  listen on 127.0.0.1 only (read from /proc, not from Dask's own report);
- the luigid launcher and config that ship in ``deploy/`` bind 127.0.0.1 (the
  launcher is started and its sockets read from /proc), and no shipped
  document tells anyone to start luigid otherwise.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.numpy import load_file

import tasks
from pipeline_helpers import REPO, build, descendants, listening_sockets, tiny_model, wait_for  # noqa: F401

pytestmark = pytest.mark.slow

GOOD = "step_0012"


class _Payload:
    """Unpickling this creates ``path``: proof that someone unpickled it."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _refuse(*args, **kwargs):
    raise AssertionError("something tried to unpickle")


class _RefusingUnpickler:
    def __init__(self, *args, **kwargs):
        raise AssertionError("something tried to unpickle")


@pytest.fixture
def no_unpickling(monkeypatch):
    """Every unpickling entry point (pickle, torch) fails the test if called."""
    monkeypatch.setattr(pickle, "load", _refuse)
    monkeypatch.setattr(pickle, "loads", _refuse)
    monkeypatch.setattr(pickle, "Unpickler", _RefusingUnpickler)
    monkeypatch.setattr(torch, "load", _refuse)
    monkeypatch.setattr(torch.serialization, "load", _refuse)


def test_weights_load_without_unpickling(tiny_model, no_unpickling):
    from capture.load import describe_checkpoint, load_model, load_tokenizer

    ckpt = tiny_model / "checkpoints" / GOOD
    model = load_model(ckpt)
    info = describe_checkpoint(ckpt)
    tok = load_tokenizer(ckpt)
    assert info.num_experts == 4 and info.moe_layers == [0, 1]
    # The weights are the checkpoint's, not a fresh initialisation.
    stored = load_file(ckpt / "model.safetensors")
    loaded = dict(model.state_dict())
    gate = next(k for k in loaded if k.endswith("layers.1.mlp.gate.weight") or k.endswith("layers.1.block_sparse_moe.gate.weight"))
    torch.testing.assert_close(loaded[gate], torch.from_numpy(stored["model.layers.1.block_sparse_moe.gate.weight"]))
    assert tok("def f(x):")["input_ids"]


@pytest.mark.parametrize("form", ["pytorch_model.bin", "model.safetensors (torch.save)", "model.safetensors (pickle)"])
def test_pickle_checkpoints_are_refused_unopened(form, tiny_model, tmp_path):
    from capture.load import load_model

    marker = tmp_path / "unpickled"
    # The payload is live: unpickling it does create the marker.
    pickle.loads(pickle.dumps(_Payload(tmp_path / "control")))
    assert (tmp_path / "control").exists()

    d = tmp_path / "ckpt"
    shutil.copytree(tiny_model / "checkpoints" / GOOD, d)
    state = {k: torch.from_numpy(v) for k, v in load_file(d / "model.safetensors").items()}
    (d / "model.safetensors").unlink()
    if form == "pytorch_model.bin":
        torch.save({**state, "payload": _Payload(marker)}, d / "pytorch_model.bin")
    elif form == "model.safetensors (torch.save)":
        torch.save({**state, "payload": _Payload(marker)}, d / "model.safetensors")
    else:
        (d / "model.safetensors").write_bytes(pickle.dumps({"payload": _Payload(marker)}, protocol=4))
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_model(d)
    assert not marker.exists(), "the checkpoint was unpickled"


class _Spy:
    """Records the ``trust_remote_code`` every transformers loader receives."""

    def __init__(self, monkeypatch):
        import transformers

        self.calls: list[tuple[str, object]] = []
        targets = [(transformers.AutoConfig, "from_pretrained"), (transformers.AutoTokenizer, "from_pretrained"),
                   (transformers.AutoModelForCausalLM, "from_pretrained"),
                   (transformers.AutoModelForCausalLM, "from_config")]
        for cls, name in targets:
            monkeypatch.setattr(cls, name, self._wrap(f"{cls.__name__}.{name}", getattr(cls, name)))

    def _wrap(self, label, fn):
        def spy(*args, **kwargs):
            self.calls.append((label, kwargs.get("trust_remote_code", "absent")))
            return fn(*args, **kwargs)

        return spy


class _InProcessClient:
    """Stands in for the Dask client so that capture jobs run here, where the spy sees them."""

    class _Done:
        def __init__(self, value):
            self.value = value

        def result(self):
            return self.value

    def submit(self, fn, *args, key=None, pure=None, resources=None, **kwargs):
        return self._Done(fn(*args, **kwargs))

    def compute(self, obj):
        return self._Done(obj.compute())


@pytest.mark.parametrize("setting", [None, "false", "true"])
def test_trust_remote_code_only_when_the_experiment_sets_it(setting, tiny_model, tmp_path, monkeypatch):
    ckpt = tiny_model / "checkpoints" / GOOD
    exp = tmp_path / "x.toml"
    line = f"trust_remote_code = {setting}\n" if setting else ""
    exp.write_text(
        f'name = "x"\noutput_dir = "{tmp_path / "run"}"\n[model]\nsource = "checkpoints"\n{line}'
        f'[[model.checkpoints]]\nname = "a"\npath = "{ckpt}"\nstep = 0\n'
        f'[[datasets]]\nname = "d"\npath = "{tiny_model / "data" / "eval.jsonl"}"\n'
    )
    spy = _Spy(monkeypatch)
    monkeypatch.setattr(tasks, "_client", lambda exp: _InProcessClient())
    ok, errors = build(exp, [tasks.Capture(experiment=str(exp), checkpoint="a")])
    assert ok, errors
    # PrepareModel, Tokenize, RoutingTemplate and the capture job all loaded something.
    assert {label for label, _ in spy.calls} == {"AutoConfig.from_pretrained", "AutoTokenizer.from_pretrained",
                                                 "AutoModelForCausalLM.from_pretrained",
                                                 "AutoModelForCausalLM.from_config"}
    expected = setting == "true"
    assert all(value is expected for _, value in spy.calls), spy.calls


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dask_listens_on_loopback_only():
    import deploy

    deploy.close_client()
    me = os.getpid()
    before = {(ip, port) for ip, port, _ in listening_sockets(descendants(me))}
    client = deploy.client(n_workers=1, threads_per_worker=1, dashboard_port=_free_port(), announce=False)
    try:
        (worker, w), = client.scheduler_info()["workers"].items()
        port = lambda address: int(address.rsplit(":", 1)[1].split("/")[0])  # noqa: E731
        # What Dask reports...
        # TLS with this run's credentials (test_cluster.py shows a client without them is refused).
        assert client.scheduler.address.startswith("tls://127.0.0.1:")
        assert worker.startswith("tls://127.0.0.1:") and w["nanny"].startswith("tls://127.0.0.1:")
        assert deploy.dashboard_link().startswith("http://127.0.0.1:")
        # ...and what the kernel says: every socket the cluster opened listens on loopback only.
        opened = [(ip, p, pid) for ip, p, pid in listening_sockets(descendants(me)) if (ip, p) not in before]
        expected = {port(client.scheduler.address), port(worker), port(w["nanny"]), port(deploy.dashboard_link())}
        assert expected <= {p for _, p, _ in opened}, (expected, opened)
        assert client.run(os.getpid)[worker] in {pid for _, _, pid in opened}  # the worker process listens too
        assert all(ip == "127.0.0.1" for ip, _, _ in opened), opened
    finally:
        deploy.close_client()


def _shipped_luigid_commands() -> list[str]:
    """Every line of deploy/ and the README that starts luigid."""
    lines = []
    for f in [*sorted((REPO / "deploy").rglob("*")), REPO / "README.md"]:
        if f.is_file() and f.suffix in ("", ".md", ".sh", ".cfg", ".yaml", ".yml", ".py", ".txt", ".service"):
            for line in f.read_text(errors="replace").splitlines():
                if re.search(r"(^|[\s`$(;/])luigid\s+-", line):  # a command: luigid followed by options
                    lines.append(f"{f.name}: {line.strip()}")
    return lines


def test_luigid_config_binds_loopback(tmp_path):
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "deploy" / "luigid.cfg")
    assert cfg.get("core", "scheduler_host") == "127.0.0.1"
    assert cfg.getboolean("core", "local_scheduler") is False
    commands = _shipped_luigid_commands()
    assert commands, "no luigid command found in deploy/"
    for line in commands:
        assert re.search(r"--address[ =]127\.0\.0\.1\b", line), f"luigid started without --address 127.0.0.1: {line}"

    port = _free_port()
    env = dict(os.environ, LUIGID_PORT=str(port), LUIGID_STATE_DIR=str(tmp_path / "state"),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    proc = subprocess.Popen(["bash", str(REPO / "deploy" / "luigid.sh")], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: [s for s in listening_sockets(descendants(proc.pid)) if s[1] == port],
                 what="luigid to listen", timeout=60, proc=proc)
        # tornado binds every address family before listening: all of luigid's sockets are up now.
        found = listening_sockets(descendants(proc.pid))
        assert found and all(ip == "127.0.0.1" for ip, _, _ in found), found
        assert oct((tmp_path / "state").stat().st_mode & 0o777) == "0o700"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
