"""Run bio-pype pipelines on pype agents.

``pype_rs.queue`` is bio-pype's queue module ``pype_rs`` (``register``, ``execute``,
``get_handler``) and its ``StorageBackend`` (``PYPE_OVERLAY_MODE=pype_rs``); bio-pype finds it
through the one-line file ``queues/pype_rs.py`` that ``pype-rs install`` writes.
"""

__version__ = "0.1.0"

#: Version of the storage-backend protocol spoken to the agent (PROTOCOL.md).
SERVED_PROTOCOL = 1
#: Version of the JSON pipeline ``pype-coordinator run --json`` reads.
PIPELINE_VERSION = 1
#: Version of the event lines ``pype-coordinator run --json`` writes.
EVENTS_VERSION = 1
