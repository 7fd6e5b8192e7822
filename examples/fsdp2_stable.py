"""FSDP2 + gradstats.StableOptimizer: a small training run on 2 processes.

    torchrun --nproc_per_node 2 examples/fsdp2_stable.py            # CPU (gloo) or GPUs (nccl)
    torchrun --nproc_per_node 2 examples/fsdp2_stable.py --nan-step 5

The gradients are FSDP2 DTensor shards. ``StableOptimizer`` computes the *global* gradient
statistics from the local shards with one fused pass plus one small all-reduce (and one
MAX for max-abs), so every rank clips with the same coefficient and skips the same steps.
``--nan-step k`` puts a NaN into rank 1's gradient shard at step k: every rank skips that
step and the weights stay untouched.
"""
import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import gradstats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-norm", type=float, default=0.25)
    ap.add_argument("--nan-step", type=int, default=3,
                    help="step at which rank 1 gets a NaN gradient (-1: never)")
    ap.add_argument("--width", type=int, default=64)
    args = ap.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = torch.device("cuda" if use_cuda else "cpu")
    mesh = init_device_mesh(device.type, (world,))

    torch.manual_seed(0)  # same initial weights on every rank (FSDP2 shards them)
    w = args.width
    model = torch.nn.Sequential(
        torch.nn.Linear(16, w), torch.nn.GELU(),
        torch.nn.Linear(w, w), torch.nn.GELU(),
        torch.nn.Linear(w, 4)).to(device)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    teacher = torch.randn(16, 4, device=device)

    opt = gradstats.StableOptimizer(
        torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, fused=True),
        max_norm=args.max_norm)

    gen = torch.Generator(device="cpu").manual_seed(1234 + rank)  # each rank: its own data
    for step in range(args.steps):
        x = torch.randn(32, 16, generator=gen).to(device)
        y = torch.tanh(x @ teacher)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if step == args.nan_step and rank == min(1, world - 1):
            next(iter(model.parameters())).grad.to_local().view(-1)[0] = float("nan")
        opt.step()
        opt.zero_grad()
        rec = opt.last_stats.to_dict()  # one device->host copy (for printing only)
        if rank == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}  grad norm {rec['total_norm']:.4f}"
                  f"  clip {min(rec['clip_coef']):.3f}  skipped {rec['skipped']}",
                  flush=True)
        if step == args.nan_step:  # every rank made the same decision
            flags = [None] * world
            dist.all_gather_object(flags, bool(rec["skipped"]))
            assert all(flags), flags
    summary = opt.summary()
    if rank == 0:
        print("summary:", summary)
        print("done")
    dist.barrier()
    print(f"rank {rank}: finished", flush=True)
    # Note: with torch 2.13 on CPU/gloo a process occasionally aborts at interpreter exit
    # after this point ("terminate called without an active exception"); it happens with a
    # torch-only FSDP2 script too and loses nothing: every rank has finished.
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
