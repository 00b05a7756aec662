"""Named sets of classes a user can pick when starting an annotation.

Label values, names and colours follow the public benchmarks the presets are
named after, so masks made here line up with those datasets' conventions.
"""

from __future__ import annotations

from napari_fewlabel.data.classes import EMPHYSEMA_SUBTYPES, SegmentationClass
from napari_fewlabel.data.phantoms import CARDIAC_CLASSES

_BACKGROUND = SegmentationClass(0, "background", (0, 0, 0))


def _classes(*named: tuple[str, tuple[int, int, int]]) -> tuple[SegmentationClass, ...]:
    return (
        _BACKGROUND,
        *tuple(SegmentationClass(i, name, color) for i, (name, color) in enumerate(named, start=1)),
    )


#: Preset name -> classes (index 0 is background). "Custom" is built from the user's names.
CLASS_PRESETS: dict[str, tuple[SegmentationClass, ...]] = {
    # MM-WHS 2017 structures used by Dou et al. (2018), in their label order.
    "Cardiac MM-WHS": _classes(
        ("AA (ascending aorta)", (241, 214, 145)),
        ("LA blood", (216, 101, 79)),
        ("LV blood", (221, 130, 101)),
        ("LV myocardium", (144, 238, 144)),
    ),
    # ACDC 2017 label order: 1 RV cavity, 2 myocardium, 3 LV cavity.
    "Cardiac ACDC": _classes(
        ("RV", (0, 151, 206)),
        ("myocardium", (144, 238, 144)),
        ("LV", (216, 101, 79)),
    ),
    # Fleischner emphysema subtypes (DrasCLR's downstream task), plus normal lung: the
    # labels `fewlabel emphysema --subtype-labels` reads and its subtype maps use.
    "Emphysema subtypes": EMPHYSEMA_SUBTYPES,
    "Cardiac phantom (sample data)": CARDIAC_CLASSES,
}

CUSTOM = "Custom"
