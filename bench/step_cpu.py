#!/usr/bin/env python3
"""CPU time per empty step, split by process: the coordinator, its local agents, and the rest
(bash and the kernel threads working for them), for a fan of independent `true` steps run by
`pype-coordinator run --agents 4` (the embedded coordinator).

    python3 bench/step_cpu.py [STEPS] [--bin PATH]     (PYPE_CGROUPS=never to compare)

The coordinator and agents are sampled from /proc every 50 ms (their last sample counts, so
an agent's last 50 ms may be missed); "everything" is the CPU time of the whole process tree,
from the parent's rusage once the run has ended. The sampling itself costs some CPU, so the
steps/s printed here are lower than `cargo bench -p tests --bench steps` gives.
"""
import os
import subprocess
import sys
import tempfile
import time

args = [a for a in sys.argv[1:] if not a.startswith("--")]
steps = int(args[0]) if args else 5000
binary = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "e2e-coordinator")
if "--bin" in sys.argv:
    binary = sys.argv[sys.argv.index("--bin") + 1]
if not os.path.exists(binary):
    sys.exit(f"no {binary}: cargo build --release -p tests --bins")
binary = os.path.realpath(binary)
tick = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(") ", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick
    except (OSError, IndexError, ValueError):
        return None


with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
    pipeline = os.path.join(tmp, "fan.toml")
    with open(pipeline, "w") as f:
        f.write('name = "fan"\n')
        for i in range(steps):
            f.write(f'[[steps]]\nname = "f{i}"\ncommand = "true"\n')
    before = os.times()
    started = time.time()
    run = subprocess.Popen(
        [binary, "--state-dir", os.path.join(tmp, "state"), "run", "--agents", "4", "--no-materialize", pipeline],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, RUST_LOG="info"),
    )
    last = {}
    while run.poll() is None:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline") as f:
                    cmd = f.read()
            except OSError:
                continue
            if cmd.startswith(binary):
                used = cpu_seconds(pid)
                if used is not None:
                    last[pid] = ("agent" if "__agent" in cmd else "coordinator", used)
        time.sleep(0.05)
    wall = time.time() - started
    after = os.times()
    if run.returncode != 0:
        sys.exit(f"the run failed with {run.returncode}")
    everything = (after.children_user + after.children_system) - (before.children_user + before.children_system)
    coordinator = sum(s for k, s in last.values() if k == "coordinator")
    agents = sum(s for k, s in last.values() if k == "agent")
    ms = lambda s: 1e3 * s / steps  # noqa: E731
    print(
        f"{steps} steps in {wall:.2f} s ({steps / wall:.0f} steps/s). CPU per step: coordinator "
        f"{ms(coordinator):.3f} ms, agents {ms(agents):.3f} ms, bash and the rest "
        f"{ms(everything - coordinator - agents):.3f} ms, everything {ms(everything):.3f} ms"
    )
