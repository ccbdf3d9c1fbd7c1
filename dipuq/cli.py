"""``dipuq`` command line: a thin layer over the Python API.

Each sub-command lives in :mod:`dipuq.commands` as a module with ``add_parser(subparsers)``
(which registers it and sets ``func``). Errors a user can fix print one line and exit 2
(no traceback unless ``--debug``).
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import zipfile
import zlib

from dipuq import __version__, threads
from dipuq.commands import data, demo, experiment, info, reconstruct, show
from dipuq.devices import is_oom, oom_error
from dipuq.errors import DipuqError

#: The sub-commands, in the order ``dipuq --help`` lists them.
COMMANDS = (reconstruct, show, demo, experiment, data, info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dipuq",
        description="CT reconstruction with error bars: a deep image prior fitted to the projections, "
        "linearised, and sampled to give a per-voxel standard deviation.",
    )
    parser.add_argument("--version", action="version", version=f"dipuq {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("dipuq: interrupted (completed stages are kept; rerun the same command to resume)", file=sys.stderr)
        return 130
    except _USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"dipuq: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # CUDA out of memory outside the pipeline's stages (e.g. an experiment baseline)
        if args.debug or not is_oom(exc):
            raise
        print(f"dipuq: error: {_one_line(oom_error(exc))}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """Failures a user can act on: bad input, and files (theirs or a checkpoint) that cannot be
    read — OS errors, truncated zip/NPZ/pickle streams, HDF5/TIFF errors (OSError subclasses) and
    running out of memory. Anything else is a bug and keeps its traceback."""
    return (DipuqError, OSError, EOFError, MemoryError, zipfile.BadZipFile, pickle.UnpicklingError, zlib.error)


_USER_ERRORS = _user_errors()


def _one_line(exc: BaseException) -> str:
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename:
        msg = f"{exc.strerror or type(exc).__name__}: {exc.filename}"
    elif isinstance(exc, MemoryError) and not isinstance(exc, DipuqError):
        msg = f"out of memory ({msg}); reduce the problem size (data.bin, data.vol_xy, sampler.chains_per_batch)"
    elif not isinstance(exc, DipuqError):
        msg = f"cannot read a file: {type(exc).__name__}: {msg} (truncated or corrupt?)"
    return " ".join(msg.split())


def run() -> None:
    """Console-script entry: :func:`main`, then exit with its code.

    A torchrun rank (it formed a process group) leaves through ``os._exit`` after flushing its
    output, skipping the interpreter teardown in which native communication threads can abort a
    finished rank (see :func:`dipuq.samplers.ranks.made_process_group`).
    """
    threads.configure()
    code = main()
    dist_mod = sys.modules.get("dipuq.samplers.ranks")
    if dist_mod is not None and dist_mod.made_process_group():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
