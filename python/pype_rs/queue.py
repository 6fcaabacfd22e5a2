"""bio-pype's queue module ``pype_rs``: jobs run as steps on pype agents.

``register`` writes ``pipeline_runtime.yaml`` exactly as bio-pype's own queues do (its
``yaml_dump``), so ``pype resume`` keeps working. ``execute`` submits every job still to run as
one run of ``pype-coordinator run --json -`` (each job a step: its command, its dependencies,
``ncpu``/``mem``/``time`` as resources and timeout) and follows the run's events, keeping each
job's status in ``pipeline_runtime.yaml``. ``get_handler`` serves bio-pype's queue commands
(cancel, status, logs) through the coordinator. ``StorageBackend`` is the backend
``PYPE_OVERLAY_MODE=pype_rs`` selects.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Set, Tuple

from . import EVENTS_VERSION, PIPELINE_VERSION
from . import coordinator
from .backend import StorageBackend  # noqa: F401  (bio-pype looks it up in this module)

QUEUE_NAME = "pype_rs"
_snippet_modules = None


def _modules():
    global _snippet_modules
    if _snippet_modules is None:
        from pype.utils.snippets import snippets_modules_list

        _snippet_modules = snippets_modules_list({})
    return _snippet_modules


def register(
    command: str,
    snippet_name: str,
    requirements: Dict[str, Any],
    dependencies: list,
    log: Any,
    profile: str,
    batch_id: Optional[str] = None,
) -> str:
    """Registers a job in ``pipeline_runtime.yaml`` (bio-pype's own ``yaml_dump``)."""
    from pype.utils.queues import yaml_dump

    return yaml_dump(command, snippet_name, requirements, dependencies, log, profile, batch_id, _modules())


# -- turning jobs into a pipeline ---------------------------------------------------------------


def step_name(run_id: str, name: Optional[str]) -> str:
    """A step name the coordinator accepts, unique by the job's run id."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name or "job").strip("._-")[:60] or "job"
    return f"{base}.{run_id}"


def parse_time(value: Any) -> Optional[int]:
    """Slurm-style ``[D-]HH:MM:SS``, ``MM:SS`` or minutes, to seconds."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return int(value) * 60
    text = str(value).strip()
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [int(p) for p in text.split(":")]
    if len(parts) == 1:
        secs = parts[0] * 60
    elif len(parts) == 2:
        secs = parts[0] * 60 + parts[1]
    else:
        secs = parts[0] * 3600 + parts[1] * 60 + parts[2]
    return days * 86400 + secs


def _memory(value: Any) -> Optional[int]:
    if value in (None, ""):
        return None
    from pype.misc import bases_format

    try:
        return int(bases_format(str(value), 1024))
    except Exception:
        return None


def job_words(command: str) -> Tuple[List[str], Optional[str], Optional[str]]:
    """The words after ``snippets`` (the snippet and its arguments), the ``--log`` dir and
    the ``--profile`` of a bio-pype job command; ``([], None, None)`` when it is not one."""
    try:
        words = shlex.split(command)
    except ValueError:
        return [], None, None
    if "snippets" not in words:
        return [], None, None
    i = words.index("snippets")
    profile = None
    for j, w in enumerate(words[:i]):
        if w in ("--profile", "-p") and j + 1 < i:
            profile = words[j + 1]
    rest = words[i + 1 :]
    log_dir = None
    if "--log" in rest:
        k = rest.index("--log")
        if k + 1 < len(rest):
            log_dir = rest[k + 1]
    return rest, log_dir, profile


def _profile_files(profile: Optional[str]) -> List[str]:
    if not profile:
        return []
    try:
        from pype.utils.profiles import get_profiles

        p = get_profiles({}).get(profile)
        return [os.path.normpath(f) for f in (p.files.values() if p else []) if isinstance(f, str) and f.startswith("/")]
    except Exception:
        return []


def _collapse(roots: Set[str]) -> List[str]:
    out: List[str] = []
    for r in sorted(roots):
        if r != "/" and not any(r == o or r.startswith(o.rstrip("/") + "/") for o in out):
            out.append(r)
    return out


def world(jobs: Dict[str, Dict[str, Any]], plog: str) -> Tuple[List[str], List[str], List[str]]:
    """The directories the jobs may touch (roots), those they may write (write roots), and the
    files to import at submission. Roots: the directories their absolute arguments name (an
    argument that is a directory or has no suffix, else its parent), the pipeline log dir, the
    profile's files' directories, ``PYPE_RS_ROOTS``. Write roots: the directory-like arguments,
    the log dir and ``PYPE_RS_ROOTS``; never the directory of an existing input file alone, so
    a step cannot have the coordinator write over what sits beside the user's inputs."""
    roots: Set[str] = {os.path.normpath(plog)}
    write: Set[str] = {os.path.normpath(plog)}
    imports: Set[str] = set()
    for job in jobs.values():
        words, log_dir, profile = job_words(job.get("command", ""))
        files = _profile_files(profile)
        for w in words + files:
            if not w.startswith("/"):
                continue
            p = os.path.normpath(w)
            if os.path.isdir(p) or not os.path.splitext(p)[1]:
                roots.add(p)
                if w not in files:
                    write.add(p)
            else:
                roots.add(os.path.dirname(p))
                if not os.path.exists(p) and w not in files:
                    # An output file to be: its directory is written.
                    write.add(os.path.dirname(p))
            if os.path.isfile(p) and not p.startswith(os.path.normpath(plog) + "/"):
                imports.add(p)
    for r in os.environ.get("PYPE_RS_ROOTS", "").split(":"):
        if r.startswith("/"):
            roots.add(os.path.normpath(r))
            write.add(os.path.normpath(r))
    return _collapse(roots), _collapse(write), sorted(imports)


def split_command(command: str) -> Tuple[List[Tuple[str, str]], List[str]]:
    """A job command's leading ``KEY=value`` words and the rest (the executable and its args)."""
    words = shlex.split(command)
    env: List[Tuple[str, str]] = []
    while words and "=" in words[0] and not words[0].startswith(("-", "/")):
        k, v = words.pop(0).split("=", 1)
        env.append((k, v))
    return env, words


def _site_packages() -> str:
    import pype

    return os.path.dirname(os.path.dirname(os.path.abspath(pype.__file__)))


def ship_mode() -> str:
    """``PYPE_RS_SHIP_PYPE``: ``all`` (or ``1``) ships bio-pype's packages and the modules,
    ``modules`` only the modules (workers with bio-pype installed, e.g. an image built with
    ``deploy/qemu/build-image.sh --with-biopype``), unset ships nothing."""
    v = os.environ.get("PYPE_RS_SHIP_PYPE", "").strip().lower()
    if v in ("", "0", "no", "false", "none"):
        return ""
    if v == "modules":
        return "modules"
    if v in ("1", "yes", "true", "all"):
        return "all"
    raise ValueError(f"PYPE_RS_SHIP_PYPE={v!r}: expected all, modules or nothing")


def worker_command(command: str, ship: str) -> Tuple[str, List[str]]:
    """The step's bash command for a job, and the paths it needs shipped.

    The job command names this host's ``pype`` and ``PYPE_MODULES``. On the worker they are
    mapped: ``$PYPE_RS_WORKER_PYPE`` / ``$PYPE_RS_WORKER_MODULES`` when the agent's environment
    sets them, else the same paths when they exist there, else ``pype`` on the worker's
    ``PATH``. With ``ship``, bio-pype's packages and the modules directory travel with the run
    instead (inputs of the step, restored by the agent) and the job runs as ``python3 -m
    pype.commands`` with them (the worker needs only a ``python3`` of the same minor version).
    """
    env, words = split_command(command)
    modules = dict(env).get("PYPE_MODULES") or os.environ.get("PYPE_MODULES", "")
    if len(words) > 2 and words[1:3] == ["-m", "pype.commands"]:
        exe, args = words[:3], words[3:]
    else:
        exe, args = words[:1], words[1:]
    assigns = " ".join(f"{k}={shlex.quote(v)}" for k, v in env if k != "PYPE_MODULES")
    if ship == "all":
        # bio-pype's packages, and this package where it is not among them (a source tree).
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        paths = list(dict.fromkeys([here, _site_packages()]))
        line = (
            f"PYTHONPATH={':'.join(shlex.quote(p) for p in paths)} {assigns} PYPE_MODULES={shlex.quote(modules)} "
            f"exec python3 -m pype.commands {shlex.join(args)}"
        )
        return line, [p for p in paths + [modules] if p]
    shipped = [modules] if ship == "modules" and modules else []
    exe_text = shlex.join(exe)
    lines = [
        f"pype_rs_exe=({exe_text})",
        'if [ -n "${PYPE_RS_WORKER_PYPE:-}" ]; then pype_rs_exe=("$PYPE_RS_WORKER_PYPE");',
        'elif [ ! -x "${pype_rs_exe[0]}" ]; then',
        '  pype_rs_exe=("$(command -v pype)") || { echo "pype_rs: no pype on this worker (${pype_rs_exe[0]} is missing, none on PATH; set PYPE_RS_WORKER_PYPE)" >&2; exit 127; }',
        "fi",
        f"pype_rs_modules={shlex.quote(modules)}",
        'if [ -n "${PYPE_RS_WORKER_MODULES:-}" ]; then pype_rs_modules=$PYPE_RS_WORKER_MODULES;',
        'elif [ ! -d "$pype_rs_modules" ]; then echo "pype_rs: the modules directory $pype_rs_modules is not on this worker (set PYPE_RS_WORKER_MODULES)" >&2; exit 127; fi',
        f'{assigns} PYPE_MODULES="$pype_rs_modules" exec "${{pype_rs_exe[@]}}" {shlex.join(args)}',
    ]
    return "\n".join(lines), shipped


def build_pipeline(name: str, jobs: Dict[str, Dict[str, Any]], to_run: List[str], plog: str) -> Dict[str, Any]:
    roots, write_roots, imports = world({r: jobs[r] for r in to_run}, plog)
    ship = ship_mode()
    names = {r: step_name(r, jobs[r].get("name")) for r in to_run}
    steps = []
    for rid in to_run:
        job = jobs[rid]
        words, log_dir, _ = job_words(job.get("command", ""))
        if not words or not log_dir:
            raise ValueError(
                f"job {rid} ({job.get('name')}): its command is not a bio-pype job "
                f"('... pype --profile P snippets --log DIR SNIPPET ...'): {job.get('command', '')!r}"
            )
        req = job.get("requirements") or {}
        resources: Dict[str, Any] = {}
        try:
            resources["cpus"] = float(req.get("ncpu", 1))
        except (TypeError, ValueError):
            resources["cpus"] = 1.0
        mem = _memory(req.get("mem"))
        if mem:
            resources["memory"] = mem
        command, shipped = worker_command(job["command"], ship)
        imports.extend(p for p in shipped if p not in imports)
        step: Dict[str, Any] = {
            "name": names[rid],
            "command": command,
            "inputs": shipped,
            "outputs": [os.path.normpath(log_dir)],
            "after": [names[d] for d in job.get("dependencies") or [] if d in names],
            "resources": resources,
            "serve_backend": True,
        }
        timeout = parse_time(req.get("time"))
        if timeout:
            step["timeout_secs"] = timeout
        steps.append(step)
    return {
        "version": PIPELINE_VERSION,
        "name": re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:80] or "biopype",
        "roots": roots,
        "write_roots": write_roots,
        "imports": imports,
        "write_back": True,
        "steps": steps,
    }


# -- following a run ----------------------------------------------------------------------------

TERMINAL = ("completed", "failed", "cancelled")
#: The coordinator's step states as bio-pype's job statuses.
STATES = {
    "pending": "pending",
    "ready": "submitted",
    "running": "running",
    "succeeded": "completed",
    "skipped": "completed",
    "pruned": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
}


class PypeRsQueue:
    """Submits the jobs still to run as one coordinator run and follows it."""

    def __init__(self, log: Any):
        from pype.utils.logs import PipelineLogDir
        from pype.utils.runtime import Runtime

        self.log = log
        self.plog = os.path.dirname(log.__path__)
        self.runtime_file = PipelineLogDir(self.plog).runtime_yaml
        self.runtime = Runtime(self.runtime_file)
        self.by_step: Dict[str, str] = {}
        self.run: Optional[str] = None
        self.proc: Optional[subprocess.Popen] = None
        self.errors: List[str] = []

    def info(self, msg: str) -> None:
        self.log.log.info(f"[pype_rs] {msg}")

    def error(self, msg: str) -> None:
        self.log.log.error(f"[pype_rs] {msg}")
        print(f"pype_rs: {msg}", file=sys.stderr)

    def jobs(self) -> Dict[str, Dict[str, Any]]:
        return self.runtime.job_entries()

    def plan(self) -> List[str]:
        """The jobs to submit; pending jobs blocked by a failed or cancelled one are cancelled."""
        jobs = self.jobs()
        to_run = [r for r, j in jobs.items() if j.get("status") in ("pending", "submitted", "running")]
        blocked: Set[str] = set()
        changed = True
        while changed:
            changed = False
            for r in to_run:
                if r in blocked:
                    continue
                for d in jobs[r].get("dependencies") or []:
                    status = jobs.get(d, {}).get("status")
                    if status in ("failed", "cancelled") or d in blocked:
                        blocked.add(r)
                        changed = True
                        self.runtime.update(r, "cancelled", error_msg=f"Dependency failed: {d}")
                        break
        self.runtime.flush()
        return [r for r in to_run if r not in blocked]

    def execute(self) -> None:
        to_run = self.plan()
        if not to_run:
            self.info("no job to run")
            return
        jobs = self.jobs()
        meta = self.runtime.read_metadata()
        try:
            pipeline = build_pipeline(meta.get("pipeline_name") or "biopype", jobs, to_run, self.plog)
            cmd = coordinator.run_command()
        except (ValueError, coordinator.CoordinatorError) as e:
            for r in to_run:
                self.set_status(r, "failed", error_msg=str(e))
            self.runtime.flush()
            self.error(str(e))
            return
        self.by_step = {s["name"]: r for s, r in zip(pipeline["steps"], to_run)}
        self.info(f"submitting {len(to_run)} jobs: {shlex.join(cmd)}")
        coord_log = os.path.join(self.log.__path__, "pype-coordinator.log")
        os.makedirs(self.log.__path__, exist_ok=True)
        with open(coord_log, "ab") as err:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1
            )
            try:
                self.proc.stdin.write(json.dumps(pipeline) + "\n")
                self.proc.stdin.flush()
                done = self.follow()
            except KeyboardInterrupt:
                self.proc.terminate()
                self.proc.wait()
                self.abandon("interrupted")
                raise
            code = self.proc.wait()
        if not done:
            tail = _tail(coord_log, 5)
            if coordinator.address() is None:
                self.abandon(f"pype-coordinator exited with code {code} before the run finished")
            self.error(f"pype-coordinator exited with code {code} before the run finished; its log {coord_log}:\n{tail}")
        self.report()

    def follow(self) -> bool:
        """Applies every event line; whether the run's last line came."""
        last_flush = 0.0
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("v") != EVENTS_VERSION:
                self.error(f"pype-coordinator writes events of version {ev.get('v')}, pype_rs reads {EVENTS_VERSION}")
                self.proc.terminate()
                return False
            finished = self.apply(ev)
            now = time.monotonic()
            if finished or now - last_flush > 0.5:
                self.runtime.flush()
                last_flush = now
            if ev.get("event") == "run done":
                self.runtime.flush()
                self.proc.stdin.close()
                return True
        self.runtime.flush()
        return False

    def set_status(self, rid: str, status: str, **fields: Any) -> None:
        """``Runtime.update``, which for a terminal status reads the job's snippet logs; a job
        that never got as far as writing them (it failed early, or was skipped) still gets its
        status."""
        try:
            self.runtime.update(rid, status, **fields)
        except (AttributeError, OSError, ValueError):
            from datetime import datetime

            now = datetime.now().isoformat()
            with self.runtime._lock:
                job = self.runtime._data.setdefault(rid, {})
                job["status"] = status
                job.setdefault("completed_at", now)
                job.update(fields)

    def apply(self, ev: Dict[str, Any]) -> bool:
        """Applies one event; whether a job became terminal."""
        kind = ev.get("event", "")
        if ev.get("run"):
            self.run = ev["run"]
        rid = self.by_step.get(ev.get("step") or "")
        if rid is None:
            return False
        detail = ev.get("detail") or ""
        if kind == "step dispatched":
            self.runtime.update(rid, "submitted", queue_id=f"{self.run}/{ev['step']}")
        elif kind == "step started":
            self.runtime.update(rid, "running")
        elif kind == "step harvested":
            self.set_status(rid, "completed")
            return True
        elif kind in ("step skipped", "step pruned"):
            self.set_status(rid, "completed", error_msg=f"{kind[5:]}: {detail}")
            return True
        elif kind == "step failed":
            self.set_status(rid, "failed", error_msg=detail)
            self.errors.append(rid)
            return True
        elif kind == "step cancelled":
            self.set_status(rid, "cancelled", error_msg=detail)
            return True
        return False

    def abandon(self, why: str) -> None:
        """Jobs an embedded coordinator did not finish (it is gone, and its agents with it):
        cancelled, so ``pype resume`` runs them again. (A run on ``serve`` goes on without this
        client: its jobs keep their status.)"""
        for rid in self.by_step.values():
            status = self.jobs().get(rid, {}).get("status")
            if status not in TERMINAL:
                self.set_status(rid, "cancelled", error_msg=why)
        self.runtime.flush()

    def report(self) -> None:
        jobs = self.jobs()
        failed = [(r, j) for r, j in jobs.items() if j.get("status") == "failed"]
        cancelled = [(r, j) for r, j in jobs.items() if j.get("status") == "cancelled"]
        done = sum(1 for j in jobs.values() if j.get("status") == "completed")
        self.info(f"run {self.run}: {done} completed, {len(failed)} failed, {len(cancelled)} cancelled")
        for r, j in failed:
            self.error(f"job {j.get('name')} ({r}) failed: {j.get('error_msg', '')}")
        for r, j in cancelled:
            self.log.log.warning(f"[pype_rs] job {j.get('name')} ({r}) cancelled: {j.get('error_msg', '')}")
        if failed or cancelled:
            print(
                f"pype_rs: {len(failed)} failed: "
                + ", ".join(f"{j.get('name')} ({r})" for r, j in failed)
                + f"; {len(cancelled)} cancelled: "
                + ", ".join(f"{j.get('name')} ({r})" for r, j in cancelled),
                file=sys.stderr,
            )


def _tail(path: str, n: int) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def execute(log: Any) -> None:
    """Runs every registered job still to run on pype agents."""
    log.add_log("pype_rs_run")
    queuelog = log.programs_logs["pype_rs_run"]
    PypeRsQueue(queuelog).execute()


# -- bio-pype's queue commands -------------------------------------------------------------------


def _handler_class():
    from pype.utils.queue_commands import QueueCommandHandler

    class PypeRsCommandHandler(QueueCommandHandler):
        """Queue commands through the coordinator; a job's queue id is ``RUN/STEP``."""

        def __init__(self, runtime_file: Optional[str] = None, log: Any = None):
            self.runtime_file = runtime_file
            self.log = log

        def submit_job(self, command, requirements, run_id=None, queue_deps=None):
            raise NotImplementedError("pype_rs submits jobs with `execute`")

        def check_job_status(self, queue_id: str) -> Tuple[str, Optional[str]]:
            run, _, step = str(queue_id).partition("/")
            try:
                table = coordinator.status(run)
            except coordinator.CoordinatorError as e:
                return "unknown", str(e)
            for line in table.splitlines():
                words = line.split()
                if len(words) >= 2 and words[0] == step:
                    return STATES.get(words[1], words[1]), None
            return "unknown", f"run {run} has no step {step}"

        def _cancel_job_impl(self, queue_id: str) -> bool:
            run, _, step = str(queue_id).partition("/")
            if not run or not step:
                return False
            try:
                coordinator.cancel(run, step)
                return True
            except coordinator.CoordinatorError as e:
                if coordinator.address() is None:
                    # The embedded coordinator is gone, and its agents with it: nothing runs.
                    return True
                if self.log is not None:
                    self.log.log.error(f"[pype_rs] cancelling {queue_id}: {e}")
                return False

        def get_queue_load(self) -> int:
            return 0

    return PypeRsCommandHandler


def get_handler(runtime_data: Optional[Dict[str, Any]] = None, runtime_file: Optional[str] = None):
    """The handler ``pype resume`` and bio-pype's API commands use."""
    return _handler_class()(runtime_file=runtime_file)
