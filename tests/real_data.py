"""Where the real scans of ../shared/DATA.md live once `scripts/fetch_test_data.sh` ran.

Tests ask for them through the fixtures in conftest.py; a missing file skips
the test with a message saying how to get it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

DATA_DIR = Path(
    os.environ.get("FEWLABEL_TEST_DATA", Path.home() / ".cache/napari-fewlabel/test-data")
)
ITK_DATA = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")
INVESALIUS = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
FETCH_HINT = "run `bash scripts/fetch_test_data.sh` (installs the real test scans)"


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def require(path: Path | None, what: str) -> Path:
    """``path`` if it exists, else skip the calling test with a how-to."""
    if path is None or not path.exists():
        pytest.skip(f"{what} not found ({path}): {FETCH_HINT}")
    return path


def itk_t1() -> Path:
    return require(ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz", "ITK KmeansTest T1")


def itk_t1_labels() -> Path:
    return require(
        ITK_DATA / "KmeansTest_T1KmeansPrelimSegmentation.nii.gz", "ITK KmeansTest labels"
    )


def itk_t1_skullstrip() -> Path:
    return require(ITK_DATA / "KmeansTest_T1RawSkullStrip.nii.gz", "ITK KmeansTest skull strip")


def nibabel_anatomical() -> Path:
    base = _package_dir("nibabel")
    return require(base and base / "tests/data/anatomical.nii", "nibabel anatomical.nii")


def lung1_image() -> Path:
    return require(DATA_DIR / "pyradiomics/lung1_image.nrrd", "pyradiomics lung1 CT")


def lung1_label() -> Path:
    return require(DATA_DIR / "pyradiomics/lung1_label.nrrd", "pyradiomics lung1 label")


def lung2_image() -> Path:
    return require(DATA_DIR / "pyradiomics/lung2_image.nrrd", "pyradiomics lung2 CT")


def lung2_label() -> Path:
    return require(DATA_DIR / "pyradiomics/lung2_label.nrrd", "pyradiomics lung2 label")


def pydicom_tests() -> Path:
    base = _package_dir("pydicom")
    return require(base and base / "data/test_files", "pydicom test files (pip install pydicom)")


def dipy_s0_10slices() -> Path:
    base = _package_dir("dipy")
    return require(
        base and base / "data/files/S0_10slices.nii.gz", "dipy S0_10slices (pip install dipy)"
    )


def mni152(kind: str = "t1") -> Path:
    base = _package_dir("nilearn")
    name = f"datasets/data/mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"
    return require(base and base / name, f"MNI152 {kind} (pip install nilearn)")


def invesalius_head_ct() -> Path:
    return require(INVESALIUS, "InVesalius Cranium.inv3 head CT")
