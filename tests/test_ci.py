"""CI runs the README's test install and command, and there a skipped test is a failure
(but for the tests that need a non-root user): an extra that did not install fails CI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import REQUIRE_EXTRAS, ROOT_SKIP

ROOT = Path(__file__).resolve().parents[1]


def readme_test_command() -> str:
    """The README's Quickstart command that installs what the tests need and runs them."""
    lines = (ROOT / "README.md").read_text().splitlines()
    (index,) = [i for i, line in enumerate(lines) if line.startswith("# 2. install what the tests")]
    return lines[index + 1]


def test_ci_runs_the_readmes_test_install_and_command_requiring_the_extras():
    command = readme_test_command()
    assert ".venv/bin/pip install -e '.[test]'" in command and "-m pytest" in command
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci, "CI does not run the README's test command"
    assert f"export {REQUIRE_EXTRAS}=1" in ci[: ci.index(command)]


def test_the_newest_python_and_jax_run_the_readmes_command_too():
    """``.ci/newest`` (Python 3.13, jax 0.11, in a Debian root) runs the same command,
    every extra required."""
    command = readme_test_command()
    newest = (ROOT / ".ci" / "newest").read_text()
    assert command in newest.splitlines()
    assert f"{REQUIRE_EXTRAS}=1" in newest[: newest.index(command)]
    assert os.access(ROOT / ".ci" / "newest", os.X_OK)


PROBE = f'''
import pytest


@pytest.fixture(scope="module")
def extra():
    return pytest.importorskip("rnnjax_no_such_extra")


def test_needs_an_extra():
    pytest.importorskip("rnnjax_no_such_extra")


def test_needs_an_extra_through_a_fixture(extra):
    pass


def test_skips_for_no_stated_reason():
    pytest.skip("not today")


def test_needs_a_non_root_user():
    pytest.skip("{ROOT_SKIP}: chmod does not stop root")


def test_passes():
    pass
'''


def outcomes(tmp_path: Path, require: bool, workers: tuple[str, ...] = ()) -> dict[str, str]:
    """Run PROBE under this directory's conftest (``workers``: pytest-xdist's options, as
    the README's command gives them): each test's outcome."""
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != REQUIRE_EXTRAS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if require:
        env[REQUIRE_EXTRAS] = "1"
    report = tmp_path / f"report-{require}.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *workers,
                    f"--junitxml={report}", "test_probe.py"], cwd=tmp_path, env=env,
                   capture_output=True, text=True, timeout=120)
    out = {}
    for case in ET.parse(report).iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        out[case.get("name")] = kinds[0] if kinds else "passed"
    return out


@pytest.mark.parametrize("workers", [(), ("-n", "2", "--dist", "worksteal")],
                         ids=["one-process", "xdist"])
def test_a_skip_fails_where_the_extras_are_required(tmp_path, workers):
    """In one process and on pytest-xdist's workers alike (the README runs the latter)."""
    assert outcomes(tmp_path, require=False, workers=workers) == {
        "test_needs_an_extra": "skipped",
        "test_needs_an_extra_through_a_fixture": "skipped",
        "test_skips_for_no_stated_reason": "skipped",
        "test_needs_a_non_root_user": "skipped",
        "test_passes": "passed",
    }
    as_root = os.geteuid() == 0
    assert outcomes(tmp_path, require=True, workers=workers) == {
        "test_needs_an_extra": "failure",
        "test_needs_an_extra_through_a_fixture": "error",
        "test_skips_for_no_stated_reason": "failure",
        "test_needs_a_non_root_user": "skipped" if as_root else "failure",
        "test_passes": "passed",
    }
