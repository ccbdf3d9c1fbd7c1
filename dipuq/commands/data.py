"""``dipuq data list | info NAME | fetch NAME``: the registry of real CT scans."""

from __future__ import annotations

import argparse

from dipuq.data.registry import DATASETS, fetch, get, human_size


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("data", help="list, describe and download the registered real scans",
                              description="Registered real CT scans: list them, describe one, or fetch one "
                              "(from a mirror folder or by download, SHA-256 verified).")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    sub.add_parser("list", help="table of datasets: name, kind, size, licence").set_defaults(func=_list)
    info = sub.add_parser("info", help="source, licence, geometry facts and files of one dataset")
    info.add_argument("name")
    info.set_defaults(func=_info)
    fetch = sub.add_parser("fetch", help="download (or find in a mirror) and verify a dataset; print its path")
    fetch.add_argument("name")
    fetch.add_argument("--mirror", metavar="DIR", default=None,
                       help="folder holding the files (default: $DIPUQ_DATA_MIRROR)")
    fetch.add_argument("--cache", metavar="DIR", default=None,
                       help="download cache (default: $DIPUQ_CACHE or ~/.cache/dipuq)")
    fetch.set_defaults(func=_fetch)
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])
    return p


def _list(args) -> int:
    rows = [("NAME", "KIND", "SIZE", "LICENCE")]
    rows += [(d.name, d.kind, human_size(d.size), d.licence) for d in DATASETS.values()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    return 0


def _info(args) -> int:
    print(get(args.name).describe())
    return 0


def _fetch(args) -> int:
    ds = get(args.name)
    print(fetch(ds, cache_dir=args.cache, mirror=args.mirror, quiet=False))
    return 0
