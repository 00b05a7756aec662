"""The region of each scan the adaptation critic looks at (issue 27, part 3).

Dou et al. (2018) crop the MRI and the CT around the same anatomy (the heart)
before adaptation, so the critic cannot tell the domains apart by field of view
(a CT with the table and shoulders in it, an MRI cropped tight). We keep the
networks' inputs whole (the adapted model still predicts whole slices) and crop
what the *critic* sees instead:

* the slices it samples lie in the region's slice range;
* every feature map and logit map it reads is cut to the region's in-plane box
  (the same fractions of the input at every level) before being resized to the
  critic's resolution.

A region comes from a foreground mask at the network's input size, ``(n, H, W)``
per scan: the source labels or a box the user gives, else the source model's
own prediction on the scan. The box is widened by a margin and then to the
input's aspect ratio, so that both domains' crops are resized alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from napari_fewlabel.data.slice_stack import SliceStack, fit_labels
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.models.critic import resize_to
from napari_fewlabel.models.unet2d import TwoStreamUNet
from napari_fewlabel.train.adapt_check import predicted_labels
from napari_fewlabel.train.device import Precision

#: Windows predicted at a time when the region comes from the model's prediction.
_BATCH = 16

#: A box ``(top, left, bottom, right)`` as fractions of the input's height and width.
Box = tuple[float, float, float, float]

WHOLE: Box = (0.0, 0.0, 1.0, 1.0)

#: Share of a *predicted* foreground left out at each end of each axis (stray voxels).
PREDICTION_TRIM = 0.02


@dataclass(frozen=True)
class CriticRegion:
    """Slices ``first..last`` (inclusive) of a stack and the in-plane ``box`` the critic sees."""

    first: int
    last: int
    box: Box = WHOLE

    @classmethod
    def whole(cls, stack: SliceStack) -> CriticRegion:
        return cls(0, len(stack) - 1, WHOLE)

    def sample(self, rng: np.random.Generator) -> int:
        """A random centre slice in the region."""
        return int(rng.integers(self.first, self.last + 1))

    def to_dict(self) -> dict[str, object]:
        return {"slices": [self.first, self.last], "box": [round(v, 4) for v in self.box]}


def region_of(
    foreground: torch.Tensor, margin: float = 0.1, trim: float = 0.0
) -> CriticRegion | None:
    """The region around the True voxels of ``foreground`` ``(n, H, W)``; None if there are none.

    Along each axis the extent leaves out ``trim`` of the True voxels at each
    end (0: all of them; a prediction's stray voxels far from the anatomy do
    not stretch the box). The slice range and the box then grow by ``margin``
    of their extent on each side (at least one slice and two pixels), and the
    box grows to the input's aspect ratio, all within the input.
    """
    n, height, width = foreground.shape
    if not bool(foreground.any()):
        return None
    mask = foreground.to(torch.float64)
    first, last = _grow(*_extent(mask.sum(dim=(1, 2)), trim), margin, 1, n)
    top, bottom = _grow(*_extent(mask.sum(dim=(0, 2)), trim), margin, 2, height)
    left, right = _grow(*_extent(mask.sum(dim=(0, 1)), trim), margin, 2, width)
    # Same aspect as the input: both domains' crops are then scaled alike by resize_to.
    box_h, box_w = bottom - top, right - left
    if box_w * height < box_h * width:
        left, right = _widen(left, right, math.ceil(box_h * width / height), width)
    else:
        top, bottom = _widen(top, bottom, math.ceil(box_w * height / width), height)
    return CriticRegion(
        first, last - 1, (top / height, left / width, bottom / height, right / width)
    )


def _extent(counts: torch.Tensor, trim: float) -> tuple[int, int]:
    """``[start, stop)`` of the positions holding all but ``trim`` of ``counts`` at each end."""
    cumulative = torch.cumsum(counts, 0)
    total = float(cumulative[-1])
    start = int(torch.searchsorted(cumulative, trim * total, right=True))
    stop = int(torch.searchsorted(cumulative, (1 - trim) * total, right=False)) + 1
    return min(start, stop - 1), min(stop, len(counts))


def _grow(start: int, stop: int, margin: float, minimum: int, limit: int) -> tuple[int, int]:
    pad = max(minimum, math.ceil((stop - start) * margin))
    return max(0, start - pad), min(limit, stop + pad)


def _widen(start: int, stop: int, length: int, limit: int) -> tuple[int, int]:
    """``[start, stop)`` grown to ``length`` around its centre, shifted to stay in ``[0, limit)``."""
    length = min(length, limit)
    centre = (start + stop) / 2
    new_start = round(centre - length / 2)
    new_start = min(max(0, new_start), limit - length)
    return new_start, new_start + length


def crop_maps(
    maps: Sequence[torch.Tensor], boxes: Sequence[Box], size: tuple[int, int]
) -> list[torch.Tensor]:
    """Each ``(B, C_i, h_i, w_i)`` map cut to sample ``b``'s box, then resized to ``size``.

    ``boxes`` holds one box per sample. Every level is cut at the same fractions,
    at least one pixel wide.
    """
    if all(box == WHOLE for box in boxes):
        return resize_to(maps, size)
    out = []
    for m in maps:
        h, w = m.shape[-2:]
        crops = []
        for b, (top, left, bottom, right) in enumerate(boxes):
            r0, c0 = min(h - 1, math.floor(top * h)), min(w - 1, math.floor(left * w))
            r1, c1 = max(r0 + 1, math.ceil(bottom * h)), max(c0 + 1, math.ceil(right * w))
            crops.append(resize_to([m[b : b + 1, :, r0:r1, c0:c1]], size)[0])
        out.append(torch.cat(crops))
    return out


def predicted_foreground(
    network: TwoStreamUNet,
    stack: SliceStack,
    in_slices: int,
    device: torch.device,
    precision: Precision,
) -> torch.Tensor:
    """Where ``network`` predicts any foreground class on every slice of ``stack``, ``(n, H, W)``."""
    out = []
    for start in range(0, len(stack), _BATCH):
        centres = torch.arange(start, min(start + _BATCH, len(stack)))
        labels = predicted_labels(network, stack.windows(centres, in_slices), device, precision)
        out.append(labels > 0)
    return torch.cat(out)


def labelled_foreground(
    labels: np.ndarray, scan_shape: tuple[int, ...], axis: int, stack: SliceStack, what: str
) -> torch.Tensor:
    """The nonzero voxels of a label map on the stack's scan, at the input size, ``(n, H, W)``.

    Raises FewLabelError when ``labels`` is not on the scan's grid ``scan_shape``.
    """
    if tuple(labels.shape) != tuple(scan_shape):
        raise FewLabelError(
            f"The {what} are {tuple(labels.shape)} voxels but the scan is {tuple(scan_shape)}: "
            "give a label map saved on that scan's grid."
        )
    mask = (np.asarray(labels) != 0).astype(np.int64)
    return fit_labels(mask, axis, np.arange(len(stack)), stack.fit) > 0


def box_foreground(
    box: Sequence[tuple[int, int]], shape: tuple[int, int, int], axis: int, stack: SliceStack
) -> torch.Tensor:
    """A ``(z, y, x)`` voxel box ``[(z0, z1), (y0, y1), (x0, x1)]`` (ends excluded) as a mask.

    Raises FewLabelError when the box is empty or leaves the scan.
    """
    if len(box) != 3:
        raise FewLabelError("Give the CT box as three ranges z0:z1,y0:y1,x0:x1 in voxels.")
    for (start, stop), extent, name in zip(box, shape, "zyx", strict=True):
        if not 0 <= start < stop <= extent:
            raise FewLabelError(
                f"The CT box's {name} range {start}:{stop} is empty or outside the scan "
                f"(0:{extent}): give z0:z1,y0:y1,x0:x1 with 0 <= start < end <= size."
            )
    mask = np.zeros(shape, dtype=np.int64)
    mask[tuple(slice(a, b) for a, b in box)] = 1
    return labelled_foreground(mask, shape, axis, stack, "CT box")


def parse_box(text: str) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """``"z0:z1,y0:y1,x0:x1"`` -> ``((z0, z1), (y0, y1), (x0, x1))``; FewLabelError if malformed."""
    try:
        parts = [tuple(int(v) for v in part.split(":")) for part in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3 or any(len(p) != 2 for p in parts):
        raise FewLabelError(
            f"Could not read the box {text!r}: write it as z0:z1,y0:y1,x0:x1 in voxels, "
            "e.g. 10:60,40:200,30:220."
        )
    (z0, z1), (y0, y1), (x0, x1) = parts
    return (z0, z1), (y0, y1), (x0, x1)
