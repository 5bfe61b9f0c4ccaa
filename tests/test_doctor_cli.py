"""The doctor's contract with CI: arguments checked where given, exit codes, progress only on a terminal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management.base import CommandError
from testbed.servers import DBServer, free_port

from .conftest import ROOT, subprocess_env
from .test_doctor import alias, doctor, doctor_json

pytestmark = pytest.mark.server


def test_probe_progress_only_on_a_tty(server: DBServer) -> None:
    """The progress bar is drawn on a terminal, and nothing at all goes to a redirected stderr."""
    master, replica = os.openpty()
    with alias(server), open(replica, "w") as tty:
        code, out, _ = doctor("--database", "doc", "--probe-idle", "1", stderr=tty)
        _, _, redirected = doctor("--database", "doc", "--probe-idle", "0.3")
    try:
        drawn = os.read(master, 65536).decode()
    except OSError:  # EIO: nothing was ever written to the terminal
        drawn = ""
    os.close(master)
    assert "probing idle limit [" in drawn
    assert "100% done" in drawn
    assert "all survived up to 1s" in out
    assert "note[idle-limit-measured]" in out
    assert code == 0
    assert redirected == ""


def test_unknown_alias_is_refused_naming_the_configured_ones() -> None:
    """A typo in --database fails before anything runs, naming the argument and the configured aliases."""
    with pytest.raises(CommandError, match=r"--database: unknown database alias 'defualt'.*default, lite"):
        doctor("--database", "defualt")


@pytest.mark.parametrize("value", ["0", "-3", "nan", "inf", "soon"])
def test_probe_idle_needs_a_positive_number(value: str) -> None:
    """--probe-idle 0 (or negative, infinite, not a number) fails as a bad argument, naming it."""
    with pytest.raises(CommandError, match=r"--probe-idle: .* is not a positive number of seconds"):
        doctor("--database", "lite", "--probe-idle", value)


@pytest.mark.parametrize("value", ["0", "-3", "2.5", "many"])
def test_concurrency_needs_a_whole_number(value: str) -> None:
    """--concurrency 0 (or negative, fractional, not a number) fails as a bad argument, naming it."""
    with pytest.raises(CommandError, match=r"--concurrency: .* is not a whole number >= 1"):
        doctor("--database", "lite", "--concurrency", value)


def test_an_alias_given_twice_is_diagnosed_once(server: DBServer) -> None:
    """``--database doc --database doc`` reports the alias once."""
    with alias(server):
        _, data = doctor_json("--database", "doc", "--database", "lite", "--database", "doc")
    assert [d["alias"] for d in data["databases"]] == ["doc", "lite"]


def _run_all(runs: dict[str, tuple[list[str], dict[str, str]]], cwd: Path) -> dict[str, tuple[int, str]]:
    """Run several real processes at once (each pays Django's start-up), each in its own directory.

    Returns name -> (exit code, stderr).
    """
    started = {}
    for i, (name, (cmd, env)) in enumerate(runs.items()):
        (cwd / str(i)).mkdir()
        started[name] = subprocess.Popen(
            cmd, env=env, cwd=cwd / str(i), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    done = {}
    for name, proc in started.items():
        _, err = proc.communicate(timeout=120)
        done[name] = (proc.returncode, err)
    return done


def _env(**changes: str | None) -> dict[str, str]:
    env = subprocess_env()
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _bad_settings(tmp_path: Path) -> None:
    (tmp_path / "badfc_settings.py").write_text("from tests.settings import *\nFRESHCONN = {'CHECK_AFTER_IDLE': '5'}\n")


DOCTOR = [sys.executable, "-m", "django", "freshconn", "doctor"]


def test_exit_codes_of_the_real_command(live: None, tmp_path: Path) -> None:
    """As real processes: 1 warnings, 2 unreachable, bad alias, bad --probe-idle or --format; 0 healthy."""
    dead = str(free_port())
    only_src = _env(DJANGO_SETTINGS_MODULE=None, PYTHONPATH=str(ROOT / "src"))
    runs = {
        "warnings": ([*DOCTOR, "--database", "default"], _env()),  # the test settings set no driver timeouts
        "unreachable": ([*DOCTOR, "--database", "default"], _env(FRESHCONN_TEST_DB_PORT=dead)),
        "typo": ([*DOCTOR, "--database", "defualt"], _env()),
        "probe 0": ([*DOCTOR, "--probe-idle", "0"], _env()),
        "format": ([*DOCTOR, "--format", "xml"], _env()),
        # --settings and --pythonpath after the subcommand: the only way this process finds tests.settings.
        "settings after": (
            [*DOCTOR, "--database", "lite", "--settings", "tests.settings", "--pythonpath", str(ROOT)],
            only_src,
        ),
    }
    done = _run_all(runs, tmp_path)
    codes = {name: code for name, (code, _) in done.items()}
    assert codes == {
        "warnings": 1,
        "unreachable": 2,
        "typo": 2,
        "probe 0": 2,
        "format": 2,
        "settings after": 0,
    }, {name: err[-500:] for name, (_, err) in done.items()}
    assert "unknown database alias 'defualt': DATABASES has default, lite" in done["typo"][1]
    assert "--probe-idle" in done["probe 0"][1]


def test_invalid_freshconn_in_a_real_process_is_exit_two(tmp_path: Path) -> None:
    """A FRESHCONN that fails validation at start-up still lets the doctor run and report E001, exit 2."""
    _bad_settings(tmp_path)
    cmd = [*DOCTOR, "--database", "lite", "--pythonpath", str(tmp_path), "--settings", "badfc_settings"]
    done = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr[-500:]
    assert "error[settings-invalid] (freshconn.E001) FRESHCONN['CHECK_AFTER_IDLE']" in done.stdout


def _ci_recipe() -> str:
    text = (ROOT / "docs" / "doctor.md").read_text()
    block = text.split("<!-- ci-recipe -->", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    return block.replace("python manage.py", f"{sys.executable} -m django")


def test_ci_recipe_fails_when_the_doctor_did_not_run(live: None, tmp_path: Path) -> None:
    """The documented CI recipe passes on warnings and fails on errors and whenever the doctor did not run."""
    _bad_settings(tmp_path)
    recipe = ["bash", "-c", _ci_recipe()]
    runs = {
        "warnings": (recipe, _env()),
        "unreachable": (recipe, _env(FRESHCONN_TEST_DB_PORT=str(free_port()))),
        "no settings": (recipe, _env(DJANGO_SETTINGS_MODULE="tests.no_such_settings")),
        "bad FRESHCONN": (
            recipe,
            _env(DJANGO_SETTINGS_MODULE="badfc_settings", PYTHONPATH=f"{tmp_path}:{ROOT}:{ROOT / 'src'}"),
        ),
    }
    done = _run_all(runs, tmp_path)
    assert done["warnings"][0] == 0, done["warnings"][1][-500:]
    assert {name: done[name][0] != 0 for name in ("unreachable", "no settings", "bad FRESHCONN")} == dict.fromkeys(
        ("unreachable", "no settings", "bad FRESHCONN"), True
    )
