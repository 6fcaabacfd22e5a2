#!/usr/bin/env python3
"""Transfer benchmark: pype (QUIC + mTLS + tar) against tar|ssh, rsync over ssh and tar|nc.

Moves (a) one 1 GiB random file and (b) 10,000 files of 8 KiB from a source directory to a
fresh destination on 127.0.0.1, each method REPS times, and prints the median MB/s, files/s
and the ratios against the baselines, plus the peak RSS of the coordinator and the agent
during (a) and the UDP receive errors counted by the kernel during the pype runs.

Usage: bench/setup.sh && cargo build --release && python3 bench/transfer.py [--reps N]
"""

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
COORD = os.path.join(BIN, "pype-coordinator")
AGENT = os.path.join(BIN, "pype-agent")


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=True, check=True, **kw)


def udp_errors():
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    head, vals = rows[0], rows[1]
    d = dict(zip(head[1:], map(int, vals[1:])))
    return d.get("InErrors", 0), d.get("RcvbufErrors", 0)


def vm_hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def wait_line(proc, needle, timeout=30):
    deadline = time.time() + timeout
    lines = []
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return line
    raise RuntimeError(f"no {needle!r} from process:\n{''.join(lines)}")


class Pype:
    def __init__(self, work):
        self.work = work
        self.state = os.path.join(work, "coord")
        env = dict(os.environ, RUST_LOG="warn,coordinator=info,agent=info")
        self.coord = subprocess.Popen(
            [COORD, "--state-dir", self.state, "serve", "--listen", "127.0.0.1:0"],
            stderr=subprocess.PIPE, text=True, env=env)
        line = wait_line(self.coord, "coordinator listening")
        self.addr = line.split("addr=")[1].split()[0]
        token = subprocess.run([COORD, "--state-dir", self.state, "token", "create"],
                               check=True, capture_output=True, text=True).stdout.strip()
        self.agent = subprocess.Popen(
            [AGENT, "run", "--coordinator", self.addr, "--ca", os.path.join(self.state, "ca.pem"),
             "--token", token, "--state-dir", os.path.join(work, "agent"), "--name", "bench"],
            stderr=subprocess.PIPE, text=True, env=env)
        wait_line(self.agent, "connected to coordinator")
        # Drain logs so the pipes never fill.
        for p in (self.coord, self.agent):
            subprocess.Popen(["cat"], stdin=p.stderr, stdout=subprocess.DEVNULL)

    def push(self, src, dest):
        subprocess.run([COORD, "--state-dir", self.state, "push", "bench", src, dest],
                       check=True, capture_output=True)

    def stop(self):
        for p in (self.agent, self.coord):
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=10)


class Sshd:
    def __init__(self, work, port=2299):
        self.port = port
        self.dir = os.path.join(work, "ssh")
        os.makedirs(self.dir)
        sh(f"ssh-keygen -q -t ed25519 -N '' -f {self.dir}/host_key")
        sh(f"ssh-keygen -q -t ed25519 -N '' -f {self.dir}/client_key")
        os.makedirs("/run/sshd", exist_ok=True)
        auth = os.path.join(self.dir, "authorized_keys")
        shutil.copy(f"{self.dir}/client_key.pub", auth)
        os.chmod(auth, 0o600)
        cfg = os.path.join(self.dir, "sshd_config")
        with open(cfg, "w") as f:
            f.write(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {self.dir}/host_key\n"
                    f"AuthorizedKeysFile {auth}\nPermitRootLogin yes\nPasswordAuthentication no\n"
                    f"StrictModes no\nUsePAM no\nPidFile {self.dir}/sshd.pid\n")
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        self.proc = subprocess.Popen([sshd, "-D", "-e", "-f", cfg], stderr=subprocess.DEVNULL)
        self.ssh = (f"ssh -p {port} -i {self.dir}/client_key -o StrictHostKeyChecking=no "
                    f"-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes")
        for _ in range(100):
            if subprocess.run(f"{self.ssh} root@127.0.0.1 true", shell=True).returncode == 0:
                break
            time.sleep(0.1)
        self.cipher = subprocess.run(
            f"{self.ssh} -v root@127.0.0.1 true 2>&1 | grep -m1 'cipher:' | sed 's/.*cipher: //'",
            shell=True, capture_output=True, text=True).stdout.strip()

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def tar_nc(src, dest, port=2399):
    os.makedirs(dest)
    recv = subprocess.Popen(f"nc -l 127.0.0.1 {port} | tar -C {dest} -xf -", shell=True)
    time.sleep(0.3)  # let the listener bind; not part of the measured time
    t = time.perf_counter()
    sh(f"tar -C {src} -cf - . | nc -N 127.0.0.1 {port}")
    recv.wait()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=10000)
    args = ap.parse_args()
    for b in (COORD, AGENT):
        if not os.path.exists(b):
            sys.exit(f"missing {b}: run `cargo build --release` first")

    work = tempfile.mkdtemp(prefix="pype-bench-", dir=os.environ.get("BENCH_DIR", "/var/tmp"))
    try:
        big = os.path.join(work, "big")
        small = os.path.join(work, "small")
        os.makedirs(big)
        sh(f"head -c {args.big_mib}M /dev/urandom > {big}/data.bin")
        for d in range(args.files // 100):
            os.makedirs(f"{small}/d{d:03}")
            for i in range(100):
                with open(f"{small}/d{d:03}/f{i:03}", "wb") as f:
                    f.write(os.urandom(8192))
        sh(f"cat {big}/data.bin > /dev/null; find {small} -type f -exec cat {{}} + > /dev/null")
        big_bytes = args.big_mib * 1024 * 1024
        small_bytes = args.files * 8192

        sshd = Sshd(work)
        pype = Pype(work)
        results = {}
        udp_before = udp_errors()
        hwm = (0, 0)

        def dest():
            parent = os.path.join(work, "dest")
            os.makedirs(parent, exist_ok=True)
            return os.path.join(parent, str(time.monotonic_ns()))

        def run(name, dataset, fn):
            print(f"running {name} on {os.path.basename(dataset)}", file=sys.stderr, flush=True)
            times = []
            for _ in range(args.reps):
                d = dest()
                # Every method starts with no dirty pages left by the one before (untimed):
                # write-back of an earlier GiB would otherwise land on whoever runs next.
                os.sync()
                times.append(fn(dataset, d))
                shutil.rmtree(os.path.join(work, "dest"), ignore_errors=True)
            results[(name, dataset)] = statistics.median(times)

        methods = {
            "pype (QUIC+mTLS)": lambda s, d: timed(lambda: pype.push(s, d)),
            "tar | ssh": lambda s, d: timed(lambda: sh(
                f"tar -C {s} -cf - . | {sshd.ssh} root@127.0.0.1 'mkdir -p {d} && tar -C {d} -xf -'")),
            "tar | ssh aes128-gcm": lambda s, d: timed(lambda: sh(
                f"tar -C {s} -cf - . | {sshd.ssh} -c aes128-gcm@openssh.com root@127.0.0.1 "
                f"'mkdir -p {d} && tar -C {d} -xf -'")),
            "rsync -a over ssh": lambda s, d: timed(lambda: sh(
                f"rsync -a -e '{sshd.ssh}' {s}/ root@127.0.0.1:{d}/")),
            "tar | nc (plain)": lambda s, d: tar_nc(s, d),
        }
        for dataset in (big, small):
            for name, fn in methods.items():
                run(name, dataset, fn)
                if name.startswith("pype") and dataset == big:
                    hwm = (vm_hwm_kib(pype.coord.pid), vm_hwm_kib(pype.agent.pid))
                    udp_after = udp_errors()
        pype.stop()
        sshd.stop()

        print(f"\nTransfer benchmark, {args.reps} runs each (median), loopback, {os.cpu_count()} cores")
        print(f"ssh cipher negotiated: {sshd.cipher or 'unknown'}\n")
        print(f"{'method':<22} {'1 GiB file MB/s':>16} {'10k x 8 KiB files/s':>20} {'(MB/s)':>8}")
        for name in methods:
            tb, ts = results[(name, big)], results[(name, small)]
            print(f"{name:<22} {big_bytes / 1e6 / tb:>16.0f} {args.files / ts:>20.0f} {small_bytes / 1e6 / ts:>8.0f}")
        p = "pype (QUIC+mTLS)"
        print("\nratios (pype / baseline, higher is better):")
        for base in ("tar | ssh", "tar | ssh aes128-gcm", "rsync -a over ssh", "tar | nc (plain)"):
            rb = results[(base, big)] / results[(p, big)]
            rs = results[(base, small)] / results[(p, small)]
            print(f"  vs {base:<20} big file {rb:5.2f}x   small files {rs:5.2f}x")
        print(f"\npeak RSS during (a): coordinator {hwm[0] / 1024:.1f} MiB, agent {hwm[1] / 1024:.1f} MiB")
        print(f"UDP InErrors/RcvbufErrors during pype (a): "
              f"{udp_after[0] - udp_before[0]}/{udp_after[1] - udp_before[1]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
