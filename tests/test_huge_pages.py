"""Transparent huge pages for XLA:CPU's buffers: when a process can ask for them
(rnnjax.process), and rnnjax train starting itself again with them (rnnjax.cli). The
tuner's side (timing them in a child) is in test_tune.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rnnjax import cli, process
from rnnjax.checkpoint import check_resumable
from rnnjax.config import TUNED, Config

TINY = ["--steps", "3", "--eval-every", "2", "--hidden-size", "8", "--no-tune"]


def test_huge_pages_are_asked_for_in_glibc_tunables():
    assert not process.huge_pages_on({}) and not process.huge_pages_on({"GLIBC_TUNABLES": ""})
    env = process.with_huge_pages({
        "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=0", "HOME": "/h"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1",
                   "HOME": "/h"}
    assert process.huge_pages_on(env)
    assert process.with_huge_pages({}) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


@pytest.mark.parametrize(("libc", "mode", "env", "reason"), [
    (("glibc", "2.36"), "always [madvise] never", {}, None),
    (("glibc", "2.35"), "always [madvise] never", {"GLIBC_TUNABLES": "glibc.rtld.x=1"}, None),
    (("glibc", "2.31"), "always [madvise] never", {}, "needs glibc 2.35 or later, this is glibc"),
    (("", ""), "always [madvise] never", {}, "needs glibc 2.35 or later, this is another libc"),
    (("glibc", "2.36"), "[always] madvise never", {}, "'[always] madvise never', not given on"),
    (("glibc", "2.36"), "always madvise [never]", {}, "'always madvise [never]', not given on"),
    (("glibc", "2.36"), None, {}, "this kernel has no transparent huge pages"),
    (("glibc", "2.36"), "always [madvise] never", {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},
     "$GLIBC_TUNABLES already sets glibc.malloc.hugetlb"),
])
def test_huge_pages_are_offered_only_where_asking_changes_what_a_process_gets(
        monkeypatch, tmp_path, libc, mode, env, reason):
    mode_file = tmp_path / "enabled"
    if mode is not None:
        mode_file.write_text(mode + "\n")
    monkeypatch.setattr(process, "THP_MODE", mode_file)
    monkeypatch.setattr(process.platform, "libc_ver", lambda: libc)
    why = process.huge_pages_unavailable(env)
    assert why == reason if reason is None else why.startswith(reason) or reason in why


class Restarted(Exception):
    pass


@pytest.fixture
def restarts(monkeypatch):
    """Huge pages to be had, this process without them, and process.restart recorded (the
    environment it was given) in place of replacing the test's process."""
    monkeypatch.setattr(process, "huge_pages_unavailable", lambda env=None: None)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(cli.RESTARTED, raising=False)
    started = []

    def restart(env):
        started.append(dict(env))
        raise Restarted

    monkeypatch.setattr(process, "restart", restart)
    return started


def test_the_program_starts_again_with_huge_pages_and_the_choice(restarts, monkeypatch):
    config = Config(huge_pages=True, unroll=0, xla_flags="--xla_cpu_use_xnnpack=false")
    tuning = {"mode": "measured", "tune_s": 12.5, "choice": {"unroll": 0}}
    with pytest.raises(Restarted):
        cli.start_with_huge_pages(config, tuning, whole_process=True)
    [env] = restarts
    assert process.huge_pages_on(env) and cli.RESTARTED not in os.environ
    # The process it starts takes the settings and how they were chosen: it does not tune.
    again, how = cli.restarted_config(Config(), env[cli.RESTARTED])
    assert {k: getattr(again, k) for k in TUNED} == {k: getattr(config, k) for k in TUNED}
    assert how == {**tuning, "process": "started again with huge pages"}
    # With huge pages already, or without them chosen: no restart.
    cli.start_with_huge_pages(config.replace(huge_pages=False), tuning, whole_process=True)
    monkeypatch.setenv("GLIBC_TUNABLES", process.HUGE_PAGES)
    cli.start_with_huge_pages(config, tuning, whole_process=True)
    assert len(restarts) == 1


def test_rnnjax_train_starts_again_before_it_writes_anything(restarts, tmp_path, capsys):
    work = tmp_path / "run"
    with pytest.raises(Restarted):
        cli.main(["train", *TINY, "--huge-pages", "--workdir", str(work)], whole_process=True)
    assert not work.exists()
    assert "rnnjax: starting again with huge pages" in capsys.readouterr().err
    record = json.loads(restarts[0][cli.RESTARTED])
    assert record["settings"]["huge_pages"] is True and record["tuning"] == {"mode": "off"}


def test_a_library_call_runs_without_huge_pages_and_says_so(restarts, tmp_path, capsys):
    assert cli.main(["train", *TINY, "--huge-pages", "--workdir", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "note: running without huge pages: this process started without them" in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["huge_pages_on"] is False and summary["tuning"]["settings"]["huge_pages"]
    assert restarts == []


@pytest.mark.parametrize(("record", "problem"), [
    ("{not json", "Expecting property name"),
    (json.dumps({"settings": {"hidden_size": 3}, "tuning": {}}), "not rnnjax's record"),
    (json.dumps({"settings": {"unroll": -1}, "tuning": {}}), "--unroll"),
    (json.dumps({"tuning": {}}), "'settings'"),
])
def test_a_restart_record_not_rnnjaxs_is_one_line(monkeypatch, capsys, tmp_path, record,
                                                  problem):
    monkeypatch.setenv(cli.RESTARTED, record)
    assert cli.main(["train", *TINY, "--workdir", str(tmp_path / "run")]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rnnjax: error: $RNNJAX_RESTARTED is not")
    assert problem in err[0] and err[0].endswith("unset it")
    assert not (tmp_path / "run").exists()


def test_huge_pages_may_change_on_resume():
    check_resumable(Config(huge_pages=True), Config())


def test_the_rnnjax_program_with_huge_pages(tmp_path):
    """End to end, as a user runs it: started again with them where this machine has them,
    else a note, and the run either way."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", cli.RESTARTED)}
    work = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "rnnjax", "train", *TINY, "--huge-pages",
                           "--workdir", str(work)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((work / "summary.json").read_text())
    why = process.huge_pages_unavailable(env)
    if why is None:
        assert "rnnjax: starting again with huge pages" in proc.stderr
        assert summary["huge_pages_on"] is True
        assert summary["tuning"]["process"] == "started again with huge pages"
    else:
        assert f"note: running without huge pages: {why}" in proc.stderr
        assert summary["huge_pages_on"] is False
    assert proc.stdout.count("final test accuracy") == 1


def test_rnnjax_tunes_choice_as_flags_gives_it_to_rnnjax_train():
    import shlex

    choice = {"unroll": 0, "backward": "hand_written", "projection": "in_loop",
              "weight_grad": "per_step", "chunks": 4, "feed": "device",
              "xla_flags": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_a=1",
              "huge_pages": True, "cpus": 1}
    for huge in (True, False):
        flags = cli.choice_flags({**choice, "huge_pages": huge})
        assert flags.endswith((" --huge-pages" if huge else " --no-huge-pages") + " --cpus 1")
        args = cli.build_parser().parse_args(["train", *shlex.split(flags)])
        assert cli.flag_changes(args) == {**choice, "huge_pages": huge}
    assert "--unroll" not in cli.choice_flags(choice, frozenset({"unroll"}))
