"""Fuzzed files through every reader: only FewLabelError may come out (issue 24).

Mutated NIfTI (plain and gzip), NRRD, MetaImage, DICOM slices (one slice of a
real series replaced) and safetensors model files go through ``load_volume``
and ``load_checkpoint`` in a forked child each (``tests/fuzzing.py``). Every
input must be read or refused with a FewLabelError: no other exception, no
crash, no hang, no allocation past the reader's memory limit. Hypothesis
draws the mutations from a fixed seed (``derandomize``), so CI tries the same
inputs every run; ``benchmarks/fuzz.py`` tries thousands.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzzing

EXAMPLES_PER_FORMAT = 150


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return fuzzing.write_seeds(tmp_path_factory.mktemp("seeds"))


@pytest.fixture(scope="module")
def worker():
    with fuzzing.Worker() as w:
        yield w


@pytest.mark.parametrize("kind", fuzzing.FORMATS)
def test_the_seed_files_are_read(worker, seeds, kind, tmp_path):
    # Without this, a harness that refuses everything would pass the fuzz test.
    path = fuzzing.place(kind, seeds[kind], seeds[kind].read_bytes(), tmp_path)
    outcome = worker.read(kind, path)
    assert outcome.kind == "read", outcome


@pytest.mark.parametrize("kind", fuzzing.FORMATS)
def test_mutated_files_are_read_or_refused_with_a_sentence(worker, seeds, kind, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"fuzz-{kind}")
    original = seeds[kind].read_bytes()
    seen: dict[str, int] = {}

    @settings(
        max_examples=EXAMPLES_PER_FORMAT,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(rand=st.randoms(use_true_random=False))
    def one(rand):
        data = fuzzing.mutate(kind, original, rand)
        outcome = worker.read(kind, fuzzing.place(kind, seeds[kind], data, folder))
        seen[outcome.kind] = seen.get(outcome.kind, 0) + 1
        assert outcome.passed, f"{outcome.kind}: {outcome.detail}"
        if outcome.kind == "refused":  # a sentence, not an empty or bare exception text
            assert len(outcome.detail.split()) >= 5, outcome.detail

    one()
    # The mutations must reach the readers' error paths, not only harmless bytes.
    assert seen.get("refused", 0) > 0, seen
