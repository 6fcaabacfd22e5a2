"""``pype-rs install``: makes bio-pype find the ``pype_rs`` queue module.

bio-pype looks queue modules up as files ``<name>.py`` in ``$PYPE_MODULES/queues`` (or
``$PYPE_QUEUES``), then in its own ``pype/pype_modules/queues``. This writes a one-line
``pype_rs.py`` there that imports this package.
"""

import argparse
import os
import sys

SHIM = '"""bio-pype queue module pype_rs (written by `pype-rs install`)."""\nfrom pype_rs.queue import StorageBackend, execute, get_handler, register  # noqa: F401\n'


def default_dir() -> str:
    if os.environ.get("PYPE_QUEUES"):
        return os.environ["PYPE_QUEUES"]
    if os.environ.get("PYPE_MODULES"):
        return os.path.join(os.environ["PYPE_MODULES"], "queues")
    import pype.pype_modules.queues as builtin

    return os.path.dirname(builtin.__file__)


def install(directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "pype_rs.py")
    with open(path, "w") as f:
        f.write(SHIM)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pype-rs")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("install", help="write queues/pype_rs.py where bio-pype finds queue modules")
    p.add_argument(
        "--dir",
        help="queues directory (default: $PYPE_QUEUES, else $PYPE_MODULES/queues, else bio-pype's own)",
    )
    args = parser.parse_args(argv)
    if args.command == "install":
        path = install(args.dir or default_dir())
        print(f"pype-rs: wrote {path}; use `pype pipelines --queue pype_rs` and PYPE_OVERLAY_MODE=pype_rs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
