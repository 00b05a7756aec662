"""How large a scan the readers may load, checked from the header before any voxel is read.

A header is a few bytes that can claim any size: a 200-byte NRRD can declare
17 GB of voxels, and a small ``.nii.gz`` can decompress to 4 GB of zeros.
Every reader therefore asks :func:`check_volume_size` with the memory it is
about to allocate (the decoded array plus the copies the decoder makes) and
refuses with a sentence instead of exhausting the machine. The limit is a
fraction of the memory available now, or ``FEWLABEL_MAX_VOLUME_GB`` when set.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import psutil

from napari_fewlabel.errors import FewLabelError

#: Environment variable that replaces the default limit, in GB (10**9 bytes).
ENV_MAX_VOLUME_GB = "FEWLABEL_MAX_VOLUME_GB"
#: Share of the available physical memory one scan may take while it is read:
#: the rest is for the float32 copy, the normalised copy and the model.
AVAILABLE_FRACTION = 0.5

_GB = 1e9


def max_volume_bytes() -> int:
    """The most bytes one scan may take while it is read (see module docstring)."""
    text = os.environ.get(ENV_MAX_VOLUME_GB, "").strip()
    if not text:
        return int(AVAILABLE_FRACTION * psutil.virtual_memory().available)
    try:
        gb = float(text)
    except ValueError:
        gb = float("nan")
    if not gb > 0 or gb == float("inf"):
        raise FewLabelError(
            f"{ENV_MAX_VOLUME_GB}={text!r} is not a size in GB: set it to a positive number "
            f"such as 16, or unset it to use {AVAILABLE_FRACTION:.0%} of the available memory."
        )
    return int(gb * _GB)


def check_volume_size(
    shape: Sequence[int], bytes_per_voxel: int, what: str, *, dtype: str = ""
) -> int:
    """Refuse ``what`` when reading ``shape`` voxels would exceed :func:`max_volume_bytes`.

    Args:
        shape: the voxel counts the header declares, any number of axes.
        bytes_per_voxel: bytes the reader holds per voxel at its peak (the
            decoded array plus the copies it makes on the way).
        what: the file or folder name, for the message.
        dtype: the stored voxel type, for the message.

    Returns:
        The bytes needed, when they fit.
    """
    voxels = 1
    for n in shape:
        voxels *= int(n)  # Python ints: a forged header cannot overflow this
    needed = voxels * int(bytes_per_voxel)
    limit = max_volume_bytes()
    if needed > limit:
        size = " x ".join(str(int(n)) for n in shape)
        kind = f" {dtype}" if dtype else ""
        overridden = bool(os.environ.get(ENV_MAX_VOLUME_GB, "").strip())
        share = f"{AVAILABLE_FRACTION:.0%} of the memory available now"
        source = ENV_MAX_VOLUME_GB if overridden else share
        raise FewLabelError(
            f"{what} declares {size}{kind} voxels, which would take {needed / _GB:.1f} GB of "
            f"memory to read, more than the limit of {limit / _GB:.1f} GB ({source}): crop or "
            f"downsample the scan, check that its header is right, or set "
            f"{ENV_MAX_VOLUME_GB} to a larger number of GB if this machine can hold it."
        )
    return needed
