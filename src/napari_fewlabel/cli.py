"""`fewlabel`: the command line over the headless library.

Every subcommand is a ``_cmd_<name>(args) -> int`` function registered in
:func:`build_parser`. A :class:`FewLabelError` (bad input the user can fix)
prints its sentence on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np
from nibabel.orientations import aff2axcodes

from napari_fewlabel import __version__
from napari_fewlabel.errors import FewLabelError

EXIT_USER_ERROR = 2


def _cmd_info(args: argparse.Namespace) -> int:
    from napari_fewlabel.io import load_volume

    volume = load_volume(args.path)
    data = volume.array
    finite = data[np.isfinite(data)] if data.dtype.kind == "f" else data
    info = {
        "path": str(args.path),
        "format": volume.header.get("format", "?"),
        "shape_zyx": list(volume.shape),
        "spacing_mm_zyx": [round(s, 4) for s in volume.spacing_mm],
        "file_orientation": "".join(aff2axcodes(volume.grid.affine)),
        "display_orientation": "".join(aff2axcodes(volume.affine)),
        "modality": volume.modality,
        "dtype": str(data.dtype),
        "intensity_range": [float(finite.min()), float(finite.max())] if finite.size else None,
        "affine_ras": [[round(v, 4) for v in row] for row in volume.affine.tolist()],
    }
    for key in ("SeriesDescription", "other_series", "files", "qform_code", "sform_code"):
        if key in volume.header:
            info[key] = volume.header[key]
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key == "affine_ras":
            continue
        print(f"{key:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fewlabel",
        description="Annotation-efficient MRI/CT segmentation: label a few slices, "
        "fine-tune a pretrained encoder, predict the whole volume.",
    )
    parser.add_argument("--version", action="version", version=f"napari-fewlabel {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "info",
        help="shape, spacing, orientation, intensity range and modality of a scan",
        description="Print what napari-fewlabel reads from a scan: NIfTI, NRRD, MetaImage, "
        "or a DICOM series folder.",
    )
    p.add_argument("path", help="a scan file or a DICOM series folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except FewLabelError as exc:
        print(f"fewlabel: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("fewlabel: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
