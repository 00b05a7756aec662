"""Sample data: the synthetic cardiac phantom pair, and the MNI152 T1 when nilearn is installed."""

from __future__ import annotations

from pathlib import Path

from napari_fewlabel.data.phantoms import PhantomModality, cardiac_phantom
from napari_fewlabel.demo import DEMO_SHAPE, DEMO_SPACING_MM
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io import load_volume
from napari_fewlabel.napari._layers import image_layer_data, labels_layer_data

#: The phantom's ground truth is added hidden: it is the answer key, not an annotation.
TRUTH_SUFFIX = "truth (synthetic)"


def _cardiac(modality: PhantomModality) -> list[tuple]:
    phantom = cardiac_phantom(modality, shape=DEMO_SHAPE, spacing_mm=DEMO_SPACING_MM)
    name = f"cardiac {modality} phantom"
    truth = labels_layer_data(
        phantom.labels.array, phantom.image, f"{name} {TRUTH_SUFFIX}", phantom.classes
    )
    truth[1]["visible"] = False
    return [image_layer_data(phantom.image, name), truth]


def cardiac_mri() -> list[tuple]:
    """Synthetic short-axis-like cardiac MRI with its labels (deterministic, not a patient)."""
    return _cardiac("MR")


def cardiac_ct() -> list[tuple]:
    """The same synthetic anatomy with a contrast CT appearance in HU."""
    return _cardiac("CT")


def mni152_path() -> Path:
    """The MNI ICBM152 2009 T1 template shipped inside the nilearn wheel."""
    try:
        import nilearn
    except ImportError as exc:
        raise FewLabelError(
            "The MNI152 sample needs nilearn: `pip install napari-fewlabel[mni]`."
        ) from exc
    return (
        Path(nilearn.__file__).parent
        / "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    )


def mni152_t1() -> list[tuple]:
    volume = load_volume(mni152_path())
    return [image_layer_data(volume.with_array(volume.array, modality="MR"), "MNI152 T1")]
