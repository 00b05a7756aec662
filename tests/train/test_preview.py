"""Live preview: a run told which slice is on screen labels it with the model of the moment."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np

from napari_fewlabel.train.control import JobControl
from napari_fewlabel.train.events import Done, Notice, Preview
from napari_fewlabel.train.finetune import run


def _previews(events):
    return [e for e in events if isinstance(e, Preview)]


def test_a_run_previews_the_slice_on_screen_and_its_neighbours(make_job, tiny_case):
    control = JobControl()
    control.show_slice(0, 8)
    job = make_job(steps=3, preview_every_s=0.0)
    job = replace(job, settings=replace(job.settings, planes="labelled"))
    events = list(run(job, control))
    previews = _previews(events)
    assert [p.step for p in previews] == [1, 2, 3]
    for p in previews:
        assert (p.axis, p.start) == (0, 7)
        assert p.labels.shape == (3, *tiny_case.image.shape[1:])
        assert p.labels.dtype == np.uint8
        assert int(p.labels.max()) < len(tiny_case.classes)
    assert isinstance(events[-1], Done)


def test_the_preview_follows_the_view_and_says_which_orientation_it_can_show(make_job, tiny_case):
    control = JobControl()
    control.show_slice(1, 0)  # coronal, first slice: only one neighbour exists
    labelled = make_job(steps=2, preview_every_s=0.0)
    labelled = replace(labelled, settings=replace(labelled.settings, planes="labelled"))
    events = list(run(labelled, control))
    assert not _previews(events)
    told = [e.message for e in events if isinstance(e, Notice) and "live preview" in e.message]
    assert len(told) == 1 and "z (axial)" in told[0], told

    # With the planes across, the run trains on coronal slices too, and previews them.
    across = replace(labelled, settings=replace(labelled.settings, planes="all"))
    previews = _previews(run(across, control))
    assert previews and all((p.axis, p.start) == (1, 0) for p in previews)
    z, _, x = tiny_case.image.shape
    assert previews[0].labels.shape == (2, z, x)

    # No slice on screen (the 3D view): no preview.
    control.show_slice(None)
    assert not _previews(run(across, control))


def test_no_preview_without_a_control_that_knows_the_view(make_job):
    events = list(run(make_job(steps=2, preview_every_s=0.0), threading.Event()))
    assert not _previews(events)
    assert isinstance(events[-1], Done)


def _report(control: JobControl, out) -> None:
    out.put(control.slice_on_screen())
    control.set()


def test_a_job_control_shares_the_slice_and_the_stop_flag_with_a_spawned_process():
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    control = JobControl(ctx)
    control.show_slice(2, 41)
    out = ctx.Queue()
    child = ctx.Process(target=_report, args=(control, out))
    child.start()
    assert out.get(timeout=60) == (2, 41)
    child.join(60)
    assert child.exitcode == 0
    assert control.is_set()
