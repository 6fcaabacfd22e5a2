"""``StorageBackend`` for ``PYPE_OVERLAY_MODE=pype_rs``.

bio-pype makes one backend per code chunk. Inside a pype step (``PYPE_RS_SOCKET`` set by the
agent) every method is a call to the agent over its Unix socket, one JSON object per line
(PROTOCOL.md, "Storage backend served to a step"): the agent restores inputs and programs
from the snapshot store, redirects outputs to scratch, and stores harvests as snapshots.
Where ``pype pipelines`` plans (no agent), ``check_outputs`` asks the coordinator instead, so
skip and prune follow the registry, not this host's disk.
"""

import json
import os
import socket
from typing import Any, Dict, List, Optional

from . import SERVED_PROTOCOL
from . import coordinator

SOCKET_ENV = "PYPE_RS_SOCKET"


class BackendError(RuntimeError):
    """The agent refused or failed a storage call."""


def _overlay_volume_class():
    from pype.utils.overlay import OverlayVolume

    return OverlayVolume


def _as_dict(v: Any) -> Dict[str, Any]:
    return {
        "path": str(v.path),
        "original_dir": str(v.original_dir),
        "scratch_dir": str(v.scratch_dir),
        "bind_file": str(v.bind_file),
        "harvest": bool(v.harvest),
    }


def merge_registry_file(path: str, entries: Dict[str, Any]) -> None:
    """Merges entries into a registry file (bio-pype's JSON, ``indent=2``), atomically."""
    if not entries:
        return
    import fcntl

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # Chunks of one job may harvest at once: one writer at a time.
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current: Dict[str, Any] = {}
        if os.path.isfile(path):
            with open(path) as f:
                try:
                    current = json.load(f)
                except ValueError:
                    current = {}
        current.update(entries)
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(current, f, indent=2)
        os.replace(tmp, path)


class StorageBackend:
    """bio-pype's backend interface, served by the pype agent running the job."""

    def __init__(self, log: Any = None):
        self.log = log
        self._socket_path = os.environ.get(SOCKET_ENV) or None
        self._sock: Optional[socket.socket] = None
        self._reader = None
        self._next_id = 0

    # -- transport ---------------------------------------------------------------------------

    def _say(self, level: str, msg: str) -> None:
        logger = getattr(self.log, "log", None)
        if logger is not None:
            getattr(logger, level)(f"pype_rs: {msg}")

    def _connect(self) -> None:
        if self._socket_path is None:
            raise BackendError(
                "PYPE_OVERLAY_MODE=pype_rs needs a pype agent: this process runs outside a pype step "
                f"({SOCKET_ENV} is not set); submit the pipeline with --queue pype_rs"
            )
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self._socket_path)
        except OSError as e:
            s.close()
            raise BackendError(f"cannot reach the pype agent at {self._socket_path}: {e}")
        self._sock = s
        self._reader = s.makefile("rb")
        try:
            init = self._call_raw("init", {"protocol": SERVED_PROTOCOL, "pid": os.getpid()})
            if init.get("protocol") != SERVED_PROTOCOL:
                raise BackendError(
                    f"the pype agent speaks storage protocol {init.get('protocol')}, this pype_rs {SERVED_PROTOCOL}"
                )
        except BackendError:
            self._reader.close()
            s.close()
            self._sock = None
            raise

    def _call_raw(self, method: str, params: Dict[str, Any]) -> Dict[str, Any]:
        self._next_id += 1
        line = json.dumps({"id": self._next_id, "method": method, "params": params}) + "\n"
        try:
            self._sock.sendall(line.encode())
            answer = self._reader.readline()
        except OSError as e:
            raise BackendError(f"{method}: the connection to the pype agent failed: {e}")
        if not answer:
            raise BackendError(f"{method}: the pype agent closed the connection")
        try:
            reply = json.loads(answer)
        except ValueError:
            raise BackendError(f"{method}: the pype agent answered with a line that is not JSON")
        if "error" in reply:
            message = (reply.get("error") or {}).get("message", "unknown error")
            self._say("error", f"{method} refused by the agent: {message}")
            raise BackendError(f"{method}: {message}")
        return reply.get("result") or {}

    def _call(self, method: str, params: Dict[str, Any]) -> Dict[str, Any]:
        if self._sock is None:
            self._connect()
        return self._call_raw(method, params)

    def _replace_volumes(self, overlay_volumes: List[Any], result: Dict[str, Any]) -> None:
        if "overlay_volumes" not in result:
            return
        OverlayVolume = _overlay_volume_class()
        overlay_volumes[:] = [OverlayVolume(**v) for v in result["overlay_volumes"]]

    # -- bio-pype's eight methods ------------------------------------------------------------

    def prepare_inputs(self, inputs: List[str], overlay_volumes: List[Any]) -> None:
        result = self._call(
            "prepare_inputs",
            {"inputs": [str(i) for i in inputs], "overlay_volumes": [_as_dict(v) for v in overlay_volumes]},
        )
        for w in result.get("warnings", []):
            self._say("warning", w)
        self._replace_volumes(overlay_volumes, result)

    def restore_program(self, profile_name: str, program_key: str) -> None:
        result = self._call("restore_program", {"profile_name": profile_name, "program_key": program_key})
        for w in result.get("warnings", []):
            self._say("warning", w)

    def prepare_outputs(self, outputs: List[str], output_harvest: Dict[str, bool], overlay_volumes: List[Any]) -> None:
        result = self._call(
            "prepare_outputs",
            {
                "outputs": [str(o) for o in outputs],
                "output_harvest": {str(k): bool(v) for k, v in (output_harvest or {}).items()},
                "overlay_volumes": [_as_dict(v) for v in overlay_volumes],
            },
        )
        self._replace_volumes(overlay_volumes, result)

    def harvest(self, upper: Any, original_dir: Any) -> None:
        result = self._call("harvest", {"upper": str(upper), "original_dir": str(original_dir)})
        entries = result.get("new_entries") or {}
        log_dir = getattr(self.log, "__path__", None)
        if entries and log_dir:
            # As bio-pype's cloud backend: the step's entries beside its logs.
            merge_registry_file(os.path.join(str(log_dir), "snapshot_registry.json"), entries)
        self._say("info", f"harvested {len(entries)} registry entries from {original_dir}")

    def cleanup(self) -> None:
        if self._sock is None:
            return
        try:
            self._call_raw("cleanup", {})
        finally:
            try:
                self._reader.close()
                self._sock.close()
            finally:
                self._sock = None

    def check_outputs(self, paths: List[str]) -> Dict[str, Optional[int]]:
        paths = [str(p) for p in paths]
        if self._socket_path is None:
            # Where `pype pipelines` plans: the coordinator's registry is the truth.
            return coordinator.paths_present(paths)
        result = self._call("check_outputs", {"paths": paths})
        sizes = result.get("sizes") or {}
        return {p: sizes.get(p) for p in paths}

    def prepare_build(self, paths: List[str], program_keys: Optional[List[str]] = None) -> None:
        self._call("prepare_build", {"paths": [str(p) for p in paths], "program_keys": list(program_keys or [])})

    def stage_program(self, profile_name: str, program_key: str, artifact_path: Any) -> None:
        self._call(
            "stage_program",
            {"profile_name": profile_name, "program_key": program_key, "artifact_path": str(artifact_path)},
        )

    def __del__(self):
        s = getattr(self, "_sock", None)
        if s is not None:
            try:
                s.close()
            except OSError:
                pass
