"""Start a Dask cluster on SLURM and print what moe-atlas needs to use it.

Usage (on a login node, in the project's environment with ``pip install -e ".[deploy]"``)::

    python -m deploy.slurm --jobs 4 --cores 8 --memory 64GB --gpus 1 --walltime 04:00:00 --interface ib0
    # prints the lines to export (keep this process running), e.g.
    #   export MOE_ATLAS_SCHEDULER=tls://10.1.2.3:8786
    #   export DASK_DISTRIBUTED__COMM__TLS__CA_FILE=~/.moe-atlas/slurm/8786/cert.pem  (and ..CLIENT__CERT, ..KEY)
    #   dashboard: http://127.0.0.1:8787/status (on the login node; ssh -L 8787:127.0.0.1:8787 login-node)
    python -m deploy.slurm --gpus 1 --dry-run      # print the job script sbatch would get, start nothing

The scheduler runs in this process, workers are SLURM jobs. Workers with GPUs
advertise a ``GPU`` resource, so that capture jobs (one per checkpoint) get one
device each.

Where it listens: the scheduler on ``--port`` (default **8786**; ``0`` = any
free port) of the interface the compute nodes reach (``--interface``, or
``--host``); the dashboard on ``--dashboard-address`` (default
``127.0.0.1:8787``: reach it with an SSH tunnel). The addresses printed are
the ones actually bound.

Security: a Dask scheduler runs the code any client sends it, and a login node
is shared with every user of the machine. The cluster therefore speaks TLS with
credentials made for this launch only (``distributed.Security.temporary()``);
workers and moe-atlas read them from ``--credentials-dir`` (default
``~/.moe-atlas/slurm/<port>``, made ``0700``, files ``0600``), which must be
on a file system the compute nodes share. The files are removed when this
process ends.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

#: The scheduler port the docs promise (distributed's default); ``--port 0`` takes any free one.
DEFAULT_PORT = 8786
DEFAULT_DASHBOARD = "127.0.0.1:8787"


class LaunchError(RuntimeError):
    """A setting or environment the SLURM launcher cannot work with; the message is one line."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m deploy.slurm", description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=2, help="SLURM jobs to submit (one worker each)")
    p.add_argument("--cores", type=int, default=4, help="cores per job (threads of its worker)")
    p.add_argument("--memory", default="32GB", help="memory per job")
    p.add_argument("--gpus", type=int, default=0, help="GPUs per job (--gres=gpu:N; workers advertise GPU=N)")
    p.add_argument("--walltime", default="02:00:00")
    p.add_argument("--queue", default=None, help="SLURM partition")
    p.add_argument("--account", default=None)
    p.add_argument("--interface", default=None,
                   help="network interface of the scheduler and workers that the compute nodes reach (e.g. ib0)")
    p.add_argument("--host", default=None, help="address the scheduler binds instead of --interface's")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"scheduler port (default {DEFAULT_PORT}; 0 = any free port)")
    p.add_argument("--dashboard-address", default=DEFAULT_DASHBOARD,
                   help=f"host:port of the dashboard (default {DEFAULT_DASHBOARD}: this machine only)")
    p.add_argument("--credentials-dir", default=None,
                   help="private directory on a shared file system for this launch's TLS credentials "
                        "(default ~/.moe-atlas/slurm/<port>)")
    p.add_argument("--dry-run", action="store_true", help="print the job script and exit; submit nothing")
    a = p.parse_args(argv)
    for key, low in (("jobs", 0), ("cores", 1), ("gpus", 0)):
        if getattr(a, key) < low:
            p.error(f"--{key} = {getattr(a, key)}: expected at least {low}")
    if not 0 <= a.port <= 65535:
        p.error(f"--port = {a.port}: expected a TCP port 1..65535 (or 0 for any free port)")
    return a


def _private_dir(path: Path) -> bool:
    """Make ``path`` a directory only this user can use; True if it was created here.

    An existing directory must belong to this user and give nobody else any
    access: another user who can write there could swap the credentials.
    """
    created = not path.exists()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise LaunchError(f"--credentials-dir {path}: not a directory")
    if st.st_uid != os.getuid():
        raise LaunchError(f"--credentials-dir {path}: belongs to uid {st.st_uid}, not to you")
    if created:
        path.chmod(0o700)  # mkdir's mode is masked by the umask
    elif st.st_mode & 0o077:
        raise LaunchError(f"--credentials-dir {path}: mode {stat.S_IMODE(st.st_mode):o} lets other users in; "
                          "chmod 700 it or choose another directory")
    return created


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


@dataclass
class Launch:
    """A started scheduler: the cluster, what a client must export, and the files this launch made."""

    cluster: object
    env: dict[str, str]
    dashboard: str
    credentials_dir: Path
    made: list[Path] = field(default_factory=list)
    made_dir: bool = False

    def job_script(self) -> str:
        return self.cluster.job_script()

    def announce(self) -> str:
        lines = [f"export {k}={v}" for k, v in self.env.items()]
        lines.append(f"dashboard: {self.dashboard}")
        return "\n".join(lines)

    def close(self) -> None:
        """Stop the cluster (cancelling its jobs) and remove the credentials this launch wrote."""
        try:
            self.cluster.close()
        finally:
            # dask-jobqueue's copies of the credentials for the workers are temporary files it keeps open
            # (deleted when closed); close them now rather than whenever the cluster is garbage-collected.
            for key in ("ca_file", "cert", "key"):
                handle = getattr(self.cluster, f"_job_{key}", None)
                if handle is not None:
                    handle.close()
            for p in self.made:
                p.unlink(missing_ok=True)
            if self.made_dir:
                try:
                    self.credentials_dir.rmdir()  # only if empty: never remove what others put there
                except OSError:
                    pass


def start(a: argparse.Namespace) -> Launch:
    """Start the scheduler of a SLURM cluster (no job submitted yet) with this launch's TLS credentials.

    Raises
    ------
    LaunchError
        dask-jobqueue missing, the credentials directory unusable, or the port taken; one line.
    """
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:  # optional dependency
        raise LaunchError('deploy.slurm needs dask-jobqueue: pip install -e ".[deploy]"') from exc
    from distributed import Security

    if a.port:
        _check_port(a.host or "", a.port)
    cred = Path(a.credentials_dir or Path.home() / ".moe-atlas" / "slurm" / str(a.port or os.getpid()))
    cred = cred.expanduser().absolute()
    try:
        security = Security.temporary()
    except ImportError as exc:
        raise LaunchError("the cluster's TLS credentials need the 'cryptography' package: pip install cryptography") \
            from exc
    made_dir = _private_dir(cred)
    # One self-signed certificate is this launch's CA and everyone's certificate (Security.temporary()).
    cert, key = cred / "cert.pem", cred / "key.pem"
    made: list[Path] = []
    try:
        for path, text in ((cert, security.tls_client_cert), (key, security.tls_client_key)):
            _write_private(path, text)
            made.append(path)
    except FileExistsError as exc:
        for p in made:
            p.unlink()
        raise LaunchError(f"--credentials-dir {cred}: {exc.filename} exists (another launch is running there?); "
                          "choose another directory") from exc

    scheduler_options = {"port": a.port, "dashboard_address": a.dashboard_address}
    if a.host:
        scheduler_options["host"] = a.host
    extra = ["--resources", f"GPU={a.gpus}"] if a.gpus else []
    try:
        cluster = SLURMCluster(
            cores=a.cores, processes=1, memory=a.memory, walltime=a.walltime, queue=a.queue, account=a.account,
            interface=a.interface, job_extra_directives=[f"--gres=gpu:{a.gpus}"] if a.gpus else [],
            worker_extra_args=extra, scheduler_options=scheduler_options,
            security=security, protocol="tls://",
            # jobqueue writes the workers' copy of the credentials here (0600 temporary files)
            shared_temp_directory=str(cred),
            job_script_prologue=["export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false"],
        )
    except Exception as exc:
        for p in made:
            p.unlink()
        if made_dir:
            try:
                cred.rmdir()
            except OSError:  # jobqueue's own temporary files are still open; they go with it
                pass
        bind = _os_error(exc)
        if bind is None:
            raise
        raise LaunchError(f"cannot start the Dask scheduler on port {a.port}: {bind} (another scheduler there? "
                          "pass --port N, or --port 0 for any free port)") from exc

    address = cluster.scheduler_address
    env = {
        "MOE_ATLAS_SCHEDULER": address,
        "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(cert),
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(cert),
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(key),
    }
    return Launch(cluster, env, _dashboard(cluster, a.dashboard_address), cred, made, made_dir)


def _check_port(host: str, port: int) -> None:
    """Fail early, before any credentials are written, when the scheduler's port is taken."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as distributed's listener does
        try:
            s.bind((host, port))
        except OSError as exc:
            raise LaunchError(f"cannot start the Dask scheduler on port {port}: {exc.strerror} (another scheduler "
                              "there? pass --port N, or --port 0 for any free port)") from exc


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError (e.g. address in use) behind distributed's "Scheduler failed to start", if any."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
    return None


def _dashboard(cluster, requested: str) -> str:
    """The dashboard's link on the host it is bound to (distributed's own link names the scheduler's interface)."""
    port = cluster.scheduler.http_server.port
    host = requested.rsplit(":", 1)[0] if ":" in requested else ""
    if host in ("", "0.0.0.0", "::", "[::]"):
        import socket

        host = socket.gethostname()  # every interface: name the machine
    return f"http://{host}:{port}/status"


def main(argv=None) -> None:
    a = parse_args(argv)
    try:
        launch = start(a)
    except LaunchError as exc:
        raise SystemExit(f"deploy.slurm: {exc}") from None
    try:
        if a.dry_run:
            print(launch.job_script(), flush=True)
            return
        launch.cluster.scale(jobs=a.jobs)
        print(launch.announce(), flush=True)
        print("keep this process running; Ctrl-C stops the cluster and cancels its jobs", file=sys.stderr,
              flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        launch.close()


if __name__ == "__main__":
    main()
