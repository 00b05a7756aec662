"""Sample data: the synthetic cardiac phantom pair, and the MNI152 T1 when nilearn is installed."""

from __future__ import annotations

from pathlib import Path

from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io import load_volume
from napari_fewlabel.napari._layers import image_layer_data


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
