#!/usr/bin/env python3
"""The peer of `scripts/bench_elastic.py`'s recovery figure: TorchElastic (torchrun) on the same
machine. Three gloo workers all-reduce in a loop under `torchrun --standalone --nproc-per-node 3
--max-restarts 3` (default settings otherwise); one worker is killed with SIGKILL after 20 steps;
the time from the kill to the first step of the restarted group is measured. torchrun restarts every
worker (and its data position) from scratch; hcmoco keeps the survivors.

  $HCMOCO_VENV/bin/python scripts/bench_torchelastic.py --runs 5
"""
import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

WORKER = r'''
import os, sys, time
import torch, torch.distributed as dist
dist.init_process_group("gloo")
rank, restart = dist.get_rank(), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
print(f"pid {os.getpid()} rank {rank} restart {restart}", flush=True)
t = torch.ones(1 << 16)
for step in range(1_000_000):
    dist.all_reduce(t)
    time.sleep(0.03)
    if rank == 0:
        print(f"step {step} restart {restart} t {time.monotonic():.4f}", flush=True)
'''


def run_once(python):
    tmp = tempfile.mkdtemp()
    script = os.path.join(tmp, "worker.py")
    with open(script, "w") as f:
        f.write(WORKER)
    proc = subprocess.Popen(
        [python, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "3",
         "--max-restarts", "3", script],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = []
    threading.Thread(target=lambda: [lines.append((time.monotonic(), l)) for l in proc.stdout], daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        victim = None
        while time.monotonic() < deadline:
            steps = [l for _, l in lines if l.startswith("step ") and " restart 0 " in l]
            pids = [l.split()[1] for _, l in lines if l.startswith("pid ") and " rank 1 restart 0" in l]
            if len(steps) >= 20 and pids:
                victim = int(pids[0])
                break
            time.sleep(0.01)
        if victim is None:
            raise RuntimeError("no progress:\n" + "".join(l for _, l in lines[-20:]))
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        # torchrun restarts within seconds or not at all (its restarted workers time out on gloo's
        # connections, three times): 45 s is plenty either way.
        while time.monotonic() < t0 + 45:
            after = [t for t, l in lines if t > t0 and l.startswith("step ") and " restart 1 " in l]
            if after:
                return after[0] - t0
            time.sleep(0.01)
        errors = [l for _, l in lines if "Error" in l or "error" in l or "restart" in l.lower()]
        raise RuntimeError("no restart:\n" + "".join(errors[-30:]))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    vs, failed = [], []
    for _ in range(args.runs):
        try:
            vs.append(run_once(sys.executable))
        except RuntimeError as e:
            # A restart that never trains again is a result too: say why, once per run.
            why = [l for l in str(e).splitlines() if "RuntimeError" in l or "failed" in l]
            failed.append(why[-1] if why else str(e).splitlines()[0])
    print(f"torchrun: {len(vs)} of {args.runs} runs recovered; {len(failed)} never trained again")
    for f in failed:
        print(f"  failed: {f[:200]}")
    if vs:
        s = sorted(vs)
        print(f"torchrun recovery (kill -9 of 1 of 3 -> first step after the restart): median "
              f"{statistics.median(s):.2f} s, range {s[0]:.2f}-{s[-1]:.2f} s ({', '.join(f'{v:.2f}' for v in vs)})")


if __name__ == "__main__":
    main()
