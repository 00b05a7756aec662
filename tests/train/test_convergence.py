"""Stop when done: the convergence rule, the faster schedule after it, a real run."""

from __future__ import annotations

from dataclasses import replace

import pytest

from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.models.checkpoint import read_card
from napari_fewlabel.train.convergence import ConvergenceRule, ConvergenceWatch
from napari_fewlabel.train.events import Done, Notice, Progress
from napari_fewlabel.train.finetune import FinetuneSettings, _Clock, run


def _checks(agreements, losses_per_interval, *, every=25, steps=300, rule=None):
    """Feed a run's signals; the steps at which the watch said 'converged'."""
    watch = ConvergenceWatch(rule or ConvergenceRule())
    said = []
    for k, (agreement, loss) in enumerate(zip(agreements, losses_per_interval, strict=True)):
        for _ in range(every):
            watch.add_loss(loss)
        step = (k + 1) * every
        if watch.check(agreement, step / steps):
            said.append(step)
    return said


def test_flat_high_agreement_and_flat_loss_converge_once():
    assert _checks([0.97] * 12, [0.2] * 12) == [125]  # progress 0.42 >= 0.4, three checks


def test_rising_agreement_low_agreement_or_falling_loss_do_not_converge():
    rising = [0.80 + 0.015 * k for k in range(12)]  # 0.95 only at the last checks, never flat
    assert _checks(rising, [0.2] * 12) == []
    assert _checks([0.93] * 12, [0.2] * 12) == []  # flat but below 0.95
    falling = [0.5 * 0.85**k for k in range(12)]  # the labelled loss still drops 15 % a check
    assert _checks([0.97] * 12, falling) == []


def test_not_before_the_unlabelled_term_has_started():
    rule = ConvergenceRule(min_progress=0.9)
    assert _checks([0.97] * 12, [0.2] * 12, rule=rule) == [275]


def test_bad_rules_are_refused():
    with pytest.raises(FewLabelError, match="speed-up"):
        ConvergenceRule(speedup=0.5)
    with pytest.raises(FewLabelError, match="fraction"):
        ConvergenceRule(min_agreement=1.5)


def test_the_clock_runs_the_rest_of_the_schedule_faster():
    clock = _Clock(300, None)
    assert clock.progress(120) == pytest.approx(0.4)
    saved = clock.hurry(120, 2.0)
    assert saved == 90  # the remaining 180 steps of schedule in 90
    total, _ = clock.total_and_eta(120, 1.0)
    assert total == 210
    assert clock.progress(165) == pytest.approx(0.7)  # 45 steps at twice the pace
    assert clock.progress(210) == pytest.approx(1.0)


def test_settings_round_trip_the_rule():
    settings = FinetuneSettings(stop_when_converged=ConvergenceRule(speedup=3.0))
    again = FinetuneSettings.from_dict(settings.to_dict())
    assert again.stop_when_converged == ConvergenceRule(speedup=3.0)
    assert "3x faster" in " ".join(settings.differences_from_paper(1))
    default = FinetuneSettings.from_dict(FinetuneSettings().to_dict())
    assert default.stop_when_converged == ConvergenceRule()  # the default since measured
    before = {k: v for k, v in FinetuneSettings().to_dict().items() if k != "stop_when_converged"}
    assert FinetuneSettings.from_dict(before).stop_when_converged is None  # an older card
    assert FinetuneSettings.paper().stop_when_converged is None


def test_a_real_run_that_converges_finishes_early_and_says_why(make_job, tiny_settings):
    """An easy rule on the tiny phantom: the run ends before its steps and tells the user."""
    rule = ConvergenceRule(min_agreement=0.0, max_spread=1.0, window=2, max_loss_drop=1.0,
                           min_progress=0.25, speedup=4.0)  # fmt: skip
    settings = replace(tiny_settings, validate_every=2, stop_when_converged=rule)
    events = list(run(make_job(steps=16, settings=settings)))
    done = events[-1]
    assert isinstance(done, Done) and not done.cancelled
    # Converged at step 4 (progress 0.25, two checks): the remaining 12 steps take 3.
    assert done.summary["steps_done"] == 7
    assert done.summary["converged"].startswith("converged: the streams agree")
    card = read_card(done.checkpoint)
    assert card.training["converged"] == done.summary["converged"]
    assert card.training["steps_done"] == 7
    notices = [e.message for e in events if isinstance(e, Notice)]
    assert any("finishing 9 steps early" in m for m in notices)
    progress = [e for e in events if isinstance(e, Progress)]
    assert [p.note for p in progress[:3]] == ["", "", ""]
    assert progress[-1].note == "converged: finishing early" and progress[-1].total == 7


def test_without_the_rule_every_step_is_done(make_job, tiny_settings):
    settings = replace(tiny_settings, stop_when_converged=None)
    events = list(run(make_job(steps=6, settings=settings)))
    assert events[-1].summary["steps_done"] == 6 and events[-1].summary["converged"] is None
