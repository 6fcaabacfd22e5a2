#!/usr/bin/env python3
"""Time from "instance requested" to "agent connected" for the qemu provider, against the
time from qemu start to cloud-init's final stage of the same boot.

    sudo python3 bench/vm_boot.py [--runs N] [--bin target/release/pype-coordinator]

Each run: a network namespace with only lo, an HTTP server in it offering the agent binary
(download mode, pinned SHA-256), and `pype-coordinator run --provider qemu` on a one-step
pipeline. A poller reads the instance's serial console every 10 ms and stamps, with host
time, when qemu started (the console file appears), when systemd started pype-agent.service
and when cloud-init printed "finished at". The coordinator's log gives "instance requested"
(with create_ms: token, user-data render, seed ISO, overlay, qemu launch), "agent enrolled"
and "instance joined".

The coordinator's own overhead is the difference between the two: what the total adds to
the boot (render, seed, overlay and qemu launch before it; enroll and first heartbeat after
cloud-init's final stage). Target: under 1 s. Also printed: create_ms, the agent's own time
in the guest from its unit starting to its enrollment (emulated under TCG), and the
coordinator's side from enrollment to the agent joining.
Needs root, qemu-system-x86_64, genisoimage and the image from deploy/qemu/build-image.sh.
"""
import argparse
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlog import log_time  # noqa: E402




def poll_console(state, marks, stop):
    pattern = os.path.join(state, "instances", "qemu", "*", "console.log")
    while not stop.is_set():
        for path in glob.glob(pattern):
            now = time.time()
            marks.setdefault("qemu started", now)
            try:
                text = open(path, "rb").read().decode("utf-8", "replace")
            except OSError:
                continue
            if "pype-agent.service" in text:
                marks.setdefault("agent unit started", now)
            if "Cloud-init v." in text and "finished at" in text:
                marks.setdefault("cloud-init final", now)
            # The agent's own log lines (its unit logs to the console too).
            if re.search(r"INFO [^\n]*enrolled", text):
                marks.setdefault("agent enrolled", now)
            if "connected to coordinator" in text:
                marks.setdefault("agent connected", now)
        time.sleep(0.01)


def one_run(coordinator, agent_bin, image_dir, n):
    work = tempfile.mkdtemp(prefix="pype-vmbench-")
    netns = f"pype-bench-{os.getpid()}-{n}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    http = None
    try:
        subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up"], check=True)
        www = os.path.join(work, "www")
        os.makedirs(www)
        agent = os.path.join(www, "pype-agent")
        if subprocess.run(["objcopy", "--strip-debug", agent_bin, agent]).returncode != 0:
            shutil.copy(agent_bin, agent)
        sha = hashlib.sha256(open(agent, "rb").read()).hexdigest()
        http = subprocess.Popen(
            ["ip", "netns", "exec", netns, "python3", "-m", "http.server", "8089", "--bind", "127.0.0.1",
             "--directory", www], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cfg = os.path.join(work, "provider.toml")
        with open(cfg, "w") as f:
            f.write(f'max_instances = 1\nboot_timeout_secs = 400\n[agent]\nmode = "download"\n'
                    f'url = "http://10.0.2.2:8089/pype-agent"\nsha256 = "{sha}"\n'
                    f'[qemu]\nimage_dir = "{image_dir}"\n')
        pipeline = os.path.join(work, "one.toml")
        with open(pipeline, "w") as f:
            f.write('name = "one"\n[[steps]]\nname = "one"\ncommand = "true"\n')
        state = os.path.join(work, "state")
        marks, stop = {}, threading.Event()
        poller = threading.Thread(target=poll_console, args=(state, marks, stop))
        poller.start()
        out = subprocess.run(
            ["ip", "netns", "exec", netns, coordinator, "--state-dir", state, "run", "--provider", "qemu",
             "--provider-config", cfg, pipeline],
            capture_output=True, text=True, env={**os.environ, "RUST_LOG": "info"}, timeout=900)
        stop.set()
        poller.join()
        if out.returncode != 0:
            sys.exit(f"run failed:\n{out.stderr}")
        ev = {}
        for line in out.stderr.splitlines():
            for key, needle in [("requested", "instance requested"), ("enrolled", "agent enrolled"),
                                ("joined", "instance joined")]:
                if needle in line and key not in ev:
                    ev[key] = log_time(line)
                    if key == "requested":
                        ev["create_ms"] = float(re.search(r"create_ms=(\d+)", line).group(1))
        requested = ev["requested"] - ev["create_ms"] / 1000.0
        total = ev["joined"] - requested
        boot = marks["cloud-init final"] - marks["qemu started"]
        after_unit = ev["joined"] - marks["agent unit started"]
        overhead = ev["create_ms"] / 1000.0 + after_unit
        return {"total": total, "boot": boot, "create": ev["create_ms"] / 1000.0,
                "unit_to_joined": after_unit, "overhead": overhead,
                "unit_to_enrolled": marks.get("agent enrolled", float("nan")) - marks["agent unit started"],
                "coord_enroll_to_joined": ev["joined"] - ev["enrolled"]}
    finally:
        if http:
            http.kill()
        subprocess.run(["ip", "netns", "del", netns])
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/pype-coordinator"))
    ap.add_argument("--agent", default=os.path.join(ROOT, "target/release/pype-agent"))
    ap.add_argument("--image-dir", default=os.environ.get("PYPE_QEMU_IMAGE_DIR", "/var/cache/pype/images/bookworm"))
    a = ap.parse_args()
    rows = [one_run(a.bin, a.agent, a.image_dir, i) for i in range(a.runs)]
    print("| run | requested -> agent connected | qemu start -> cloud-init final | ratio | difference | create (token, render, seed, overlay, qemu) | unit started -> agent enrolled (in the guest) | coordinator: enrolled -> joined | unit started -> joined |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for i, r in enumerate(rows, 1):
        print(f"| {i} | {r['total']:.2f} s | {r['boot']:.2f} s | {r['total'] / r['boot']:.2f} | "
              f"**{(r['total'] - r['boot']) * 1000:.0f} ms** | "
              f"{r['create'] * 1000:.0f} ms | {r['unit_to_enrolled'] * 1000:.0f} ms | "
              f"{r['coord_enroll_to_joined'] * 1000:.0f} ms | {r['unit_to_joined'] * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
