"""Rank 1 dies (SIGKILL) while rank 0 waits for it in a collective: the job must end, not hang."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    (out / f"pid{rank}").write_text(str(os.getpid()))
    dist.barrier()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(1)
    dist.all_reduce(torch.ones(1))  # never completes: its peer is gone
    (out / "rank0-finished").write_text("the collective returned without its peer")


if __name__ == "__main__":
    main()
