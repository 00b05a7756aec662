"""A deterministic **synthetic** cardiac phantom (MRI-like and CT-like).

No real cardiac scan with cardiac labels can be installed on the machines this
project runs on, so tests, the napari sample data and the MRI -> CT adaptation
experiments use this generated volume. It is *synthetic*: simple shapes with
realistic intensities, not anatomy from a patient.

Geometry
--------
The array is ``(z, y, x)`` in display orientation (see
:mod:`napari_fewlabel.io.volume`): axis 0 runs from the apex of the left
ventricle (``z = 0``) toward the base and the great vessels, so an axial slice
looks like a cardiac short-axis view. Anterior is at the top of a slice, the
patient's left on the right of the screen. Along ``z`` the heart changes
smoothly: the LV appears at the apex as a solid myocardial cap, opens into a
ring around a growing blood pool, the RV crescent joins it, and near the base
the left atrium (posterior) and the ascending aorta join them in the upper
half while the ventricles narrow toward the base. Centres, radii and
wall shapes drift with ``z`` under seed-dependent low-frequency harmonics, so a
few labelled slices do not give the others by copying.

Labels (:data:`CARDIAC_CLASSES`, names and colours in one place)
-----------------------------------------------------------------
0 background, 1 LV blood pool (papillary muscles included, as in ACDC),
2 LV myocardium, 3 RV blood pool, 4 left atrium, 5 ascending aorta.
Unlabelled look-alikes are there on purpose: the descending aorta and the
superior vena cava are blood too, the RV free wall is muscle.

Appearance
----------
* ``"CT"``: contrast-enhanced CT in Hounsfield units (``int16``): air -1000,
  lungs about -860 with vessels, fat -100, muscle 45, myocardium 110, blood
  pools 300-400 (RV lower from mixing), SVC 600, bone 250-900, Gaussian noise
  of about 18 HU.
* ``"MR"``: balanced-SSFP-like magnitude (``float32``, arbitrary units): blood
  bright, fat bright, myocardium darker than skeletal muscle, lungs dark, a
  smooth multiplicative coil bias field and Rician noise.

The contrast ordering differs between the two (fat is brighter than
myocardium on MR, darker on CT; bone is bright on CT, dark-rimmed on MR), so a
model trained on the MRI phantom should do badly on the CT phantom, as a real
MRI model does on CT. Partial volume comes from smoothing the ideal intensity
map before the noise is added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from napari_fewlabel.data.classes import SegmentationClass
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io.volume import Volume

#: The phantom's classes: label value, name and RGB colour.
CARDIAC_CLASSES: tuple[SegmentationClass, ...] = (
    SegmentationClass(0, "background", (0, 0, 0)),
    SegmentationClass(1, "LV blood pool", (220, 50, 47)),
    SegmentationClass(2, "LV myocardium", (133, 153, 0)),
    SegmentationClass(3, "RV blood pool", (38, 139, 210)),
    SegmentationClass(4, "left atrium", (181, 137, 0)),
    SegmentationClass(5, "ascending aorta", (211, 54, 130)),
)

LV_BLOOD, LV_MYOCARDIUM, RV_BLOOD, LEFT_ATRIUM, AORTA = 1, 2, 3, 4, 5

PhantomModality = Literal["MR", "CT"]

# Tissue codes of the ideal (noise-free) tissue map; labels are derived from them.
(_AIR, _LUNG, _FAT, _MUSCLE, _MYO, _LV, _RV, _LA, _AO, _DESC_AO, _SVC, _CORTEX, _MARROW, _VESSEL,
 _PAPILLARY) = range(15)  # fmt: skip

# Intensity of each tissue code.
_CT_HU = {
    _AIR: -1000.0,
    _LUNG: -860.0,
    _FAT: -100.0,
    _MUSCLE: 45.0,
    _MYO: 110.0,
    _LV: 380.0,
    _RV: 300.0,
    _LA: 360.0,
    _AO: 400.0,
    _DESC_AO: 390.0,
    _SVC: 600.0,
    _CORTEX: 900.0,
    _MARROW: 250.0,
    _VESSEL: 60.0,
    _PAPILLARY: 110.0,
}
_MR_SIGNAL = {
    _AIR: 0.0,
    _LUNG: 30.0,
    _FAT: 700.0,
    _MUSCLE: 260.0,
    _MYO: 190.0,
    _LV: 860.0,
    _RV: 800.0,
    _LA: 820.0,
    _AO: 780.0,
    _DESC_AO: 760.0,
    _SVC: 740.0,
    _CORTEX: 40.0,
    _MARROW: 520.0,
    _VESSEL: 350.0,
    _PAPILLARY: 190.0,
}


@dataclass(frozen=True)
class CardiacPhantom:
    """A synthetic cardiac scan with its ground-truth labels.

    Attributes
    ----------
    image : Volume
        Intensities, ``(z, y, x)``; HU (``int16``) for CT, arbitrary units
        (``float32``) for MR.
    labels : Volume
        Ground truth (``uint8``), same geometry, values in :data:`CARDIAC_CLASSES`.
    classes : tuple of SegmentationClass
        :data:`CARDIAC_CLASSES`.
    """

    image: Volume
    labels: Volume
    classes: tuple[SegmentationClass, ...] = CARDIAC_CLASSES


def cardiac_phantom(
    modality: PhantomModality = "MR",
    seed: int = 0,
    shape: tuple[int, int, int] = (48, 128, 128),
    spacing_mm: tuple[float, float, float] = (2.0, 1.5, 1.5),
) -> CardiacPhantom:
    """Generate the synthetic cardiac phantom.

    The same ``seed`` and ``shape`` give the same anatomy for both modalities,
    so ``cardiac_phantom("MR", 3)`` and ``cardiac_phantom("CT", 3)`` are a
    paired MRI/CT "patient" with identical labels.

    Parameters
    ----------
    modality : {"MR", "CT"}
        Appearance.
    seed : int
        Anatomy variation and noise.
    shape : tuple of int
        ``(z, y, x)`` voxels; the anatomy scales with the field of view.
    spacing_mm : tuple of float
        Voxel size ``(z, y, x)`` in mm (stored in the volumes' geometry).

    Returns
    -------
    CardiacPhantom
    """
    if modality not in ("MR", "CT"):
        raise FewLabelError(f"The phantom comes as 'MR' or 'CT', not {modality!r}.")
    if min(shape) < 8:
        raise FewLabelError(f"Phantom shape {shape} is too small: use at least 8 voxels per axis.")
    tissue = _tissue_map(shape, seed)
    labels = _labels_from_tissue(tissue)
    rng = np.random.default_rng([seed, 1 if modality == "CT" else 2])
    image = _render_ct(tissue, rng) if modality == "CT" else _render_mr(tissue, rng)
    header = {"synthetic": True, "phantom": "cardiac", "seed": int(seed)}
    image_volume = Volume.from_array(image, spacing_mm, modality=modality, header=header)
    label_volume = Volume.from_array(labels, spacing_mm, modality=modality, header=header)
    return CardiacPhantom(image=image_volume, labels=label_volume)


# --------------------------------------------------------------------- anatomy
def _smooth_series(rng: np.random.Generator, t: np.ndarray, amplitude: float) -> np.ndarray:
    """A random smooth function of ``t`` in [0, 1]: a few low-frequency sines."""
    out = np.zeros_like(t)
    for freq in (0.5, 1.0, 1.7):
        out += rng.uniform(-1, 1) * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
    return amplitude * out / 3.0


def _tissue_map(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Tissue codes ``(z, y, x)`` (uint8) of the noise-free phantom."""
    nz, ny, nx = shape
    rng = np.random.default_rng([seed, 0])
    t = (np.arange(nz) + 0.5) / nz  # 0 at the apex end, 1 at the great vessels
    # In-plane coordinates in [-1, 1] across the field of view (y down = posterior).
    v = (np.arange(ny) + 0.5) / ny * 2 - 1
    u = (np.arange(nx) + 0.5) / nx * 2 - 1
    vv, uu = np.meshgrid(v, u, indexing="ij")
    angle = np.arctan2(vv, uu)

    tissue = np.full(shape, _AIR, dtype=np.uint8)
    drift_v = _smooth_series(rng, t, 0.04)
    drift_u = _smooth_series(rng, t, 0.04)
    wall_a2 = 0.06 + _smooth_series(rng, t, 0.05)
    wall_phase = rng.uniform(0, np.pi) + _smooth_series(rng, t, 1.0)
    lung_vessels = _lung_vessel_field(shape, rng)

    def ellipse(cv: float, cu: float, rv: float, ru: float) -> np.ndarray:
        return ((vv - cv) / rv) ** 2 + ((uu - cu) / ru) ** 2 <= 1.0

    heart = 1.2 * rng.uniform(0.92, 1.08)  # heart size relative to the thorax
    fat_px = max(1, round(0.03 * min(ny, nx)))
    for k in range(nz):
        tk = t[k]
        sl = tissue[k]
        # Thorax: skin/fat, muscle, lungs, spine and descending aorta, mediastinal fat.
        sl[ellipse(0.05, 0.0, 0.72, 0.96)] = _FAT
        sl[ellipse(0.05, 0.0, 0.66, 0.90)] = _MUSCLE
        for side in (-1.0, 1.0):
            lung = ellipse(0.02, side * 0.47, 0.52, 0.36)
            sl[lung] = _LUNG
            sl[lung & lung_vessels[k]] = _VESSEL
        sl[ellipse(0.60, 0.0, 0.13, 0.13)] = _CORTEX
        sl[ellipse(0.60, 0.0, 0.10, 0.10)] = _MARROW
        sl[ellipse(0.42, 0.14, 0.07, 0.07)] = _DESC_AO

        # Heart centre drifts smoothly; everything cardiac is placed relative to it.
        cv, cu = -0.04 + drift_v[k], 0.14 + 0.05 * tk + drift_u[k]
        r = np.hypot(vv - cv, uu - cu)
        shape_mod = 1.0 + wall_a2[k] * np.cos(2 * (angle - wall_phase[k]))

        # Left atrium: posterior to the LV, from mid-heart to above the ventricles.
        s_la = (tk - 0.72) / 0.36
        if abs(s_la) < 1:
            r_la = 0.15 * heart * np.sqrt(1 - s_la**2)
            sl[ellipse(cv + 0.27 * heart, cu - 0.06, r_la * 0.8, r_la)] = _LA
        # Right ventricle: a crescent wrapped round the septum that narrows toward the
        # outflow tract at the top, with a thin free wall.
        s_rv = (tk - 0.10) / 0.88
        if 0 < s_rv < 1:
            grow = np.sin(np.pi * min(1.0, s_rv * 1.5) / 2) ** 0.5 * np.sqrt(
                min(1.0, (1 - s_rv) / 0.3)
            )
            rv_v, rv_u = 0.22 * grow * heart, 0.25 * grow * heart
            c_rv = (cv - (0.08 + 0.08 * s_rv) * heart, cu - (0.17 + 0.04 * s_rv) * heart)
            sl[ellipse(*c_rv, rv_v + 0.025, rv_u + 0.025)] = _MUSCLE
            sl[ellipse(*c_rv, rv_v, rv_u)] = _RV
        # Left ventricle: a myocardial cap at the apex, a ring round the blood pool,
        # narrowing again toward the base.
        s_lv = (tk - 0.04) / 0.94
        if 0 < s_lv < 1:
            base_taper = np.sqrt(min(1.0, (1 - s_lv) / 0.25))
            r_epi = 0.26 * heart * np.sqrt(min(1.0, s_lv * 1.6)) * (0.4 + 0.6 * base_taper)
            thickness = (0.085 - 0.02 * s_lv) * heart
            sl[r <= r_epi * shape_mod] = _MYO
            r_endo = max(0.0, r_epi - thickness)
            if r_endo > 0:
                sl[r <= r_endo * shape_mod] = _LV
                if 0.2 < s_lv < 0.7:  # papillary muscles: myocardium look, blood-pool label
                    for a in (0.6, 2.2):
                        pv = cv + 0.6 * r_endo * np.sin(a + 0.2 * wall_phase[k])
                        pu = cu + 0.6 * r_endo * np.cos(a + 0.2 * wall_phase[k])
                        sl[ellipse(pv, pu, 0.03, 0.03)] = _PAPILLARY
        # Ascending aorta: a tilted tube rising between the RV outflow and the LA.
        s_ao = (tk - 0.40) / 0.60
        if 0 <= s_ao <= 1:
            r_ao = 0.10 * heart * min(1.0, 0.6 + 3 * s_ao)
            c_ao = (cv + (0.10 - 0.10 * s_ao) * heart, cu - (0.26 + 0.04 * s_ao) * heart)
            sl[ellipse(*c_ao, r_ao, r_ao)] = _AO
            if s_ao > 0.4:  # the SVC runs beside it, to the patient's right
                sl[ellipse(c_ao[0] + 0.02, c_ao[1] - 0.2, 0.05, 0.05)] = _SVC
        # Epicardial fat: a thin layer round the heart, where it meets lung or soft tissue.
        cardiac = np.isin(sl, (_MYO, _LV, _RV, _LA, _AO, _PAPILLARY))
        if cardiac.any():
            shell = ndimage.binary_dilation(cardiac, iterations=fat_px) & ~cardiac
            sl[shell & ((sl == _LUNG) | (sl == _MUSCLE) | (sl == _VESSEL))] = _FAT
    return tissue


def _lung_vessel_field(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Thin branching-looking bright structures in the lungs (bool, ``(z, y, x)``)."""
    noise = rng.standard_normal(shape).astype(np.float32)
    smooth = ndimage.gaussian_filter(noise, sigma=(1.5, 2.0, 2.0))
    smooth /= smooth.std() + 1e-6
    return np.abs(smooth) < 0.08


def _labels_from_tissue(tissue: np.ndarray) -> np.ndarray:
    labels = np.zeros(tissue.shape, dtype=np.uint8)
    labels[(tissue == _LV) | (tissue == _PAPILLARY)] = LV_BLOOD
    labels[tissue == _MYO] = LV_MYOCARDIUM
    labels[tissue == _RV] = RV_BLOOD
    labels[tissue == _LA] = LEFT_ATRIUM
    labels[tissue == _AO] = AORTA
    return labels


# ------------------------------------------------------------------ appearance
def _ideal_intensity(tissue: np.ndarray, table: dict[int, float]) -> np.ndarray:
    lut = np.zeros(256, dtype=np.float32)
    for code, value in table.items():
        lut[code] = value
    return lut[tissue]


def _render_ct(tissue: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    hu = _ideal_intensity(tissue, _CT_HU)
    hu = ndimage.gaussian_filter(hu, sigma=(0.5, 0.8, 0.8))  # partial volume
    hu += rng.normal(0.0, 18.0, size=hu.shape).astype(np.float32)
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16)


def _render_mr(tissue: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    signal = _ideal_intensity(tissue, _MR_SIGNAL)
    signal = ndimage.gaussian_filter(signal, sigma=(0.6, 0.9, 0.9))
    nz, ny, nx = tissue.shape
    z, y, x = np.meshgrid(
        np.linspace(-1, 1, nz), np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij"
    )
    # Surface-coil bias: brighter anteriorly and toward one side, smooth in z.
    gy, gx, gz = rng.uniform(0.25, 0.4), rng.uniform(-0.15, 0.15), rng.uniform(-0.1, 0.1)
    bias = np.exp(-gy * y + gx * x + gz * z - 0.12 * (x**2 + y**2)).astype(np.float32)
    signal *= bias
    # Rician noise: magnitude of a complex signal with Gaussian noise in both channels.
    sigma = 22.0
    real = signal + rng.normal(0.0, sigma, size=signal.shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, size=signal.shape).astype(np.float32)
    return np.sqrt(real**2 + imag**2).astype(np.float32)
