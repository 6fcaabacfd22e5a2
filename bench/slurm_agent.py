#!/usr/bin/env python3
"""Time from work becoming ready with no agent to a step starting on a fresh Slurm-started
agent, against a plain `sbatch --wrap true` round trip on the same cluster, in the same run.

    sudo python3 bench/slurm_agent.py [--runs N] [--bin target/release/pype-coordinator]

The cluster is tests/slurm/cluster.sh (munged, slurmctld, two slurmd on 127.0.0.1). Rounds
alternate between the two measurements so both see the same cluster state:

- baseline: `sbatch --parsable --wrap true`, then `squeue -j ID` every 10 ms until the job
  has left the queue (submit to completion: the round trip);
- ours: `pype-coordinator run --provider slurm` on a one-step pipeline with a fresh state dir,
  so no agent exists. From "run started" (the run wants an agent and has none) to "step
  started" (the snippet runs on the agent the coordinator submitted): sbatch, Slurm starting
  the job, the agent's start, enrollment with its one-time token, joining, planning (one
  check_outputs through the agent) and dispatch.

Target: ours within 1.5x of the baseline. Needs root and Debian's slurmctld, slurmd,
slurm-client and munge (./ci-setup installs them).
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlog import log_time  # noqa: E402




def baseline(env, work):
    t0 = time.time()
    out = subprocess.run(["sbatch", "--parsable", "--wrap", "true", f"--output={work}/wrap-%j.log"],
                         capture_output=True, text=True, env=env, check=True)
    job = out.stdout.strip().split(";")[0]
    started = None
    while True:
        q = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, env=env)
        state = q.stdout.strip()
        if state == "RUNNING" and started is None:
            started = time.time()
        if q.returncode == 0 and state == "":
            break
        if q.returncode != 0 and "Invalid job id" in q.stderr:
            break
        time.sleep(0.01)
    return time.time() - t0


def ours(env, work, coordinator, agent, n):
    state = os.path.join(work, f"state-{n}")
    cfg = os.path.join(work, "provider.toml")
    with open(cfg, "w") as f:
        f.write(f'max_instances = 1\nboot_timeout_secs = 60\n[slurm]\nagent_bin = "{agent}"\n'
                f'log_dir = "{work}/jobs"\n[slurm.env]\nTMPDIR = "{work}"\n')
    pipeline = os.path.join(work, "one.toml")
    with open(pipeline, "w") as f:
        f.write('name = "one"\n[[steps]]\nname = "one"\ncommand = "true"\n')
    out = subprocess.run([coordinator, "--state-dir", state, "run", "--provider", "slurm", "--provider-config",
                          cfg, "--backend", "direct", pipeline], capture_output=True, text=True, env=env,
                         timeout=300)
    if out.returncode != 0:
        sys.exit(f"run failed:\n{out.stderr}")
    ev = {}
    for line in out.stderr.splitlines():
        for key, needle in [("ready", "run started"), ("requested", "instance requested"),
                            ("enrolled", "agent enrolled"), ("joined", "instance joined"),
                            ("started", "step started")]:
            if needle in line and key not in ev:
                ev[key] = log_time(line)
                if key == "requested":
                    ev["create_ms"] = float(re.search(r"create_ms=(\d+)", line).group(1))
    return {"total": ev["started"] - ev["ready"], "sbatch": ev["create_ms"] / 1000.0,
            "to_enrolled": ev["enrolled"] - ev["requested"], "enrolled_to_started": ev["started"] - ev["enrolled"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/pype-coordinator"))
    ap.add_argument("--agent", default=os.path.join(ROOT, "target/release/pype-agent"))
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="pype-slurmbench-")
    cluster = os.path.join(ROOT, "tests/slurm/cluster.sh")
    subprocess.run([cluster, "start", os.path.join(work, "cluster"), "2"], check=True, stdout=subprocess.DEVNULL)
    env = {**os.environ, "SLURM_CONF": os.path.join(work, "cluster", "slurm.conf"), "RUST_LOG": "info"}
    try:
        base, mine = [], []
        for i in range(a.runs):
            base.append(baseline(env, work))
            mine.append(ours(env, work, a.bin, a.agent, i))
        print("| run | sbatch --wrap true round trip | run wants an agent -> step started | ratio | sbatch call | requested -> agent enrolled | enrolled -> step started |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for i, (b, m) in enumerate(zip(base, mine), 1):
            print(f"| {i} | {b:.2f} s | {m['total']:.2f} s | {m['total'] / b:.2f} | {m['sbatch'] * 1000:.0f} ms | "
                  f"{m['to_enrolled'] * 1000:.0f} ms | {m['enrolled_to_started'] * 1000:.0f} ms |")
        mb, mm = statistics.median(base), statistics.median([m["total"] for m in mine])
        print(f"\nmedian: baseline {mb:.2f} s, ours {mm:.2f} s, ratio {mm / mb:.2f} (target <= 1.5)")
    finally:
        subprocess.run([cluster, "stop", os.path.join(work, "cluster")])
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
