"""The synthetic emphysema phantom: deterministic, every subtype where it belongs, not an intensity test."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from napari_fewlabel.data.emphysema_phantom import (
    CENTRILOBULAR,
    NORMAL,
    PANLOBULAR,
    PARASEPTAL,
    emphysema_phantom,
)
from napari_fewlabel.infer.lungs import segment_lungs


def test_phantom_is_a_ct_with_four_subtypes_in_their_places():
    ph = emphysema_phantom(0)
    again = emphysema_phantom(0)
    assert np.array_equal(ph.scan.array, again.scan.array)
    assert ph.scan.modality == "CT" and ph.scan.array.dtype == np.int16
    labels = ph.labels.array
    assert set(np.unique(labels)) == {0, NORMAL, CENTRILOBULAR, PARASEPTAL, PANLOBULAR}
    lung = labels > 0
    hu = ph.scan.array
    assert -880 < np.median(hu[labels == NORMAL]) < -840  # parenchyma around -850 HU

    # Places: centrilobular in the upper zone, panlobular in the lower, paraseptal at the pleura.
    z = np.nonzero(lung)[0]
    mean_z = {c: np.nonzero(labels == c)[0].mean() for c in (CENTRILOBULAR, PANLOBULAR)}
    assert mean_z[CENTRILOBULAR] > np.percentile(z, 60) > np.percentile(z, 30) > mean_z[PANLOBULAR]
    depth = ndi.distance_transform_edt(lung, sampling=ph.scan.spacing_mm)
    assert depth[labels == PARASEPTAL].max() <= 15.0 < depth[labels == CENTRILOBULAR].min() + 1

    # Shapes: lucencies (< -960 HU) are small and many in centrilobular regions, larger in
    # paraseptal ones, absent in normal lung; panlobular lung is diffusely low (the lowest
    # mean) with only noise-sized specks below -960 HU.
    lucent = lung & (hu < -960)
    parts, count = ndi.label(lucent)
    sizes = np.bincount(parts.ravel())[1:]
    owner = ndi.labeled_comprehension(labels, parts, np.arange(1, count + 1), _mode, int, 0)
    small = np.median(sizes[owner == CENTRILOBULAR])
    assert np.median(sizes[owner == PARASEPTAL]) > 2 * small
    assert np.mean(lucent[labels == NORMAL]) < 0.02
    assert np.median(sizes[owner == PANLOBULAR]) < small
    means = [hu[labels == c].mean() for c in (NORMAL, CENTRILOBULAR, PARASEPTAL, PANLOBULAR)]
    assert np.argmin(means) == 3

    # The lung mask of the real pipeline finds the phantom's lungs.
    found = segment_lungs(ph.scan).labels > 0
    assert 2 * np.sum(found & lung) / (found.sum() + lung.sum()) > 0.98


def test_a_voxel_threshold_does_not_separate_the_subtypes():
    ph = emphysema_phantom(1)
    labels, hu = ph.labels.array, ph.scan.array.astype(float)
    # Centrilobular and paraseptal regions have about the same mean density ...
    means = {c: hu[labels == c].mean() for c in (NORMAL, CENTRILOBULAR, PARASEPTAL, PANLOBULAR)}
    assert abs(means[CENTRILOBULAR] - means[PARASEPTAL]) < 40
    # ... and a voxel's HU says little: the best rule from HU to subtype (each 10 HU bin
    # to its most frequent subtype, classes weighted equally) gets about 60% of the voxels right
    # (the subtype map needs above 70% Dice for every subtype).
    classes = (NORMAL, CENTRILOBULAR, PARASEPTAL, PANLOBULAR)
    edges = np.arange(-1030, 200, 10)
    histograms = np.stack(
        [np.histogram(hu[labels == c], edges)[0] / np.sum(labels == c) for c in classes]
    )
    balanced_accuracy = histograms.max(axis=0).sum() / len(classes)
    assert balanced_accuracy < 0.65, balanced_accuracy
    # Pairs without a density difference by design are not separable by a threshold either.
    for a, b in ((CENTRILOBULAR, PARASEPTAL), (NORMAL, CENTRILOBULAR)):
        below_a, below_b = (np.cumsum(histograms[classes.index(c)]) for c in (a, b))
        best_threshold = np.max(np.abs(below_a - below_b)) / 2 + 0.5
        assert best_threshold < 0.8, (a, b, best_threshold)
    # Another seed moves the zone borders and the lucencies.
    assert not np.array_equal(labels, emphysema_phantom(2).labels.array)


def _mode(values: np.ndarray) -> int:
    return int(np.bincount(values).argmax())
