#!/usr/bin/env python3
"""Snapshot restore through the S3 store (moto on loopback, presigned URLs) against the QUIC
relay (the coordinator's local store), for 1 GiB in one file and for 10,000 small files.

    .venv-moto/bin/python bench/s3_restore.py [--runs N] [--bin target/debug/e2e-coordinator]

Needs the moto venv that ./ci-setup installs (.venv-moto, with boto3) and a coordinator built
with the `aws` feature (`cargo build -p tests` builds target/debug/e2e-coordinator with it;
our own crates are then unoptimised, the byte movers - quinn, rustls, zstd, tar, blake3, ureq
- optimised as in every dev build, on both sides alike).

For each dataset and store, a state dir holds the dataset imported as one snapshot (for S3,
uploaded by the coordinator in 16 MiB parts). Each round empties the local agent's snapshot
cache and forces a one-step pipeline whose input is the dataset; the restore is the time from
"step dispatched" to "step started" in the coordinator's log: the agent asks for the
snapshot, receives it (over the QUIC stream, or from moto at a presigned URL), checks its
BLAKE3 digest, unpacks it and starts the snippet. Rounds alternate between the two stores.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import boto3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlog import log_time  # noqa: E402

MOTO = os.path.join(ROOT, ".venv-moto", "bin", "moto_server")


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def make_data(base):
    big = os.path.join(base, "big")
    os.makedirs(big)
    with open(os.path.join(big, "blob.bin"), "wb") as f:
        for _ in range(64):
            f.write(os.urandom(16 << 20))
    small = os.path.join(base, "small")
    for d in range(100):
        sub = os.path.join(small, f"d{d:02}")
        os.makedirs(sub)
        for i in range(100):
            with open(os.path.join(sub, f"f{i:03}.dat"), "wb") as f:
                f.write(os.urandom(1024))
    return {"1 GiB, one file": big, "10,000 files of 1 KiB": small}


def coordinator(binary, state, args, env):
    return subprocess.run([binary, "--state-dir", state] + args, env=env, capture_output=True, text=True)


def restore_once(binary, state, pipeline, env):
    shutil.rmtree(os.path.join(state, "local-agents"), ignore_errors=True)
    p = coordinator(binary, state, ["run", "--agents", "1", "--force", "restore", pipeline], env)
    if p.returncode != 0:
        sys.exit(f"run failed:\n{p.stdout}\n{p.stderr[-3000:]}")
    t0 = t1 = None
    for line in p.stderr.splitlines():
        if 'step="restore"' in line and "step dispatched" in line:
            t0 = log_time(line)
        if 'step="restore"' in line and "step started" in line:
            t1 = log_time(line)
    direct = "fetch-direct" in p.stderr
    return t1 - t0, direct


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "debug", "e2e-coordinator"))
    a = ap.parse_args()
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    moto = subprocess.Popen([MOTO, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = tempfile.mkdtemp(prefix="pype-s3-bench-")
    try:
        env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                   AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
                   AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null")
        for _ in range(100):
            try:
                s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                  aws_access_key_id="testing", aws_secret_access_key="testing")
                s3.create_bucket(Bucket="bench")
                break
            except Exception:
                time.sleep(0.1)
        data = make_data(os.path.join(work, "data"))
        results = {}
        for name, path in data.items():
            states = {}
            for store in ["relay", "s3"]:
                state = os.path.join(work, f"{store}-{len(results)}")
                os.makedirs(state)
                if store == "s3":
                    with open(os.path.join(state, "coordinator.toml"), "w") as f:
                        f.write(f'[store]\nkind = "s3"\nbucket = "bench"\nprefix = "s{len(results)}"\n'
                                f'region = "us-east-1"\nendpoint_url = "{endpoint}"\nforce_path_style = true\n')
                p = coordinator(a.bin, state, ["import", path], env)
                if p.returncode != 0:
                    sys.exit(f"import failed: {p.stderr[-2000:]}")
                pipeline = os.path.join(state, "p.toml")
                with open(pipeline, "w") as f:
                    f.write(f'name = "bench"\ndata_root = "{state}/out"\n[[steps]]\nname = "restore"\n'
                            f'command = "mkdir -p {{{{data_root}}}} && du -s {path} > {{{{data_root}}}}/du.txt"\n'
                            f'inputs = ["{path}"]\noutputs = ["du.txt"]\n')
                states[store] = (state, pipeline)
            times = {"relay": [], "s3": []}
            for _ in range(a.runs):
                for store in ["relay", "s3"]:
                    state, pipeline = states[store]
                    t, direct = restore_once(a.bin, state, pipeline, env)
                    if direct != (store == "s3"):
                        sys.exit(f"{store}: the fetch did not take the expected path")
                    times[store].append(t)
            results[name] = times
            r, s = statistics.median(times["relay"]), statistics.median(times["s3"])
            print(f"{name}: relay median {r:.2f} s {sorted(round(x, 2) for x in times['relay'])}, "
                  f"s3 median {s:.2f} s {sorted(round(x, 2) for x in times['s3'])}, s3/relay {s / r:.2f}",
                  flush=True)
    finally:
        moto.terminate()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
