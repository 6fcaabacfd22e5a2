#!/usr/bin/env python3
"""Print every job of the pipeline_runtime.yaml files under a bio-pype --log dir.

Usage: /tmp/bpv/bin/python check_runtime.py LOG_DIR [EXPECT]
  EXPECT (optional): comma list of name=status, e.g. "fail=failed,stats=cancelled";
  jobs not listed must be 'completed'. Exit 1 on any mismatch.
  With no job at all (everything skipped) it prints "no jobs" and exits 0.
Needs PyYAML (bio-pype's venv has it).
"""
import glob
import sys

import yaml

log_dir = sys.argv[1]
expect = dict(kv.split("=", 1) for kv in sys.argv[2].split(",")) if len(sys.argv) > 2 else {}
bad = 0
n = 0
for f in sorted(glob.glob(f"{log_dir}/*/pipeline_runtime.yaml")):
    data = yaml.safe_load(open(f)) or {}
    for run_id, job in sorted(data.items(), key=lambda kv: str(kv[1].get("name", "")) if isinstance(kv[1], dict) else ""):
        if run_id.startswith("__"):
            continue
        n += 1
        want = expect.get(job["name"], "completed")
        ok = job["status"] == want
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} {run_id} {job['name']:<16} {job['status']:<10} {job.get('error_msg') or ''}")
if n == 0:
    print("no jobs")
sys.exit(1 if bad else 0)
