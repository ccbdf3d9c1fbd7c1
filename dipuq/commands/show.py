"""``dipuq show RUN``: slice figures of a finished run (written to PNG; no window is opened)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from dipuq.data.scan import Scan
from dipuq.errors import DipuqError
from dipuq.show import prepare

DESCRIPTION = """\
Write slice figures of a run directory: reconstruction, posterior std and, when the scan has a
reference, the reference, |error| and z-score, with shared colour scales. Without --axis all
three orthogonal views through the centre (or through --slice) are drawn; with --axis one view.
Figures are written to PNG files (no window is ever opened, so it works over ssh and in batch jobs).
"""

EPILOG = """\
examples:
  dipuq show runs/demo                       # figures/show_center.png
  dipuq show runs/demo --axis z --slice 20   # one axial slice
  dipuq show runs/demo --axis x --out sagittal.png
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("show", help="write slice figures of a run", description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="run directory written by `dipuq reconstruct` or `dipuq demo`")
    p.add_argument("--axis", choices=("z", "y", "x"), default=None,
                   help="z = axial, y = coronal, x = sagittal (default: all three)")
    p.add_argument("--slice", dest="index", default=None, metavar="K",
                   help="slice index along --axis (default: the middle); without --axis: the same index on every axis")
    p.add_argument("--out", "-o", metavar="FILE", default=None, help="PNG file to write (default: RUN/figures/show_*.png)")
    p.add_argument("--dpi", type=int, default=110, help="figure resolution (default 110)")
    p.set_defaults(func=main)
    return p


def load_run(run: Path):
    """(recon, std, reference or None, voxel_size, title) from a run directory."""
    if not run.is_dir():
        raise DipuqError(f"run directory not found: {run}")
    for name in ("recon.npy", "std.npy"):
        if not (run / name).is_file():
            raise DipuqError(f"{run} has no {name}: not a finished dipuq run (run `dipuq reconstruct` first)")
    try:
        recon, std = np.load(run / "recon.npy"), np.load(run / "std.npy")
    except (OSError, ValueError) as exc:
        raise DipuqError(f"cannot read {run}/recon.npy or std.npy: {exc}") from None
    if recon.shape != std.shape or recon.ndim not in (2, 3):
        raise DipuqError(f"{run}: recon {recon.shape} and std {std.shape} must be the same 2D or 3D shape")
    reference, voxel, title = None, None, run.name
    scans = sorted((run / "stages").glob("*_scan/scan.npz"))
    if scans:
        scan = Scan.load(scans[0])
        if scan.reference is not None and scan.reference.shape == recon.shape:
            reference = scan.reference
        voxel, title = scan.geometry.voxel_size, scan.name or title
    return recon, std, reference, voxel, title


def main(args: argparse.Namespace) -> int:
    from dipuq.show import viz  # here, not at the top: `dipuq --help` need not load matplotlib

    run = Path(args.run)
    recon, std, reference, voxel, title = load_run(run)
    maps = prepare.derived_maps(recon, std, reference)
    shape = recon.shape
    index = None
    if args.index is not None:
        try:
            index = int(args.index)
        except ValueError:
            raise DipuqError(f"--slice must be an integer, got {args.index!r}") from None
    if recon.ndim == 2:
        if args.axis not in (None, "z") or index not in (None, 0):
            raise DipuqError("this run is 2D: it has a single image (no --axis/--slice to choose)")
        axes, indices, tag = ("z",), {}, "image"
    else:
        axes = (args.axis,) if args.axis else ("z", "y", "x")
        indices = {}
        for a in axes:
            n = shape["zyx".index(a)]
            k = n // 2 if index is None else index
            if not 0 <= k < n:
                raise DipuqError(f"--slice {k} is outside axis {a} (0..{n - 1})")
            indices[a] = k
        tag = f"{args.axis}{indices[args.axis]}" if args.axis else ("center" if index is None else f"slice{index}")
    out = Path(args.out) if args.out else run / "figures" / f"show_{tag}.png"
    if out.suffix.lower() != ".png":
        raise DipuqError(f"--out must be a .png file, got {out}")
    fig = viz.orthoslices(maps, axes=axes, indices=indices, title=title, voxel_size=voxel)
    viz.save_figure(fig, out, dpi=args.dpi)
    print(out)
    return 0
