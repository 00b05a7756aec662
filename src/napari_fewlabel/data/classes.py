"""Segmentation classes: index, name and display colour, in one place.

A model card lists its classes with these three facts; the napari widget, the
CLI and the evaluation tables read them from there instead of repeating them.
Index 0 is always background.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from napari_fewlabel.errors import FewLabelError

#: Colours for classes 1, 2, ... when the user gave none (RGB, 0-255).
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (255, 225, 25),
    (240, 50, 230),
    (245, 130, 48),
    (70, 240, 240),
    (145, 30, 180),
    (210, 245, 60),
    (0, 128, 128),
)


@dataclass(frozen=True)
class SegmentationClass:
    """One label value and how to show it.

    Attributes
    ----------
    index : int
        The voxel value in a label map (0 = background).
    name : str
        Human name, e.g. ``"LV myocardium"``.
    color : tuple of int
        Display colour as RGB in 0-255.
    """

    index: int
    name: str
    color: tuple[int, int, int]

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "color": list(self.color)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SegmentationClass:
        r, g, b = (int(c) for c in d["color"])
        return cls(index=int(d["index"]), name=str(d["name"]), color=(r, g, b))


def default_classes(num_classes: int) -> tuple[SegmentationClass, ...]:
    """Background plus ``num_classes - 1`` classes named ``"class 1"``, ``"class 2"``, ...

    Parameters
    ----------
    num_classes : int
        Number of classes including background (>= 2).
    """
    if num_classes < 2:
        raise FewLabelError(
            f"A segmentation needs at least 2 classes (background + one structure), got "
            f"{num_classes}: paint at least one structure with a label value of 1 or more."
        )
    return (
        SegmentationClass(0, "background", (0, 0, 0)),
        *(
            SegmentationClass(i, f"class {i}", _PALETTE[(i - 1) % len(_PALETTE)])
            for i in range(1, num_classes)
        ),
    )


def named_classes(names: Sequence[str]) -> tuple[SegmentationClass, ...]:
    """Classes from names in label order; ``names[0]`` is the background's name."""
    defaults = default_classes(len(names))
    return tuple(
        SegmentationClass(c.index, str(n), c.color) for c, n in zip(defaults, names, strict=True)
    )


def check_classes(classes: Iterable[SegmentationClass]) -> tuple[SegmentationClass, ...]:
    """Return ``classes`` as a tuple after checking indices are ``0, 1, ..., n-1``."""
    classes = tuple(classes)
    if [c.index for c in classes] != list(range(len(classes))):
        raise FewLabelError(
            "Class indices must be 0, 1, 2, ... in order (0 = background), got "
            f"{[c.index for c in classes]}: renumber the classes."
        )
    if len(classes) < 2:
        raise FewLabelError("Give at least two classes: background and one structure.")
    return classes


#: Emphysema subtype maps (Fleischner Society subtypes, DrasCLR's downstream task; 0 = not
#: lung or not labelled). Also the "Emphysema subtypes" class preset of the widget.
EMPHYSEMA_SUBTYPES: tuple[SegmentationClass, ...] = (
    SegmentationClass(0, "background", (0, 0, 0)),
    SegmentationClass(1, "normal lung", (128, 174, 128)),
    SegmentationClass(2, "centrilobular", (230, 25, 75)),
    SegmentationClass(3, "paraseptal", (0, 130, 200)),
    SegmentationClass(4, "panlobular", (255, 225, 25)),
)
