from __future__ import annotations

import os

import numpy as np
import pytest

import real_data
from dicom_writer import DicomSeries, write_ct_series

# Two cores: keep torch from oversubscribing them when several tests share a process.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def lung1_dicom(tmp_path_factory: pytest.TempPathFactory) -> DicomSeries:
    """lung1 CT written as a real one-file-per-slice DICOM series, plus a 2-image scout."""
    import SimpleITK as sitk

    pytest.importorskip("pydicom")
    image = sitk.ReadImage(str(real_data.lung1_image()))
    hu = sitk.GetArrayFromImage(image)  # (slices, rows, columns)
    folder = tmp_path_factory.mktemp("lung1_dicom")
    spacing = image.GetSpacing()
    series = write_ct_series(
        folder / "series",
        hu,
        first_position=np.asarray(image.GetOrigin()),
        pixel_spacing=(spacing[1], spacing[0]),
        slice_step_mm=spacing[2],
    )
    # A scout in another series next to it: the reader must pick the CT and name the scout.
    write_ct_series(
        folder / "series" / "scout",
        hu[:2, ::8, ::8],
        first_position=np.asarray(image.GetOrigin()),
        pixel_spacing=(spacing[1] * 8, spacing[0] * 8),
        slice_step_mm=spacing[2],
        series_number=1,
        description="Scout",
    )
    return series
