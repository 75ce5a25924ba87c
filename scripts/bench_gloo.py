"""torch.distributed gloo all-reduce, timed the way `hcmoco-worker bench allreduce` times ours.

One process per rank on loopback; for each size: warm-up iterations, a barrier, timed iterations; the
time is the slowest rank's mean. Prints the same line format:
    bytes=... time_ms=... algbw_GBps=... busbw_GBps=...
Usage: python bench_gloo.py --world 2 --sizes 16777216,67108864 --iters 20 --warmup 3
"""
import argparse
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rank_main(rank, world, port, sizes, iters, warmup, dtype):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    elem = torch.tensor([], dtype=dtype).element_size()
    for nbytes in sizes:
        t = torch.ones(max(nbytes // elem, 1), dtype=dtype)
        for _ in range(warmup):
            dist.all_reduce(t)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(t)
        mine = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        if rank == 0:
            secs = mine.item()
            algbw = t.numel() * elem / secs / 1e9
            busbw = algbw * 2 * (world - 1) / world
            print(f"bytes={t.numel() * elem} time_ms={secs * 1e3:.4f} algbw_GBps={algbw:.3f} busbw_GBps={busbw:.3f}", flush=True)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--sizes", default="16777216,67108864")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="f32", choices=["f32", "f64", "bf16"])
    a = p.parse_args()
    dtype = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16}[a.dtype]
    sizes = [int(s) for s in a.sizes.split(",")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(rank_main, args=(a.world, port, sizes, a.iters, a.warmup, dtype), nprocs=a.world, join=True)


if __name__ == "__main__":
    main()
