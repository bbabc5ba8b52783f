"""Start 2-rank jobs for the tests: free ports, a hard timeout, and no process left behind.

Each job runs in its own session and carries a job id in its environment; whatever
happens (success, failure, timeout) every process with that id is killed before the
helper returns, so a hung rank cannot outlive its test. The id, not the process group:
torch's elastic agent starts ranks in sessions of their own, and a rank orphaned by
its launcher would otherwise keep the output pipe open and the test waiting forever.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


JOB_ID = "PEFTCORE_TEST_JOB"


def _kill_job(job: str, launcher: int) -> None:
    """SIGKILL the launcher's group and every process whose environment names ``job``."""
    import psutil  # accelerate's dependency

    try:
        os.killpg(launcher, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for process in psutil.process_iter():
        try:
            if process.environ().get(JOB_ID) == job:
                process.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass


def run_job(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``argv`` in a new session; kill all of the job when it ends or after ``timeout`` seconds."""
    job = uuid.uuid4().hex
    proc = subprocess.Popen(argv, cwd=REPO, env={**_env(), JOB_ID: job}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        _kill_job(job, proc.pid)
        output, _ = proc.communicate(timeout=60)  # every writer of the pipe is gone now
        timed_out = True
    finally:
        _kill_job(job, proc.pid)  # stragglers of a finished job
    result = subprocess.CompletedProcess(argv, -9 if timed_out else proc.returncode, output, None)
    result.timed_out = timed_out
    return result


def torchrun(script: str, *args: str, nproc: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    """``torchrun --standalone`` picks a free rendezvous port itself; no restarts, so a failure ends the job."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--max-restarts=0", str(HERE / script), *args]
    return run_job(argv, timeout)


def accelerate_launch(config: str, script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / config),
            "--main_process_port", str(free_port()), str(HERE / script), *args]
    return run_job(argv, timeout)


def check(result: subprocess.CompletedProcess) -> None:
    tail = "\n".join(result.stdout.splitlines()[-60:])
    assert not result.timed_out, f"job timed out:\n{tail}"
    assert result.returncode == 0, f"job failed ({result.returncode}):\n{tail}"
