"""Write real DICOM CT series (one file per slice) for the reader tests."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class DicomSeries:
    """A CT series written slice by slice, with the geometry it was written with."""

    folder: Path
    hu: np.ndarray  # (slices, rows, columns) in HU, in the order of increasing position
    first_position: np.ndarray  # LPS mm of pixel (0, 0) of the lowest slice
    row_cosines: np.ndarray
    col_cosines: np.ndarray
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    slice_step_mm: float

    def world_lps(self, slice_index: int, row: int, column: int) -> np.ndarray:
        """DICOM's pixel -> patient mapping, from ImagePositionPatient."""
        normal = np.cross(self.row_cosines, self.col_cosines)
        return (
            self.first_position
            + slice_index * self.slice_step_mm * normal
            + column * self.pixel_spacing[1] * self.row_cosines
            + row * self.pixel_spacing[0] * self.col_cosines
        )


def write_ct_series(
    folder: Path,
    hu: np.ndarray,
    *,
    first_position: np.ndarray,
    pixel_spacing: tuple[float, float],
    slice_step_mm: float,
    row_cosines: tuple[float, float, float] = (1.0, 0.0, 0.0),
    col_cosines: tuple[float, float, float] = (0.0, 1.0, 0.0),
    series_uid: str | None = None,
    series_number: int = 2,
    description: str = "Chest CT",
    seed: int = 0,
) -> DicomSeries:
    """Write ``hu`` (slices, rows, columns) as CT Image Storage files.

    File names and InstanceNumbers are shuffled so that only
    ImagePositionPatient gives the right order.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    row_cosines, col_cosines = np.asarray(row_cosines, float), np.asarray(col_cosines, float)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid(entropy_srcs=["fewlabel-study"])
    normal = np.cross(row_cosines, col_cosines)
    rng = random.Random(seed)
    order = list(range(hu.shape[0]))
    rng.shuffle(order)
    for instance, k in enumerate(order, start=1):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.Modality = "CT"
        ds.SeriesDescription = description
        ds.SeriesNumber = series_number
        ds.InstanceNumber = instance
        ds.PatientName = "Phantom^Test"
        ds.PatientID = "FEWLABEL"
        ds.FrameOfReferenceUID = generate_uid(entropy_srcs=["fewlabel-frame"])
        position = first_position + k * slice_step_mm * normal
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_cosines, *col_cosines)]
        ds.PixelSpacing = [f"{pixel_spacing[0]:.6f}", f"{pixel_spacing[1]:.6f}"]
        ds.SliceThickness = f"{slice_step_mm:.6f}"
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.PixelData = (hu[k].astype(np.int32) + 1024).clip(0, 65535).astype("<u2").tobytes()
        ds.save_as(folder / f"IM{rng.randrange(10**6):06d}_{instance}", enforce_file_format=True)
    return DicomSeries(
        folder=folder,
        hu=hu,
        first_position=np.asarray(first_position, dtype=float),
        row_cosines=row_cosines,
        col_cosines=col_cosines,
        pixel_spacing=pixel_spacing,
        slice_step_mm=slice_step_mm,
    )
