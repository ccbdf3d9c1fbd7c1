"""``dipuq info [--json]``: this machine as dipuq sees it, for bug reports."""

from __future__ import annotations

import argparse
import json

DESCRIPTION = """\
Print what a bug report needs: dipuq, Python and library versions; the projector backends usable
on this machine (ASTRA CPU, ASTRA CUDA, dipuq's cpu-cone) and which one 'auto' picks; torch's CUDA
build and devices (name, memory); thread settings; the data cache and mirror folders and which
registered datasets they hold.

Safe on any machine: ASTRA's CUDA functions are only probed when torch sees a CUDA device.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("info", help="versions, usable backends, GPUs, threads, data folders (for bug reports)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from dipuq.devices import environment, format_environment

    info = environment()
    print(json.dumps(info, indent=2) if args.json else format_environment(info))
    return 0
