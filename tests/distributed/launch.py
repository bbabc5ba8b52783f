"""Start 2-rank jobs for the tests: free ports, a hard timeout, and no process left behind.

Each job runs in its own session (process group); whatever happens (success, failure,
timeout) the whole group is killed before the helper returns, so a hung rank cannot
outlive its test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
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


def run_job(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``argv`` in a new session; kill the whole session when it ends or after ``timeout`` seconds."""
    proc = subprocess.Popen(argv, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        timed_out = True
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of a finished job
        except ProcessLookupError:
            pass
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
