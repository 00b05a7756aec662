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
from pathlib import Path

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


def _cmd_emphysema(args: argparse.Namespace) -> int:
    import csv

    from napari_fewlabel.infer.emphysema import quantify_emphysema
    from napari_fewlabel.io import load_volume, save_labels
    from napari_fewlabel.io.atomic import atomic_path

    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise FewLabelError(f"{out} is a file: give --out a folder for the results.")
    scan = load_volume(args.ct)
    # Everything is computed before the first file is written: a scan that cannot be
    # scored leaves the output folder untouched.
    report = quantify_emphysema(scan, threshold_hu=args.threshold)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FewLabelError(
            f"Cannot create {out} ({exc.strerror}): choose a folder you can write to."
        ) from exc
    written = [
        save_labels(report.lungs.labels, like=scan, path=out / "lungs.nii.gz"),
        save_labels(report.low_attenuation, like=scan, path=out / "low_attenuation.nii.gz"),
    ]
    rows = report.to_table()
    with atomic_path(out / "emphysema.csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    written.append(out / "emphysema.csv")
    document = {"scan": str(args.ct), **report.to_dict()}
    with atomic_path(out / "emphysema.json") as tmp:
        tmp.write_text(json.dumps(document, indent=2) + "\n")
    written.append(out / "emphysema.json")

    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    threshold = f"%LAA{report.threshold_hu:g}"
    print(f"{'region':<13} {'volume mL':>10} {threshold:>9} {'%LAA-910':>9} {'Perc15 HU':>10}")
    for row in rows:
        print(
            f"{row['region']:<13} {_cell(row['lung_volume_ml'], 10, 1)} "
            f"{_cell(row['laa_percent'], 9, 2)} {_cell(row['laa_910_percent'], 9, 2)} "
            f"{_cell(row['perc15_hu'], 10, 0)}"
        )
    if report.lungs.lungs_were_split:
        print("note: the lungs touched and were separated where they are thinnest")
    if not report.lungs.airway.any():
        print("note: no trachea found in the field of view")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _cell(value: object, width: int, digits: int) -> str:
    """A right-aligned number for the table, or '-' for a region without lung."""
    if not isinstance(value, int | float):
        return f"{'-':>{width}}"
    return f"{value:>{width}.{digits}f}"


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

    p = sub.add_parser(
        "emphysema",
        help="lung masks and emphysema scores (%%LAA-950, %%LAA-910, Perc15) of a chest CT",
        description="Segment the right and left lung of a chest CT in Hounsfield units and "
        "score emphysema: %%LAA (share of lung voxels below the threshold) for both lungs, "
        "each lung and the upper/middle/lower thirds, %%LAA-910 and Perc15. Writes "
        "lungs.nii.gz (1 right, 2 left), low_attenuation.nii.gz, emphysema.csv and "
        "emphysema.json to the --out folder.",
    )
    p.add_argument("ct", help="a chest CT file or DICOM series folder, in Hounsfield units")
    p.add_argument("--out", required=True, help="folder for the masks and scores")
    p.add_argument(
        "--threshold",
        type=float,
        default=-950.0,
        metavar="HU",
        help="low-attenuation threshold in HU (default -950)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_emphysema)
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
