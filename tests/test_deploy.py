"""deploy/: what a cluster would accept, checked without a cluster (issue 13).

- deploy/kubernetes.yaml against the Dask operator's DaskCluster CRD schema,
  validated as the API server does with strict field validation (kubectl's
  default): unknown fields are errors, ``int-or-string`` fields take either.
  The CRD is the one dask-kubernetes 2026.3.0 ships
  (``dask_kubernetes/operator/deployment/helm/dask-kubernetes-operator/crds/daskcluster.yaml``),
  kept verbatim in tests/data/dask_kubernetes/ with its licence; if
  dask-kubernetes is installed, its own copy is checked too.
- deploy/slurm.py through dask-jobqueue's ``job_script()``, and a worker
  started from that script's command line: it joins the launcher's scheduler
  over TLS, a client with the printed settings runs a task, one without them
  is refused.
- deploy/Dockerfile: the image kubernetes.yaml names, built from sources
  that exist, as the user the pods run as.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import re
import shlex
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import yaml  # a dependency of dask

from deploy import slurm

# Test extras (setup.cfg [test]); without them only the tests that need them are skipped.
needs_jobqueue = pytest.mark.skipif(importlib.util.find_spec("dask_jobqueue") is None,
                                    reason='dask-jobqueue is missing: pip install -e ".[test]"')

REPO = Path(__file__).resolve().parents[1]
CRD = Path(__file__).parent / "data" / "dask_kubernetes" / "daskcluster.yaml"
CRD_SHA256 = "2da8d66739b4c98c8aadb2d1653b6ae6171d35f4e6c17db14d5ab0873943b9c6"
K8S = REPO / "deploy" / "kubernetes.yaml"


# ------------------------------------------------------------------ Kubernetes


def _strict(schema):
    """The CRD's structural schema as the API server applies it, in JSON Schema terms.

    - ``x-kubernetes-int-or-string`` / ``format: int-or-string`` fields accept
      integers and strings (the schema writes them as strings);
    - with strict field validation an object's unknown fields are errors,
      unless it says ``x-kubernetes-preserve-unknown-fields``;
    - ``apiVersion``, ``kind`` and ``metadata`` at the root are the API
      server's own (implicit in every CRD schema).
    """
    s = copy.deepcopy(schema)
    for key, tp in (("apiVersion", "string"), ("kind", "string"), ("metadata", "object")):
        s["properties"].setdefault(key, {"type": tp})

    def walk(node):
        if isinstance(node, dict):
            if node.get("x-kubernetes-int-or-string") or node.get("format") == "int-or-string":
                node.pop("type", None)
                node.pop("format", None)
                node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(s)
    return s


def _crd_validator(path: Path):
    jsonschema = pytest.importorskip("jsonschema")
    crd = yaml.safe_load(path.read_text())
    assert crd["spec"]["names"]["kind"] == "DaskCluster"
    (version,) = [v for v in crd["spec"]["versions"] if v["served"]]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    return f'{crd["spec"]["group"]}/{version["name"]}', jsonschema.Draft7Validator(schema)


def _docs():
    return [d for d in yaml.safe_load_all(K8S.read_text()) if d]


def _errors(validator, doc) -> list[str]:
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc))


def _dask_cluster():
    (dc,) = [d for d in _docs() if d["kind"] == "DaskCluster"]
    return dc


def test_vendored_crd_is_the_published_one():
    assert hashlib.sha256(CRD.read_bytes()).hexdigest() == CRD_SHA256


def test_kubernetes_yaml_passes_the_daskcluster_crd_schema():
    api, validator = _crd_validator(CRD)
    dc = _dask_cluster()
    assert dc["apiVersion"] == api
    assert _errors(validator, dc) == []


def test_crd_check_rejects_what_the_api_server_rejects():
    """The check is not vacuous: the old YAML's integer GPU limit, an unknown field and a misspelt probe fail."""
    _, validator = _crd_validator(CRD)
    worker = lambda d: d["spec"]["worker"]["spec"]["containers"][0]  # noqa: E731
    bad_gpu = _dask_cluster()
    worker(bad_gpu)["resources"]["limits"]["nvidia.com/gpu"] = 1  # what deploy/kubernetes.yaml had
    assert any("nvidia.com/gpu" in e and "is not of type 'string'" in e for e in _errors(validator, bad_gpu))
    unknown = _dask_cluster()
    worker(unknown)["readinessProbes"] = worker(unknown).pop("readinessProbe")
    assert any("readinessProbes" in e for e in _errors(validator, unknown))
    no_port = _dask_cluster()
    del worker(no_port)["livenessProbe"]["httpGet"]["port"]
    assert any("'port' is a required property" in e for e in _errors(validator, no_port))
    named_port = _dask_cluster()  # int-or-string: a number is fine too
    worker(named_port)["livenessProbe"]["httpGet"]["port"] = 8788
    assert _errors(validator, named_port) == []


def test_installed_dask_kubernetes_crd_accepts_it_too():
    spec = importlib.util.find_spec("dask_kubernetes")
    if spec is None:
        pytest.skip("dask-kubernetes is not installed (the vendored CRD is checked above)")
    path = (Path(spec.origin).parent / "operator" / "deployment" / "helm" / "dask-kubernetes-operator" / "crds"
            / "daskcluster.yaml")
    _, validator = _crd_validator(path)
    assert _errors(validator, _dask_cluster()) == []


def test_pods_have_probes_the_shared_run_volume_and_only_their_own_peers():
    docs = _docs()
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"PersistentVolumeClaim", "DaskCluster", "NetworkPolicy"}
    claim = kinds["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every worker writes the same run directory
    dc = kinds["DaskCluster"]
    name = dc["metadata"]["name"]
    for role in ("scheduler", "worker"):
        pod = dc["spec"][role]["spec"]
        (c,) = pod["containers"]
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        for probe in ("readinessProbe", "livenessProbe"):
            get = c[probe]["httpGet"]
            assert get["path"] == "/health" and get["port"] in ports, (role, probe)
        # the dashboard the probes ask is the one the process serves
        if role == "worker":
            assert c["args"][c["args"].index("--dashboard-address") + 1] == str(ports["http-dashboard"])
            assert "--resources" in c["args"] and "GPU=1" in c["args"]
            assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        else:
            assert ports == {"tcp-comm": 8786, "http-dashboard": 8787}
        (vol,) = pod["volumes"]
        assert vol["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert {"name": vol["name"], "mountPath": "/runs"} in c["volumeMounts"]
        assert pod["securityContext"]["runAsNonRoot"] is True
    service = dc["spec"]["scheduler"]["service"]
    assert service["type"] == "ClusterIP"
    policy = kinds["NetworkPolicy"]["spec"]
    # The operator labels every pod of the cluster dask.org/cluster-name=<name>: the policy covers them all
    # and admits connections from them only.
    assert policy["podSelector"]["matchLabels"] == {"dask.org/cluster-name": name}
    assert policy["ingress"] == [{"from": [{"podSelector": {"matchLabels": {"dask.org/cluster-name": name}}}]}]
    assert service["selector"]["dask.org/cluster-name"] == name


# ------------------------------------------------------------------ Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = (REPO / "deploy" / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _ignored(rel: str) -> bool:
    import fnmatch

    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = rel.split("/")
    return any(fnmatch.fnmatch("/".join(parts[:i]), p.removeprefix("**/")) or
               fnmatch.fnmatch(parts[i - 1], p.removeprefix("**/"))
               for p in patterns for i in range(1, len(parts) + 1))


def test_dockerfile_builds_the_image_kubernetes_names_from_sources_that_exist():
    import configparser

    steps = _dockerfile()
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    version = cfg["metadata"]["version"]
    (base,) = [a for w, a in steps if w == "FROM"]
    # the Python the README's commands use (python3.11) and setup.cfg's python_requires allow
    assert base.startswith("python:3.11"), base
    assert cfg["options"]["python_requires"] == ">=3.11"
    # torch pinned like the README's install commands
    readme_pin = set(re.findall(r"pip install (torch==[\d.]+)", (REPO / "README.md").read_text()))
    docker_pin = set(re.findall(r"pip install (torch==[\d.]+)", " ".join(a for w, a in steps if w == "RUN")))
    assert docker_pin and docker_pin == readme_pin
    # every COPY source exists and is not excluded from the build context
    for w, a in steps:
        if w == "COPY":
            *srcs, _dest = shlex.split(a)
            for src in srcs:
                assert (REPO / src).exists(), src
                assert not _ignored(src), f"{src} is excluded by .dockerignore"
    # every package setup.cfg installs is copied in
    copied = {shlex.split(a)[0] for w, a in steps if w == "COPY"}
    for pkg in cfg["options.packages.find"]["include"].split():
        if not pkg.endswith(".*"):
            assert pkg in copied, f"package {pkg} is not copied into the image"
    # the image the Kubernetes profile and the Dockerfile's own build command name
    images = {c["image"] for role in ("scheduler", "worker")
              for c in _dask_cluster()["spec"][role]["spec"]["containers"]}
    assert images == {f"moe-atlas:{version}"}
    assert f"-t moe-atlas:{version}" in (REPO / "deploy" / "Dockerfile").read_text()
    # runs as the pods' (non-root) user
    (user,) = [a for w, a in steps if w == "USER"]
    uid = _dask_cluster()["spec"]["worker"]["spec"]["securityContext"]["runAsUser"]
    assert user.split(":")[0] == str(uid) != "0"
    assert [w for w, _ in steps].index("USER") > max(i for i, (w, _) in enumerate(steps) if w == "RUN")


def test_dockerignore_keeps_local_state_out_of_the_image():
    for rel in (".venv/bin/python", "runs/demo/routing.zarr", ".git/config", "capture/__pycache__/x.pyc"):
        assert _ignored(rel), rel
    for rel in ("capture/job.py", "luigi.cfg", "experiments/demo.toml", "setup.cfg"):
        assert not _ignored(rel), rel


# ------------------------------------------------------------------ SLURM

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_slurm_defaults_are_the_documented_ports():
    a = slurm.parse_args([])
    assert a.port == 8786 and a.dashboard_address == "127.0.0.1:8787"
    assert "8786" in slurm.__doc__ and "127.0.0.1:8787" in slurm.__doc__


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "--port = 70000"),
    (["--cores", "0"], "--cores = 0"),
    (["--gpus", "-1"], "--gpus = -1"),
])
def test_slurm_bad_flags_stop_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        slurm.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@needs_jobqueue
def test_slurm_refuses_a_credentials_dir_others_can_enter(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    with pytest.raises(slurm.LaunchError, match=r"shared: mode 755 lets other users in"):
        slurm.start(slurm.parse_args(["--credentials-dir", str(shared), "--port", "0"]))
    assert list(shared.iterdir()) == []


@pytest.fixture
def launch(tmp_path):
    pytest.importorskip("dask_jobqueue", reason='pip install -e ".[test]"')
    port, dash = _free_port(), _free_port()
    cred = tmp_path / "creds"
    a = slurm.parse_args(["--gpus", "1", "--cores", "2", "--memory", "2GB", "--host", "127.0.0.1",
                          "--port", str(port), "--dashboard-address", f"127.0.0.1:{dash}",
                          "--credentials-dir", str(cred)])
    la = slurm.start(a)
    try:
        yield la, port, dash
    finally:
        la.close()
    # everything this launch wrote is gone, the directory too (it made it)
    assert not cred.exists()


def test_slurm_job_script_and_addresses(launch):
    from pipeline_helpers import listening_sockets

    la, port, dash = launch
    # the scheduler is where the docs say, over TLS
    assert la.env["MOE_ATLAS_SCHEDULER"] == f"tls://127.0.0.1:{port}"
    # the dashboard link names the loopback address it is bound to, and nothing else listens on its port
    assert la.dashboard == f"http://127.0.0.1:{dash}/status"
    bound = {(ip, p) for ip, p, _ in listening_sockets([os.getpid()])}
    assert ("127.0.0.1", dash) in bound and not any(p == dash and ip != "127.0.0.1" for ip, p in bound)
    assert la.announce().splitlines()[0] == f"export MOE_ATLAS_SCHEDULER=tls://127.0.0.1:{port}"
    # deploy/README.md shows what the launcher prints: the same lines, in the same order
    doc = (REPO / "deploy" / "README.md").read_text()
    (shown,) = re.findall(r"```text\n(export MOE_ATLAS_SCHEDULER=.*?)```", doc, re.S)
    shape = lambda text: [line.split("=")[0] if line.startswith("export ") else line.split(":")[0]  # noqa: E731
                          for line in text.strip().splitlines()]
    assert shape(shown) == shape(la.announce())

    script = la.job_script()
    assert "#SBATCH --gres=gpu:1" in script
    assert "#SBATCH --cpus-per-task=2" in script
    (cmd,) = [line for line in script.splitlines() if "distributed.cli.dask_worker" in line]
    argv = shlex.split(cmd)
    assert argv[argv.index("distributed.cli.dask_worker") + 1] == la.env["MOE_ATLAS_SCHEDULER"]
    assert argv[argv.index("--resources") + 1] == "GPU=1"
    assert argv[argv.index("--protocol") + 1] == "tls://"
    cred = la.credentials_dir
    assert stat.S_IMODE(cred.stat().st_mode) == 0o700
    for flag in ("--tls-ca-file", "--tls-cert", "--tls-key"):
        path = Path(argv[argv.index(flag) + 1])
        assert path.parent == cred and stat.S_IMODE(path.stat().st_mode) == 0o600, flag
    for var in ("CA_FILE", "CLIENT__CERT", "CLIENT__KEY"):
        path = Path(la.env[f"DASK_DISTRIBUTED__COMM__TLS__{var}"])
        assert path.parent == cred and stat.S_IMODE(path.stat().st_mode) == 0o600, var


@pytest.mark.slow
def test_slurm_worker_from_the_job_script_joins_over_tls(launch, tmp_path):
    """Run the job script's worker command here (as sbatch would on a node) and use the cluster as moe-atlas does."""
    la, port, _ = launch
    (cmd,) = [line for line in la.job_script().splitlines() if "distributed.cli.dask_worker" in line]
    argv = shlex.split(cmd)
    argv[argv.index("--name") + 1] = "slurm-test-worker"
    log = tmp_path / "worker.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    with open(log, "wb") as f:
        worker = subprocess.Popen(argv + ["--host", "127.0.0.1", "--no-dashboard"], stdout=f,
                                  stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    try:
        # moe-atlas's own client (deploy.client) with the printed settings: it runs a task on the GPU worker
        code = ("import deploy; from distributed import Client\n"
                "c = deploy.client(announce=False)\n"
                "c.wait_for_workers(1, timeout=120)\n"
                "print(c.submit(lambda: 6 * 7, resources={'GPU': 1}).result(timeout=120))\n"
                "deploy.close_client()\n")
        ok = subprocess.run([sys.executable, "-c", code], env=dict(env, **la.env), cwd=REPO,
                            capture_output=True, text=True, timeout=300)
        assert ok.returncode == 0 and ok.stdout.strip().splitlines()[-1] == "42", \
            ok.stdout[-2000:] + ok.stderr[-3000:] + log.read_text(errors="replace")[-2000:]
        # without the credentials the scheduler refuses the connection
        bare = {k: v for k, v in env.items() if not k.startswith("DASK_DISTRIBUTED__COMM__TLS")}
        code = ("from distributed import Client\n"
                f"Client('tcp://127.0.0.1:{port}', timeout=5)\n")
        refused = subprocess.run([sys.executable, "-c", code], env=bare, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


@needs_jobqueue
def test_slurm_port_taken_stops_with_one_line(tmp_path):
    cred = tmp_path / "creds"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        a = slurm.parse_args(["--host", "127.0.0.1", "--port", str(port), "--dashboard-address", "127.0.0.1:0",
                              "--credentials-dir", str(cred)])
        with pytest.raises(slurm.LaunchError, match=rf"cannot start the Dask scheduler on port {port}: .*--port 0"):
            slurm.start(a)
    assert not cred.exists()  # the credentials it wrote, and the directory it made, are gone
