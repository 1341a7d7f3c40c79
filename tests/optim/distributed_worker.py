"""Two CPU processes over gloo, running torch.distributed cases on torchopt_lab and on torch.optim.

Run by ``tests/optim/test_distributed.py`` as ``python distributed_worker.py CASE OUT_DIR``; rank 0
writes ``OUT_DIR/CASE.pt``: for each backend, the final full parameters of torch.optim's run and of
ours, which the test compares. Every case runs both of our backends: the torch path and the Triton
path (under the Triton interpreter on CPU).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import torchopt_lab.optim as topt

WORLD = 2
STEPS = 3
BACKENDS = ("torch", "triton")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _batch(step: int, rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(6, 8, generator=generator)


def _train(model: nn.Module, optimizer, steps: range, clip: float | None = None) -> None:
    for step in steps:
        loss = model(_batch(step, dist.get_rank())).pow(2).sum()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad()


def _full(model: nn.Module) -> list[torch.Tensor]:
    return [
        (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for p in model.parameters()
    ]


def case_ddp(backend: str) -> dict[str, list[torch.Tensor]]:
    """DistributedDataParallel: our Adam (with fused clipping) against torch.optim.Adam after
    torch's clip_grad_norm_, both over the all-reduced gradients."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    results = {}
    for name in ("torch", "ours"):
        model = DDP(_model())
        if name == "torch":
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.1)
            _train(model, optimizer, range(STEPS), clip=0.5)
        else:
            optimizer = topt.Adam(
                model.parameters(), lr=1e-2, weight_decay=0.1, backend=backend, max_grad_norm=0.5
            )
            _train(model, optimizer, range(STEPS))
        results[name] = _full(model.module)
    return results


def _sharded(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def case_fsdp2(backend: str) -> dict[str, list[torch.Tensor]]:
    """FSDP2 (``fully_shard``: DTensor parameters, each rank updates its shard) with
    ``max_grad_norm``: the clip uses the global norm over every rank's shard, as torch's
    clip_grad_norm_ on DTensors does."""
    results = {}
    for name in ("torch", "ours"):
        model = _sharded(_model())
        if name == "torch":
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
            _train(model, optimizer, range(STEPS), clip=0.1)
        else:
            optimizer = topt.AdamW(model.parameters(), lr=1e-2, backend=backend, max_grad_norm=0.1)
            _train(model, optimizer, range(STEPS))
        results[name] = _full(model)
    return results


def case_zero(backend: str) -> dict[str, list[torch.Tensor]]:
    """ZeroRedundancyOptimizer partitions the parameters and builds ``optimizer_class`` on each
    rank's partition; ours there against torch.optim's there."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    results = {}
    for name, optimizer_class, extra in (
        ("torch", torch.optim.RMSprop, {}),
        ("ours", topt.RMSprop, {"backend": backend}),
    ):
        model = DDP(_model())
        optimizer = ZeroRedundancyOptimizer(
            model.parameters(), optimizer_class=optimizer_class, lr=1e-2, momentum=0.9, **extra
        )
        _train(model, optimizer, range(STEPS))
        results[name] = _full(model.module)
    # Each rank's optimizer holds only its partition: a fused clip would use that partition's
    # norm, so max_grad_norm is refused there with a pointer to clip_grad_norm_.
    try:
        ZeroRedundancyOptimizer(
            _model().parameters(), optimizer_class=topt.Adam, max_grad_norm=1.0, backend=backend
        )
    except ValueError as error:
        results["refused"] = "ZeroRedundancyOptimizer" in str(error)
    else:
        results["refused"] = False
    return results


def case_checkpoint(backend: str) -> dict[str, list[torch.Tensor]]:
    """torch.distributed.checkpoint of an FSDP2 model's optimizer state, interchangeable with
    torch.optim's: ours saves after 2 steps and torch.optim resumes, and the other way round;
    both must end where 4 uninterrupted torch.optim steps end."""
    import tempfile

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    def ours(params):
        return topt.Adam(params, lr=1e-2, backend=backend)

    def theirs(params):
        return torch.optim.Adam(params, lr=1e-2)

    def run(first: Callable, second: Callable) -> list[torch.Tensor]:
        model = _sharded(_model())
        optimizer = first(model.parameters())
        _train(model, optimizer, range(2))
        with tempfile.TemporaryDirectory() as scratch:
            # Every rank needs the same directory: rank 0 chooses it.
            names = [scratch]
            dist.broadcast_object_list(names, src=0)
            dcp.save({"optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=names[0])
            resumed = second(model.parameters())
            state = {"optim": get_optimizer_state_dict(model, resumed)}
            dcp.load(state, checkpoint_id=names[0])
            set_optimizer_state_dict(model, resumed, state["optim"])
            dist.barrier()
        _train(model, resumed, range(2, 4))
        return _full(model)

    uninterrupted = _sharded(_model())
    _train(uninterrupted, theirs(uninterrupted.parameters()), range(4))
    return {
        "torch": _full(uninterrupted),
        "ours": run(ours, theirs),
        "ours_resumed": run(theirs, ours),
    }


CASES = {
    "ddp": case_ddp,
    "fsdp2": case_fsdp2,
    "zero": case_zero,
    "checkpoint": case_checkpoint,
}


def _worker(rank: int, case: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/rendezvous-{case}", rank=rank, world_size=WORLD
    )
    try:
        results = {backend: CASES[case](backend) for backend in BACKENDS}
        if rank == 0:
            torch.save(results, Path(out_dir) / f"{case}.pt")
        dist.barrier()  # both ranks are done before either tears the group down
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: gloo's threads can make it abort
    # ("terminate called without an active exception") on a busy machine, after the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    mp.spawn(_worker, args=(sys.argv[1], sys.argv[2]), nprocs=WORLD)
    os._exit(0)
