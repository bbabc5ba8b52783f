"""``peftcore apply --nproc-per-node N``: the same run on N local processes, started by torch's elastic launcher.

The launcher is ``torch.distributed.launcher.api.elastic_launch`` (what ``torchrun`` runs): it
picks a free rendezvous port, starts the workers, and stops them all when one fails. Each
worker runs the whole ``apply`` (same data, same seeds); training is DDP over the shards of each
global batch (see ``training_loop.fit``), rank 0 alone reports and writes the adapter.
"""

from __future__ import annotations

import os
import uuid

import torch

from peftcore.cli.errors import CliError


def in_worker() -> bool:
    """True inside a process started by torchrun / this launcher (it sets ``LOCAL_RANK``)."""
    return "LOCAL_RANK" in os.environ


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def launch(run_apply, request, nproc: int):
    """Run ``run_apply(request)`` on ``nproc`` local workers; returns rank 0's ``(results, out)``."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5)
    try:
        returned = elastic_launch(config, entrypoint=_worker)(run_apply, request)
    except ChildFailedError as exc:
        failures = "; ".join(f"rank {r}: {f.message or f'exit code {f.exitcode}'}" for r, f in exc.failures.items())
        raise CliError(f"a worker of the {nproc}-process run failed ({failures})",
                       "the worker's traceback is printed above; rerun without --nproc-per-node to debug") from None
    return returned[0]


def _worker(run_apply, request):
    """One rank: join the process group, run ``apply`` with its output and files left to rank 0."""
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    on_gpu = request.device is not None and request.device.startswith("cuda")
    if on_gpu:
        torch.cuda.set_device(local_rank)
        request.device = f"cuda:{local_rank}"
    # each rank takes its share of the cores instead of all of them
    torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ["LOCAL_WORLD_SIZE"])))
    dist.init_process_group("nccl" if on_gpu else "gloo")
    try:
        return run_apply(request, report=False)
    finally:
        dist.destroy_process_group()


def check_request(nproc: int, batch_size: int) -> None:
    if nproc > batch_size:
        raise CliError(f"--nproc-per-node {nproc} is more than --batch-size {batch_size}",
                       "each process takes a share of every batch: use a batch at least as large as the process count")
