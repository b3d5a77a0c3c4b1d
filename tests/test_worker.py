"""deploy.worker: what a Dask worker of a moe-atlas run does before its first task."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    from distributed import Client, LocalCluster
    from deploy.worker import PrepareWorker

    def probe():
        import storage
        from storage import RunLayout  # the package, not the worker's spill folder <local_directory>/storage
        return storage.__file__

    if __name__ == "__main__":
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None) as cluster, Client(cluster) as client:
            client.register_plugin(PrepareWorker(imports=()), name="prepare")
            print("STORAGE", client.submit(probe).result())
""")


def test_worker_imports_the_package_not_its_spill_folder(tmp_path):
    """From a folder outside the repository, a worker imports ``storage`` the project's package.

    Dask puts the worker's scratch folder first on sys.path and spills into
    ``<scratch>/storage``; with an editable install that folder used to win as a
    namespace package and ``from storage import RunLayout`` failed on the worker.
    """
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("STORAGE ")]
    assert line and line[0].endswith("storage/__init__.py"), out.stdout
