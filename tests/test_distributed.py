"""FFRLoss under DistributedDataParallel: two CPU processes (gloo) train a small CIFAR ResNet
for a few steps; parameters must stay identical across ranks, and each rank's penalty must
equal the single-process penalty of the same weights on that rank's batch.

Robust under load (a rank once aborted with "terminate called without an active exception"
on a loaded machine): the ranks meet at a barrier before tearing the process group down,
so neither closes its gloo connections while the other still reads from them (gloo aborts
the process when a peer vanishes mid-operation); the timeout allows for a slow machine;
the rendezvous is a file, so no port can be taken by another test run."""
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from ffr_fast import FFRLoss
from ffr_fast.models import CifarResNet

WORLD_SIZE, STEPS = 2, 3
TIMEOUT = timedelta(minutes=5)  # a loaded machine; a hang still ends with a clear error
OPTIONS = dict(grad_weight=0.5, curv_weight=0.5)


def small_resnet() -> CifarResNet:
    return CifarResNet(depth=20, width=4)  # three chains of three blocks


def train_on_rank(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD_SIZE, timeout=TIMEOUT)
    try:
        torch.manual_seed(0)  # the same initial weights on every rank
        model, single = small_resnet(), small_resnet()
        initial = [p.detach().clone() for p in model.parameters()]
        ddp = DistributedDataParallel(model)
        example = torch.randn(4, 3, 16, 16)
        ffr = FFRLoss(ddp, example_inputs=example, **OPTIONS)
        with FFRLoss(model, example_inputs=example, **OPTIONS) as on_inner_module:
            same_layers = (ffr.model is model and ffr.layer_names
                           and ffr.layer_names == on_inner_module.layer_names)
        single_ffr = FFRLoss(single, **OPTIONS)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        batches = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
        penalties, single_penalties = [], []
        for _ in range(STEPS):
            x = torch.randn(4, 3, 16, 16, generator=batches)
            y = torch.randint(0, 10, (4,), generator=batches)
            single.load_state_dict(model.state_dict())
            single(x)
            single_penalties.append(single_ffr().item())
            out = ddp(x)
            penalty = ffr()
            loss = F.cross_entropy(out, y) + penalty
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            penalties.append(penalty.item())
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(WORLD_SIZE)]
        dist.all_gather(gathered, flat)
        torch.save({
            "same_layers": same_layers,
            "chains": [len(c.names) for c in ffr.chains],
            "penalties": penalties,
            "single_penalties": single_penalties,
            "parameters_equal_across_ranks": all(torch.equal(g, gathered[0]) for g in gathered),
            "parameters_moved": any(not torch.equal(p, p0)
                                    for p, p0 in zip(model.parameters(), initial)),
        }, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # both ranks are done communicating before either tears down
    finally:
        dist.destroy_process_group()


def test_ffr_loss_under_ddp(tmp_path):
    mp.spawn(train_on_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE,
             join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    for result in results:
        assert result["same_layers"]
        assert result["chains"] == [4, 3, 3]  # the first stage starts at the stem's output
        assert result["parameters_equal_across_ranks"] and result["parameters_moved"]
        assert len(result["penalties"]) == STEPS
        for penalty, single in zip(result["penalties"], result["single_penalties"]):
            assert abs(penalty - single) <= 1e-6 * abs(single) and single > 0
    # the ranks saw different batches, so equal penalties would mean a broken setup
    assert results[0]["penalties"] != results[1]["penalties"]
