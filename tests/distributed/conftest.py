import pytest


@pytest.fixture(scope="session")
def references(tmp_path_factory):
    """1-process adapters over the same global batches, trained once per method (see train_worker)."""
    import train_worker

    made = {}

    def get(method: str):
        if method not in made:
            made[method] = tmp_path_factory.mktemp(f"reference-{method}")
            train_worker.single_process_adapter(method, made[method])
        return made[method]

    return get


@pytest.fixture(scope="session")
def deepspeed_ops():
    """DeepSpeed's CPU collective op, compiled once before any 2-rank DeepSpeed job.

    On a fresh machine DeepSpeed JIT-compiles it when a job starts (minutes on 2 cores):
    inside a job that eats the job's timeout. Compiled here, the jobs find it cached.
    """
    import subprocess
    import sys

    from launch import _env

    pytest.importorskip("deepspeed")

    code = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
