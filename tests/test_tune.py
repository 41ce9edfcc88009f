"""The tuner (rnnjax.tune, rnnjax.measure) and how rnnjax train and rnnjax tune use it.

Selection and budget logic run against a fake measuring child and a fake clock, so they
are deterministic; one test starts a real child to show it times under its own XLA
flags; the CLI tests seed the cache (or pin the settings) so that no test tunes for long.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest

from rnnjax import cells, measure, native, process, tune
from rnnjax.cli import main
from rnnjax.config import TUNED, Config, to_dict
from rnnjax.data.spec import DataSpec
from tests import users_cells

TINY = ["--hidden-size", "4", "--batch-size", "4", "--eval-batch-size", "2048"]


# The seed shape's default form (SimpleRNN at batch 50).
SEED_FORM = {"backward": "hand_written", "projection": "hoisted", "weight_grad": "product"}


def k(unroll, feed="device", flags="", chunks=1, **form):
    """A FakeChild table key: the seed form, with ``form`` changed (its fields, and
    ``native_lanes``)."""
    f = {**SEED_FORM, "native_lanes": 8, **form}
    return (unroll, f["backward"], f["projection"], f["weight_grad"], chunks, feed, flags,
            f["native_lanes"])


def fields(unroll, feed="device", flags=None, chunks=1, **form):
    """A candidate's fields (with ``flags``: a choice, every TUNED field)."""
    out = {"unroll": unroll, **SEED_FORM, "native_lanes": 8, **form, "chunks": chunks,
           "feed": feed}
    return out if flags is None else {**out, **tune.process_fields(flags), "eval_unroll": -1,
                                      "eval_native": True}


def train_step(choice):
    """A choice's fields that its train step's measurements stand for (not the
    evaluations')."""
    return {k: v for k, v in choice.items() if k not in tune.EVALUATION}


@pytest.fixture(autouse=True)
def no_huge_pages(monkeypatch):
    """Huge pages are not to be had (the CPU's flag children are "", YNN and VEC), but in
    the tests that say otherwise (:func:`huge_pages_here`)."""
    monkeypatch.setattr(process, "huge_pages_unavailable", lambda env=None: "not in this test")


@pytest.fixture
def huge_pages_here(monkeypatch):
    monkeypatch.setattr(process, "huge_pages_unavailable", lambda env=None: None)


NATIVE_UNAVAILABLE = native.unavailable


NATIVE_BACKENDS = cells.native_backends


@pytest.fixture(autouse=True)
def no_native(monkeypatch):
    """The native kernels cannot be built (no candidate for them, whatever this machine
    has), but in the tests that say otherwise (:func:`native_here`); and no cell has a
    GPU's (:func:`gpu_native`)."""
    monkeypatch.setattr(native, "unavailable", lambda: "not in this test")
    monkeypatch.setattr(cells, "native_backends",
                        lambda cell: tuple(b for b in NATIVE_BACKENDS(cell) if b != "gpu"))


@pytest.fixture
def gpu_native(monkeypatch):
    """The cells' GPU kernels are offered (rnnjax.native_gpu), on a GPU child."""
    monkeypatch.setattr(cells, "native_backends", NATIVE_BACKENDS)


@pytest.fixture
def native_here(monkeypatch):
    """The native kernels can be built, on a CPU without 512-bit vector registers (one
    vector width to time), whatever this machine has."""
    monkeypatch.setattr(native, "unavailable", lambda: None)
    monkeypatch.setattr(native, "wide_vectors", lambda: False)


ONE_CPU_OFFERED = tune.one_cpu_offered


@pytest.fixture(autouse=True)
def one_cpu(monkeypatch):
    """No child on one CPU is timed (the CPU's flag children are "", YNN and VEC), but in
    the tests that say otherwise (:func:`two_cpus`)."""
    monkeypatch.setattr(tune, "one_cpu_offered", lambda pinned: False)


@pytest.fixture
def two_cpus(monkeypatch):
    """The process may use two CPUs: a child on one is timed, as the tuner offers it."""
    monkeypatch.setattr(tune, "one_cpu_offered", ONE_CPU_OFFERED)
    monkeypatch.setattr(process, "usable_cpus", lambda: [0, 1])


@pytest.fixture(autouse=True)
def flags_in_children(monkeypatch):
    """XLA flag sets timed in children of their own (what the tuner falls back to where its
    first child did not time them), but in the tests that say otherwise
    (:func:`flags_in_process`)."""
    monkeypatch.setattr(tune, "FLAGS_IN_PROCESS", False)


@pytest.fixture
def flags_in_process(monkeypatch):
    """XLA flag sets timed in the first child's process (``tune.FLAGS_IN_PROCESS``)."""
    monkeypatch.setattr(tune, "FLAGS_IN_PROCESS", True)


class FakeChild:
    """Stands for a measuring child: times from a table, keyed on (unroll, backward,
    projection, weight_grad, chunks, feed, xla_flags, native_lanes) (:func:`k`; the child's
    flags and a
    candidate's own, in-process ones); ``wrong`` ones report results that differ from the
    baseline; one in ``kills`` kills its child the first time (as ``run_child`` reports a
    child that died: its error, the candidate it started as ``current``, and each of the
    candidates given that it did not report noted with the error); ``exclude``d ones are
    never started.
    Resolves 'best', and leaves another backend's candidates, as the real child does."""

    def __init__(self, times, wrong=(), clock=None, per_child_s=0.0, startup_s=1.0, turns=None,
                 stops_at_deadline=False, again=None, backend="cpu", evaluation=None,
                 differ=None, kills=()):
        self.kills = set(kills)
        self.times, self.wrong, self.clock, self.per_child_s = times, set(wrong), clock, per_child_s
        # again: the times a later child under the same flags reports, where they differ
        # (the same program runs faster in some processes than in others).
        self.again = again or {}
        self.startup_s, self.turns = startup_s, turns  # turns: the times in turns, by key
        # stops_at_deadline: a child takes per_child_s, or less where its deadline (brought
        # forward by pay_back, as measure.run does) comes first.
        self.stops_at_deadline = stops_at_deadline
        self.calls, self.retimed, self.closed, self.pay_back = [], [], 0, []
        self.backend, self.deadlines = backend, []  # each child's, moved as measure.run moves it
        self.alone, self.reach = [], []  # the alone and reach each child was given
        self.excluded = []  # the candidates each child was told to leave out
        # evaluation: the ms of the run's evaluation each way, an unroll or "native" (None:
        # the children cannot time it); differ: how far each way's sums are from the
        # first's (0 where not given); evaluated: what was asked
        self.evaluation, self.differ, self.evaluated = evaluation, differ or {}, []

    def __call__(self, config, flags, candidates, deadline, steps, reference, call_s, log,
                 pay_back=None, compiled=False, data=None, alone=None, reach=None,
                 exclude=()):
        later = any(call[0] == flags for call in self.calls)
        self.reach.append(reach)
        self.excluded.append(list(exclude))
        self.calls.append((flags, [dict(c) for c in candidates], deadline))
        self.pay_back.append(pay_back)
        self.alone.append(alone)
        if alone and self.backend not in alone["others_on"]:
            deadline = alone["deadline"]
            pay_back = pay_back and {**pay_back, "share": alone["share"]}
        if self.clock is not None:
            end = self.clock.now + self.per_child_s
            if self.stops_at_deadline:
                if pay_back:  # from its first candidate's step, the baseline's
                    base_s = self.times[self._key(candidates[0], flags)] * 1e-3
                    deadline = min(deadline, tune.pay_back_deadline(
                        pay_back["start"], pay_back["budget_s"], pay_back["steps"], base_s,
                        pay_back["share"]))
                end = min(end, deadline)
            self.clock.now = max(self.clock.now, end)
        self.deadlines.append(deadline)
        child = tune.Child(device={"backend": self.backend, "device_kind": "fake",
                                   "device_count": 1}, startup_s=self.startup_s)
        queue = measure.for_backend(candidates, self.backend)
        while queue:
            c = queue.pop(0)
            if measure.BEST in c.values():
                options = [o for o in measure.resolutions(
                    c, [(m.candidate, m.step_s) for m in child.measurements
                        if m.step_s is not None], measure.to_fields(config, c))
                    if not any(m.candidate == o for m in child.measurements)]
                if not options:
                    continue
                c, queue[:0] = options[0], options[1:]
            if c in exclude:
                continue
            key = self._key(c, flags)
            if key in self.kills:
                self.kills.discard(key)
                child.error, child.current = "child exited -11: no message", c
                reported = [m.candidate for m in child.measurements]
                child.measurements += [
                    tune.Measurement(o, flags, note=child.error)
                    for o in measure.for_backend(candidates, self.backend) if o not in reported]
                return child
            if key not in self.times:
                child.measurements.append(tune.Measurement(c, flags, note="failed: fake"))
                continue
            ms = self.again.get(key, self.times[key]) if later else self.times[key]
            child.measurements.append(tune.Measurement(  # the table's times in ms
                c, flags, ms * 1e-3, 1.0, 0.5 if key in self.wrong else 1e-7, 10))
        if self.turns is not None:
            child.retime = lambda c, until, steps=None: self._retime(c, flags)
            child.close = lambda: setattr(self, "closed", self.closed + 1)
        if self.evaluation is not None:
            child.evaluate = lambda c, ways, until: self._evaluate(c, flags, ways)
        return child

    def _evaluate(self, c, flags, ways):
        self.evaluated.append((self._key(c, flags), ways))
        return {"event": "evaluation",
                "differ": {str(w): self.differ.get(w, 0.0) if i else 0.0
                           for i, w in enumerate(ways)},
                "seconds": {str(w): self.evaluation[w] * 1e-3 for w in ways}}

    def _retime(self, c, flags):
        key = self._key(c, flags)
        self.retimed.append(key)
        return self.turns.get(key, self.times[key]) * 1e-3

    @staticmethod
    def _key(c, flags):
        """The table key (:func:`k`) of candidate fields ``c`` under ``flags``."""
        return (c["unroll"], c["backward"], c["projection"], c["weight_grad"], c["chunks"],
                c["feed"], " ".join(filter(None, [flags, c.get("xla_flags", "")])),
                c["native_lanes"])


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


YNN = tune.FLAG_SETS["cpu"][0]
VEC = tune.FLAG_SETS["cpu"][1]


@pytest.fixture
def one_process(monkeypatch):
    """The first child's candidates are not timed again in a second process (its tests
    follow :func:`test_close_candidates_are_timed_again_in_a_second_process`): the flag
    children and the budget alone."""
    monkeypatch.setattr(tune, "SECOND_MOST", 1)


def all_times(base=1.0, config=None, flag_sets=("", YNN, VEC)):
    """Every candidate of ``config``'s shape (the seed's) at every unroll, under each of
    ``flag_sets``, ``base`` ms."""
    config = config or Config()
    times = {}
    for c in tune.model_candidates(config, frozenset()):
        for unroll in ((1, 4, 0) if measure.BEST in c.values() else (c["unroll"],)):
            for chunks in ((1, 4) if c["chunks"] == measure.BEST else (c["chunks"],)):
                for lanes in ((8, 16) if c["native_lanes"] == measure.BEST
                              else (c["native_lanes"],)):
                    for flags in flag_sets:
                        times[(unroll, c["backward"], c["projection"], c["weight_grad"],
                               chunks, c["feed"], flags, lanes)] = base
    return times


def test_the_fastest_matching_candidate_wins_by_measured_time(one_process):
    config = Config()
    times = all_times()
    times[k(0)] = 0.80
    times[k(4)] = 0.70  # fastest, but its results differ: excluded
    fake = FakeChild(times, wrong={k(4)})
    result = tune.tune(config, frozenset(), 30.0, child=fake, clock=Clock())
    assert result.choice == fields(0, flags="")
    # The flag stage timed the best two candidates under each alternative flag set.
    assert [c[0] for c in fake.calls] == ["", YNN, VEC]
    # (of those whose results match: the wrong unroll 4 is not among them; ties keep order).
    assert fake.calls[1][1] == [fields(0), fields(1)]

    times[k(0, flags=VEC)] = 0.5  # a flag set faster still
    result = tune.tune(config, frozenset(), 30.0, child=FakeChild(times), clock=Clock())
    assert result.choice == fields(0, flags=VEC)


def test_a_candidate_that_kills_its_child_is_left_out_and_the_others_timed_again(
        one_process, tmp_path):
    """A candidate whose process dies (a kernel's compiler or its device failing below
    Python) costs only itself: a new child times the others, the baseline first (the
    reference rewritten from it), told to leave that one out as resolved (a form at the
    'best' unroll dies as the unroll it resolved to), and the choice is made among them;
    it is noted failed. Where no new child's baseline fits in the first child's share, or
    the new child times no baseline, the first child's timings stand."""
    config = Config()
    times = all_times()
    times[k(0)] = 0.9
    times[k(4)] = 0.8
    in_loop = fields(0, projection="in_loop")  # a form at 'best', resolved to the full unroll
    for killed, resolved in ((k(0), fields(0)), (k(0, projection="in_loop"), in_loop)):
        log = []
        fake = FakeChild(times, kills={killed})
        result = tune.tune(config, frozenset(), 30.0, child=fake, clock=Clock(),
                           log=log.append)
        first, again = fake.calls[0][1], fake.calls[1][1]
        assert fake.calls[1][0] == "" and again == first
        assert fake.excluded == [[], [resolved], *[[]] * (len(fake.calls) - 2)]
        assert result.choice == fields(4, flags="")
        (noted,) = [m for m in result.measurements if m.candidate == resolved]
        assert noted.note == "failed: it killed its child (child exited -11: no message)"
        assert any(line.startswith("  the child died timing unroll 0") for line in log)
    # One killed past the first child's share of the budget is not retried.
    clock = Clock()
    late = FakeChild(times, kills={k(0)}, clock=clock, per_child_s=25.0)
    result = tune.tune(config, frozenset(), 30.0, child=late, clock=clock)
    assert late.excluded == [[]] * len(late.calls)
    (noted,) = [m for m in result.measurements if m.candidate == fields(0)]
    assert noted.note == "child exited -11: no message"
    # A new child that times no baseline: the first child's timings stand, and its
    # reference, which every later child compares with (not the new child's first
    # candidate's, which measure.run writes where it finds none).
    nothing = FakeChild(dict(times), kills={k(0)})
    references = []

    def child(config, flags, candidates, deadline, steps, reference, *args, **kwargs):
        path = Path(reference)
        if not nothing.calls:
            path.write_text("the first child's baseline")
        else:  # the baseline fails in every child after the first
            nothing.times.pop(k(1), None)
            references.append(path.read_text() if path.exists() else None)
            if len(nothing.calls) == 1:
                path.write_text("the new child's first candidate")
        return nothing(config, flags, candidates, deadline, steps, reference, *args, **kwargs)

    result = tune.tune(config, frozenset(), 30.0, child=child, clock=Clock(),
                       log=(lines := []).append)
    assert any("the new child timed no baseline" in line for line in lines)
    assert result.measurements[0].candidate == fields(1) and result.measurements[0].step_s
    assert len(references) > 2
    assert references == [None] + ["the first child's baseline"] * (len(references) - 1)


def test_the_evaluations_unroll_is_timed_for_the_choice(one_process):
    """The choice's evaluation is timed by the child that timed it, at its unroll, at 1 and
    fully unrolled (that child timed its train step so); the fastest is set where it is
    MARGIN faster and the sums were the same, else the train step's unroll stays (-1)."""
    config = Config()
    times = all_times()
    times[k(0)] = 0.8  # full unroll: the train step's choice
    fake = FakeChild(times, evaluation={0: 60.0, 1: 40.0, 4: 50.0})
    log = []
    result = tune.tune(config, frozenset(), 30.0, child=fake, clock=Clock(), log=log.append)
    assert result.choice == {**fields(0, flags=""), "eval_unroll": 1}
    assert fake.evaluated == [(k(0), [0, 1])]
    assert result.record()["evaluation"] == {
        "seconds": {0: 0.06, 1: 0.04}, "differ": {0: 0.0, 1: 0.0}, "eval_unroll": 1,
        "eval_native": True}
    assert ("  the evaluation, one chunk: unroll 0: 60.0 ms, unroll 1: 40.0 ms (the same "
            "sums); eval-unroll 1, eval-native on") in log
    assert "eval-unroll 1" in tune.choice_line(result) and "(1.25x the defaults)" in \
        tune.choice_line(result)
    # Other sums (XLA's unrolls keep the same bits, or are not taken), or within the
    # margin: the train step's unroll.
    for differ, ms in ((1e-7, 40.0), (0.0, 60.0 / (1 + tune.MARGIN / 2))):
        fake = FakeChild(times, evaluation={0: 60.0, 1: ms}, differ={1: differ})
        result = tune.tune(config, frozenset(), 30.0, child=fake, clock=Clock())
        assert result.choice == fields(0, flags="") and fake.evaluated
    # Unroll 1 chosen for the train step, full unroll timed: the evaluation may take it.
    times[k(0)], times[k(1)] = 1.0, 0.8
    fake = FakeChild(times, evaluation={0: 30.0, 1: 40.0})
    result = tune.tune(config, frozenset(), 30.0, child=fake, clock=Clock())
    assert result.choice == {**fields(1, flags=""), "eval_unroll": 0}
    assert fake.evaluated == [(k(1), [1, 0])]
    # --eval-unroll given: not timed, and kept.
    fake = FakeChild(times, evaluation={0: 30.0, 1: 40.0})
    result = tune.tune(config.replace(eval_unroll=4), frozenset({"eval_unroll"}), 30.0,
                       child=fake, clock=Clock())
    assert result.choice == {**fields(1, flags=""), "eval_unroll": 4} and not fake.evaluated


def test_a_native_choices_evaluation_is_timed_in_the_native_form_and_in_xlas(
        native_here, one_process):
    """Where the choice is native (on a CPU), its evaluation is timed in the native form
    (the default: its forward writes the last step alone), and in XLA's at unroll 1 and
    fully unrolled (timed for the train step): XLA's is taken only where MARGIN faster and
    its sums within the tuner's tolerance of the native form's (they round differently);
    with --eval-native or --no-eval-native given, only the ways it leaves."""
    native_form = {"backward": "native", "projection": "hoisted", "weight_grad": "product"}
    times = all_times()
    times[k(1, **native_form)] = 0.5
    chosen = fields(1, flags="", **native_form)
    slower = {"native": 40.0, 1: 60.0, 0: 70.0}
    fake = FakeChild(times, evaluation=slower, differ={1: 2e-7, 0: 2e-7})
    log = []
    result = tune.tune(Config(), frozenset(), 30.0, child=fake, clock=Clock(), log=log.append)
    assert result.choice == chosen
    assert fake.evaluated == [(k(1, **native_form), ["native", 1, 0])]
    assert ("  the evaluation, one chunk: native: 40.0 ms, unroll 1: 60.0 ms, unroll 0: 70.0 "
            "ms (unroll 1's sums differ by 2.0e-07; unroll 0's sums differ by 2.0e-07); "
            "eval-unroll -1, eval-native on") in log
    faster = {"native": 60.0, 1: 70.0, 0: 40.0}
    for differ, choice in ((2e-7, {**chosen, "eval_native": False, "eval_unroll": 0}),
                           (2e-2, chosen)):  # beyond the tolerance: the native form stays
        fake = FakeChild(times, evaluation=faster, differ={1: differ, 0: differ})
        result = tune.tune(Config(), frozenset(), 30.0, child=fake, clock=Clock())
        assert result.choice == choice
    fake = FakeChild(times, evaluation=faster)
    result = tune.tune(Config(eval_native=False), frozenset({"eval_native"}), 30.0,
                       child=fake, clock=Clock())
    assert fake.evaluated == [(k(1, **native_form), [1, 0])]
    assert result.choice == {**chosen, "eval_native": False, "eval_unroll": 0}
    fake = FakeChild(times, evaluation=faster)
    result = tune.tune(Config(), frozenset({"eval_native"}), 30.0, child=fake, clock=Clock())
    assert not fake.evaluated and result.choice == chosen


def test_the_evaluations_part_of_the_budget_is_kept_only_where_it_can_be_timed(
        one_process, monkeypatch):
    """Where every timed candidate ran at unroll 1, the choice does too and its evaluation
    has no other unroll to be timed at: the rounds in turns keep the whole budget. Where
    another unroll was timed, they end EVAL_SHARE of it early, for the evaluation."""
    ends = []
    timing = tune.in_turns
    monkeypatch.setattr(tune, "in_turns", lambda *args: ends.append(args[4]) or timing(*args))
    config, clock = Config(), Clock()
    only_one = {key: ms for key, ms in all_times().items() if key[0] == 1}
    fake = FakeChild(only_one, evaluation={0: 30.0, 1: 40.0}, turns={})
    result = tune.tune(config, frozenset(), 30.0, child=fake, clock=clock)
    assert result.choice["unroll"] == 1 and result.choice["eval_unroll"] == -1
    assert not fake.evaluated and result.evaluation is None
    assert ends == [clock.now + 30.0]
    times = all_times()
    times[k(0)] = 0.8
    fake = FakeChild(times, evaluation={0: 60.0, 1: 40.0}, turns={})
    result = tune.tune(config, frozenset(), 30.0, child=fake, clock=clock)
    assert result.choice == {**fields(0, flags=""), "eval_unroll": 1}
    assert ends[1] == pytest.approx(clock.now + 30.0 * (1 - tune.EVAL_SHARE))
    # --eval-unroll given: nothing to time, the whole budget.
    tune.tune(config.replace(eval_unroll=1), frozenset({"eval_unroll"}), 30.0,
              child=FakeChild(times, evaluation={0: 60.0, 1: 40.0}, turns={}), clock=clock)
    assert ends[2] == clock.now + 30.0


def test_nothing_timed_under_the_runs_own_settings_is_said_so(one_process):
    """Where no candidate was timed under the run's own settings (every one failed), the
    other settings have nothing to time: no child starts for them, and the log says why,
    not that the budget was spent."""
    fake = FakeChild({})
    result = tune.tune(Config(), frozenset(), 30.0, child=fake, clock=Clock(),
                       log=(lines := []).append)
    assert len(fake.calls) == 1 and result.choice is None and not result.complete
    said = [line for line in lines if "not timed (no candidate was timed under" in line]
    assert len(said) == len(tune.flag_candidates("cpu", frozenset(), Config(), "")) - 1 > 0
    assert not any("budget spent" in line for line in lines)


def test_the_rounds_in_turns_keep_their_part_where_the_evaluation_is_timed(one_process):
    """The budget ends with the rounds in turns (TURNS_SHARE), then the evaluation's part
    (EVAL_SHARE) where it is timed: the children before them, each running until its
    deadline, leave both, so that the choice is made from timings side by side."""
    for evaluated in (False, True):
        times = all_times()
        if not evaluated:  # every candidate at unroll 1: no evaluation to time
            times = {key: ms for key, ms in times.items() if key[0] == 1}
        clock = Clock()
        fake = FakeChild(times, clock=clock, per_child_s=100.0, stops_at_deadline=True,
                         turns={}, evaluation={0: 60.0, 1: 40.0})
        result = tune.tune(Config(), frozenset(), 30.0, child=fake, clock=clock)
        evaluation_s = 30.0 * tune.EVAL_SHARE if evaluated else 0.0
        assert len(fake.calls) > 2 and max(fake.deadlines) == pytest.approx(
            1000.0 + 30.0 - evaluation_s - 30.0 * tune.TURNS_SHARE)
        assert result.final and fake.retimed
        assert bool(fake.evaluated) == evaluated


def test_a_child_times_the_runs_evaluation_each_way(tmp_path):
    """A real child, once it timed its candidates: the run's evaluation of one of them each
    way asked (an unroll, or the native form), in turns, and how far the sums were from the
    first way's; a candidate it cannot build is reported failed, and the child stays."""
    config = Config(hidden_size=4, batch_size=4, steps=3, eval_batch_size=256,
                    compile_cache="off")
    candidates = [fields(1), fields(0)]
    child = tune.run_child(config, "", candidates, time.time() + 120, 2,
                           str(tmp_path / "ref.npz"), 0.01, lambda line: None)
    try:
        report = child.evaluate(fields(0), [0, 1], time.time() + 60)
        assert report["event"] == "evaluation" and report["differ"] == {"0": 0.0, "1": 0.0}
        assert set(report["seconds"]) == {"0", "1"} and min(report["seconds"].values()) > 0
        report = child.evaluate({**fields(0), "chunks": 99}, [0, 1], time.time() + 60)
        assert "--chunks 99" in report["failed"] and "seconds" not in report
        if NATIVE_UNAVAILABLE() is None:  # the native form's evaluation: other rounding
            native_form = {"backward": "native", "projection": "hoisted",
                           "weight_grad": "product"}
            report = child.evaluate(fields(1, **native_form), ["native", 1], time.time() + 60)
            assert set(report["seconds"]) == {"native", "1"}
            assert report["differ"]["native"] == 0.0 and report["differ"]["1"] < 1e-5
        assert child.retime(fields(0), time.time() + 60) > 0
        chosen = next(m for m in child.measurements if m.candidate == fields(0))
        assert tune.evaluation_choice(chosen, [child], time.time() + 60, 1e-3, config,
                                      frozenset(), print)["eval_unroll"] in (-1, 0, 1)
    finally:
        child.close()
    assert child.evaluate(fields(0), [0, 1], time.time() + 60) is None


def _running_children() -> set[int]:
    """This process's child processes that have not exited (zombies left out)."""
    found = set()
    for entry in os.listdir("/proc"):
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except (OSError, ValueError):
            continue
        fields_of = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if (fields_of.get("PPid", "").strip() == str(os.getpid())
                and not fields_of.get("State", "").startswith("Z")):
            found.add(int(entry))
    return found


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_a_tuner_interrupted_while_its_child_times_ends_the_child(tmp_path):
    """Ctrl-C (here raised where the first result is logged) while a child times its
    candidates: the child is killed before the interrupt goes on, where it had been left
    running, its timer cancelled."""
    def interrupt(line: str) -> None:
        raise KeyboardInterrupt

    config = Config(hidden_size=4, batch_size=4, steps=3, compile_cache="off")
    before = _running_children()
    with pytest.raises(KeyboardInterrupt):
        tune.run_child(config, "", [fields(1)], time.time() + 120, 2,
                       str(tmp_path / "ref.npz"), 0.01, interrupt)
    assert _running_children() == before


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_a_tuners_child_exits_when_the_tuner_is_killed():
    """SIGKILL (SIGTERM likewise) runs no cleanup in the tuner: its child, reparented, sees
    its parent gone and exits (measure.exit_with_parent), where it had compiled and timed on
    for minutes."""
    tuner = textwrap.dedent("""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", (
            "import os, time; from rnnjax.measure import exit_with_parent; "
            "exit_with_parent(os.getppid(), 0.05); print('watching', flush=True); "
            "time.sleep(120)")], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline() == "watching\\n"
        print(child.pid, flush=True)
        time.sleep(120)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", tuner], stdout=subprocess.PIPE, text=True,
                            env=env)
    child = int(proc.stdout.readline())
    proc.kill()
    proc.wait()

    def running() -> bool:
        try:
            return not Path(f"/proc/{child}/status").read_text().split("State:")[1].strip(
                ).startswith("Z")
        except (OSError, IndexError):
            return False

    until = time.time() + 30
    while running() and time.time() < until:
        time.sleep(0.05)
    if running():
        os.kill(child, signal.SIGKILL)
        pytest.fail("the tuner's child outlived the tuner by 30 s")


def test_the_evaluation_starts_no_compile_past_its_deadline():
    """The evaluation's ways are compiled while the budget allows: the first two whatever
    the time (a choice needs two), a later one only where its compile, predicted from the
    unrolls compiled before it, ends before the deadline (one asked after the budget had
    run out compiled all three, 2.4 s past it at the seed's shape); and the parent asks no
    child once the budget is spent."""
    config = Config(hidden_size=4, batch_size=4, eval_batch_size=64, compile_cache="off")
    spec = DataSpec((28, 28, 1), 10)
    late = measure.evaluation_timing(config, "", spec, [1, 4, 0], time.time() - 1.0)
    assert set(late["seconds"]) == set(late["differ"]) == {"1", "4"}
    timely = measure.evaluation_timing(config, "", spec, [1, 4, 0], time.time() + 600.0)
    assert set(timely["seconds"]) == {"1", "4", "0"} and timely["differ"]["0"] == 0.0

    chosen = tune.Measurement(fields(1), step_s=1e-3)
    asked: list[tuple[str, list]] = []

    def child(name, *timed):  # a child that timed these, and records each request
        def evaluate(candidate, ways, until):
            asked.append((name, ways))
            return {"seconds": {str(w): 1.0 for w in ways},
                    "differ": {str(w): 0.0 for w in ways}}
        return tune.Child({"backend": "cpu"}, [chosen, *timed], evaluate=evaluate)

    clock, lines = Clock(), []
    unrolled = child("both unrolls", tune.Measurement(fields(0), step_s=2e-3))
    assert tune.evaluation_choice(chosen, [unrolled], clock.now, 1e-3, config, frozenset(),
                                  lines.append, clock) is None
    assert asked == [] and lines == ["  the evaluation: not timed (budget spent)"]
    # A child with one way to evaluate the choice (it timed unroll 1 alone) is passed over.
    report = tune.evaluation_choice(chosen, [child("one unroll"), unrolled], clock.now + 1,
                                    1e-3, config, frozenset(), lines.append, clock)
    assert asked == [("both unrolls", [1, 0])] and report["eval_unroll"] == -1


def test_flag_sets_are_chosen_from_timings_in_turns(one_process):
    """A flag set that looked faster in its own child (started later, on a machine then
    less loaded) but is not when timed side by side with the baseline is not chosen."""
    config = Config()
    times = all_times()
    times[k(1, flags=YNN)] = 0.9
    turns = {k(1): 1.0, k(1, flags=YNN): 1.05, k(1, flags=VEC): 1.2}
    fake = FakeChild(times, turns=turns)
    result = tune.tune(config, frozenset(), 30.0, child=fake, clock=Clock())
    assert result.choice == fields(1, flags="")
    # The baseline and each child's fastest, round after round, every child closed after.
    assert fake.retimed[:3] == [k(1), k(1, flags=YNN), k(1, flags=VEC)]
    assert len(fake.retimed) == 3 * tune.TURN_ROUNDS and fake.closed == 3
    assert [m.note for m in result.final] == ["timed in turns"] * 3
    assert "timed in turns" in tune.format_table(result)
    assert len(result.record()["table"]) == len(result.measurements) + 3
    # Side by side it is faster: chosen.
    turns[k(1, flags=YNN)] = 0.8
    result = tune.tune(config, frozenset(), 30.0, child=FakeChild(times, turns=turns),
                       clock=Clock())
    assert result.choice == fields(1, flags=YNN)
    assert "(1.25x the defaults)" in tune.choice_line(result)
    # The base flags' fastest is timed in turns as well as the baseline.
    times[k(0)] = 0.7
    turns.update({k(0): 0.75, k(0, flags=YNN): 0.9, k(0, flags=VEC): 1.2})
    fake = FakeChild(times, turns=turns)
    result = tune.tune(config, frozenset(), 30.0, child=fake, clock=Clock())
    assert fake.retimed[:3] == [k(0), k(1), k(1, flags=YNN)]
    assert result.choice == fields(0, flags="")


def test_flag_sets_are_timed_in_the_first_childs_process(flags_in_process, one_process,
                                                         monkeypatch):
    """Each XLA flag set is timed in the first child, on the fastest form and unroll after
    the unrolls, beside the run's own flags in one process: a set timed so needs no child
    of its own, and wins by the margin of any candidate timed in the same process, not by
    the wider one of flags timed in another process."""
    config = Config()
    times = all_times()
    times[k(0)] = 0.9
    times[k(0, flags=YNN)] = 0.85  # 5.6% faster than the fastest under the run's own flags
    fake = FakeChild(times)
    result = tune.tune(config, frozenset(), 30.0, child=fake, clock=Clock())
    assert [c[0] for c in fake.calls] == [""]  # no child for YNN or VEC
    first = fake.calls[0][1]
    on = [c for c in first if measure.ON in c]
    assert [(c[measure.ON], c["xla_flags"]) for c in on] == [
        (backend, flags) for backend, sets in tune.FLAG_SETS.items() for flags in sets
        if "+WHILE" not in flags]  # that one in a GPU child of its own
    # After the forms, before the chunks, at the fastest so far.
    forms = [c for c in first[:first.index(on[0])] if measure.ON not in c]
    assert len(forms) == len(tune.model_candidates(config, frozenset())) - 3  # chunks, 4, feed
    assert first[first.index(on[-1]) + 1]["chunks"] == 4
    assert all(c["unroll"] == measure.BEST and c["weight_grad"] == measure.BEST for c in on)
    timed = [m for m in result.measurements if m.candidate.get("xla_flags")]
    assert [m.fields["xla_flags"] for m in timed] == [YNN, VEC]  # the CPU's sets alone
    assert all(m.candidate["unroll"] == 0 for m in timed)  # resolved: the fastest's unroll
    assert result.choice == fields(0, flags=YNN)
    assert "'--xla_cpu_experimental_ynn_fusion_type='" in tune.format_table(result)
    # The same timings from a child of its own: not the FLAG_MARGIN faster, not chosen.
    monkeypatch.setattr(tune, "FLAGS_IN_PROCESS", False)
    fake = FakeChild(times)
    result = tune.tune(config, frozenset(), 30.0, child=fake, clock=Clock())
    assert [c[0] for c in fake.calls] == ["", YNN, VEC]
    assert result.choice == fields(0, flags="")


def test_a_flag_set_the_first_child_did_not_time_gets_its_own_child(flags_in_process,
                                                                    one_process):
    config = Config()
    times = all_times()
    times[k(1, flags=YNN)] = 0.5
    fake = FakeChild(times)
    ynn = {key: value for key, value in times.items() if key[-2] == YNN}

    def child(config, flags, *args, **kwargs):
        if not fake.calls:  # the first child: YNN fails to compile in its process
            for key in ynn:
                del fake.times[key]
        try:
            return fake(config, flags, *args, **kwargs)
        finally:
            fake.times.update(ynn)

    result = tune.tune(config, frozenset(), 30.0, child=child, clock=Clock())
    failed = [m for m in result.measurements if m.candidate.get("xla_flags") == YNN]
    assert failed and all(m.note.startswith("failed") for m in failed)
    assert [c[0] for c in fake.calls] == ["", YNN]  # VEC was timed in the first child
    assert result.choice == fields(1, flags=YNN)


def test_a_gpu_child_times_its_own_flag_sets_and_takes_their_share(flags_in_process,
                                                                  one_process):
    """On a GPU the CPU's sets are not timed; the GPU's set that is one compilation's
    option is, in the first child, and '+WHILE', which only $XLA_FLAGS reads (as a
    compilation's option XLA refused it: every GPU run's first flag set failed), in a child
    of its own, planned from the start (the first child's share, not the larger one of a
    child with nothing to follow). That child times the fastest form without the first
    child's in-process set of the same flag (which would win over its own and time the
    in-process set again, under both names)."""
    config = Config()
    plus_while, none = tune.FLAG_SETS["gpu"]
    times = all_times(flag_sets=("", none, plus_while))
    times[k(1)], times[k(1, flags=none)], times[k(1, flags=plus_while)] = 0.9, 0.8, 0.5
    fake = FakeChild(times, backend="gpu")
    result = tune.tune(config, frozenset(), 30.0, child=fake, clock=Clock())
    assert [c[0] for c in fake.calls] == ["", plus_while]
    assert {c.get("xla_flags") for c in measure.for_backend(fake.calls[0][1], "gpu")} == \
        {None, none}
    assert fake.alone[0]["others_on"] == ["gpu"]
    assert fake.calls[0][2] == pytest.approx(1000.0 + tune.FIRST_SHARE * 30.0)
    assert fake.calls[1][1] == [fields(1)]  # the fastest two, one program under its flags
    assert result.choice == fields(1, flags=plus_while)
    assert result.choice["xla_flags"] == plus_while


def test_a_candidate_under_a_childs_flags_drops_its_own_setting_of_the_same_flag():
    plus_while, none = tune.FLAG_SETS["gpu"]
    candidate = {**fields(1), "xla_flags": f"{none} --xla_gpu_autotune_level=0"}
    assert tune.under(candidate, plus_while) == {**fields(1),
                                                 "xla_flags": "--xla_gpu_autotune_level=0"}
    assert tune.under(candidate, f"{plus_while} --xla_gpu_autotune_level=4") == fields(1)
    assert tune.under(candidate, "cpus=1") == candidate
    assert tune.under(fields(1), plus_while) == fields(1)


@pytest.mark.parametrize("flags", [f for sets in tune.FLAG_SETS.values() for f in sets])
def test_a_flag_set_timed_in_process_is_one_xla_takes_for_one_compilation(flags):
    """The tuner times in the first child's process (one compilation's options) only the
    sets XLA takes so, on a CPU too (its compiler reads the GPU's options as well); a set
    that edits a list flag's defaults is refused there by XLA itself, and by
    ``runtime.compile_options`` in one line, and goes to a child of its own."""
    import jax

    from rnnjax import runtime

    jitted = jax.jit(lambda a: jax.numpy.tanh(a @ a))
    x = jax.numpy.ones((8, 8))
    in_process = {c["xla_flags"] for c in tune.flag_set_candidates(Config(), frozenset(), "")}
    if runtime.per_compilation(flags):
        assert flags in in_process or not tune.FLAGS_IN_PROCESS
        runtime.compile_timed(jitted, x, xla_flags=flags)
        return
    assert flags not in in_process
    assert not tune._flags_only(flags, Config(), frozenset())
    name, _, value = flags.lstrip("-").partition("=")
    with pytest.raises(Exception, match="not a valid enum value"):
        jitted.lower(x).compile(compiler_options={name: value})
    with pytest.raises(ValueError, match=r"edits the defaults of a list.*\$XLA_FLAGS"):
        runtime.compile_timed(jitted, x, xla_flags=flags)


def test_a_signed_number_is_a_value_not_an_edit_of_a_lists_defaults():
    """``runtime.per_compilation``: ``+NAME``/``-NAME`` in a list (``$XLA_FLAGS``' syntax
    alone) is refused as one compilation's option; a signed number (``-inf``, ``-1``,
    ``+1e3``) is a flag's value, not such an edit."""
    from rnnjax import runtime

    for edit in ("--xla_x=+WHILE", "--xla_x=FUSION,-CUBLAS", "--xla_x=-information",
                 "--xla_a=1 --xla_x=+nanos"):
        assert not runtime.per_compilation(edit), edit
    for value in ("--xla_x=-inf", "--xla_x=+Infinity", "--xla_x=-NaN", "--xla_x=-1",
                  "--xla_x=+1e3", "--xla_x=1,-inf", "--xla_x=", "--xla_x", "--xla_x=a-b"):
        assert runtime.per_compilation(value), value
        assert runtime.compile_options(value)


def test_a_flag_set_applies_to_one_compilation():
    """``runtime.compile_options``: XLA flags as one compilation's options, over the
    process's; a name XLA does not know fails that compilation, naming it."""
    import jax
    import jax.numpy as jnp

    from rnnjax import runtime

    assert runtime.compile_options("--xla_a=1 --xla_b= --xla_c") == {
        "xla_a": "1", "xla_b": "", "xla_c": "true"}
    assert runtime.compile_options("") == {}
    jitted = jax.jit(lambda a: jnp.tanh(a @ a) @ a)
    x = jnp.ones((64, 64))
    plain, _ = runtime.compile_timed(jitted, x)
    ynn_off, _ = runtime.compile_timed(jitted, x, xla_flags=YNN)
    assert "ynn" not in ynn_off.as_text()
    assert np.array_equal(plain(x), plain(x)) and ynn_off(x).shape == (64, 64)
    with pytest.raises(Exception, match="xla_no_such_flag"):
        runtime.compile_timed(jitted, x, xla_flags="--xla_no_such_flag=1")


def test_calls_in_turns_fill_the_time_left():
    """Each call in turns is as long as the rounds' time allows (at least the steps it was
    timed in): a call of a few milliseconds is mostly its own cost and noise."""
    clock, asked = Clock(), []

    def child(flags, ms):
        c = tune.Child(measurements=[tune.Measurement(fields(1), flags, ms * 1e-3, 1.0, 0.0, 10)])

        def retime(candidate, until, steps=None):
            asked.append((flags, steps))
            clock.now += ms * 1e-3 * steps
            return ms * 1e-3

        c.retime = retime
        return c

    children = [child("", 1.0), child("cpus=1", 0.5)]
    # 10 s for 5 rounds of 2 calls, each given half its share: 0.5 s a call.
    final = tune.in_turns(children, fields(1), "", 1e-3, clock() + 10.0, clock, lambda _: None)
    assert asked[:2] == [("", 500), ("cpus=1", 1000)]
    assert len(asked) == 2 * tune.TURN_ROUNDS
    assert [m.step_s for m in final] == [1e-3, 0.5e-3]
    # Little time left: the steps they were timed in, no fewer.
    asked.clear()
    tune.in_turns(children, fields(1), "", 1e-3, clock() + 0.1, clock, lambda _: None)
    assert asked[:2] == [("", 10), ("cpus=1", 10)]


def test_a_later_childs_turns_are_put_in_the_first_childs_terms():
    """The second process ran every program twice as slow, in turns too: its timing of the
    candidate both timed is scaled to the first's (0.9 ms), so that by the means over the
    processes the candidate still beats the baseline (1.0 ms, timed in the first alone;
    by raw means it would be 1.35). Children under other settings time other fields: their
    timings stand."""
    clock = Clock()
    faster = fields(0)

    def child(flags, times):
        c = tune.Child(measurements=[tune.Measurement(f, flags, ms * 1e-3, 1.0, 0.0, 10)
                                     for f, ms in times])
        c.retime = lambda candidate, until, steps=None: dict(
            (json.dumps(f), ms) for f, ms in times)[json.dumps(candidate)] * 1e-3
        return c

    children = [child("", [(fields(1), 1.0), (faster, 0.9)]), child("", [(faster, 1.8)]),
                child(YNN, [(faster, 0.7)])]
    final = tune.in_turns(children, fields(1), "", 1e-3, clock() + 10.0, clock, lambda _: None)
    assert [(m.candidate, m.flags, m.step_s) for m in final] == [
        (faster, "", pytest.approx(0.9e-3)), (fields(1), "", 1e-3),
        (faster, "", pytest.approx(0.9e-3)), (faster, YNN, 0.7e-3)]
    assert final[2].note == "timed in turns, x0.5 to the first process's terms"
    means = tune.pooled(final)
    assert [m.step_s for m in means] == [pytest.approx(0.9e-3), 1e-3, 0.7e-3]
    assert tune.select(means, fields(1), "", 1e-3, flag_margin=0.5).candidate == faster


def test_the_native_kernels_are_timed_after_the_unrolls_on_a_cpu_and_chosen_when_fastest(
        native_here):
    """The backward 'native' (rnnjax.native) of simple_rnn, lstm and gru is timed on a CPU
    child only (measure.ON), at the baseline's unroll (it has no other): right after the
    baseline at a batch of at most tune.ONE_CPU_FIRST, after the unroll probes at larger
    ones; not for a cell without native kernels, a pinned form field, bfloat16 or where no
    compiler is at hand; chosen where it is the fastest; never timed again at another
    unroll (the middle unroll's candidate, resolved to it, is the same program)."""
    native_form = {"backward": "native", "projection": "hoisted", "weight_grad": "product"}
    config = Config()
    candidates = tune.model_candidates(config, frozenset())
    assert candidates[:3] == [fields(1), {**fields(1, **native_form), measure.ON: "cpu"},
                              fields(0)]
    assert [c for c in candidates if c["backward"] == "native"] == [candidates[1]]
    large = tune.model_candidates(Config(batch_size=tune.ONE_CPU_FIRST + 1), frozenset())
    assert [i for i, c in enumerate(large) if c["backward"] == "native"] == [2]
    middle = {**fields(4, **native_form), "chunks": 1}
    assert measure.same_program(middle, fields(1, **native_form))
    assert not measure.same_program({**middle, "chunks": 4}, fields(1, **native_form))
    assert not measure.same_program(fields(4), fields(1))
    for cell in ("lstm", "gru"):
        assert sum(c["backward"] == "native"
                   for c in tune.model_candidates(Config(cell=cell), frozenset())) == 1
    for other, pinned in ((Config(cell="irnn"), frozenset()),
                          (Config(weight_grad="per_step"), frozenset({"weight_grad"})),
                          (Config(backward="hand_written"), frozenset({"backward"})),
                          (Config(compute_dtype="bfloat16"), frozenset({"compute_dtype"}))):
        assert all(c["backward"] != "native" for c in tune.model_candidates(other, pinned))
    times = all_times()
    times[k(1, **native_form)] = 0.7
    result = tune.tune(config, frozenset(), 30.0, child=FakeChild(times), clock=Clock())
    assert result.choice == fields(1, flags="", **native_form)


def test_on_a_gpu_the_native_kernels_are_timed_right_after_the_baseline(gpu_native):
    """simple_rnn's GPU kernels (rnnjax.native_gpu, Pallas) are a candidate for a GPU child
    only, right after the baseline at every batch, with no C++ compiler at hand (they need
    none); the CPU's native kernels are not offered then; lstm and gru have no GPU
    kernels. Chosen where they are the fastest."""
    native_form = {"backward": "native", "projection": "hoisted", "weight_grad": "product"}
    for batch in (50, 4096):
        candidates = tune.model_candidates(Config(batch_size=batch), frozenset())
        assert candidates[1] == {**fields(1, **native_form), measure.ON: "gpu"}
        assert [c for c in candidates if c["backward"] == "native"] == [candidates[1]]
        assert tune.unroll_probe(candidates) == {**candidates[0], "unroll": 0}
        assert measure.for_backend(candidates, "gpu")[1] == fields(1, **native_form)
        assert all(c["backward"] != "native" for c in measure.for_backend(candidates, "cpu"))
    for config in (Config(cell="lstm"), Config(cell="gru"), Config(cell="irnn"),
                   Config(hidden_size=200)):  # too wide for the GPU's kernels
        assert all(c["backward"] != "native"
                   for c in tune.model_candidates(config, frozenset()))
    assert all(c["backward"] != "native" for c in tune.model_candidates(
        Config(backward="hand_written"), frozenset({"backward"})))
    times = all_times()
    times[k(1, **native_form)] = 0.5
    result = tune.tune(Config(), frozenset(), 30.0, child=FakeChild(times, backend="gpu"),
                       clock=Clock())
    assert result.choice == fields(1, flags="", **native_form)


def test_where_the_cpu_has_512_bit_registers_the_native_kernels_are_timed_at_16_lanes_too(
        native_here, monkeypatch):
    """Config.native_lanes: the build for 16 floats a vector is timed right after the one
    for 8 where the CPU has 512-bit registers (native.wide_vectors), unless the width is
    pinned; the candidates timed on the fastest form so far take its width (BEST); a
    width is no other program for a form that reads no native kernels."""
    native_form = {"backward": "native", "projection": "hoisted", "weight_grad": "product"}
    monkeypatch.setattr(native, "wide_vectors", lambda: True)
    config = Config()
    candidates = tune.model_candidates(config, frozenset())
    assert candidates[1:3] == [{**fields(1, **native_form), measure.ON: "cpu"},
                               {**fields(1, **native_form, native_lanes=16),
                                measure.ON: "cpu"}]
    assert all(c["native_lanes"] == measure.BEST for c in candidates if c["chunks"] != 1)
    pinned = tune.model_candidates(config.replace(native_lanes=16),
                                   frozenset({"native_lanes"}))
    assert [c["native_lanes"] for c in pinned if c["backward"] == "native"] == [16]
    monkeypatch.setattr(native, "wide_vectors", lambda: False)
    assert [c["native_lanes"] for c in tune.model_candidates(config, frozenset())
            if c["backward"] == "native"] == [8]
    assert measure.same_program(fields(1, native_lanes=16), fields(1))
    assert not measure.same_program(fields(1, **native_form, native_lanes=16),
                                    fields(1, **native_form))
    monkeypatch.setattr(native, "wide_vectors", lambda: True)
    times = all_times()
    times[k(1, **native_form)] = 0.8
    times[k(1, **native_form, native_lanes=16)] = 0.6
    times[k(1, **native_form, native_lanes=16, chunks=4)] = 0.7
    fake = FakeChild(times)
    result = tune.tune(config, frozenset(), 30.0, child=fake, clock=Clock())
    assert result.choice == fields(1, flags="", **native_form, native_lanes=16)
    timed = [m.candidate for m in result.measurements if m.step_s is not None]
    assert fields(1, chunks=4, **native_form, native_lanes=16) in timed  # on the fastest
    table = tune.format_table(result)
    assert "native 8" in table and "native 16" in table


def test_without_a_compiler_the_native_kernels_are_not_timed(monkeypatch):
    monkeypatch.setattr(native, "unavailable", NATIVE_UNAVAILABLE)  # the real one
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    assert all(c["backward"] != "native" for c in tune.model_candidates(Config(), frozenset()))


def test_each_form_is_timed_at_the_faster_unroll_then_the_fastest_at_the_middle():
    """The baseline, fully unrolled; the cell's other forms at the faster of those two
    unrolls (the real child resolves 'best' so too: a form that loses at unroll 1 can win
    fully unrolled, where its per-step products run beside the recurrence); the fastest
    form at the middle unroll; the other feed."""
    config = Config()
    times = all_times()
    times[k(0)] = 0.7  # not a near tie (measure.UNROLL_NEAR): one unroll per form
    times[k(1, weight_grad="per_step")] = 1.1  # slower at unroll 1
    times[k(0, weight_grad="per_step")] = 0.5  # fastest fully unrolled
    fake = FakeChild(times)
    result = tune.tune(config, frozenset(), 30.0, child=fake, clock=Clock())
    assert result.choice == fields(0, weight_grad="per_step", flags="")
    first = [m.candidate for m in result.measurements if not m.flags]
    assert first == [fields(1), fields(0), fields(0, projection="in_loop"),
                     fields(0, weight_grad="per_step"),
                     fields(1, backward="autodiff", projection="in_loop"),  # compiles slowly
                     fields(0, weight_grad="per_step", chunks=4),  # the fastest, in parts
                     fields(4, weight_grad="per_step"), fields(1, "stream")]
    # Where unroll 1 is the faster, the forms are timed at unroll 1.
    times = all_times()
    times[k(0)] = 1.4
    times[k(1, projection="in_loop")] = 0.5
    result = tune.tune(config, frozenset(), 30.0, child=FakeChild(times), clock=Clock())
    first = [m.candidate for m in result.measurements if not m.flags]
    assert first[2:7] == [fields(1, projection="in_loop"), fields(1, weight_grad="per_step"),
                          fields(1, backward="autodiff", projection="in_loop"),
                          fields(1, projection="in_loop", chunks=4),
                          fields(4, projection="in_loop")]
    assert result.choice == fields(1, projection="in_loop", flags="")
    # The GRU's default is autodiff in the loop; its hand-written backward is a candidate,
    # in each of its forms.
    gru = tune.model_candidates(Config(cell="gru"), frozenset())
    assert [(c["backward"], c["projection"], c["weight_grad"]) for c in gru[3:7]] == [
        ("hand_written", "hoisted", "product"), ("hand_written", "hoisted", "per_step"),
        ("hand_written", "in_loop", "product"), ("autodiff", "hoisted", "product")]
    # That form at the baseline's unroll, then fully unrolled (the unrolls compared in one
    # form), and autodiff only at unroll 1: its full unroll compiles and runs slowly.
    assert gru[1:3] == [fields(1), fields(0)] and gru[6]["unroll"] == 1
    # A pinned weight gradient is kept in the hand-written forms too.
    pinned_gru = tune.model_candidates(Config(cell="gru", weight_grad="product"),
                                       frozenset({"weight_grad"}))
    assert {c["weight_grad"] for c in pinned_gru} - {tune.BEST} == {"product"}
    assert len([c for c in pinned_gru if c["backward"] == "hand_written"]) == 4  # + 1 and 0
    # A Flax cell has one form: only unrolls (and the feed).
    flax = tune.model_candidates(Config(cell="flax.linen:GRUCell"), frozenset())
    assert [c["unroll"] for c in flax] == [1, 0, tune.BEST, 4, 1]
    assert [c["chunks"] for c in flax] == [1, 1, 4, tune.BEST, 1]  # 28 rows: 4 parts
    # A pinned unroll: the forms at it, no other unroll.
    pinned = tune.model_candidates(Config(unroll=2), frozenset({"unroll"}))
    assert {c["unroll"] for c in pinned} == {2}


def test_close_candidates_are_timed_again_in_a_second_process():
    """The first child's candidates within SECOND_NEAR of its fastest (at most SECOND_MOST)
    are timed again in a second process under the same flags, and each is judged by its
    mean over the two, the second's timings in the first's terms (scaled by the geometric
    mean of the three ratios, 0.92): a program that ran fast in the first process only
    (0.80 there, 1.00 in the second) loses to one that ran 0.85 and 0.86. The flag
    children then time the best two by those means."""
    config = Config()
    times = all_times()
    times[k(0)] = 0.80
    times[k(0, projection="in_loop")] = 0.85
    fake = FakeChild(times, again={k(0): 1.0, k(0, projection="in_loop"): 0.86})
    log = []
    result = tune.tune(config, frozenset(), 30.0, child=fake, clock=Clock(), log=log.append)
    assert [c[0] for c in fake.calls] == ["", "", YNN, VEC]
    # the two close ones and, of those timed 1.0 (within 25% of 0.80), the first: the baseline
    assert fake.calls[1][1] == [fields(0), fields(0, projection="in_loop"), fields(1)]
    assert fake.calls[2][1] == [fields(0, projection="in_loop"), fields(0)]
    assert result.choice == fields(0, projection="in_loop", flags="")
    means = {json.dumps(m.fields, sort_keys=True): m for m in result.means}
    chosen = means[json.dumps(train_step(result.choice), sort_keys=True)]
    scale = (0.80 / 1.0 * 0.85 / 0.86 * 1.0 / 1.0) ** (1 / 3)
    assert chosen.step_s == pytest.approx((0.85 + 0.86 * scale) / 2 * 1e-3)
    assert chosen.note == "mean of 2 processes"
    assert means[json.dumps(train_step(fields(0, flags="")), sort_keys=True)].step_s == \
        pytest.approx((0.80 + 1.0 * scale) / 2 * 1e-3)
    assert means[json.dumps(train_step(fields(1, flags="")), sort_keys=True)].step_s == \
        pytest.approx((1.0 + 1.0 * scale) / 2 * 1e-3)
    assert "(1.17x the defaults)" in tune.choice_line(result)
    assert "mean of 2 processes" in tune.format_table(result)
    assert [m.note for m in result.measurements if m.note.startswith("second process")] == \
        [f"second process, x{scale:.3g} to the first process's terms"] * 3
    assert any("again in a second process, the 3 within 25%" in line for line in log)
    assert [row["note"] for row in result.record()["table"]].count("mean of 2 processes") == 3
    # A clear winner (nothing else within SECOND_NEAR): no second process.
    times[k(0)] = 0.5
    fake = FakeChild(times)
    result = tune.tune(config, frozenset(), 30.0, child=fake, clock=Clock())
    assert [c[0] for c in fake.calls] == ["", YNN, VEC] and result.means == []
    assert result.choice == fields(0, flags="")


def test_a_second_process_that_ran_slower_does_not_count_against_its_candidates():
    """The case that chose the defaults at rows 1024 (GRU, 2026-12-03): three finalists ran
    0.87-1.0x the baseline's time in the first process, the baseline 4th and so not timed
    again, and all three 1.6-2.5x slower in the second. By raw means over the processes each
    lost to the baseline's one timing; in the first process's terms the fastest wins."""
    config = Config()
    times = all_times(base=27.9)
    times[k(0)] = 25.8
    times[k(1, weight_grad="per_step")] = 24.3
    times[k(0, weight_grad="per_step")] = 27.8
    again = {k(0): 40.8, k(1, weight_grad="per_step"): 41.7,
             k(0, weight_grad="per_step"): 69.4}
    fake = FakeChild(times, again=again)
    result = tune.tune(config, frozenset(), 30.0, child=fake, clock=Clock())
    assert [c[0] for c in fake.calls][:2] == ["", ""]
    second = [FakeChild._key(c, "") for c in fake.calls[1][1]]
    assert k(1) not in second and k(1, weight_grad="per_step") in second
    # By raw means (as before), every finalist was slower than the baseline's 27.9 ms.
    assert all((times[key] + again[key]) / 2 > 27.9 for key in second)
    assert result.choice == fields(1, weight_grad="per_step", flags="")


def test_the_second_process_is_timed_in_turns_with_the_others():
    """In the final rounds in turns the second process's candidates are timed in both
    processes (with the baseline and each flag child's fastest), and the means of those
    turns decide."""
    config = Config()
    times = all_times()
    times[k(0)] = 0.80
    times[k(0, projection="in_loop")] = 0.85
    turns = {k(0): 0.82, k(0, projection="in_loop"): 0.90}
    fake = FakeChild(times, turns=turns)
    result = tune.tune(config, frozenset(), 30.0, child=fake, clock=Clock())
    first_round = fake.retimed[: len(fake.retimed) // tune.TURN_ROUNDS]
    # the first child's three, the second's three, then each flag child's fastest
    assert first_round == [k(0), k(0, projection="in_loop"), k(1),
                           k(0), k(0, projection="in_loop"), k(1),
                           k(0, flags=YNN), k(0, flags=VEC)]
    assert fake.closed == 4 and result.choice == fields(0, flags="")
    assert {m.note for m in result.means} == {"mean of 2 processes"}


def test_the_second_process_keeps_to_its_share_of_the_budget():
    """It needs its start-up and, for each candidate, the load of its compiled program (from
    the compilation cache: CACHED_LOAD of its compile) and its calls: with 5 s of start-up
    it does not fit in SECOND_SHARE of 30 s, and the tuning is marked incomplete."""
    clock = Clock()
    times = all_times()
    fake = FakeChild(times, clock=clock, per_child_s=1.0, startup_s=5.0)
    log = []
    result = tune.tune(Config(), frozenset(), 30.0, child=fake, clock=clock, log=log.append)
    assert [c[0] for c in fake.calls] == ["", YNN, VEC] and not result.complete
    assert any("not timed again in a second process (budget spent" in line for line in log)
    # 3.9 s of start-up: the first two fit in the 4.5 s (a candidate: 0.2 s of load, 6 calls
    # of 10 steps of 1 ms), the third would not: it is timed with two.
    clock = Clock()
    fake = FakeChild(times, clock=clock, per_child_s=1.0, startup_s=3.9)
    result = tune.tune(Config(), frozenset(), 30.0, child=fake, clock=clock)
    assert [c[0] for c in fake.calls] == ["", "", YNN, VEC]
    assert len(fake.calls[1][1]) == 2 and not result.complete
    assert fake.calls[1][2] == pytest.approx(1001.0 + tune.SECOND_SHARE * 30.0)


def test_the_second_process_leaves_other_flags_their_child():
    """Where the budget left fits the second process or a child under the first other XLA
    flags, not both, the flags' child is timed: a 10 s budget, 6 s of it the first
    child's, a child's start-up 0.9 s. Without other flags to time the second process
    fits (0.9 s and two cached candidates of 0.26 s, in its 1.5 s)."""
    times = all_times()
    log = []
    clock = Clock()
    fake = FakeChild(times, clock=clock, per_child_s=6.0, startup_s=0.9,
                     stops_at_deadline=True)
    result = tune.tune(Config(), frozenset(), 10.0, child=fake, clock=clock, log=log.append)
    assert [c[0] for c in fake.calls] == ["", YNN] and not result.complete
    assert any("not timed again in a second process (budget spent" in line for line in log)
    clock = Clock()
    fake = FakeChild(times, clock=clock, per_child_s=6.0, startup_s=0.9,
                     stops_at_deadline=True)
    tune.tune(Config(xla_flags=""), frozenset({"xla_flags"}), 10.0, child=fake, clock=clock)
    assert [c[0] for c in fake.calls] == ["", ""] and len(fake.calls[1][1]) == 2


def test_finalists_and_means():
    a, b, c = fields(1), fields(0), fields(4)
    ms = [tune.Measurement(a, "", 1.0e-3, 1.0, 1e-7, 10),
          tune.Measurement(b, "", 0.9e-3, 1.0, 1e-7, 10),
          tune.Measurement(c, "", 1.2e-3, 1.0, 0.5, 10),  # its results differ: not a finalist
          tune.Measurement(c, YNN, note="budget spent")]
    assert [m.candidate for m in tune.finalists(ms, 1e-3)] == [b, a]
    assert [m.candidate for m in tune.finalists(ms, 1e-3, near=0.05)] == [b]
    assert tune.finalists(ms, 1e-3, most=1)[0].candidate == b
    again = [tune.Measurement(b, "", 1.1e-3, 0.2, 3e-7, 10),
             tune.Measurement(c, YNN, 0.7e-3, 2.0, 1e-7, 10)]
    pooled = tune.pooled(ms + again)
    assert [(m.candidate, m.flags) for m in pooled] == [(a, ""), (b, ""), (c, ""), (c, YNN)]
    assert pooled[0] is ms[0]  # timed once: as it stands
    assert pooled[1].step_s == pytest.approx(1.0e-3) and pooled[1].difference == 3e-7
    assert pooled[1].note == "mean of 2 processes"
    assert pooled[3] is again[1]  # the untimed one gives way to the one timed


def test_the_baseline_stays_unless_another_is_clearly_faster():
    config = Config()
    base = tune.baseline(config, frozenset())
    assert base == fields(1)  # batch 50
    assert tune.baseline(config.replace(batch_size=512), frozenset())["weight_grad"] == \
        "per_step"
    assert tune.baseline(config.replace(cell="gru"), frozenset()) == fields(
        1, backward="autodiff", projection="in_loop")
    times = all_times(1.0)
    times[k(0)] = 1.0 - tune.MARGIN / 2  # within the margin: noise
    result = tune.tune(config, frozenset(), 30.0, child=FakeChild(times), clock=Clock())
    assert result.choice == {**base, "xla_flags": "", "huge_pages": False, "cpus": 0,
                             "eval_unroll": -1, "eval_native": True}
    times[k(0)] = 1.0 - 2 * tune.MARGIN
    result = tune.tune(config, frozenset(), 30.0, child=FakeChild(times), clock=Clock())
    assert result.choice["unroll"] == 0
    # Other XLA flags, timed in other processes, must be faster than the fastest under the
    # run's own by the wider FLAG_MARGIN: twice MARGIN is not enough.
    assert tune.FLAG_MARGIN > 2 * tune.MARGIN
    times[k(0, flags=YNN)] = (1.0 - 2 * tune.MARGIN) * (1 - 2 * tune.MARGIN)
    result = tune.tune(config, frozenset(), 30.0, child=FakeChild(times), clock=Clock())
    assert result.choice == fields(0, flags="")
    times[k(0, flags=YNN)] = (1.0 - 2 * tune.MARGIN) * (1 - tune.FLAG_MARGIN / 2)
    result = tune.tune(config, frozenset(), 30.0, child=FakeChild(times), clock=Clock())
    assert result.choice == fields(0, flags="")
    times[k(0, flags=YNN)] = (1.0 - 2 * tune.MARGIN) * (1 - 2 * tune.FLAG_MARGIN)
    result = tune.tune(config, frozenset(), 30.0, child=FakeChild(times), clock=Clock())
    assert result.choice == fields(0, flags=YNN)


def test_nothing_timed_in_budget_means_no_choice():
    times = all_times()
    del times[k(1)]  # the baseline never gets timed
    result = tune.tune(Config(), frozenset(), 30.0, child=FakeChild(times), clock=Clock())
    assert result.choice is None
    assert "the defaults stay" in tune.choice_line(result)


def test_the_budget_stops_starting_children():
    clock = Clock()
    fake = FakeChild(all_times(), clock=clock, per_child_s=31.0)  # the first child overruns
    result = tune.tune(Config(), frozenset(), 30.0, child=fake, clock=clock)
    assert len(fake.calls) == 1  # no flag child started after the budget
    assert fake.calls[0][2] == pytest.approx(1000.0 + tune.FIRST_SHARE * 30.0)
    assert not result.complete and result.choice is not None
    skipped = [m for m in result.measurements if m.flags]
    assert skipped and all(m.step_s is None and m.note.startswith("budget spent")
                           for m in skipped)


def test_the_most_promising_candidates_may_take_the_budgets_later_parts(native_here,
                                                                        gpu_native,
                                                                        monkeypatch):
    """The native forms (each backend's, each width) and the full unroll, the most promising
    after the baseline, in the candidates' order, are handed to the first child with the
    budget's REACH_SHARE (``measure.reach_until``): there they may start where the child's
    own share would leave them untimed (an H200's 10-second first runs did so to the full
    unroll). Without the backend's ON: the fields a child times (the CPU's native and the
    GPU's alike). No probe where the unroll is pinned."""
    native_form = {"backward": "native", "projection": "hoisted", "weight_grad": "product"}
    config = Config()
    candidates = tune.model_candidates(config, frozenset())
    probe = tune.unroll_probe(candidates)
    assert probe == {**candidates[0], "unroll": 0} and candidates.index(probe) >= 1
    assert tune.reaching(candidates) == [fields(1, **native_form), probe]  # both backends'
    wide = tune.model_candidates(Config(batch_size=4096), frozenset())
    assert [c["backward"] for c in tune.reaching(wide)] == ["native", "hand_written"]
    monkeypatch.setattr(native, "wide_vectors", lambda: True)  # both widths, in order
    assert tune.reaching(tune.model_candidates(config, frozenset())) == [
        fields(1, **native_form), fields(1, **native_form, native_lanes=16), probe]
    monkeypatch.setattr(native, "wide_vectors", lambda: False)
    assert tune.unroll_probe(tune.model_candidates(config, frozenset({"unroll"}))) is None
    assert tune.unroll_probe([{**candidates[0], "unroll": 0}, probe]) is None  # unrolled
    pinned = frozenset({"backward", "unroll"})
    assert tune.reaching(tune.model_candidates(config.replace(backward="hand_written"),
                                               pinned)) == []
    clock = Clock()
    fake = FakeChild(all_times(), clock=clock, per_child_s=1.0)
    tune.tune(config, frozenset(), 30.0, child=fake, clock=clock, pay_back=True)
    assert fake.reach[0] == {
        "candidates": tune.reaching(candidates), "share": tune.REACH_SHARE,
        "deadline": pytest.approx(1000.0 + tune.REACH_SHARE * tune.TUNE_COMMAND_BUDGET_S)}
    assert max(tune.FIRST_SHARE, tune.ALONE_SHARE) < tune.REACH_SHARE
    assert len(fake.reach) > 1 and all(r is None for r in fake.reach[1:])  # the first's only
    fake = FakeChild(all_times(), clock=Clock(), per_child_s=1.0)
    tune.tune(config.replace(backward="hand_written"), pinned, 30.0, child=fake,
              clock=fake.clock)
    assert fake.reach[0] is None
    reach = {"candidates": [probe], "deadline": 50.0, "share": 0.9}
    assert measure.reach_until(probe, 20.0, reach) == 50.0
    assert measure.reach_until(probe, 60.0, reach) == 60.0  # never sooner
    assert measure.reach_until(candidates[0], 20.0, reach) == 20.0
    assert measure.reach_until(probe, 20.0, None) == 20.0


def test_a_native_baseline_times_its_other_width_and_no_unroll(native_here, monkeypatch):
    """With --backward native (the native baseline, which honours no other form field) the
    other vector width is timed right after it, as where the tuner offers the native form
    itself, and no unroll: the native passes have no loop to unroll, so each unroll would
    time the baseline's program again (``measure.same_program``), and noise could choose
    one. Of its candidates only that width takes the budget's later parts
    (``tune.reaching``), not the other feed, which is native too."""
    monkeypatch.setattr(native, "wide_vectors", lambda: True)
    config = Config(backward="native")
    pinned = frozenset({"backward"})
    candidates = tune.model_candidates(config, pinned)
    base = candidates[0]
    assert base["backward"] == "native" and base["native_lanes"] == 8
    assert candidates[1] == {**base, "native_lanes": 16, measure.ON: "cpu"}
    assert all(c["unroll"] == base["unroll"] for c in candidates)
    assert tune.unroll_probe(candidates) is None
    assert not any(measure.same_program(a, b) and a != b
                   for i, a in enumerate(candidates) for b in candidates[i + 1:]
                   if measure.BEST not in {**a, **b}.values())
    assert {"feed": "stream"}.items() <= candidates[-1].items()
    assert tune.reaching(candidates) == [{**base, "native_lanes": 16}]
    monkeypatch.setattr(native, "unavailable", lambda: "no compiler")
    assert 16 not in {c["native_lanes"] for c in tune.model_candidates(config, pinned)}
    monkeypatch.setattr(native, "unavailable", lambda: None)
    lanes = tune.model_candidates(config.replace(native_lanes=16),
                                  pinned | {"native_lanes"})
    assert {c["native_lanes"] for c in lanes} == {16}


def test_a_child_times_the_unroll_probe_within_its_reach(tmp_path, capsys, monkeypatch):
    """measure.run in this process: the full unroll, predicted (here, told) to compile for
    longer than the child has left, is skipped; with the reach it is timed, its later
    deadline reported first, for the parent's timer. With a run's pay-back budget the reach
    follows it: REACH_SHARE of the 10-second floor, where the child's own share (a half,
    here) was cut to 5 s. The child's clock (``measure.time.time``) stands at each run's
    start, so that the deadlines' arithmetic is tested, not the machine's load: on the real
    clock the base's compile and timing had to end within 3.8 s of the start, which two
    suites at once on 2 CPUs outran (the probe was then skipped)."""
    from rnnjax.config import to_dict

    config = Config(hidden_size=4, batch_size=4, steps=3, compile_cache="off")
    base, probe = fields(1), fields(0)
    predicted = {28: 100.0}
    monkeypatch.setattr(measure, "predict_compile_s",
                        lambda unroll, measured, growth=0.4: predicted.get(unroll, 0.0))
    monkeypatch.setattr(measure, "time", types.SimpleNamespace(
        time=lambda: now, perf_counter=time.perf_counter, sleep=time.sleep))

    def run(name, reach, pay_back=None):
        measure.run({"config": to_dict(config), "candidates": [base, probe],
                     "deadline": now + 50, "steps": 2, "call_s": 0.01, "repeats": 1,
                     "reference": str(tmp_path / f"{name}.npz"), "reach": reach,
                     "pay_back": pay_back})
        return [json.loads(line[len(measure.PREFIX):])
                for line in capsys.readouterr().out.splitlines()
                if line.startswith(measure.PREFIX)]

    now = time.time()
    events = run("alone", None)
    assert [e["candidate"] for e in events if e["event"] == "result"] == [base]
    skipped = [e for e in events if e["event"] == "skipped"]
    assert [e["candidate"] for e in skipped] == [probe]
    assert skipped[0]["reason"].startswith("compile predicted 100 s, ")
    now = time.time()
    events = run("reach", {"candidates": [probe], "deadline": now + 200, "share": 0.9})
    names = [e["event"] for e in events]
    assert [e["candidate"] for e in events if e["event"] == "result"] == [base, probe]
    assert names.index("budget") == names.index("result") + 1  # before the probe's compile
    assert [e["deadline"] for e in events if e["event"] == "budget"] == [now + 200]
    # Beyond the pay-back cut (5 s), within the reach's 9 s.
    predicted[28] = 5.2
    now = time.time()
    events = run("pay_back", {"candidates": [probe], "deadline": now + 200, "share": 0.9},
                 {"start": now, "steps": 3, "share": 0.5, "budget_s": 30.0})
    assert [e["candidate"] for e in events if e["event"] == "result"] == [base, probe]
    assert [e["deadline"] for e in events if e["event"] == "budget"] == [
        pytest.approx(now + 0.5 * tune.PAY_BACK_FLOOR_S),
        pytest.approx(now + 0.9 * tune.PAY_BACK_FLOOR_S)]


def test_a_backend_without_other_settings_gives_the_first_child_their_share(monkeypatch):
    """Which process settings follow is known per backend before any starts
    (:func:`tune.others_on`): on a CPU, XLA flags and huge pages; on a TPU none, so there the
    first child takes ALONE_SHARE of the budget, where a CPU's takes FIRST_SHARE; with a
    run's pay-back budget, that share of it."""
    config = Config()
    assert tune.others_on(config, frozenset(), "") == ["cpu", "gpu"]
    assert tune.others_on(config, frozenset({"xla_flags"}), "") == []  # no huge pages here
    with monkeypatch.context() as m:
        m.setattr(process, "huge_pages_unavailable", lambda env=None: None)
        assert tune.others_on(config, frozenset({"xla_flags"}), "") == ["cpu"]
        assert tune.others_on(config, frozenset({"xla_flags", "huge_pages"}), "") == []
    for backend, share in (("cpu", tune.FIRST_SHARE), ("tpu", tune.ALONE_SHARE)):
        clock = Clock()
        fake = FakeChild(all_times(), clock=clock, per_child_s=40.0, stops_at_deadline=True,
                         backend=backend)
        tune.tune(config, frozenset(), 30.0, child=fake, clock=clock)
        assert fake.deadlines[0] == pytest.approx(1000.0 + share * 30.0)
        assert (YNN in [c[0] for c in fake.calls]) == (backend == "cpu")
        assert all(c[0] == "" for c in fake.calls) == (backend == "tpu")
        clock = Clock()  # a seed run's pay-back budget: 10 s, the first child's share of it
        fake = FakeChild(all_times(), clock=clock, per_child_s=40.0, stops_at_deadline=True,
                         backend=backend)
        tune.tune(config, frozenset(), 30.0, child=fake, clock=clock, pay_back=True)
        assert fake.deadlines[0] == pytest.approx(1000.0 + share * tune.PAY_BACK_FLOOR_S)
        # before the cut: its share of the longest budget a run may get (rnnjax tune's)
        assert fake.alone[0]["deadline"] == pytest.approx(
            1000.0 + tune.ALONE_SHARE * tune.TUNE_COMMAND_BUDGET_S)


def test_a_first_child_alone_leaves_the_second_process_its_share():
    """Where no other settings follow (a TPU's run; a CPU's whose user set them all), the
    first child's share (ALONE_SHARE) ends where the second process's, the turns' and the
    evaluation's parts begin: without the evaluation's part, the evaluation's reserve came
    out of the second process's share, which then held a twentieth of the budget, too
    little to start a child, and close finalists were never timed again. A TPU, which one
    process holds at a time (the first child, which stays), starts no second process."""
    shares = tune.ALONE_SHARE + tune.SECOND_SHARE + tune.TURNS_SHARE + tune.EVAL_SHARE
    assert shares == pytest.approx(1.0)
    times = all_times()
    times[k(1)], times[k(1, projection="in_loop")] = 1.0, 0.95  # close: timed again
    settled = frozenset({"xla_flags", "huge_pages", "cpus"})
    for backend, pinned in (("cpu", settled), ("tpu", frozenset())):
        clock = Clock()
        fake = FakeChild(times, clock=clock, per_child_s=100.0, stops_at_deadline=True,
                         turns={}, evaluation={0: 60.0, 1: 40.0}, backend=backend)
        lines: list[str] = []
        tune.tune(Config(), pinned, 30.0, child=fake, clock=clock, log=lines.append)
        assert fake.deadlines[0] == pytest.approx(1000.0 + tune.ALONE_SHARE * 30.0)
        assert any(line.startswith("  the evaluation, one chunk") for line in lines)
        if backend == "cpu":
            assert len(fake.calls) == 2, lines  # the second process
            assert any(line.startswith("  again in a second process") for line in lines)
        else:
            assert len(fake.calls) == 1, lines
            assert "  not timed again in a second process (a TPU is held by one process at " \
                   "a time: the first child's)" in lines


def test_a_child_on_other_devices_than_the_first_counts_for_nothing():
    """A later child that reports other devices than the first child (a TPU's second
    process, which found the TPU held by the first and ran on the host's CPU, where JAX
    falls back quietly) is closed, and its timings and first steps count for nothing: they
    are another device's. The choice is the first child's."""

    class Elsewhere(FakeChild):
        def __call__(self, *args, **kwargs):
            child = super().__call__(*args, **kwargs)
            if len(self.calls) > 1:
                child.device = {**child.device, "device_kind": "another"}
            return child

    times = all_times()
    times[k(0)] = 0.80
    times[k(0, projection="in_loop")] = 0.85  # close: a second process
    times[k(0, flags=YNN)] = times[k(0, flags=VEC)] = 0.40  # would win, timed elsewhere
    fake = Elsewhere(times, turns={})
    lines: list[str] = []
    result = tune.tune(Config(), frozenset(), 30.0, child=fake, clock=Clock(),
                       log=lines.append)
    assert [c[0] for c in fake.calls] == ["", "", YNN, VEC]
    assert result.choice == fields(0, flags="")
    assert not result.complete
    assert fake.closed == 4  # the three at once, the first at the end
    note = ("a child ran on device_kind another, where the first ran on device_kind fake")
    assert lines.count(f"  {note}: its timings are dropped") == 3
    later = [m for m in result.measurements if m.flags in (YNN, VEC)]
    assert later and all(m.step_s is None and m.note == f"failed: {note}" for m in later)
    assert all(m.note != "mean of 2 processes" for m in result.means)


def test_no_child_starts_that_could_not_finish_in_its_share(one_process):
    """A child needs its start-up, a compile and its timed calls: 20 s of start-up does not
    fit in the 9 s left to the two flag sets (the budget's last 3 s are for timing in
    turns, which the first set may take where only they fit it: 12 s), so neither is
    started."""
    clock = Clock()
    fake = FakeChild(all_times(), clock=clock, per_child_s=18.0, startup_s=20.0)
    result = tune.tune(Config(), frozenset(), 30.0, child=fake, clock=clock)
    assert [c[0] for c in fake.calls] == [""]
    assert any("would need ~21 s" in m.note for m in result.measurements)
    clock = Clock()  # 3 s of start-up fits in the first flag set's 4.5 s, which ends the budget
    fake = FakeChild(all_times(), clock=clock, per_child_s=18.0, startup_s=3.0)
    result = tune.tune(Config(), frozenset(), 30.0, child=fake, clock=clock)
    assert [c[0] for c in fake.calls] == ["", YNN]
    # with one candidate's compile and calls (1.06 s), not two: it times the fastest only.
    assert len(fake.calls[1][1]) == 1 and not result.complete
    assert [m.note for m in result.measurements if m.flags == YNN] == ["budget spent", ""]
    # A first set that needs more than an equal share (5.5 s of start-up) gets it: the sets
    # come most promising first.
    clock = Clock()
    fake = FakeChild(all_times(), clock=clock, per_child_s=18.0, startup_s=5.5)
    tune.tune(Config(), frozenset(), 30.0, child=fake, clock=clock)
    assert [c[0] for c in fake.calls] == ["", YNN]
    # A first set that fits only with the turns' part (10 s of start-up and 1.06 s: 9 s
    # before the turns, 12 s to the end) takes it; the next set never does.
    clock = Clock()
    fake = FakeChild(all_times(), clock=clock, per_child_s=18.0, startup_s=10.0)
    result = tune.tune(Config(), frozenset(), 30.0, child=fake, clock=clock)
    assert [c[0] for c in fake.calls] == ["", YNN]
    assert fake.calls[1][2] == pytest.approx(1000.0 + 18.0 + 11.06)  # its deadline
    assert any(m.flags == VEC and "would need ~11 s" in m.note for m in result.measurements)


def test_the_budget_follows_the_runs_length():
    """rnnjax train's default budget, once the baseline is timed: a quarter of the run's
    training time at the defaults for a short run, at least the floor (a seed run of 4001
    steps of 1 ms: 10 s); the default 30 s for a run of 2-5 minutes; a tenth of a longer
    one (rows at batch 4096, 4001 steps of 0.16 s: 64 s), at most rnnjax tune's 120 s."""
    assert tune.run_budget(4001 * 1e-3) == tune.PAY_BACK_FLOOR_S
    assert tune.run_budget(80.0) == pytest.approx(20.0)
    assert tune.run_budget(120.0) == 30.0 and tune.run_budget(300.0) == 30.0
    assert tune.run_budget(4001 * 0.16) == pytest.approx(64.016)
    assert tune.run_budget(3600.0) == tune.TUNE_COMMAND_BUDGET_S
    # Never past what the run can pay back, nor below what was given.
    assert tune.run_budget(100.0, 40.0) == 25.0 and tune.run_budget(200.0, 40.0) == 40.0
    assert tune.pay_back_deadline(5.0, 30.0, 4001, 0.02) == pytest.approx(5.0 + 20.005)
    # The first child's part: 60% of the 10 s, where the whole would have been its own.
    assert tune.pay_back_deadline(0.0, 30.0, 4001, 1e-3, tune.FIRST_SHARE) == \
        pytest.approx(tune.FIRST_SHARE * tune.PAY_BACK_FLOOR_S)


def test_a_long_run_tunes_for_longer(one_process):
    """The first child may run until its part of the longest budget (rnnjax tune's), and
    the budget is a tenth of a long run once its baseline is timed: 4001 steps of 0.4 s,
    160 s, at most 120. The flag children get their parts of that."""
    log = []
    clock = Clock()
    fake = FakeChild(all_times(base=400.0), clock=clock, per_child_s=8.0)
    result = tune.tune(Config(), frozenset(), 30.0, child=fake, clock=clock, pay_back=True,
                       log=log.append)
    assert fake.calls[0][2] == pytest.approx(1000.0 + tune.FIRST_SHARE *
                                             tune.TUNE_COMMAND_BUDGET_S)
    assert result.budget_s == tune.TUNE_COMMAND_BUDGET_S
    assert [c[0] for c in fake.calls] == ["", YNN, VEC]
    assert fake.calls[-1][2] > 1000.0 + 30.0  # past the default budget
    assert any("tuning for 120 s, not 30 s (a tenth of a long run)" in line for line in log)


def test_a_short_run_tunes_only_for_what_it_can_pay_back(one_process):
    """rnnjax train's default budget shrinks, once the baseline is timed, to a quarter of
    the run's training time at the defaults, at least the floor (:func:`run_budget`): a
    seed run of 4001 steps of 1 ms is given 10 s, where the flag children no longer fit
    after an 8 s first; a run of 4001 steps of 40 ms keeps the whole 30 s. rnnjax tune (no
    pay_back) spends its all."""
    log = []
    clock = Clock()  # the first child takes 8 s: the flag children no longer fit in 10
    fake = FakeChild(all_times(), clock=clock, per_child_s=8.0)
    result = tune.tune(Config(), frozenset(), 30.0, child=fake, clock=clock, pay_back=True,
                       log=log.append)
    # told to the first child, with its part of the budget (the flag children's follows)
    assert fake.pay_back == [{"start": 1000.0, "steps": 4001, "share": tune.FIRST_SHARE,
                              "budget_s": 30.0}]
    assert [c[0] for c in fake.calls] == [""]  # no time left for other flags
    assert result.budget_s == tune.PAY_BACK_FLOOR_S and not result.complete
    assert any("tuning for 10 s, not 30 s (what it can pay back" in line for line in log)
    # A first child that stops at its part of the cut budget, as measure.run does (6 of the
    # 10 s), leaves the flag children theirs: here the first set's (2 s: its start-up and
    # one candidate), then the rounds in turns.
    clock = Clock()
    fake = FakeChild(all_times(), clock=clock, per_child_s=8.0, stops_at_deadline=True)
    result = tune.tune(Config(), frozenset(), 30.0, child=fake, clock=clock, pay_back=True)
    assert [c[0] for c in fake.calls] == ["", YNN]
    assert fake.calls[1][2] <= 1000.0 + tune.PAY_BACK_FLOOR_S * (1 - tune.TURNS_SHARE)
    clock = Clock()
    fake = FakeChild(all_times(base=40.0), clock=clock, per_child_s=8.0)
    result = tune.tune(Config(), frozenset(), 30.0, child=fake, clock=clock, pay_back=True)
    assert [c[0] for c in fake.calls] == ["", YNN, VEC] and result.budget_s == 30.0
    clock = Clock()
    fake = FakeChild(all_times(), clock=clock, per_child_s=8.0)
    result = tune.tune(Config(), frozenset(), 30.0, child=fake, clock=clock)
    assert fake.pay_back == [None, None, None] and [c[0] for c in fake.calls] == ["", YNN, VEC]


def test_a_choice_cut_short_is_tuned_again_for_a_run_that_may_spend_more():
    """A first run of 4001 steps of 1 ms chose in its 10 s, not timing everything; the
    same shape run for 400,000 steps may spend 40 s (a tenth of its ~400 s): it tunes
    again. 8000 steps (10 s at most) and a complete record do not."""
    base = fields(1, flags="")
    record = {"budget_s": 10.0, "complete": False, "baseline": base,
              "table": [{**base, "step_ms": 1.2}, {**fields(0, flags=""), "step_ms": 0.9},
                        {**base, "step_ms": 1.0}]}  # the baseline's best: 1 ms
    assert tune.outgrown(record, Config(steps=400_000), 30.0, pay_back=True) == 40.0
    assert tune.outgrown(record, Config(steps=8000), 30.0, pay_back=True) is None
    assert tune.outgrown(record, Config(steps=100_000), 30.0, pay_back=True) == 25.0
    assert tune.outgrown({**record, "complete": True}, Config(steps=400_000), 30.0,
                         pay_back=True) is None
    # A --tune-budget given (no pay-back): more than 1.5x the record's, tuned again.
    assert tune.outgrown(record, Config(), 16.0, pay_back=False) == 16.0
    assert tune.outgrown(record, Config(), 15.0, pay_back=False) is None
    # A record without the baseline timed, or written without these fields: it stands.
    assert tune.outgrown({**record, "table": []}, Config(steps=400_000), 30.0, True) is None
    assert tune.outgrown({"choice": {}}, Config(steps=400_000), 30.0, pay_back=True) is None


def test_pinned_fields_are_never_tuned():
    config = Config(unroll=2, cell="lstm", backward="hand_written", weight_grad="product")
    pinned = frozenset({"unroll", "backward", "weight_grad"})
    candidates = tune.model_candidates(config, pinned)
    assert {c["unroll"] for c in candidates} == {2}
    assert {(c["backward"], c["weight_grad"]) for c in candidates} == {
        ("hand_written", "product")}
    # Not pinned ('best': the fastest projection timed, for the chunked candidates).
    assert {c["projection"] for c in candidates} == {"hoisted", "in_loop", tune.BEST}
    xnn = "--xla_cpu_use_xnnpack=false"
    fake = FakeChild({k(2, flags=xnn): 1.0, k(2, "stream", xnn): 0.5,
                      k(2, flags=xnn, projection="in_loop"): 0.9})
    config = config.replace(xla_flags=xnn)
    result = tune.tune(config, pinned | {"xla_flags"}, 30.0, child=fake, clock=Clock())
    assert [c[0] for c in fake.calls] == [xnn]  # no other flags
    assert result.choice == fields(2, "stream", xnn)
    tampered = {**fields(0, flags=""), "weight_grad": "per_step"}
    applied = tune.apply(config, tampered, frozenset({"unroll", "xla_flags"}))
    assert applied.unroll == 2 and applied.xla_flags == xnn
    assert applied.weight_grad == "per_step"


def test_a_second_huge_pages_process_waits_for_time_left(one_process, huge_pages_here):
    """Huge pages are timed in HUGE_PAGES_PROCESSES children, each in its part of what the
    flag sets leave: where the first overran its part (a child stopped late), the second
    is not started past the budget."""

    class Overruns(FakeChild):
        def __call__(self, config, flags, *args, **kwargs):
            child = super().__call__(config, flags, *args, **kwargs)
            if tune.HUGE_PAGES in flags.split():
                self.clock.now += 60.0
            return child

    clock, lines = Clock(), []
    fake = Overruns(all_times(), clock=clock)
    result = tune.tune(Config(), frozenset(), 30.0, child=fake, clock=clock, log=lines.append)
    assert [c[0] for c in fake.calls] == ["", YNN, VEC, tune.HUGE_PAGES]
    assert [line for line in lines if "not started" in line] == [
        "  xla-flags (none), huge-pages on, cpus all: process 2 of 2 not started (budget "
        "spent)"]
    assert not result.complete


def test_huge_pages_are_timed_last_on_top_of_the_fastest_flags(one_process, huge_pages_here,
                                                               monkeypatch):
    HUGE = tune.HUGE_PAGES
    config = Config()
    assert tune.flag_candidates("cpu", frozenset(), config, "") == ["", YNN, VEC, HUGE]
    assert tune.flag_candidates("gpu", frozenset(), config, "") == ["", *tune.FLAG_SETS["gpu"]]
    # Pinned: the run's own, with or without them.
    assert tune.flag_candidates("cpu", frozenset({"huge_pages"}), config.replace(
        huge_pages=True), "") == [HUGE, f"{YNN} {HUGE}", f"{VEC} {HUGE}"]
    assert tune.flag_candidates("cpu", frozenset({"xla_flags"}), config.replace(
        xla_flags=VEC), "") == [VEC, HUGE]
    assert tune.flag_candidates("cpu", frozenset({"xla_flags", "huge_pages"}), config,
                                "") == [""]

    times = all_times()
    times.update({k(0, flags=YNN): 0.8, k(0, flags=f"{YNN} {HUGE}"): 0.6,
                  k(1, flags=f"{YNN} {HUGE}"): 1.0})
    fake = FakeChild(times)
    result = tune.tune(config, frozenset(), 30.0, child=fake, clock=Clock())
    # Huge pages come last, under the fastest flags so far (YNN's), the fastest candidate
    # in each of two processes (their mean is what counts), and win.
    assert [c[0] for c in fake.calls] == ["", YNN, VEC, *[f"{YNN} {HUGE}"] * 2]
    assert [c[1] for c in fake.calls[-2:]] == [[fields(0)]] * 2
    assert result.choice == {**fields(0, flags=YNN), "huge_pages": True}
    assert any(m.fields == train_step(result.choice) and m.note == "mean of 2 processes"
               for m in result.means)
    assert "huge-pages on" in tune.choice_line(result)
    assert any(" 0.600 " in line and line.rstrip().endswith(f"{YNN!r} huge pages")
               for line in tune.format_table(result).splitlines())
    # Not FLAG_MARGIN faster than the fastest without them: not chosen.
    times[k(0, flags=f"{YNN} {HUGE}")] = 0.8 * (1 - tune.FLAG_MARGIN / 2)
    result = tune.tune(config, frozenset(), 30.0, child=FakeChild(times), clock=Clock())
    assert result.choice == fields(0, flags=YNN)
    # Where the fastest without them keeps the run's own flags (YNN's 0.95 is not
    # FLAG_MARGIN faster than 1.0), they are measured against those: 0.89 is, 0.93 is not.
    times.update({k(0, flags=YNN): 0.95, k(0, flags=f"{YNN} {HUGE}"): 0.89})
    result = tune.tune(config, frozenset(), 30.0, child=FakeChild(times), clock=Clock())
    assert result.choice == {**fields(0, flags=YNN), "huge_pages": True}
    times[k(0, flags=f"{YNN} {HUGE}")] = 0.93
    result = tune.tune(config, frozenset(), 30.0, child=FakeChild(times), clock=Clock())
    assert result.choice == fields(1, flags="")
    # Where the fastest is under the run's own flags: huge pages alone.
    times[k(0, flags=YNN)] = 1.0
    fake = FakeChild({**times, k(0): 0.9, k(0, flags=HUGE): 0.5})
    result = tune.tune(config, frozenset(), 30.0, child=fake, clock=Clock())
    assert fake.calls[-1][0] == HUGE and result.choice == fields(0, flags=HUGE)
    # They take no time from the XLA flag sets: each child's deadline is as without them.
    deadlines = {}
    for offered in (None, "not here"):
        monkeypatch.setattr(process, "huge_pages_unavailable",
                            lambda env=None, why=offered: why)
        clock = Clock()
        fake = FakeChild(times, clock=clock, per_child_s=2.0)
        tune.tune(config, frozenset(), 30.0, child=fake, clock=clock)
        deadlines[offered] = [c[2] for c in fake.calls[:3]]
    assert deadlines[None] == deadlines["not here"]
    monkeypatch.setattr(process, "huge_pages_unavailable", lambda env=None: None)
    # Two processes or none: where the budget fits one, they are not timed.
    clock = Clock()
    fake = FakeChild(times, clock=clock, per_child_s=7.0, startup_s=3.0)
    result = tune.tune(config, frozenset(), 30.0, child=fake, clock=clock)
    assert [c[0] for c in fake.calls] == ["", YNN, VEC] and not result.complete
    assert any(m.flags == HUGE and m.note.startswith("budget spent (2 children would need")
               for m in result.measurements)


def test_a_childs_environment_has_its_process_settings():
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x", "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0",
           "HOME": "/h"}
    plain = tune.child_env(YNN, env)
    assert plain == {**env, "XLA_FLAGS": f"--xla_dump_to=/tmp/x {YNN}",
                     "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # the accelerator is shared
    own = {**env, "XLA_PYTHON_CLIENT_PREALLOCATE": "true"}  # the user's own setting wins
    assert tune.child_env(YNN, own)["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"
    huge = tune.child_env(f"{YNN} {tune.HUGE_PAGES}", env)
    assert huge == {**plain, "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1"}
    assert tune.process_fields(f"{YNN} {tune.HUGE_PAGES}") == {"xla_flags": YNN,
                                                               "huge_pages": True, "cpus": 0}
    assert tune.process_flags(YNN, True) == f"{YNN} {tune.HUGE_PAGES}"
    assert tune.process_flags("", False) == ""
    # The CPUs are the child's own to set (run_child: its config's cpus), not its environment.
    assert tune.process_fields(f"{YNN} cpus=1") == {"xla_flags": YNN, "huge_pages": False,
                                                    "cpus": 1}
    assert tune.process_flags(YNN, True, 1) == f"{YNN} {tune.HUGE_PAGES} cpus=1"
    assert tune.child_env(f"{YNN} cpus=1", env) == plain
    # The user's own huge pages are part of the machine in the cache's key.
    config = Config()
    assert tune.key(config, frozenset(), env)["machine"]["huge_pages"] is False
    assert tune.key(config, frozenset(), huge)["machine"]["huge_pages"] is True
    # hugetlb=0 of the user's: huge pages are not offered there, so a choice made where they
    # were (read the same as unset before) is not reused.
    off = {**env, "GLIBC_TUNABLES": env.get("GLIBC_TUNABLES", "") + ":glibc.malloc.hugetlb=0"}
    assert tune.key(config, frozenset(), off)["machine"]["huge_pages"] == "0"


def test_one_cpu_is_timed_on_a_cpu_that_may_use_more(two_cpus):
    """First for a small batch (where it won), after the XLA flag sets for a large one;
    never where the user set --cpus, nor off the CPU; a pinned --cpus stays in every set."""
    assert tune.flag_candidates("cpu", frozenset(), Config(), "") == ["", "cpus=1", YNN, VEC]
    assert tune.flag_candidates("cpu", frozenset(), Config(batch_size=1024), "") == \
        ["", YNN, VEC, "cpus=1"]
    assert tune.flag_candidates("gpu", frozenset(), Config(), "") == ["", *tune.FLAG_SETS["gpu"]]
    assert tune.flag_candidates("cpu", frozenset({"cpus"}), Config(cpus=2), "") == \
        ["cpus=2", f"{YNN} cpus=2", f"{VEC} cpus=2"]
    assert tune.key(Config(), frozenset(), {})["machine"]["cpus"] == 2


@pytest.mark.parametrize("faster, chosen", [(0.8, 1), (0.95, 0)])
def test_one_cpu_is_chosen_only_where_as_much_faster_as_other_flags(two_cpus, one_process,
                                                                    faster, chosen):
    times = all_times(flag_sets=("", "cpus=1", YNN, VEC))
    for unroll in (1, 0):
        times[k(unroll, flags="cpus=1")] = faster
    fake = FakeChild(times)
    result = tune.tune(Config(), frozenset(), 30.0, child=fake, clock=Clock())
    assert [c[0] for c in fake.calls] == ["", "cpus=1", YNN, VEC]
    assert result.choice["cpus"] == chosen  # FLAG_MARGIN: 10%


def test_a_cpus_the_user_set_is_every_childs(two_cpus, one_process):
    """The first child's too: its model candidates run on the CPUs the run will have."""
    pinned = [f"{flags} cpus=2".strip() for flags in ("", YNN, VEC)]
    fake = FakeChild(all_times(flag_sets=pinned))
    result = tune.tune(Config(cpus=2), frozenset({"cpus"}), 30.0, child=fake, clock=Clock())
    assert [c[0] for c in fake.calls] == pinned
    assert result.choice["cpus"] == 2 and result.baseline["cpus"] == 2


def test_flags_the_user_set_in_xla_flags_are_not_tried():
    config = Config()
    assert tune.flag_candidates("cpu", frozenset(), config, "") == ["", YNN, VEC]
    assert tune.flag_candidates("cpu", frozenset(), config,
                                "--xla_cpu_prefer_vector_width=256") == \
        ["", YNN]
    assert tune.flag_candidates("tpu", frozenset(), config, "") == [""]
    assert tune.flag_candidates("gpu", frozenset(), config, "") == ["", *tune.FLAG_SETS["gpu"]]
    assert tune.flag_candidates("gpu", frozenset(), config,
                                "--xla_gpu_enable_command_buffer=FUSION") == [""]


@pytest.mark.parametrize("flags", [f for sets in tune.FLAG_SETS.values() for f in sets])
def test_every_flag_set_is_one_this_xla_accepts(flags):
    """XLA parses every backend's flags at start-up and aborts on a value it does not
    know: a flag set with a typo would fail its child on every machine of that backend."""
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    start = [sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"]
    done = subprocess.run(start, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    # ... and this check can fail: the same flag with a value XLA does not know.
    bogus = subprocess.run(start, env={**env, "XLA_FLAGS": flags + "BOGUS"},
                           capture_output=True, text=True, timeout=120)
    assert bogus.returncode != 0


def test_cache_key_and_invalidation(tmp_path, monkeypatch):
    from rnnjax import runtime

    config = Config()
    key = tune.key(config, frozenset(), env={})
    for other in (config.replace(batch_size=64), config.replace(cell="gru"),
                  config.replace(hidden_size=51), config.replace(order="pixels"),
                  config.replace(compute_dtype="bfloat16"), config.replace(num_layers=2)):
        assert tune.key(other, frozenset(), env={}) != key
    assert tune.key(config, frozenset({"unroll"}), env={}) != key
    assert tune.key(config, frozenset(), env={"XLA_FLAGS": "--xla_cpu_use_xnnpack=true"}) != key
    assert tune.key(config, frozenset(), env={"CUDA_VISIBLE_DEVICES": "1"}) != key
    # Two host devices, a choice of its own (they shared one, each deleting the other's).
    assert tune.key(config, frozenset(), env={"JAX_NUM_CPU_DEVICES": "2"}) != key
    assert tune.key(config.replace(steps=9, seed=3), frozenset(), env={}) == key  # no shape
    with monkeypatch.context() as machine:  # another CPU (a cache shared by two machines)
        machine.setattr(runtime, "cpu_name", lambda: "Another CPU")
        assert tune.key(config, frozenset(), env={}) != key
    # Where the native kernels cannot be built (no compiler: another PATH, a container
    # sharing the cache), a cached native choice stopped the run: another key.
    assert key["machine"]["native"] is False  # this module's (native_unavailable)
    with monkeypatch.context() as compiler:
        compiler.setattr(native, "unavailable", lambda: None)
        assert tune.key(config, frozenset(), env={}) != key
    # The model's input is the dataset's images read in the order: the IDX layout's by
    # default, as every key written before had it.
    assert key["model"]["input"] == [28, 28]
    assert tune.key(config.replace(order="pixels"), frozenset(), env={})["model"]["input"] \
        == [784, 1]
    colour = DataSpec((32, 32, 3), 10)
    assert tune.key(config, frozenset(), env={}, spec=colour)["model"]["input"] == [32, 96]
    assert tune.key(config.replace(order="pixels"), frozenset(), env={},
                    spec=colour)["model"]["input"] == [1024, 3]
    # The classes the model has: a dataset of the same images with 100 classes is another
    # model; --num-classes 10 on MNIST's 10 is the same one.
    assert key["model"]["num_classes"] == 10
    assert tune.key(config, frozenset(), env={}, spec=DataSpec((28, 28, 1), 100)) != key
    assert tune.key(config.replace(num_classes=10), frozenset(), env={}) == key
    assert tune.key(config.replace(num_classes=7), frozenset(), env={}) != key

    choice = fields(0, flags="")
    record = {"key": key, "choice": choice, "device": None}
    path = tune.save(tmp_path, record)
    assert path.parent == tmp_path and tune.load(tmp_path, key)["choice"] == choice
    # A write that fails (a full disk) leaves the cached file as it was, and no partial one.
    with monkeypatch.context() as failing:
        failing.setattr(tune.os, "replace", lambda *args: (_ for _ in ()).throw(OSError(28)))
        assert tune.save(tmp_path, {**record, "choice": fields(1)}) is None
    assert sorted(tmp_path.iterdir()) == [path] and tune.load(tmp_path, key)["choice"] == choice

    monkeypatch.setattr(runtime, "versions",
                        lambda extra=(): {"python": "3", "jax": "9.9.9", "jaxlib": "9.9.9"})
    assert tune.key(config, frozenset(), env={}) != key  # another jax: another key
    monkeypatch.undo()
    monkeypatch.setattr(tune, "TUNER_VERSION", tune.TUNER_VERSION + 1)
    assert tune.load(tmp_path, tune.key(config, frozenset(), env={})) is None
    monkeypatch.undo()

    path.write_text(json.dumps({**record, "key": {**key, "batch_size": 7}}))  # not its key
    assert tune.load(tmp_path, key) is None
    path.write_text(json.dumps({**record, "choice": {**choice, "unroll": -1}}))  # bad value
    assert tune.load(tmp_path, key) is None
    partial = {name: value for name, value in choice.items() if name != "xla_flags"}
    path.write_text(json.dumps({**record, "choice": partial}))  # a tuned field missing
    assert tune.load(tmp_path, key) is None
    path.write_text(json.dumps({**record, "device": "cpu"}))  # check_device's AttributeError
    assert tune.load(tmp_path, key) is None
    path.write_text("{not json")
    assert tune.load(tmp_path, key) is None
    assert tune.cache_dir("off") is None
    assert tune.cache_dir(str(tmp_path / "jax")) == tmp_path / "tune"


def test_a_child_times_candidates_under_its_own_xla_flags(tmp_path):
    """A real child process: it reports its device and a timing, and XLA in it ran with
    the flags given (here one whose effect shows on disk: dumping the compiled programs)."""
    config = Config(hidden_size=4, batch_size=4, steps=3, compile_cache="off")
    dump = tmp_path / "dump"
    lines = []
    import time

    candidates = [fields(1), fields(0, "stream", weight_grad="per_step"),
                  fields(tune.BEST, projection="in_loop")]
    start = time.time()
    child = tune.run_child(config, f"--xla_dump_to={dump}", candidates, start + 120,
                           2, str(tmp_path / "ref.npz"), 0.01, lines.append,
                           pay_back={"start": start + 145, "steps": 3, "share": 0.5,
                                     "budget_s": 30.0},
                           alone={"others_on": ["gpu"], "deadline": start + 150,
                                  "share": 0.25})
    assert child.error == "" and child.device["backend"] == "cpu"
    # alone: no other settings follow on its backend, so its deadline moved from 120 s to
    # alone's 150, and its part of the pay-back budget is alone's quarter. pay_back: once
    # its reference was timed, the child brought its deadline forward to that part of the
    # floor after the (here, pretended) start, 147.5 s, and the parent's timer followed
    # (not moved to alone's: no cut below 120; alone's share not taken: 150, no cut).
    assert child.deadline == pytest.approx(start + 145 + 0.25 * tune.PAY_BACK_FLOOR_S)
    # 'best': at the unroll of the faster of the two timed, and at the other too where
    # they timed within UNROLL_NEAR of each other (measure.resolutions).
    assert [m.candidate for m in child.measurements[:2]] == candidates[:2]
    resolved = [m.candidate for m in child.measurements[2:]]
    unrolls = [c["unroll"] for c in resolved]
    assert len(resolved) in (1, 2) and len(set(unrolls)) == len(unrolls)
    assert set(unrolls) <= {0, 1}
    assert all(c == {**candidates[2], "unroll": c["unroll"]} for c in resolved)
    for m in child.measurements:
        assert m.step_s > 0 and m.compile_s > 0 and m.steps == 2
        assert m.difference < tune.tolerance(config)
    assert child.measurements[0].difference == 0.0  # the reference itself
    assert any(p.name.endswith(".txt") for p in dump.iterdir())  # the flag took effect
    first_round = [line for line in lines if "(timed again)" not in line]
    assert len(first_round) == len(child.measurements)
    assert all("ms/step" in line for line in lines)
    # It stays for one more call at a time of what it timed, until closed.
    assert child.retime(candidates[0], time.time() + 60) > 0
    assert child.retime({**candidates[0], "unroll": 3}, time.time() + 60) is None
    child.close()
    assert child.retime(candidates[0], time.time() + 60) is None


def test_a_child_times_a_flag_set_in_its_own_process(tmp_path):
    """A real child: a candidate with its own XLA flags is compiled under them, beside the
    run's own in one process (here a flag whose effect shows on disk: dumping the compiled
    programs, only that candidate's); another backend's candidate is not timed."""
    config = Config(hidden_size=4, batch_size=4, steps=3, compile_cache="off")
    dump = tmp_path / "dump"
    flags = f"--xla_dump_to={dump}"
    candidates = [fields(1), {**fields(tune.BEST), "xla_flags": flags, measure.ON: "cpu"},
                  {**fields(tune.BEST), "xla_flags": "--xla_gpu_enable_command_buffer=",
                   measure.ON: "gpu"}]
    lines = []
    start = time.time()
    child = tune.run_child(config, "", candidates, start + 120, 2, str(tmp_path / "ref.npz"),
                           0.01, lines.append)
    try:
        assert child.error == "" and child.device["backend"] == "cpu"
        assert [m.candidate for m in child.measurements] == [
            fields(1), {**fields(1), "xla_flags": flags}]
        plain, flagged = child.measurements
        assert flagged.fields["xla_flags"] == flags and plain.fields["xla_flags"] == ""
        assert flagged.difference < tune.tolerance(config) and flagged.step_s > 0
        dumped = [p.name for p in dump.iterdir()]
        assert dumped and all("train_steps" in name for name in dumped if name.endswith(".txt"))
        assert child.retime(flagged.candidate, time.time() + 60) > 0
    finally:
        child.close()


def test_the_tuner_times_the_datasets_images(tmp_path):
    """A dataset of other images (``--source tfds``) is tuned at its own shapes: the
    sequence's length sets the chunked candidates, and a real child builds its model and
    random images from the spec (8x6 RGB, 5 classes, read by rows: 8 steps of 18)."""
    small = DataSpec((8, 6, 3), 5)
    assert tune.sequence_length(Config(), small) == 8
    assert tune.sequence_length(Config(order="pixels"), small) == 48
    assert tune.sequence_length(Config(order="pixels")) == 784

    def parts(config):
        return {c["chunks"] for c in tune.model_candidates(config, frozenset(), small)} - {
            measure.BEST}

    assert parts(Config()) == {1}  # 8 steps: no 4 parts of at least CHUNK_STEPS
    assert parts(Config(order="pixels")) == {1, 4, 8}
    data = measure.synthetic_data(Config(), 6, small)
    assert data.train_images.shape == (6, 8, 6, 3) and data.train_labels.max() < 5
    assert measure.synthetic_data(Config(), 6).train_images.shape == (6, 28, 28)
    config = Config(hidden_size=4, batch_size=4, steps=3, compile_cache="off")
    # On one CPU where it may use more (the child applies its flags' cpus=1 itself).
    usable = len(process.usable_cpus())
    flags = "cpus=1" if usable > 1 else ""
    child = tune.run_child(config, flags, [fields(1)], __import__("time").time() + 120, 2,
                           str(tmp_path / "ref.npz"), 0.01, lambda line: None, data=small)
    assert child.error == "" and child.measurements[0].step_s > 0
    assert child.cpus == (1 if usable > 1 else process.cpu_count())
    child.close()
    # The spec reaches the child through tune(), and so through resolve() and the CLI.
    seen = []

    def spy(config, flags, candidates, deadline, steps, reference, call_s, log, **kw):
        seen.append(kw.get("data"))
        return tune.Child(device=None)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tune, "run_child", spy)
        tune.tune(Config(), frozenset(), 5.0, spec=small)
        tune.resolve(Config(compile_cache=str(tmp_path / "jax")), frozenset(), 5.0,
                     spec=small, err=io.StringIO())
    assert seen == [small, small]


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k != tune.ENV_VAR}  # tuning on
    return {**env, "XDG_CACHE_HOME": str(tmp_path / "cache"), **extra}


def _seed_cache(tmp_path, args, choice, env):
    """Write ``choice`` to the cache the CLI will read for ``rnnjax train args``."""
    from rnnjax.cli import build_parser, config_from_args, flag_changes

    parsed = build_parser().parse_args(["train", *args])
    config = config_from_args(parsed)
    pinned = frozenset(flag_changes(parsed)) & set(TUNED)
    directory = Path(env["XDG_CACHE_HOME"]) / "rnnjax" / "tune"
    with pytest.MonkeyPatch.context() as real:  # the child process's: it may build them
        real.setattr(native, "unavailable", NATIVE_UNAVAILABLE)
        key = tune.key(config, pinned, env=env)
    return tune.save(directory, {"key": key, "choice": choice, "device": None})


def _run(*args, env):
    return subprocess.run([sys.executable, "-m", "rnnjax", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_choice_is_recorded_and_resume_reuses_it_bitwise(tmp_path):
    env = _env(tmp_path)
    args = [*TINY, "--eval-every", "3", "--checkpoint-every", "3"]
    # On one CPU, where it may use more: it changes the rounding, so the resumed run must
    # have it too.
    one_cpu = len(process.usable_cpus()) > 1
    choice = fields(0, flags="--xla_cpu_use_xnnpack=false" + " cpus=1" * one_cpu,
                    weight_grad="per_step", projection="in_loop")
    _seed_cache(tmp_path, [*args, "--steps", "6"], choice, env)
    whole = tmp_path / "whole"
    proc = _run("train", *args, "--steps", "6", "--workdir", str(whole), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "rnnjax: tuning" not in proc.stderr  # the cached choice, no measuring
    config = json.loads((whole / "config.json").read_text())
    assert {k: config[k] for k in TUNED} == choice
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["tuning"]["mode"] == "cached" and summary["tuning"]["settings"] == choice
    assert "--xla_cpu_use_xnnpack=false" in summary["xla_flags_env"]  # applied at start-up
    assert summary["cpus_used"] == 1 or not one_cpu
    assert ("tuned (cached): unroll 0, backward hand_written, projection in_loop, "
            "weight-grad per_step") in proc.stdout

    stopped = tmp_path / "stopped"
    proc = _run("train", *args, "--steps", "3", "--workdir", str(stopped), env=env)
    assert proc.returncode == 0, proc.stderr
    # Another choice cached since: the resumed run must keep the one it recorded.
    _seed_cache(tmp_path, [*args, "--steps", "3"], fields(1, "stream", ""), env)
    proc = _run("train", "--resume", "--steps", "6", "--workdir", str(stopped), env=env)
    assert proc.returncode == 0, proc.stderr
    resumed = json.loads((stopped / "config.json").read_text())
    assert {k: resumed[k] for k in TUNED} == choice
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["tuning"]["mode"] == "resumed"
    assert "--xla_cpu_use_xnnpack=false" in summary["xla_flags_env"]
    assert summary["cpus_used"] == 1 or not one_cpu

    from rnnjax.checkpoint import read_meta

    def digest(run):
        return read_meta(run / "checkpoints" / "6")["state_sha256"]

    def records(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "wall_s"} for line in lines]

    assert digest(stopped) == digest(whole)  # bitwise the same state
    assert records(stopped) == records(whole)


def _fail_if_tuned(*args, **kwargs):
    raise AssertionError("tuned, though it should not have")


@pytest.fixture
def in_process(tmp_path, monkeypatch):
    """main() in this process with tuning on, its cache in tmp_path, no real child, and
    the training itself replaced by a record of the config and tuning it was given (what
    reaches config.json and summary.json: test_choice_is_recorded_... runs it for real)."""
    from rnnjax import loop

    monkeypatch.delenv(tune.ENV_VAR, raising=False)
    monkeypatch.setattr(tune, "cache_dir", lambda compile_cache: tmp_path / "tune")
    monkeypatch.setattr(tune, "run_child", _fail_if_tuned)
    ran = []
    monkeypatch.setattr(loop, "train_and_evaluate",
                        lambda config, workdir, tuning, **kwargs: ran.append((config, tuning)))
    env = dict(os.environ)

    def seed(args, choice, **record):
        from rnnjax.cli import build_parser, config_from_args, flag_changes

        parsed = build_parser().parse_args(["train", *args])
        pinned = frozenset(flag_changes(parsed)) & set(TUNED)
        key = tune.key(config_from_args(parsed), pinned, env=env)
        tune.save(tmp_path / "tune", {"key": key, "choice": choice, "device": None, **record})

    def last():
        config, tuning = ran[-1]
        return {name: getattr(config, name) for name in TUNED}, tuning["mode"]

    seed.ran, seed.last = ran, last
    return seed


CACHED = fields(0, "stream", "", weight_grad="product", backward="autodiff",
                projection="in_loop")
RUN = [*TINY, "--steps", "2", "--compile-cache", "off"]


def test_the_cached_choice_is_used_and_explicit_flags_override_it(in_process):
    in_process(RUN, CACHED)
    assert main(["train", *RUN]) == 0
    assert in_process.last() == (CACHED, "cached")
    # --unroll given: a key of its own (unroll pinned); its choice never changes --unroll.
    in_process([*RUN, "--unroll", "3"], CACHED)
    assert main(["train", *RUN, "--unroll", "3"]) == 0
    assert in_process.last() == ({**CACHED, "unroll": 3}, "cached")
    # Every tuned setting given: nothing to tune, nothing read.
    given = ["--unroll", "2", "--backward", "hand_written", "--projection", "hoisted",
             "--weight-grad", "product", "--chunks", "1", "--feed", "device", "--xla-flags=",
             "--no-huge-pages", "--cpus", "0", "--eval-unroll", "-1", "--native-lanes", "8",
             "--eval-native"]
    assert main(["train", *RUN, *given]) == 0
    assert in_process.last() == (fields(2, flags=""), "pinned")


def test_a_run_started_over_takes_the_settings_its_records_were_made_with(in_process,
                                                                          tmp_path, capsys):
    """The same command again in the workdir of a run stopped before its first checkpoint
    takes the tuned settings its config.json records, whatever the cache holds now: a
    choice changed since (a later ``rnnjax tune``) made it another run, refused."""
    from rnnjax.cli import build_parser, config_from_args

    work = tmp_path / "stopped"
    work.mkdir()
    earlier = fields(0, "stream", "", weight_grad="per_step", backward="autodiff",
                     projection="hoisted")
    stopped = config_from_args(build_parser().parse_args(["train", *RUN])).replace(**earlier)
    (work / "config.json").write_text(json.dumps(to_dict(stopped)))
    (work / "metrics.jsonl").write_text("")
    in_process(RUN, CACHED)  # since changed: projection in_loop
    assert main(["train", *RUN, "--workdir", str(work)]) == 0
    assert in_process.last() == (earlier, "recorded")
    # A flag that makes it another run: not those records' settings (the loop refuses it).
    in_process([*RUN, "--unroll", "3"], CACHED)
    assert main(["train", *RUN, "--workdir", str(work), "--unroll", "3"]) == 0
    assert in_process.last() == ({**CACHED, "unroll": 3}, "cached")
    assert main(["train", *RUN, "--workdir", str(work), "--steps", "5"]) == 0
    assert in_process.last() == (earlier, "recorded")
    assert main(["train", *RUN, "--workdir", str(tmp_path / "new")]) == 0
    assert in_process.last() == (CACHED, "cached")
    # --tune and --tune-budget were read by no one, silently: the run says so (the same
    # command again, as a scheduler runs it, is not refused).
    for asked in (["--tune"], ["--tune-budget", "50"], ["--tune", "--tune-budget", "50"]):
        flags = " and ".join(flag for flag in asked if flag.startswith("--"))
        capsys.readouterr()
        assert main(["train", *RUN, "--workdir", str(work), *asked]) == 0
        assert in_process.last() == (earlier, "recorded")
        assert capsys.readouterr().err.startswith(
            f"rnnjax: note: {flags} not read: {work} holds the records of a run stopped "
            "before its first checkpoint, and this one starts it over with the settings its "
            "config.json records (never tuned again: the same run)\n")


def test_no_tune_and_the_environment_turn_tuning_off(in_process, monkeypatch, capsys):
    in_process(RUN, CACHED)
    defaults = {name: getattr(Config(), name) for name in TUNED}
    assert main(["train", *RUN, "--no-tune"]) == 0
    assert in_process.last() == (defaults, "off")
    monkeypatch.setenv(tune.ENV_VAR, "off")
    assert main(["train", *RUN]) == 0
    assert in_process.last() == (defaults, "off")
    assert "--tune-budget" not in capsys.readouterr().err
    # A budget given under the variable was dropped without a word.
    assert main(["train", *RUN, "--tune-budget", "50"]) == 0
    assert in_process.last() == (defaults, "off")
    assert ("rnnjax: note: --tune-budget not read: $RNNJAX_TUNE is off, so this run is not "
            "tuned; pass --tune to tune it\n") in capsys.readouterr().err
    assert main(["train", *RUN, "--tune"]) == 0
    assert in_process.last() == (CACHED, "cached")


@pytest.mark.parametrize("cell, stale", [
    ("irnn", {"backward": "native"}),  # no native kernels
    ("simple_rnn", {"backward": "autodiff", "weight_grad": "per_step"}),  # autodiff's own
    ("simple_rnn", {"cpus": 999}),  # more than this process may use
])
def test_a_cached_choice_that_cannot_run_as_it_names_is_timed_again(in_process, monkeypatch,
                                                                    capsys, cell, stale):
    """A cached choice was applied unchecked: a form the cell lacks (a cell registered again
    under its name with other code, a cache file edited) went into config.json though
    another ran; native kernels or CPUs the run cannot have failed every run of the shape,
    naming a flag no one gave. It is stale: timed again and saved over."""
    run = [*RUN, "--cell", cell]
    in_process(run, {**fields(1, flags=""), **stale})
    config = Config(cell=cell, hidden_size=4, batch_size=4)
    monkeypatch.setattr(tune, "run_child", FakeChild(all_times(1.0, config)))
    assert main(["train", *run]) == 0
    assert in_process.last()[1] == "measured"
    (path,) = (in_process.ran[-1][1]["cache"],)
    err = capsys.readouterr().err
    assert f"rnnjax: the choice cached in {path} cannot run as it names (" in err
    assert "): tuning again\n" in err
    monkeypatch.setattr(tune, "run_child", _fail_if_tuned)  # what it saved runs as named
    assert main(["train", *run]) == 0
    assert in_process.last()[1] == "cached" and "cannot run" not in capsys.readouterr().err


class Holder:
    """Another process tuning a shape: holds its lock in a thread until ``release``; the
    waiter's ``waiting`` callback (wrapped by :meth:`watch`) sets ``waited``."""

    def __init__(self, monkeypatch, directory, key):
        import threading

        self.waited, self.released, self.locked = (threading.Event(), threading.Event(),
                                                   threading.Event())
        self.calls = []
        lock = tune.shape_lock

        def watch(directory, key_, waiting):
            def waiting_(path):
                self.calls.append(path)
                waiting(path)
                self.waited.set()
            return lock(directory, key_, waiting_)

        monkeypatch.setattr(tune, "shape_lock", watch)

        def hold():
            with lock(directory, key, lambda path: pytest.fail("the holder waited")):
                self.locked.set()
                self.released.wait(60)
                self.then()

        self.then = lambda: None
        self.thread = threading.Thread(target=hold, daemon=True)
        self.thread.start()
        assert self.locked.wait(30)

    def release_when_waited(self, then=lambda: None):
        """Once the other waits: ``then()`` with the lock still held, and let it go."""
        import threading

        def release():
            assert self.waited.wait(60)
            self.then = then
            self.released.set()
        threading.Thread(target=release, daemon=True).start()


def test_the_shape_lock_makes_a_second_holder_wait_and_leaves_no_file(tmp_path):
    """Two processes starting one new shape together both tuned it in full, each timing
    under the other's load. The tuner's lock makes the second wait for the first."""
    import threading

    key = {"shape": 1}
    lock_file = tune.cache_path(tmp_path / "tune", key).with_suffix(".lock")
    order, said = [], []
    first = tune.shape_lock(tmp_path / "tune", key, lambda path: pytest.fail("waited"))
    assert first.__enter__() is False and lock_file.exists()

    def second():
        with tune.shape_lock(tmp_path / "tune", key, said.append) as waited:
            order.append(("second", waited))
    thread = threading.Thread(target=second)
    thread.start()
    deadline = time.monotonic() + 30
    while not said and time.monotonic() < deadline:
        time.sleep(0.01)
    assert said == [lock_file] and order == []  # it waits, said once
    order.append("first done")
    first.__exit__(None, None, None)  # removes the file: the waiter locks the new one
    thread.join(30)
    assert order == ["first done", ("second", True)]
    assert list((tmp_path / "tune").iterdir()) == []  # only records stay in the cache
    # A third, alone, waits for nothing; with no cache, or one that cannot be written,
    # nothing is locked (nothing is shared).
    with tune.shape_lock(tmp_path / "tune", key, said.append) as waited:
        assert waited is False
    (tmp_path / "file").write_text("")
    for directory in (None, tmp_path / "file" / "tune"):
        with tune.shape_lock(directory, key, said.append) as waited, \
                tune.shape_lock(directory, key, said.append) as again:
            assert waited is again is False
    assert len(said) == 1


def test_a_run_waits_for_another_tuning_its_shape_and_uses_its_choice(in_process, monkeypatch,
                                                                      capsys, tmp_path):
    """The second of two runs of one new shape waits for the first's tuning and uses what
    it saved, tuning nothing."""
    from rnnjax.cli import build_parser, config_from_args

    config = config_from_args(build_parser().parse_args(["train", *RUN]))
    holder = Holder(monkeypatch, tmp_path / "tune", tune.key(config, frozenset()))
    holder.release_when_waited(then=lambda: in_process(RUN, CACHED))
    assert main(["train", *RUN]) == 0  # _fail_if_tuned: it tuned nothing
    assert in_process.last() == (CACHED, "cached")
    err = capsys.readouterr().err
    assert (f"rnnjax: another process is tuning simple_rnn 4 x1 rows batch 4 here (it holds "
            f"{holder.calls[0]}): waiting to read its choice") in err
    assert ("rnnjax: simple_rnn 4 x1 rows batch 4: using the choice another process saved "
            "meanwhile") in err and "rnnjax: tuning simple_rnn" not in err


def test_a_choice_saved_while_a_run_checked_its_data_is_used(in_process, monkeypatch,
                                                            capsys):
    """A tuner that saved and let the lock go while this run checked its data (after its
    first read of the cache): the lock was free, so this run tuned again ("the first run of
    this shape here") and saved over that choice, a long rnnjax tune's too. The cache is
    read again under the lock."""
    monkeypatch.setattr(tune, "child_sources", lambda config: in_process(RUN, CACHED))
    assert main(["train", *RUN]) == 0  # _fail_if_tuned: it tuned nothing
    assert in_process.last() == (CACHED, "cached")
    err = capsys.readouterr().err
    assert err.startswith("rnnjax: simple_rnn 4 x1 rows batch 4: using the choice another "
                          "process saved meanwhile\n") and "waiting" not in err


def test_a_run_whose_other_tuner_saved_nothing_tunes_after_it(in_process, monkeypatch,
                                                              capsys, tmp_path):
    """Where the other process saved nothing (killed, or it failed) the waiter tunes."""
    from rnnjax.cli import build_parser, config_from_args

    config = config_from_args(build_parser().parse_args(["train", *RUN]))
    holder = Holder(monkeypatch, tmp_path / "tune", tune.key(config, frozenset()))
    holder.release_when_waited()
    monkeypatch.setattr(tune, "run_child", FakeChild(all_times(1.0, config)))
    assert main(["train", *RUN]) == 0
    assert in_process.last()[1] == "measured" and len(holder.calls) == 1
    assert "rnnjax: tuning simple_rnn 4 x1 rows batch 4, the first run of this shape here" \
        in capsys.readouterr().err


def test_rnnjax_tune_waits_for_another_tuning_its_shape(monkeypatch, capsys, tmp_path):
    """rnnjax tune times again whatever is cached, but not under another tuner's load."""
    from rnnjax.cli import build_parser, config_from_args

    monkeypatch.setattr(tune, "cache_dir", lambda compile_cache: tmp_path / "tune")
    config = config_from_args(build_parser().parse_args(["tune", *TINY]))
    holder = Holder(monkeypatch, tmp_path / "tune", tune.key(config, frozenset()))
    holder.release_when_waited()
    timed = []

    def tuned(config, pinned, budget, **kwargs):
        timed.append(holder.released.is_set())
        return tune.Result(key=tune.key(config, pinned), choice=fields(1, flags=""),
                           baseline=fields(1), measurements=[], device=None, seconds=1.0,
                           budget_s=budget, complete=True)
    monkeypatch.setattr(tune, "tune", tuned)
    assert main(["tune", *TINY]) == 0
    assert timed == [True]  # timed once the other had finished
    assert "rnnjax: another process is tuning this shape here (it holds" in \
        capsys.readouterr().err
    assert [p.suffix for p in (tmp_path / "tune").iterdir()] == [".json"]


def test_a_runs_tuning_that_cannot_be_cached_says_why(in_process, monkeypatch, capsys,
                                                       tmp_path):
    """A tuner's cache that cannot be written (a file in its place, a full disk, a
    read-only home) was reported as "no cache", every later run tuning again unexplained."""
    monkeypatch.setattr(tune, "run_child", FakeChild(
        all_times(1.0, Config(hidden_size=4, batch_size=4))))
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(tune, "cache_dir", lambda compile_cache: tmp_path / "file" / "tune")
    assert main(["train", *RUN]) == 0
    assert (f"; not saved ({tmp_path / 'file' / 'tune'} cannot be written: tunes again next "
            "run)") in capsys.readouterr().err


def test_a_new_shape_is_tuned_once_then_cached(in_process, monkeypatch, capsys):
    times = all_times(1.0, Config(hidden_size=4, batch_size=4))
    times[k(4)] = 0.5
    fake = FakeChild(times)
    monkeypatch.setattr(tune, "run_child", fake)
    assert main(["train", *RUN]) == 0
    assert in_process.last() == (fields(4, flags=""), "measured")
    err = capsys.readouterr().err
    assert "rnnjax: tuning simple_rnn 4" in err and "--tune-budget 30 s, less for a" in err
    assert fake.pay_back[0]["steps"] == 2  # the default budget: capped by the run's steps
    assert "chose unroll 4, backward hand_written, projection hoisted, weight-grad product" \
        in err and "saved in" in err
    calls = len(fake.calls)
    assert main(["train", *RUN]) == 0
    assert len(fake.calls) == calls  # the second run reads the cache
    assert in_process.last()[1] == "cached"
    # A choice cut short by a budget a run of the shape may well exceed: tuned again.
    in_process(RUN, CACHED, complete=False, budget_s=10.0)
    assert main(["train", *RUN, "--tune-budget", "14"]) == 0  # not 1.5x 10 s: it stands
    assert len(fake.calls) == calls and in_process.last()[1] == "cached"
    assert main(["train", *RUN, "--tune-budget", "300"]) == 0
    assert len(fake.calls) > calls and in_process.last()[1] == "measured"
    assert "tuning simple_rnn 4 x1 rows batch 4, again: its cached choice had" in \
        capsys.readouterr().err
    # A --tune-budget given is spent as given: no pay-back cap.
    assert main(["train", *RUN, "--hidden-size", "6", "--tune-budget", "5"]) == 0
    assert fake.pay_back[-1] is None and "--tune-budget 5 s;" in capsys.readouterr().err
    # A bad run is refused before any time is spent tuning: no child started.
    monkeypatch.setattr(tune, "run_child", _fail_if_tuned)
    assert main(["train", *RUN, "--hidden-size", "5", "--batch-size", "70000"]) == 2
    assert "larger than the 60000 training examples" in capsys.readouterr().err


def test_rnnjax_tune_prints_the_table_and_caches_the_choice(tmp_path):
    env = _env(tmp_path)
    pins = ["--xla-flags=", "--no-huge-pages", "--cpus", "0", "--backward", "hand_written",
            "--projection", "hoisted", "--weight-grad", "product", "--feed", "device"]  # one child
    proc = _run("tune", *TINY, *pins, "--tune-budget", "90", env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:7] == ["unroll", "backward", "projection", "weight-grad", "chunks",
                                    "feed", "ms/step"]
    rows = [line.split() for line in lines[1:5]]
    # The baseline, fully unrolled, the faster of those in 4 parts, the middle unroll.
    assert [(row[0], row[4]) for row in rows] in (
        [("1", "1"), ("0", "1"), (fastest, "4"), ("4", chunks)]
        for fastest in ("1", "0") for chunks in ("1", "4"))
    assert all(row[1:4] == ["hand_written", "hoisted", "product"] for row in rows)
    # Then, where the four timed within SECOND_NEAR of each other (a loaded machine), their
    # rows from a second process and in turns, those of a later process in the first's
    # terms ("second process, x0.751 to the first process's terms"), and their means.
    chose = next(i for i, line in enumerate(lines) if line.startswith("chose unroll "))
    notes = [line.split("(none)", 1)[1].strip() for line in lines[5:chose]]
    assert all(note.startswith(("second process", "timed in turns", "mean of "))
               for note in notes), notes
    assert "rnnjax: timing simple_rnn 4" in proc.stderr and "ms/step" in proc.stderr
    cached = list((tmp_path / "cache" / "rnnjax" / "tune").glob("*.json"))
    assert len(cached) == 1
    choice = json.loads(cached[0].read_text())["choice"]
    # The choice as flags, cached or not (only the uncached line had them; a multi-process
    # run, never tuned, was told to give every process "the flags it prints"): with the
    # flags given they make the choice.
    line, flags = lines[chose + 1].split("; as flags: ")
    assert line == f"cached in {cached[0]}: rnnjax train uses it for this shape"
    from rnnjax.cli import build_parser, config_from_args

    given = config_from_args(build_parser().parse_args(["train", *TINY, *pins,
                                                        *shlex.split(flags)]))
    assert {k: getattr(given, k) for k in TUNED} == choice
    # rnnjax train of the same shape (and the same flags given) uses it without tuning.
    work = tmp_path / "run"
    proc = _run("train", *TINY, *pins, "--steps", "2", "--workdir", str(work), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "rnnjax: tuning" not in proc.stderr
    config = json.loads((work / "config.json").read_text())
    assert {k: config[k] for k in TUNED} == choice
    assert json.loads((work / "summary.json").read_text())["tuning"]["mode"] == "cached"


def test_best_names_the_fastest_timed_values():
    timed = [({"unroll": 1, "form": "a"}, 3.0), ({"unroll": 4, "form": "b"}, 1.0)]
    assert measure.resolve({"unroll": 0, "form": measure.BEST}, timed, {"form": "x"}) == {
        "unroll": 0, "form": "b"}
    assert measure.resolve({"unroll": measure.BEST, "form": "a"}, timed, {"unroll": 1}) == {
        "unroll": 4, "form": "a"}
    assert measure.resolve({"unroll": 0, "form": measure.BEST}, [], {"form": "x"}) == {
        "unroll": 0, "form": "x"}


def test_a_best_unroll_is_timed_at_each_unroll_near_the_fastest():
    """The seed's shape: the baseline timed alike at unroll 1 and fully unrolled, so a form
    is timed at both, the faster first; an unroll 30% slower is not tried, nor for a
    candidate whose form fields are 'best' too."""
    timed = [({"unroll": 1, "form": "a"}, 1.00), ({"unroll": 0, "form": "a"}, 1.2),
             ({"unroll": 4, "form": "a"}, 1.30)]
    best_unroll = {"unroll": measure.BEST, "form": "b"}
    assert measure.resolutions(best_unroll, timed, {"unroll": 1}) == [
        {"unroll": 1, "form": "b"}, {"unroll": 0, "form": "b"}]
    assert measure.resolutions(best_unroll, timed[:1] + timed[2:], {"unroll": 1}) == [
        {"unroll": 1, "form": "b"}]
    both = {"unroll": measure.BEST, "form": measure.BEST}
    assert measure.resolutions(both, timed, {"unroll": 1, "form": "x"}) == [
        {"unroll": 1, "form": "a"}]
    assert measure.resolutions(best_unroll, [], {"unroll": 1}) == [{"unroll": 1, "form": "b"}]
    # Through the tuner: per-step weight gradients lose at unroll 1, win fully unrolled.
    times = all_times()
    times[k(0)] = 1.01
    times[k(0, weight_grad="per_step")] = 0.8
    times[k(1, weight_grad="per_step")] = 1.3
    fake = FakeChild(times)
    result = tune.tune(Config(), frozenset(), 30.0, child=fake, clock=Clock())
    assert result.choice == fields(0, weight_grad="per_step", flags="")


@pytest.mark.parametrize("cell", ["simple_rnn", "lstm", "gru", "flax.linen:GRUCell"])
def test_the_childs_state_has_the_runs_shapes_without_compiling_its_initialisation(cell):
    """Children time every candidate from a state drawn by NumPy (the same in every child):
    the tree, shapes and dtypes of the run's, its optimizer state the optimizer's own."""
    import jax
    import numpy as np

    from rnnjax import train
    from rnnjax.model import make_model
    from rnnjax.optim import make_optimizer

    config = Config(cell=cell, hidden_size=8)
    model, optimizer = make_model(config), make_optimizer(config)
    real = jax.eval_shape(lambda: train.create_state(jax.random.key(0), model, optimizer))
    state = measure.synthetic_state(model, optimizer)
    assert jax.tree.structure(state) == jax.tree.structure(real)
    assert [(a.shape, a.dtype) for a in jax.tree.leaves(state)] == \
        [(a.shape, a.dtype) for a in jax.tree.leaves(real)]
    again = measure.synthetic_state(model, optimizer)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(state.params))
    assert all(np.abs(a).max() > 0 for a in jax.tree.leaves(state.params))


def test_a_non_finite_first_step_never_matches():
    ref = {"loss": np.float32(2.3), "s0": np.ones(3, np.float32)}
    assert measure.relative_difference(ref, ref) == 0.0
    assert measure.relative_difference({**ref, "loss": np.float32(np.nan)}, ref) == math.inf
    assert measure.relative_difference({**ref, "s0": np.array([1, np.inf, 1])}, ref) == \
        math.inf


@pytest.mark.parametrize("optimizer", ["sgd", "noisy_sgd"])
def test_an_sgd_candidates_first_step_is_compared_by_its_update(optimizer):
    """Where the optimizer keeps no floating-point state (SGD), the first step is compared
    by the parameters' update, the learning rate times the gradient: compared by the
    parameters themselves, a candidate whose gradients were half what they should be
    differed by 5e-4 at SGD's learning rate of 1e-3, within the 1e-3 tolerance. Another
    form of the same cell (autodiff against the hand-written pass) still matches. An
    optimizer holding a random key (``noisy_sgd``) failed every candidate: NumPy took the
    key for a float."""
    config = Config(optimizer=optimizer, batch_size=8, steps=4, steps_per_call=2,
                    compile_cache="off")
    data = measure.synthetic_data(config, 16)
    timed = measure.Timed(config, data, time.perf_counter)
    import jax

    from rnnjax.model import make_model
    from rnnjax.optim import make_optimizer

    initial = measure.synthetic_state(make_model(config), make_optimizer(config))
    updates = [a - b for a, b in zip(jax.tree.leaves(timed.state.params),
                                     jax.tree.leaves(initial.params), strict=True)]
    assert sorted(timed.first_step) == ["loss", *(f"s{i}" for i in range(len(updates)))]
    for i, update in enumerate(updates):
        np.testing.assert_allclose(timed.first_step[f"s{i}"], update, atol=1e-9)
        assert np.abs(update).max() > 0
    half = {k: v if k == "loss" else v / 2 for k, v in timed.first_step.items()}
    assert measure.relative_difference(half, timed.first_step) == pytest.approx(0.5)
    other, _ = measure.candidate_config(config, {"backward": "autodiff",
                                                 "projection": "in_loop"})
    assert tune.baseline(config, frozenset())["backward"] == "hand_written"
    again = measure.Timed(other, data, time.perf_counter)
    assert measure.relative_difference(again.first_step, timed.first_step) < \
        tune.tolerance(config)


def test_defaults_not_timed_say_why_a_failed_child_or_the_budget():
    """Every child failing (an unknown flag in $XLA_FLAGS: XLA exits at start-up) said the
    defaults were not timed within the budget, and to give a larger one."""
    def result(note):
        return tune.Result(key={}, choice=None, baseline=fields(1), measurements=[
            tune.Measurement(fields(1), "", note=note)], device=None, seconds=4.1,
            budget_s=20.0, complete=False)

    failed = tune.choice_line(result("child exited 1: Unknown flag in XLA_FLAGS: --xla_x=1"))
    assert failed == ("the defaults were not timed: their child failed (child exited 1: "
                      "Unknown flag in XLA_FLAGS: --xla_x=1); the defaults stay")
    assert tune.choice_line(result(tune.STOPPED)) == (
        "the defaults were not timed in 4.1 s of tuning (--tune-budget 20 s), so nothing "
        "compares with them; the "
        "defaults stay (give a larger --tune-budget)")


def test_rnnjax_tune_says_why_it_did_not_cache(tmp_path, monkeypatch, capsys):
    """A cache directory that cannot be written was reported as 'no --compile-cache'."""
    choice = fields(1, flags="")
    monkeypatch.setattr(tune, "tune", lambda config, pinned, budget, **kwargs: tune.Result(
        key=tune.key(config, pinned), choice=choice, baseline=fields(1), measurements=[],
        device=None, seconds=1.0, budget_s=budget, complete=True))
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(tune, "cache_dir", lambda compile_cache: tmp_path / "file" / "tune")
    assert main(["tune", *TINY]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith(f"not cached ({tmp_path / 'file' / 'tune'} cannot be written); "
                           "pass: --unroll 1 ")
    monkeypatch.setattr(tune, "cache_dir", lambda compile_cache: None)
    assert main(["tune", *TINY, "--compile-cache", "off"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(
        "not cached (no --compile-cache); pass: --unroll 1 ")


def test_an_sgd_first_step_that_moves_nothing_is_compared_by_its_second():
    """SGD under a warmup starts at a learning rate of 0: its first update is 0 whatever
    the gradient, so a candidate whose gradients were 3 times too large matched. The
    second step's update (at the warmup's second rate) is compared instead."""
    config = Config(optimizer="sgd", schedule="warmup_cosine", warmup_steps=100, steps=200,
                    batch_size=8, steps_per_call=4, compile_cache="off")
    data = measure.synthetic_data(config, 16)
    timed = measure.Timed(config, data, time.perf_counter)
    assert timed.first == 2  # one step that moved nothing, then the one compared
    assert min(np.abs(v).max() for k, v in timed.first_step.items() if k != "loss") > 0
    wrong = {k: v if k == "loss" else 3 * v for k, v in timed.first_step.items()}
    assert measure.relative_difference(wrong, timed.first_step) == pytest.approx(2.0)
    constant = measure.Timed(config.replace(schedule="constant", warmup_steps=0), data,
                             time.perf_counter)
    assert constant.first == 1  # a first step that moved: compared as it was


def test_a_calls_own_cost_is_spread_over_the_runs_steps_per_call():
    """The LSTM at batch 1024: a 1-step call 82 ms, a 2-step call 123 ms: 41 ms a step and
    41 ms of the call's own; the run spreads those 41 over its 500 steps per call. A call's
    own cost larger than its steps' is read the same (it was once dropped there, or cut to
    half the 1-step call)."""
    assert measure.call_overhead(0.082, 0.123, 2) == pytest.approx(0.041)
    assert measure.call_overhead(0.003, 0.042, 42) == pytest.approx(0.003 - 0.039 / 41)
    for own, step, steps in ((3, 1, 2), (9, 1, 8), (1, 1, 8), (0.364, 0.066, 2)):
        one, seconds = own + step, own + steps * step
        assert measure.call_overhead(one, seconds, steps) == pytest.approx(own)
        assert measure.run_step(seconds, steps, own, 500) == pytest.approx(step + own / 500)
    # A second step within the noise (a tenth of the call): the largest step it could hide
    # comes off, so the cost read moves with the timings (it had dropped to 0 there).
    assert measure.call_overhead(0.080, 0.082, 2) == pytest.approx(0.082 - 2 * 0.0082)
    assert measure.call_overhead(10, 11, 2) == pytest.approx(11 - 2 * 1.1)
    near = [measure.call_overhead(one, 1.0, 2) for one in (0.899, 0.9, 0.901, 1.2)]
    assert near == pytest.approx([0.798, 0.8, 0.8, 0.8])  # no more than the 2-step call leaves
    # A 1-step call slower than the 4-step one (noise): the cost is what the 4-step call
    # leaves beside 4 steps of the largest size the noise could hide (it had been 0.487 s,
    # more than the whole 4-step call, and each step nearly free: 0.001 s at 500 a call).
    assert measure.call_overhead(0.5, 0.4, 4) == pytest.approx(0.4 - 4 * 0.04 / 3)
    assert measure.run_step(0.4, 4, measure.call_overhead(0.5, 0.4, 4), 500) == pytest.approx(
        0.04 / 3 + (0.4 - 0.16 / 3) / 500)
    # benchmarks/flax_peers' medians of issue 11's review (ms): 1 step 2.970, 3 steps 1.115
    assert measure.call_overhead(2.970, 1.115, 3) < 1.115
    assert measure.call_overhead(0.08, 0.08, 1) == 0.0
    assert measure.call_overhead(float("inf"), 0.1, 4) == 0.0


def test_compile_time_prediction_bounds_the_unrolls_tried():
    """Full unrolling of 784 pixel steps is predicted to compile for minutes from the
    unrolls compiled before it (and so skipped by a small budget); 28 rows are not. From
    one compiled unroll, a step adds compile time with the share of the program's
    instructions it adds: the SimpleRNN's small step less than the GRU's."""
    from rnnjax.measure import predict_compile_s

    assert predict_compile_s(0, {}) is None
    assert predict_compile_s(28, {1: (2.0, 0.1), 4: (2.6, 0.1)}) == pytest.approx(2.0 + 0.2 * 27)
    assert predict_compile_s(784, {1: (2.0, 0.2), 16: (5.0, 0.2)}) > 120
    # noise: no slope
    assert predict_compile_s(28, {1: (2.0, 0.1), 4: (1.5, 0.1)}) == pytest.approx(2.0)
    assert predict_compile_s(4, {1: (4.0, 0.25)}) == pytest.approx(4.0 * 1.3)
    assert predict_compile_s(28, {1: (2.0, 0.25)}) < 10 < predict_compile_s(784, {1: (2.0, 0.25)})
    # The step shares of issue 11's machine, 28 rows at batch 1024, each compiled at unroll 1
    # in 0.8 s (the SimpleRNN measured 1.6 s fully unrolled, the GRU 3.2 s): the SimpleRNN
    # starts with 3 s left, where a tenth more per step for every cell had predicted 3 s.
    simple, gru = predict_compile_s(28, {1: (0.8, 0.12)}), predict_compile_s(28, {1: (0.8, 0.27)})
    assert 1.6 < simple < 2.0 < 3.0 < gru < 3.6
    assert predict_compile_s(28, {1: (0.8, None)}) == pytest.approx(0.8 * 3.7)  # no text
    assert predict_compile_s(4, {28: (3.0, 0.0)}) == pytest.approx(3.0)  # from a full unroll
    # What the child then does: not started; started where an earlier child compiled it
    # (the second process loads its programs from the compilation cache).
    assert measure.why_not(784, {1: (2.0, 0.25)}, 30.0, cached=False) == \
        "compile predicted 159 s, 30 s left"  # 2.0 * (1 + 0.4 * 0.25 * 783)
    assert measure.why_not(784, {1: (2.0, 0.25)}, 30.0, cached=True) == ""
    assert measure.why_not(28, {1: (2.0, 0.25)}, 30.0, cached=False) == ""
    assert measure.why_not(28, {1: (0.8, 0.12)}, 3.0, cached=False) == ""
    assert measure.why_not(28, {}, 0.0, cached=True) == "budget spent"
    # A GPU's own growth: the H200's first child compiled the SimpleRNN's rows at unroll 1
    # in 2.0-2.3 s, a step share near 0.14 at batch 1024, where its full unroll compiled in
    # 1.42x the time of unroll 1 (1.8 -> 2.5 s): predicted at the CPU's growth to need 5 s
    # with 3 s left, at the GPU's 3.2 s; a backend not measured is predicted as a CPU.
    assert measure.compile_growth("gpu") < measure.compile_growth("cpu")
    assert measure.compile_growth("tpu") == measure.compile_growth("cpu")
    gpu = predict_compile_s(28, {1: (2.0, 0.14)}, measure.compile_growth("gpu"))
    assert gpu == pytest.approx(2.0 * (1 + 0.16 * 0.14 * 27))
    assert 2.5 < gpu < 3.5 < 4.5 < predict_compile_s(28, {1: (2.0, 0.14)})
    assert measure.why_not(28, {1: (2.0, 0.14)}, 4.0, False, measure.compile_growth("gpu")) == ""
    assert measure.why_not(28, {1: (2.0, 0.14)}, 4.0, False) == \
        "compile predicted 5 s, 4 s left"


def test_a_compiled_train_steps_step_share_follows_its_cell():
    """The child reads each compiled candidate's step share (``measure.step_share``, from
    the program its feed compiled): the LSTM's step holds more of its program than the
    SimpleRNN's, and a program fully unrolled has no step left to unroll."""

    def share(cell: str, unroll: int, chunks: int = 1) -> float | None:
        config = Config(cell=cell, batch_size=8, unroll=unroll, chunks=chunks, steps=4,
                        steps_per_call=2, compile_cache="off")
        timed = measure.Timed(config, measure.synthetic_data(config, 16), time.perf_counter)
        return measure.step_share(timed.run.program, *measure.loop_unroll(unroll, chunks, 28))

    simple, lstm = share("simple_rnn", 1), share("lstm", 1)
    assert simple is not None and lstm is not None
    assert 0.02 < simple < lstm < 0.6
    assert share("simple_rnn", 0) == 0.0
    # In 4 parts of 7 steps, each fully unrolled (unroll 0, or 7 or more): no loop over
    # time left (the loop of K steps per call is not one); unrolled by 1, 4 loops.
    assert share("simple_rnn", 0, chunks=4) == share("simple_rnn", 8, chunks=4) == 0.0
    assert share("simple_rnn", 1, chunks=4) > simple
    assert measure.loop_unroll(0, 4, 28) == (7, 7) and measure.loop_unroll(2, 8, 28) == (2, 4)


def test_a_program_from_the_compile_cache_counts_the_compile_it_took(tmp_path):
    """The child reads, for a program loaded from JAX's persistent compilation cache, the
    compile it took when it was cached (JAX stores whole seconds), so later unrolls' compile
    times are still predicted: counted as nothing, a baseline loaded from the cache let the
    pixels' full unroll (minutes of compiling) start and spend the tuner's whole budget."""
    script = textwrap.dedent("""
        import sys, time, jax, jax.numpy as jnp
        from rnnjax import measure, runtime
        runtime.enable_compile_cache(sys.argv[1])
        jax.monitoring.register_event_listener(measure._count_cache_hits)
        jax.monitoring.register_event_duration_secs_listener(measure._add_cached_compile_s)
        steps = int(sys.argv[2])
        def f(x):  # compiles for seconds: the steps unrolled
            def step(h, _):
                return jnp.tanh(h @ x) + jnp.sin(h) * jnp.cos(h @ x.T), None
            return jax.lax.scan(step, x, None, length=steps, unroll=steps)[0]
        start = time.perf_counter()
        jax.jit(f).lower(jnp.ones((8, 8))).compile()
        print(time.perf_counter() - start, measure.CACHE_HITS[0], measure.CACHED_COMPILE_S[0])
    """)

    def run(steps: int) -> list[float]:
        proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / str(steps)),
                               str(steps)], capture_output=True, text=True, timeout=300,
                              check=True)
        return [float(v) for v in proc.stdout.split()]

    # A program whose compile takes seconds on this machine (JAX stores whole seconds of
    # the backend's compile: 900 steps took 1.2 s in all, 0 stored, on a 2-vCPU Xeon).
    for steps in (900, 1800, 3600):
        compile_s, hits, cached_s = run(steps)
        assert hits == 0 and cached_s == 0
        if compile_s >= 2.5:
            break
    _, hits, cached_s = run(steps)
    assert hits > 0 and 1.0 <= cached_s <= compile_s + 0.5
    assert abs(cached_s - round(cached_s)) < 1e-6  # the seconds stored, whole


KILLER = '''
import os
import signal

import rnnjax.loop as loop

real = loop.device_feed


def device_feed(config, *args, **kwargs):
    if config.unroll == 4:  # the middle unroll's candidate: the process dies as a segfault
        os.kill(os.getpid(), signal.SIGSEGV)
    return real(config, *args, **kwargs)


loop.device_feed = device_feed
'''


def test_a_real_child_that_dies_names_the_candidate_it_was_timing(tmp_path, monkeypatch):
    """``run_child`` reports a child killed by a signal (its exit status) with each
    candidate it did not report noted so; ``lost`` names the one it died timing (after the
    baseline; not a form at the 'best' unroll it timed before, which the child reported as
    resolved), which ``tune`` then leaves out of a new child."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILLER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        filter(None, [str(hook), os.environ.get("PYTHONPATH", "")])))
    config = Config(hidden_size=4, batch_size=4, steps=3, compile_cache="off")
    best = {**fields(tune.BEST), "projection": "in_loop"}
    child = tune.run_child(config, "", [fields(1), best, fields(4), fields(0)],
                           time.time() + 120, 2, str(tmp_path / "ref.npz"), 0.01,
                           lambda line: None)
    try:
        assert child.error.startswith(f"child exited {-signal.SIGSEGV}")
        assert child.measurements[0].step_s > 0 and child.measurements[1].step_s > 0
        assert child.measurements[1].candidate["projection"] == "in_loop"
        assert [m.candidate for m in child.measurements if m.note == child.error] == [
            best, fields(4), fields(0)]  # the 'best' form too: reported as resolved
        assert tune.lost(child) == fields(4)
    finally:
        child.close()
    assert tune.lost(tune.Child(error=tune.STOPPED, measurements=child.measurements)) is None
    assert tune.lost(tune.Child(error=child.error, measurements=child.measurements[1:])) is None


def test_measure_run_twice_in_one_process_counts_each_cache_hit_once(tmp_path, capsys,
                                                                     monkeypatch):
    """measure.run twice in one process (the suite's workers run it dozens of times): the
    persistent cache's events are counted once each, as in a child's one run. A listener
    registered at each run counted every event once per run before, and in the suite's
    workers a full unroll's predicted compile came to pass a 60 s deadline."""
    import jax

    from rnnjax.config import to_dict

    monkeypatch.setattr(measure, "CACHE_HITS", [0])
    monkeypatch.setattr(measure, "CACHED_COMPILE_S", [0.0])
    config = Config(hidden_size=4, batch_size=4, steps=3, compile_cache="off")
    for name in ("first", "second"):
        measure.run({"config": to_dict(config), "candidates": [fields(1)],
                     "deadline": time.time() + 60, "steps": 2, "call_s": 0.01,
                     "repeats": 1, "reference": str(tmp_path / f"{name}.npz")})
    capsys.readouterr()
    hits, seconds = measure.CACHE_HITS[0], measure.CACHED_COMPILE_S[0]
    jax.monitoring.record_event("/jax/compilation_cache/cache_hits")
    jax.monitoring.record_event_duration_secs("/jax/compilation_cache/compile_time_saved_sec",
                                              3.0)
    assert measure.CACHE_HITS[0] == hits + 1
    assert measure.CACHED_COMPILE_S[0] == seconds + 3.0


def test_a_child_refuses_a_run_that_cannot_fit_before_drawing_anything(capsys, monkeypatch):
    """measure.run in this process: a model too large for the device (where the parent
    could not know it: another backend than the CPU's) fails every candidate at once, with
    the run's own message, before any candidate draws its parameters."""
    from rnnjax.config import to_dict

    def draw(*args):
        raise AssertionError("parameters drawn for a model that cannot fit")

    monkeypatch.setattr(measure, "synthetic_params", draw)
    candidates = [fields(1), fields(0)]
    measure.run({"config": to_dict(Config(hidden_size=100_000_000, compile_cache="off")),
                 "candidates": candidates, "deadline": time.time() + 60, "steps": 2,
                 "call_s": 0.01, "repeats": 1, "reference": "unused.npz"})
    out = [json.loads(line[len(measure.PREFIX):]) for line in capsys.readouterr().out.splitlines()
           if line.startswith(measure.PREFIX)]
    assert [e["event"] for e in out] == ["device", "refused"]  # and nothing after it
    assert out[-1]["reason"].startswith("the run needs about 142.1 PiB")


def test_a_batch_the_devices_cannot_split_stops_tuning_at_once(tmp_path, capsys):
    """Two CPU devices, --batch-size 33: the first child reports the run's own error and
    tuning stops there, one line, exit 2 (each child timed nothing and said so, the run
    was refused only after the budget, and `rnnjax tune` printed its table, exit 1)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "XDG_CACHE_HOME": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    env.pop(tune.ENV_VAR, None)
    for command in (["train", "--workdir", str(tmp_path / "run")], ["tune"]):
        done = subprocess.run(
            [sys.executable, "-m", "rnnjax", *command, "--steps", "2", "--hidden-size", "8",
             "--batch-size", "33", "--tune-budget", "60"],
            capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 2, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last == ("rnnjax: error: --batch-size 33 does not divide over 2 devices; use a "
                        "multiple of 2 such as 32 or 34 (or fewer devices with --num-devices)")
        # No child after the first, which timed nothing: no candidate's line.
        assert "not timed" not in done.stderr and "Traceback" not in done.stderr
        assert "s/step" not in done.stderr and "process 2" not in done.stderr
    assert not (tmp_path / "run").exists()


def test_a_child_whose_device_fails_after_a_candidate_exits_unreported(tmp_path, capsys,
                                                                       monkeypatch):
    """measure.run in this process: a candidate that fails is noted "failed" and the child
    goes on, while its device still runs a trivial program; where the device no longer
    does (a kernel's fault can leave a GPU's context unusable), it stops before reporting
    it (``main`` then exits DEVICE_LOST at once), its ``trying`` event the last, so that
    ``tune.lost`` names it and a new child times the others."""
    from rnnjax.config import to_dict

    config = Config(hidden_size=4, batch_size=4, steps=3, compile_cache="off")
    base, probe, middle = fields(1), fields(0), fields(4)
    real = measure.Timed

    def timed(candidate, *args, **kwargs):
        if candidate.unroll == 0:
            raise RuntimeError("INTERNAL: an illegal memory access was encountered")
        return real(candidate, *args, **kwargs)

    monkeypatch.setattr(measure, "Timed", timed)

    def run(name):
        measure.run({"config": to_dict(config), "candidates": [base, probe, middle],
                     "deadline": time.time() + 60, "steps": 2, "call_s": 0.01,
                     "repeats": 1, "reference": str(tmp_path / f"{name}.npz")})

    def events(out):
        return [json.loads(line[len(measure.PREFIX):]) for line in out.splitlines()
                if line.startswith(measure.PREFIX)]

    assert not measure.lost_device("cpu")
    run("well")
    out = events(capsys.readouterr().out)
    assert [e["candidate"] for e in out if e["event"] == "result"] == [base, middle]
    (failed,) = [e for e in out if e["event"] == "skipped"]
    assert failed["candidate"] == probe and failed["reason"].startswith(
        "failed: RuntimeError: INTERNAL: an illegal memory access")
    monkeypatch.setattr(measure, "lost_device", lambda backend: True)
    with pytest.raises(measure.DeviceLost, match="illegal memory access"):
        run("lost")
    captured = capsys.readouterr()
    out = events(captured.out)
    assert [e["candidate"] for e in out if e["event"] in ("result", "skipped")] == [base]
    assert out[-1] == {"event": "trying", "candidate": probe}  # what tune.lost names
    assert "the cpu failed after" in captured.err and "illegal memory access" in captured.err


def test_rnnjax_tune_refuses_a_run_of_several_processes(capsys, monkeypatch):
    """It timed one process at the whole batch, cached the choice under the one-process
    key (replacing that choice) and said rnnjax train uses it: a run of several processes
    never tunes."""
    for flags, env in (([ "--num-processes", "2", "--coordinator-address", "localhost:12355",
                          "--process-id", "0"], None),
                       ([], "localhost:12355")):
        with monkeypatch.context() as m:
            if env:
                m.setenv("JAX_COORDINATOR_ADDRESS", env)
            assert main(["tune", *TINY, *flags, "--tune-budget", "5"]) == 2
        assert capsys.readouterr().err == (
            "rnnjax: error: rnnjax tune times one process, and a run of several processes is "
            "never tuned (every process must choose alike): drop --num-processes, "
            "--coordinator-address and $JAX_COORDINATOR_ADDRESS, tune one process at its "
            "share of --batch-size, and give every process the flags it prints\n")


def test_a_cached_choice_of_other_devices_names_what_differs(tmp_path):
    """Measured with another device count (JAX_NUM_CPU_DEVICES), it said "measured on
    Xeon, this run has Xeon"."""
    from rnnjax import runtime

    now = runtime.device_info()
    cached = tmp_path / "choice.json"
    cached.write_text("{}")
    err = io.StringIO()
    device = {**now, "device_count": now["device_count"] + 1}
    tune.check_device({"mode": "cached", "device": device, "cache": str(cached)}, err)
    assert err.getvalue() == (
        f"rnnjax: the tuned choice was measured with device_count {now['device_count'] + 1}, "
        f"this run has device_count {now['device_count']}: kept for this run, tuning again "
        "next run\n")
    assert not cached.exists()
    tune.check_device({"mode": "cached", "device": now, "cache": str(tmp_path / "x")}, err)
    assert err.getvalue().count("\n") == 1  # the same devices: nothing said


USER_CELL = Path(users_cells.__file__).read_text()  # a module to copy beside a script


def test_a_cell_registered_in_python_is_tuned_by_the_children(tmp_path):
    """A cell registered in ``rnnjax.cells.CELLS`` by a script that runs ``rnnjax.cli.main``
    (README, "How to extend"): the tuner's children, fresh processes, had never heard of
    it, and every first run of it stopped with their "unknown cell". They import its
    function as the script did, from its module beside the script, wherever they start.
    The machine's settings are pinned: one child has the whole budget (five shared 4 s, and
    on a loaded 2-vCPU machine none timed a candidate), of 30 s: a run's end comes when
    every candidate is timed, and 8 s left the child none under two suites at once."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "scripted_cells.py").write_text(USER_CELL)
    (tmp_path / "lib" / "run.py").write_text(textwrap.dedent("""
        import sys
        from rnnjax.cells import CELLS
        import scripted_cells
        CELLS["users_elman"] = scripted_cells.elman
        from rnnjax.cli import main
        sys.exit(main(sys.argv[1:]))
    """))
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "lib" / "run.py"), "tune", "--cell", "users_elman",
         *TINY, "--xla-flags=", "--no-huge-pages", "--cpus", "0",  # one child
         "--tune-budget", "30", "--compile-cache", "off"],
        capture_output=True, text=True, env=_env(tmp_path), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "chose unroll" in proc.stdout and "unknown cell" not in proc.stderr
    assert "autodiff" in proc.stdout  # its only form


def test_a_cell_no_child_can_import_is_one_line_before_anything_is_timed(
        tmp_path, monkeypatch, capsys):
    def in_a_script(hidden):
        return cells.simple_rnn(hidden)

    in_a_script.__module__ = "__main__"
    monkeypatch.setitem(cells.CELLS, "scripted", in_a_script)
    assert main(["tune", "--cell", "scripted", *TINY, "--compile-cache", "off"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "registered from the script run as __main__" in err
    assert err.endswith("or pass --no-tune")
    def inside(hidden):
        return cells.simple_rnn(hidden)

    class Widths:
        def make(self, hidden):
            return cells.simple_rnn(hidden)

    # A function whose name its module gave to another after: a child importing
    # shadowed_cells:elman would time the other one.
    (tmp_path / "shadowed_cells.py").write_text(textwrap.dedent("""
        from rnnjax import cells

        def elman(hidden):
            return cells.simple_rnn(hidden)

        registered = elman

        def elman(hidden):  # noqa: F811
            return cells.BUILT_IN["gru"](hidden)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import shadowed_cells

    # Each names why; a bound method had been "imported" as its class's plain function, and
    # every child failed on its missing argument.
    for function, why in ((inside, "made inside another function"),
                          (shadowed_cells.registered, "not what shadowed_cells:elman names "
                                                      "where a child process imports it"),
                          (lambda hidden: cells.simple_rnn(hidden), "a lambda"),
                          (functools.partial(cells.simple_rnn), "a partial, not a function"),
                          (Widths().make, "a method, not a function"),
                          (cells.simple_rnn, "")):
        monkeypatch.setitem(cells.CELLS, "elsewhere", function)
        if not why:  # rnnjax's own under another name (a cached function): found as it is
            assert tune.child_cells(Config(cell="elsewhere")) == {
                "elsewhere": "rnnjax.cells:simple_rnn"}
            continue
        with pytest.raises(tune.ConfigError, match=why):
            tune.child_cells(Config(cell="elsewhere"))


def test_a_registered_cell_has_a_key_of_its_own_and_is_registered_in_a_child(
        tmp_path, monkeypatch):
    """A cell registered over a built-in name times the user's function: its choice is
    not the built-in cell's (a later run of rnnjax's own GRU had read the user's)."""
    (tmp_path / "scripted_cells.py").write_text(USER_CELL)
    monkeypatch.syspath_prepend(str(tmp_path))
    import scripted_cells

    built_in = tune.key(Config(cell="gru"), frozenset(), env={})
    assert tune.child_cells(Config(cell="gru")) == {}
    monkeypatch.setitem(cells.CELLS, "gru", scripted_cells.elman)
    assert tune.key(Config(cell="gru"), frozenset(), env={}) != built_in
    assert tune.child_cells(Config(cell="gru")) == {"gru": "scripted_cells:elman"}
    monkeypatch.setitem(cells.CELLS, "gru", cells.BUILT_IN["gru"])
    assert measure.register_sources({"cells": {"gru": "scripted_cells:elman"}}) is None
    assert cells.CELLS["gru"] is scripted_cells.elman
    assert "cannot be imported in the tuner's child process" in measure.register_sources(
        {"cells": {"other": "no_such_module_here:elman"}})
