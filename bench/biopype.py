#!/usr/bin/env python3
"""A bio-pype pipeline end to end: bio-pype's own queues against `--queue pype_rs`, in one run.

    sudo python3 bench/biopype.py [--runs N] [--bin target/release/pype-coordinator]

The pipeline is tests/biopype's `wordcount` (split, a fan-out of 4 counts, a join, a step with a
profile program and file: 7 jobs), run with the venv ci-setup makes (.venv-biopype: bio-pype
2.0.99rc9 and python/). Each round, fresh output and log dirs, each of:

- `parallel`: bio-pype's local queue with its defaults (polls every 10 s), and with
  PYPE_QUEUE_POLL_INTERVAL=1 (its fastest useful setting);
- `pype_rs`: PYPE_OVERLAY_MODE=pype_rs, an embedded coordinator with 2 local agents and the
  snapshot backend (a fresh state dir each round: nothing is skipped);
- `slurm`: bio-pype's Slurm queue on tests/slurm/cluster.sh (two slurmd on 127.0.0.1), with
  its defaults (polls every 10 s);
- `pype_rs` with `--provider slurm`: agents are Slurm jobs on the same cluster.

Wall time of `pype pipelines` (planning included), every job checked `completed` and the
outputs compared with the first parallel run's. Targets: pype_rs no slower than parallel;
pype_rs on Slurm at least 3x faster than bio-pype's slurm queue.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree(d):
    out = {}
    for base, _, files in os.walk(d):
        for f in files:
            p = os.path.join(base, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, d)] = fh.read()
    return out


def statuses(venv, log):
    runs = sorted(os.path.join(log, d) for d in os.listdir(log)
                  if os.path.exists(os.path.join(log, d, "pipeline_runtime.yaml")))
    script = ("import json,sys,yaml\nd=yaml.safe_load(open(sys.argv[1])) or {}\n"
              "print(json.dumps({k: v.get('status') for k, v in d.items() if not k.startswith('__')}))")
    out = subprocess.run([os.path.join(venv, "bin/python"), "-c", script,
                          os.path.join(runs[-1], "pipeline_runtime.yaml")], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/pype-coordinator"))
    ap.add_argument("--agent", default=os.path.join(ROOT, "target/release/pype-agent"))
    ap.add_argument("--venv", default=os.environ.get("PYPE_BIOPYPE_VENV", os.path.join(ROOT, ".venv-biopype")))
    ap.add_argument("--no-slurm", action="store_true")
    a = ap.parse_args()
    for p in (a.bin, os.path.join(a.venv, "bin/pype")):
        if not os.path.exists(p):
            sys.exit(f"missing {p} (cargo build --release; ./ci-setup)")
    work = tempfile.mkdtemp(prefix="pype-biopype-bench-")
    shutil.copytree(os.path.join(ROOT, "tests/biopype/modules"), os.path.join(work, "modules"))
    shutil.copytree(os.path.join(ROOT, "tests/biopype/data"), os.path.join(work, "data"))
    prof = os.path.join(work, "modules/profiles/biopype_test.yaml")
    with open(prof) as f:
        text = f.read().replace("/work/main/tests/biopype/data", os.path.join(work, "data"))
    with open(prof, "w") as f:
        f.write(text)
    subprocess.run([os.path.join(a.venv, "bin/pype-rs"), "install", "--dir", os.path.join(work, "modules/queues")],
                   check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "python")})
    cluster = os.path.join(ROOT, "tests/slurm/cluster.sh")
    slurm = not a.no_slurm and shutil.which("slurmctld") and os.geteuid() == 0
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("PYPE_")}
    base_env.update({"PYTHONPATH": os.path.join(ROOT, "python"), "PYPE_MODULES": os.path.join(work, "modules"),
                     "PYPE_RS_COORDINATOR_BIN": a.bin})
    if slurm:
        # bio-pype's slurm queue reads finished jobs' states from sacct, which needs slurmdbd
        # and a database: the cluster logs finished jobs to a jobcomp file instead, and
        # bench/sacct-jobcomp answers bio-pype's sacct call from it (on PATH as `sacct`).
        jobcomp = os.path.join(work, "jobcomp.log")
        shim = os.path.join(work, "shim")
        os.makedirs(shim)
        os.symlink(os.path.join(ROOT, "bench/sacct-jobcomp"), os.path.join(shim, "sacct"))
        subprocess.run([cluster, "start", os.path.join(work, "cluster"), "2"], check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "JOBCOMP_LOC": jobcomp})
        base_env["JOBCOMP_LOC"] = jobcomp
        base_env["PATH"] = shim + os.pathsep + base_env.get("PATH", "")
        base_env["SLURM_CONF"] = os.path.join(work, "cluster", "slurm.conf")
        cfg = os.path.join(work, "provider.toml")
        with open(cfg, "w") as f:
            f.write(f'max_instances = 2\nboot_timeout_secs = 60\n[slurm]\nagent_bin = "{a.agent}"\n'
                    f'log_dir = "{work}/jobs"\n[slurm.env]\nTMPDIR = "{work}"\n')
    kinds = [
        ("parallel", "parallel", {}),
        ("parallel, poll 1 s", "parallel", {"PYPE_QUEUE_POLL_INTERVAL": "1"}),
        ("pype_rs (2 local agents)", "pype_rs", {"PYPE_OVERLAY_MODE": "pype_rs"}),
    ]
    if slurm:
        kinds += [
            ("slurm", "slurm", {}),
            ("pype_rs --provider slurm", "pype_rs",
             {"PYPE_OVERLAY_MODE": "pype_rs", "PYPE_RS_RUN_ARGS": f"--provider slurm --provider-config {cfg}"}),
        ]
    times = {k[0]: [] for k in kinds}
    reference = None
    try:
        for r in range(a.runs):
            for label, queue, extra in kinds:
                tag = f"{r}-{label.replace(' ', '_').replace(',', '').replace('(', '').replace(')', '')}"
                out, log, state = (os.path.join(work, p + tag) for p in ("out-", "log-", "state-"))
                env = {**base_env, **extra, "PYPE_RS_STATE_DIR": state}
                cmd = [os.path.join(a.venv, "bin/pype"), "-p", "biopype_test", "pipelines", "--queue", queue,
                       "--log", log, "wordcount", "--input", os.path.join(work, "data/input.txt"), "--out", out]
                t0 = time.monotonic()
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
                took = time.monotonic() - t0
                st = statuses(a.venv, log)
                if done.returncode != 0 or len(st) != 7 or set(st.values()) != {"completed"}:
                    sys.exit(f"{label}: rc {done.returncode}, jobs {st}\n{done.stderr[-3000:]}")
                got = tree(out)
                if reference is None:
                    reference = got
                elif got != reference:
                    sys.exit(f"{label}: outputs differ from the first parallel run's")
                times[label].append(took)
                print(f"round {r + 1} {label}: {took:.2f} s", file=sys.stderr)
    finally:
        if slurm:
            subprocess.run([cluster, "stop", os.path.join(work, "cluster")])
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ours = med["pype_rs (2 local agents)"]
    print("| queue | median wall time | runs | vs pype_rs |")
    print("| --- | ---: | --- | ---: |")
    for k, v in times.items():
        print(f"| {k} | {med[k]:.2f} s | {', '.join(f'{x:.2f}' for x in v)} | {med[k] / ours:.2f}x |")
    print(f"\nparallel / pype_rs: {med['parallel'] / ours:.2f}x (poll 1 s: "
          f"{med['parallel, poll 1 s'] / ours:.2f}x); target >= 1.0")
    if slurm:
        print(f"slurm / pype_rs --provider slurm: {med['slurm'] / med['pype_rs --provider slurm']:.2f}x; target >= 3.0")


if __name__ == "__main__":
    main()
