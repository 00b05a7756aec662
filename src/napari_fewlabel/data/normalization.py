"""Intensity normalisation per modality, fitted once per volume.

* CT: clip to a Hounsfield window and map it linearly to [-1, 1]. The default
  window (-300, 400) HU keeps fat, soft tissue, contrast-filled blood and
  cancellous bone apart; lungs and air all become -1. Use a wider window for
  lung or bone work.
* MR (and unknown modality): clip to the volume's 0.5th-99.5th percentiles,
  then z-score with the mean and standard deviation of the clipped volume, so
  scanner gain and a few bright outliers (vessels, fat) do not move the scale.

Statistics are taken from a strided subsample of large volumes, so fitting a
512x512x600 CT costs a small copy, not a full one. NaN voxels become the
lowest clipped value (background) and +/-Inf the window's ends; callers report
how many there were (:func:`count_nonfinite`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io.volume import Modality

NormalizationMethod = Literal["ct_window", "percentile_zscore"]

#: Samples are at most about this many voxels (strided subsample of the volume).
_MAX_SAMPLES = 4_000_000


@dataclass(frozen=True)
class NormalizationConfig:
    """How a model expects intensities; stored in the model card.

    Attributes
    ----------
    method : {"ct_window", "percentile_zscore"}
    window_hu : tuple of float
        ``(low, high)`` HU window for ``"ct_window"``.
    percentiles : tuple of float
        ``(low, high)`` clipping percentiles for ``"percentile_zscore"``.
    """

    method: NormalizationMethod = "percentile_zscore"
    window_hu: tuple[float, float] = (-300.0, 400.0)
    percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        if self.method not in ("ct_window", "percentile_zscore"):
            raise FewLabelError(
                f"Unknown normalisation {self.method!r}: use 'ct_window' or 'percentile_zscore'."
            )
        lo, hi = self.window_hu
        if not lo < hi:
            raise FewLabelError(
                f"CT window {self.window_hu} HU is empty: give (low, high), low < high."
            )
        plo, phi = self.percentiles
        if not 0 <= plo < phi <= 100:
            raise FewLabelError(
                f"Percentiles {self.percentiles} must satisfy 0 <= low < high <= 100."
            )

    @classmethod
    def for_modality(
        cls, modality: Modality, *, window_hu: tuple[float, float] | None = None
    ) -> NormalizationConfig:
        """The default for a modality: a HU window for CT, percentiles + z-score otherwise."""
        if modality == "CT":
            return cls("ct_window", window_hu=window_hu or cls.window_hu)
        return cls("percentile_zscore")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"method": self.method}
        if self.method == "ct_window":
            d["window_hu"] = list(self.window_hu)
        else:
            d["percentiles"] = list(self.percentiles)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NormalizationConfig:
        kwargs: dict[str, Any] = {"method": d["method"]}
        if "window_hu" in d:
            kwargs["window_hu"] = (float(d["window_hu"][0]), float(d["window_hu"][1]))
        if "percentiles" in d:
            kwargs["percentiles"] = (float(d["percentiles"][0]), float(d["percentiles"][1]))
        return cls(**kwargs)


@dataclass(frozen=True)
class IntensityMapping:
    """A fitted normalisation: ``(clip(v, low, high) - offset) / scale``.

    Attributes
    ----------
    low, high : float
        Clipping range in the volume's units (HU for CT).
    offset, scale : float
        Linear map applied after clipping.
    """

    low: float
    high: float
    offset: float
    scale: float

    def __call__(self, values: np.ndarray) -> np.ndarray:
        """Normalise any array of voxel values; returns float32 of the same shape."""
        v = np.asarray(values, dtype=np.float32)
        if not np.issubdtype(np.asarray(values).dtype, np.integer):
            v = np.nan_to_num(v, nan=self.low, posinf=self.high, neginf=self.low)
        v = np.clip(v, self.low, self.high)
        v -= np.float32(self.offset)
        v /= np.float32(self.scale)
        return v

    @property
    def background(self) -> float:
        """The normalised value of the lowest intensity (used to pad slices)."""
        return (self.low - self.offset) / self.scale


def fit_intensity(array: np.ndarray, config: NormalizationConfig) -> IntensityMapping:
    """Fit ``config`` to a volume.

    Parameters
    ----------
    array : ndarray, shape (z, y, x)
        Voxel values; NaN and Inf are ignored for the statistics.
    config : NormalizationConfig

    Raises
    ------
    FewLabelError
        When the volume has no finite voxel (percentile method).
    """
    if config.method == "ct_window":
        lo, hi = config.window_hu
        return IntensityMapping(lo, hi, offset=(lo + hi) / 2, scale=(hi - lo) / 2)
    sample = _subsample(array)
    if not np.issubdtype(sample.dtype, np.integer):
        sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        raise FewLabelError(
            "The image has no finite voxel (all NaN or Inf): check the file or the scanner export."
        )
    sample = sample.astype(np.float64)
    lo, hi = np.percentile(sample, config.percentiles)
    clipped = np.clip(sample, lo, hi)
    mean, std = float(clipped.mean()), float(clipped.std())
    if std <= 0:
        # A constant volume: keep the values but avoid dividing by zero.
        std = 1.0
    return IntensityMapping(float(lo), float(max(hi, lo + 1e-6)), offset=mean, scale=std)


def count_nonfinite(array: np.ndarray) -> int:
    """Number of NaN or Inf voxels (0 for integer arrays)."""
    if np.issubdtype(array.dtype, np.integer):
        return 0
    # Slice by slice so a large volume does not need a full boolean copy.
    return int(sum(np.count_nonzero(~np.isfinite(s)) for s in array))


def _subsample(array: np.ndarray) -> np.ndarray:
    stride = 1
    while array.size / stride**3 > _MAX_SAMPLES:
        stride += 1
    return np.ascontiguousarray(array[::stride, ::stride, ::stride]).ravel()
