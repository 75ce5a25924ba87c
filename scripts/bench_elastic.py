#!/usr/bin/env python3
"""Elastic recovery figures for docs/benchmarks.md, measured with the real binaries.

  recovery  kill -9 of one of three workers -> the survivors' first committed step (a new generation)
  join      a new worker process started -> the generation that includes it sealed, and its first step
  failover  kill -9 of the leader of two `hcmoco serve --etcd` -> the standby answers, and the first
            step committed under it

Each scenario runs --runs times; the median and the range are printed. Status is read from
`hcmoco status --job J --watch` (one block per change, timestamped as it arrives) or, for failover,
by polling the standby. Usage (after `cargo build --workspace --bins`):

  python3 scripts/bench_elastic.py [--runs 5] [--bin-dir DIR] [--scenarios recovery,join,failover]
"""
import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time

STEP_RE = re.compile(r"step (\d+)/(\d+)\s+epoch \d+\s+generation (\d+)\s+world (\d+)")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Watch:
    """`hcmoco status --watch`: (time, committed, generation, world) for every status it prints."""

    def __init__(self, bins, coordinator, job):
        self.seen = []
        self.proc = subprocess.Popen(
            [f"{bins}/hcmoco", "status", "--job", job, "--watch", "--coordinator", coordinator],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            m = STEP_RE.search(line)
            if m:
                self.seen.append((time.monotonic(), int(m[1]), int(m[3]), int(m[4])))

    def latest(self):
        return self.seen[-1] if self.seen else (0, 0, 0, 0)

    def wait(self, pred, limit=120):
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            for s in list(self.seen):
                if pred(s):
                    return s
            time.sleep(0.005)
        raise RuntimeError(f"timed out; last status {self.latest()}")

    def close(self):
        self.proc.kill()


REJOIN_MS = None


def job_file(tmp, data, min_w, max_w, steps):
    path = os.path.join(tmp, "job.toml")
    rejoin = f"[rendezvous]\nrejoin_ms = {REJOIN_MS}\n" if REJOIN_MS is not None else ""
    with open(path, "w") as f:
        f.write(f"""name = "bench-elastic"
steps = {steps}
global_batch = 12
[workers]
min = {min_w}
max = {max_w}
[[data.datasets]]
manifest = "{data}/manifest.json"
[model]
backbone = "hrnet_small"
embed_dim = 32
keypoint_hidden = 32
keypoint_blocks = 1
[data]
image_size = 0
[checkpoint]
dir = "{tmp}/ckpt"
every_steps = 0
""" + rejoin)
    return path


def start(cmd, log):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def serve(bins, tmp, name, etcd=None):
    port = free_port()
    addr = f"127.0.0.1:{port}"
    cmd = [f"{bins}/hcmoco", "serve", "--listen", addr]
    if etcd:
        cmd += ["--advertise", addr, "--etcd", etcd, "--etcd-prefix", "/bench", "--election-ttl-secs", "3"]
    return start(cmd, os.path.join(tmp, f"{name}.log")), addr


def submit(bins, addr, path, limit=30):
    deadline = time.monotonic() + limit
    while True:
        r = subprocess.run([f"{bins}/hcmoco", "submit", path, "--coordinator", addr], capture_output=True, text=True)
        if r.returncode == 0:
            return r.stdout.strip()
        if time.monotonic() > deadline:
            raise RuntimeError(r.stderr)
        time.sleep(0.1)


def worker(bins, tmp, coord, job, name):
    return start([f"{bins}/hcmoco-worker", "run", "--job", job, "--coordinator", coord],
                 os.path.join(tmp, f"{name}.log"))


def stop_all(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def recovery(bins, data):
    tmp = tempfile.mkdtemp()
    coord, addr = serve(bins, tmp, "serve")
    job = submit(bins, addr, job_file(tmp, data, 2, 3, 100000))
    ws = [worker(bins, tmp, addr, job, f"w{i}") for i in range(3)]
    w = Watch(bins, addr, job)
    try:
        w.wait(lambda s: s[1] >= 20 and s[3] == 3)
        committed = w.latest()[1]
        t0 = time.monotonic()
        ws[1].send_signal(signal.SIGKILL)
        s = w.wait(lambda s: s[0] > t0 and s[2] >= 2 and s[1] > committed)
        return s[0] - t0
    finally:
        w.close()
        stop_all(ws + [coord])
        shutil.rmtree(tmp, ignore_errors=True)


def join(bins, data):
    tmp = tempfile.mkdtemp()
    coord, addr = serve(bins, tmp, "serve")
    job = submit(bins, addr, job_file(tmp, data, 1, 3, 100000))
    ws = [worker(bins, tmp, addr, job, f"w{i}") for i in range(2)]
    w = Watch(bins, addr, job)
    try:
        w.wait(lambda s: s[1] >= 20 and s[3] == 2)
        t0 = time.monotonic()
        ws.append(worker(bins, tmp, addr, job, "w2"))
        sealed = w.wait(lambda s: s[0] > t0 and s[3] == 3)
        first = w.wait(lambda s: s[0] > sealed[0] and s[3] == 3 and s[1] > sealed[1])
        return sealed[0] - t0, first[0] - t0
    finally:
        w.close()
        stop_all(ws + [coord])
        shutil.rmtree(tmp, ignore_errors=True)


def failover(bins, data):
    tmp = tempfile.mkdtemp()
    cport, pport = free_port(), free_port()
    etcd = start(["etcd", "--name", "b", "--data-dir", f"{tmp}/etcd",
                  "--listen-client-urls", f"http://127.0.0.1:{cport}",
                  "--advertise-client-urls", f"http://127.0.0.1:{cport}",
                  "--listen-peer-urls", f"http://127.0.0.1:{pport}",
                  "--initial-advertise-peer-urls", f"http://127.0.0.1:{pport}",
                  "--initial-cluster", f"b=http://127.0.0.1:{pport}"], f"{tmp}/etcd.log")
    url = f"http://127.0.0.1:{cport}"
    a, a_addr = serve(bins, tmp, "a", url)
    job = submit(bins, a_addr, job_file(tmp, data, 2, 2, 100000))
    b, b_addr = serve(bins, tmp, "b", url)
    ws = [worker(bins, tmp, f"{a_addr},{b_addr}", job, f"w{i}") for i in range(2)]
    w = Watch(bins, a_addr, job)
    try:
        w.wait(lambda s: s[1] >= 20)
        _, committed, generation, _ = w.latest()
        t0 = time.monotonic()
        a.send_signal(signal.SIGKILL)
        w.close()
        answered = None
        while True:
            r = subprocess.run([f"{bins}/hcmoco", "status", "--job", job, "--coordinator", b_addr],
                               capture_output=True, text=True)
            now = time.monotonic()
            m = STEP_RE.search(r.stdout)
            if m:
                answered = answered or now
                if int(m[3]) > generation and int(m[1]) > committed:
                    return answered - t0, now - t0
            if now - t0 > 60:
                raise RuntimeError(f"no takeover: {r.stdout} {r.stderr}")
            time.sleep(0.02)
    finally:
        stop_all(ws + [a, b, etcd])
        shutil.rmtree(tmp, ignore_errors=True)


def summary(name, values):
    vs = sorted(values)
    print(f"{name}: median {statistics.median(vs):.2f} s, range {vs[0]:.2f}-{vs[-1]:.2f} s over {len(vs)} runs "
          f"({', '.join(f'{v:.2f}' for v in values)})", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--bin-dir", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "debug"))
    ap.add_argument("--scenarios", default="recovery,join,failover")
    ap.add_argument("--rejoin-ms", type=int, default=None, help="rendezvous.rejoin_ms (default: the job default)")
    args = ap.parse_args()
    global REJOIN_MS
    REJOIN_MS = args.rejoin_ms
    bins = args.bin_dir
    data = tempfile.mkdtemp()
    subprocess.run([f"{bins}/hcmoco-worker", "data", "synth", "--out", data, "--samples", "96", "--size", "48"],
                   check=True, capture_output=True)
    scenarios = args.scenarios.split(",")
    if "recovery" in scenarios:
        summary("recovery (kill -9 of 1 of 3 -> first step of the new generation)",
                [recovery(bins, data) for _ in range(args.runs)])
    if "join" in scenarios:
        js = [join(bins, data) for _ in range(args.runs)]
        summary("join (process start -> generation with it sealed)", [j[0] for j in js])
        summary("join (process start -> its first committed step)", [j[1] for j in js])
    if "failover" in scenarios:
        fs = [failover(bins, data) for _ in range(args.runs)]
        summary("failover (kill -9 of the leader -> the standby answers)", [f[0] for f in fs])
        summary("failover (kill -9 of the leader -> first step committed under the new leader)", [f[1] for f in fs])
    shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
