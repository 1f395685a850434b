"""Gradient accumulation all-reduces once per optimizer step, also when the DDP model is wrapped by
``torch.compile`` (then it is no ``DDP`` instance, and ``no_sync`` must go through the kept handle).
Two real gloo processes; all-reduces are counted with a DDP communication hook."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ACCUM, STEPS = 3, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, compile_model: bool, out) -> None:
    from workers.train import accumulate, wrap_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    raw = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model, ddp = wrap_model(raw, 2, torch.device("cpu"), compile_model)
    calls = []

    def counting_allreduce(state, bucket):
        calls.append(1)
        fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0] / 2)

    ddp.register_comm_hook(None, counting_allreduce)
    g = torch.Generator().manual_seed(rank)
    batches = iter(
        [
            (torch.randn(4, 8, generator=g), torch.randint(0, 4, (4,), generator=g))
            for _ in range(ACCUM * STEPS)
        ]
    )
    per_step = []
    for _ in range(STEPS):
        before = len(calls)
        accumulate(model, ddp, batches, ACCUM, F.cross_entropy)
        per_step.append(len(calls) - before)
        raw.zero_grad(set_to_none=True)
    out.put((rank, per_step))
    dist.destroy_process_group()


@pytest.mark.parametrize("compile_model", [False, True], ids=["eager", "compiled"])
def test_accumulation_all_reduces_once_per_optimizer_step(compile_model):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, compile_model, out)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=180) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
            if p.exitcode is None:
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    for _rank, per_step in results:
        # one bucket here (a tiny model): one all-reduce per optimizer step, never one per micro-batch
        assert per_step == [1] * STEPS, per_step
