"""Talking to ``pype-coordinator``: where it is, and its commands for programs.

Settings (environment variables; bio-pype does not bake them into job commands):

``PYPE_RS_COORDINATOR_BIN``
    the ``pype-coordinator`` executable (default: found on ``PATH``).
``PYPE_RS_STATE_DIR``
    its state directory (default: the coordinator's own default, or ``PYPE_STATE_DIR``).
``PYPE_RS_COORDINATOR``
    ``HOST:PORT`` of a running ``pype-coordinator serve``; unset, each run starts an embedded
    coordinator with local agents.
``PYPE_RS_RUN_ARGS``
    extra arguments for ``run`` (shell words), e.g. ``--agents 4`` or
    ``--provider slurm --partition debug``.
``PYPE_RS_ROOTS``
    ``:``-separated directories jobs may read and write, on top of those their arguments name.
"""

import json
import os
import shlex
import shutil
import subprocess
from typing import Dict, List, Optional


class CoordinatorError(RuntimeError):
    """``pype-coordinator`` is missing, unreachable, or refused a request."""


def binary() -> str:
    exe = os.environ.get("PYPE_RS_COORDINATOR_BIN") or shutil.which("pype-coordinator")
    if not exe:
        raise CoordinatorError(
            "pype-coordinator was not found: put it on PATH or set PYPE_RS_COORDINATOR_BIN"
        )
    if not os.access(exe, os.X_OK):
        raise CoordinatorError(f"PYPE_RS_COORDINATOR_BIN={exe} is not an executable")
    return exe


def address() -> Optional[str]:
    return os.environ.get("PYPE_RS_COORDINATOR") or None


def base_command() -> List[str]:
    cmd = [binary()]
    state = os.environ.get("PYPE_RS_STATE_DIR")
    if state:
        cmd += ["--state-dir", state]
    return cmd


def _run(args: List[str], timeout: float = 120) -> str:
    cmd = base_command() + args
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CoordinatorError(f"{shlex.join(cmd)} did not answer within {timeout:.0f}s")
    if done.returncode != 0:
        err = done.stderr.strip().splitlines()
        raise CoordinatorError(
            f"{shlex.join(cmd)} failed: {err[-1] if err else 'exit %d' % done.returncode}"
        )
    return done.stdout


def paths_present(paths: List[str]) -> Dict[str, Optional[int]]:
    """``{path: size or None}`` from the coordinator's working registry and store."""
    if not paths:
        return {}
    args = ["paths"]
    if address():
        args += ["--coordinator", address()]
    out = _run(args + ["--"] + list(paths))
    try:
        sizes = json.loads(out)
    except ValueError:
        raise CoordinatorError(f"pype-coordinator paths printed something that is not JSON: {out[:200]!r}")
    return {p: sizes.get(p) for p in paths}


def cancel(run: str, step: str) -> None:
    args = ["cancel", run, step]
    if address():
        args += ["--coordinator", address()]
    _run(args, timeout=60)


def status(run: str) -> str:
    """``pype-coordinator status RUN``: the run's step table."""
    args = ["status", run]
    if address():
        args += ["--coordinator", address()]
    return _run(args, timeout=60)


def logs(run: str, step: str) -> str:
    return _run(["logs", run, step], timeout=60)


def run_command() -> List[str]:
    """``run --json -`` with the configured target and extra arguments."""
    cmd = base_command() + ["run", "--json", "-"]
    if address():
        cmd += ["--coordinator", address()]
    cmd += shlex.split(os.environ.get("PYPE_RS_RUN_ARGS", ""))
    return cmd
