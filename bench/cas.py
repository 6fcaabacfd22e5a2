#!/usr/bin/env python3
"""Content-addressed transfers (issue 19): bytes on the wire and store size when most of the
data is already on the other side, and a fetch killed half way then resumed.

One coordinator (`serve`) and one agent (snapshot backend) on 127.0.0.1, release binaries;
steps sent with `pype-coordinator step run`. Bytes on the wire are the coordinator's
`transfer done ... wire_bytes=` log fields (manifest, blob headers and payloads); the bytes a
killed fetch had received are what its blob spool held when it was killed.

  (a) re-harvest of a directory of FILES files (SIZE/FILES each) with 10 files changed;
  (b) a 1 MiB edit in the middle of one SIZE file, re-harvested;
  (c) fetch of a new snapshot whose files the agent holds under another snapshot;
  (d) a 2*SIZE fetch killed at about half way (SIGKILL of the agent), then resumed by a new
      agent process on the same state dir; compared with a full fetch of the same size;
  (e) the store's size after two runs whose outputs differ in 1%, against after one.

Usage: cargo build --release --locked && python3 bench/cas.py [--size-mib 1024] [--files 1000]
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
COORD = os.path.join(BIN, "pype-coordinator")
AGENT = os.path.join(BIN, "pype-agent")
MIB = 1 << 20


def sh(cmd):
    subprocess.run(cmd, shell=True, check=True)


def du(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except FileNotFoundError:
                pass
    return total


class Cluster:
    def __init__(self, work):
        self.work = work
        self.state = os.path.join(work, "coord")
        self.log = open(os.path.join(work, "coord.log"), "w+")
        self.env = dict(os.environ, RUST_LOG="warn,coordinator=info,agent=info")
        self.coord = subprocess.Popen(
            [COORD, "--state-dir", self.state, "serve", "--listen", "127.0.0.1:0"],
            stderr=self.log, env=self.env)
        self.addr = self.wait_log("coordinator listening").split("addr=")[1].split()[0]
        self.registry = os.path.join(work, "registry.json")
        self.agent_state = os.path.join(work, "agent")
        self.agent = None
        self.start_agent()

    def wait_log(self, needle, n=1, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            with open(self.log.name) as f:
                hits = [line for line in f if needle in line]
            if len(hits) >= n:
                return hits[n - 1]
            time.sleep(0.05)
        raise RuntimeError(f"no {needle!r} in the coordinator's log")

    def start_agent(self):
        token = subprocess.run([COORD, "--state-dir", self.state, "token", "create"],
                               check=True, capture_output=True, text=True).stdout.strip()
        env = dict(self.env, PYPE_OVERLAY_MODE="snapshot",
                   PYPE_SNAPSHOT_REGISTRY=os.path.join(self.work, "agent-registry.json"))
        joined = self.count("agent joined")
        self.agent_log = open(os.path.join(self.work, "agent.log"), "a")
        self.agent = subprocess.Popen(
            [AGENT, "run", "--coordinator", self.addr, "--ca", os.path.join(self.state, "ca.pem"),
             "--token", token, "--state-dir", self.agent_state, "--name", "bench"],
            stderr=self.agent_log, env=env)
        self.wait_log("agent joined", joined + 1)

    def count(self, needle):
        with open(self.log.name) as f:
            return sum(needle in line for line in f)

    def step(self, command, inputs=(), outputs=(), check=True):
        path = os.path.join(self.work, f"step-{time.monotonic_ns()}.toml")
        with open(path, "w") as f:
            f.write(f"command = {json.dumps(command)}\ninputs = {json.dumps(list(inputs))}\n"
                    f"outputs = {json.dumps(list(outputs))}\n")
        return subprocess.run([COORD, "--state-dir", self.state, "step", "run", "--agent", "bench",
                               path, "--registry", self.registry],
                              check=check, capture_output=True, text=True)

    def wire(self, direction):
        """Wire bytes of the last transfer logged in `direction`."""
        with open(self.log.name) as f:
            lines = [line for line in f if "transfer done" in line and f'direction="{direction}"' in line]
        return int(re.search(r"wire_bytes=(\d+)", lines[-1]).group(1)), len(lines)

    def stop(self):
        for p in (self.agent, self.coord):
            if p and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = ap.parse_args()
    for b in (COORD, AGENT):
        if not os.path.exists(b):
            sys.exit(f"missing {b}: run `cargo build --release --locked` first")
    size = args.size_mib * MIB
    work = tempfile.mkdtemp(prefix="pype-cas-", dir=os.environ.get("BENCH_DIR", "/var/tmp"))
    rows = []
    try:
        data = os.path.join(work, "data")
        out = os.path.join(work, "out")
        os.makedirs(f"{data}/many")
        os.makedirs(out)
        per = size // args.files
        for i in range(args.files):
            sh(f"head -c {per} /dev/urandom > {data}/many/f{i:04}")
        sh(f"head -c {size} /dev/urandom > {data}/big")
        sh(f"head -c {2 * size} /dev/urandom > {data}/huge")
        c = Cluster(work)

        # (a) and (e): a directory harvested, then again with 10 files changed.
        c.step(f"cp -r {data}/many {out}/run1", outputs=[f"{out}/run1"])
        first, _ = c.wire("store")
        store_one = du(os.path.join(c.state, "snapshots"))
        changed = " && ".join(f"head -c {per} /dev/urandom > {out}/run2/f{i:04}"
                              for i in range(0, args.files, args.files // 10)[:10])
        c.step(f"cp -r {data}/many {out}/run2 && {changed}", outputs=[f"{out}/run2"])
        second, _ = c.wire("store")
        store_two = du(os.path.join(c.state, "snapshots"))
        rows.append(("(a) re-harvest, 10 of %d files changed" % args.files, second, size, 0.02))

        # (b) a 1 MiB edit in the middle of a large file.
        c.step(f"mkdir -p {out}/b1 && cp {data}/big {out}/b1/big", outputs=[f"{out}/b1"])
        c.step(f"mkdir -p {out}/b2 && cp {data}/big {out}/b2/big && "
               f"head -c {MIB} /dev/urandom | dd of={out}/b2/big bs=1M seek={args.size_mib // 2} "
               f"conv=notrunc status=none", outputs=[f"{out}/b2"])
        edit, _ = c.wire("store")
        rows.append(("(b) 1 MiB edit in the middle of one file", edit, size, 0.03))

        # (c) the agent fetches run1, then a new snapshot of the same files laid out anew.
        # Times: the first fetch moves every byte; the second reuses the cached files (kernel
        # copies: `cp -r` gave them new mtimes); the third, of a copy that kept the mtimes
        # (`cp -a`), hard-links them.
        t = time.perf_counter()
        c.step(f"cat {out}/run1/* > /dev/null", inputs=[f"{out}/run1"])
        first_fetch_s = time.perf_counter() - t
        c.step(f"mkdir -p {out}/moved/x && cp -r {data}/many/. {out}/moved/x/", outputs=[f"{out}/moved"])
        t = time.perf_counter()
        c.step(f"cat {out}/moved/x/* > /dev/null", inputs=[f"{out}/moved"])
        copied_s = time.perf_counter() - t
        held, _ = c.wire("fetch")
        rows.append(("(c) fetch of files held under another snapshot", held, size, 0.01))
        c.step(f"mkdir -p {out}/kept && cp -a {out}/run1 {out}/kept/", inputs=[f"{out}/run1"],
               outputs=[f"{out}/kept"])
        t = time.perf_counter()
        c.step(f"cat {out}/kept/run1/* > /dev/null", inputs=[f"{out}/kept"])
        linked_s = time.perf_counter() - t
        linked, _ = c.wire("fetch")
        rows.append(("(c) same, mtimes kept (hard links)", linked, size, 0.01))

        # (d) a full fetch of 2*SIZE for the baseline, then one killed half way and resumed.
        c.step(f"mkdir -p {out}/h1 && cp {data}/huge {out}/h1/huge", outputs=[f"{out}/h1"])
        sh(f"head -c {2 * size} /dev/urandom > {data}/huge2")
        c.step(f"mkdir -p {out}/h2 && cp {data}/huge2 {out}/h2/huge", outputs=[f"{out}/h2"])
        t = time.perf_counter()
        c.step(f"test -s {out}/h1/huge", inputs=[f"{out}/h1"])
        full_s = time.perf_counter() - t
        spool = os.path.join(c.agent_state, "blobs")
        assert du(spool) == 0, "the blob spool holds blobs of finished fetches"
        runner = subprocess.Popen(
            [COORD, "--state-dir", c.state, "step", "run", "--agent", "bench",
             _write(work, f"test -s {out}/h2/huge", [f"{out}/h2"]), "--registry", c.registry],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while du(spool) < size:
            time.sleep(0.01)
        c.agent.send_signal(signal.SIGKILL)
        c.agent.wait()
        got_before = du(spool)
        # `step run` waits for its attempt's end; that agent is gone.
        runner.kill()
        runner.wait()
        c.start_agent()
        t = time.perf_counter()
        c.step(f"test -s {out}/h2/huge", inputs=[f"{out}/h2"])
        resumed_s = time.perf_counter() - t
        resumed, _ = c.wire("fetch")
        total = got_before + resumed
        c.stop()

        print(f"\nContent-addressed transfers, {os.cpu_count()} cores, loopback, release build")
        print(f"SIZE = {args.size_mib} MiB, FILES = {args.files}\n")
        print(f"{'case':<50} {'wire bytes':>12} {'of SIZE':>9} {'target':>8}")
        for name, wire, of, target in rows:
            print(f"{name:<50} {wire:>12} {wire / of:>8.2%} {'<= ' + format(target, '.0%'):>8}")
        print(f"\n(c) step times: first fetch of {args.size_mib} MiB {first_fetch_s:.2f} s; "
              f"held files copied {copied_s:.2f} s = {copied_s / first_fetch_s:.2f}x; "
              f"hard-linked {linked_s:.2f} s = {linked_s / first_fetch_s:.2f}x")
        print(f"(d) fetch of {2 * args.size_mib} MiB: full {full_s:.2f} s; killed at "
              f"{got_before / (2 * size):.0%} ({got_before} bytes in the spool), resumed in "
              f"{resumed_s:.2f} s = {resumed_s / full_s:.2f}x a full fetch (target <= 0.6x); "
              f"bytes on the wire in all {total / (2 * size):.3f}x {2 * args.size_mib} MiB "
              f"(target <= 1.1x)")
        print(f"(e) store after one run {store_one} bytes, after two runs differing in 1% "
              f"{store_two} bytes = {store_two / store_one:.3f}x (target <= 1.05x)")
        print(f"(first harvest of the directory moved {first} bytes)")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _write(work, command, inputs):
    path = os.path.join(work, f"step-{time.monotonic_ns()}.toml")
    with open(path, "w") as f:
        f.write(f"command = {json.dumps(command)}\ninputs = {json.dumps(inputs)}\noutputs = []\n")
    return path


if __name__ == "__main__":
    main()
