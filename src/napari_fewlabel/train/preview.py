"""Live preview: the slices on screen, labelled by the model of this moment.

While a fine-tuning run trains, :class:`LivePreview` asks the job's control
(:class:`~.control.JobControl`) which slice the viewer shows, every
``every_s`` seconds labels that slice and its neighbours with the network as
it is (both streams' softmax averaged, the same as prediction along one plane)
and yields a :class:`~.events.Preview` for the GUI. It runs in the training
process, between steps, so the GUI only copies a few slices into a layer.

Slices are labelled along the plane the viewer shows when the run trains on
that plane (the labelled plane, and the planes across it when the run uses
them); for any other orientation a :class:`~.events.Notice` says, once, which
orientation to turn the view to.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import torch

from napari_fewlabel.data.slice_stack import SliceStack
from napari_fewlabel.data.slices import AXIS_NAMES
from napari_fewlabel.models.unet2d import TwoStreamUNet
from napari_fewlabel.train.control import SliceOnScreen
from napari_fewlabel.train.device import Precision, autocast
from napari_fewlabel.train.events import Notice, Preview
from napari_fewlabel.train.finetune_data import PreparedData

#: Seconds between previews (and from the start of training to the first).
PREVIEW_EVERY_S = 4.0
#: Slices labelled on each side of the one on screen.
PREVIEW_NEIGHBOURS = 1


@torch.no_grad()
def label_slices(
    network: TwoStreamUNet,
    stack: SliceStack,
    indices: np.ndarray,
    device: torch.device,
    precision: Precision,
) -> np.ndarray:
    """``(n, h, w)`` uint8 labels of ``indices`` of ``stack`` on the scan's own slice grid."""
    was_training = network.training
    network.eval()
    x = stack.windows(torch.from_numpy(indices), network.config.in_slices).to(device)
    with autocast(device, precision):
        logits_a, logits_b = network(x)
    proba = (logits_a.float().softmax(dim=1) + logits_b.float().softmax(dim=1)) / 2
    labels = stack.fit.probabilities_from_input(proba).argmax(dim=1)
    network.train(was_training)
    return labels.to(torch.uint8).cpu().numpy()


class LivePreview:
    """Previews for one run; :meth:`maybe` between steps yields them when due.

    Parameters
    ----------
    control : SliceOnScreen
        Says which slice ``(data axis, index)`` is on screen, or None.
    data : PreparedData
        The run's data: the stacks of the planes it trains on.
    every_s : float
        Seconds between previews; 0 gives one after every step (tests).
    """

    def __init__(self, control: SliceOnScreen, data: PreparedData, every_s: float) -> None:
        self.control = control
        self.every_s = every_s
        self.stacks: dict[int, SliceStack] = {data.axis: data.stacks[0]}
        for plane in data.cross_planes:
            self.stacks[plane.axis] = plane.stack
        self.axis = data.axis
        self.last = time.perf_counter()
        self.told_orientation = False

    @classmethod
    def for_control(cls, control: object, data: PreparedData, every_s: float) -> LivePreview | None:
        """A preview when ``control`` can say what is on screen (a JobControl), else None."""
        if every_s < 0 or not hasattr(control, "slice_on_screen"):
            return None
        return cls(control, data, every_s)

    def maybe(
        self, network: TwoStreamUNet, step: int, device: torch.device, precision: Precision
    ) -> Iterator[Preview | Notice]:
        """A :class:`Preview` of the slices on screen if one is due, else nothing."""
        now = time.perf_counter()
        if now - self.last < self.every_s:
            return
        self.last = now
        where = self.control.slice_on_screen()
        if where is None:
            return
        axis, index = where
        stack = self.stacks.get(axis)
        if stack is None:
            if not self.told_orientation:
                self.told_orientation = True
                yield Notice(
                    f"The live preview shows {AXIS_NAMES[self.axis]} slices, the orientation "
                    "this run trains on: turn the view to it to follow training."
                )
            return
        if not 0 <= index < len(stack):
            return
        lo = max(0, index - PREVIEW_NEIGHBOURS)
        hi = min(len(stack), index + PREVIEW_NEIGHBOURS + 1)
        labels = label_slices(network, stack, np.arange(lo, hi), device, precision)
        yield Preview(axis=axis, start=lo, labels=labels, step=step)
