import subprocess
import sys

from tinystories_cli import __version__


def test_version_and_help(run_cli):
    code, out, _ = run_cli("--version")
    assert code == 0 and __version__ in out
    code, out, _ = run_cli("--help")
    assert code == 0 and "account" in out


def test_unknown_command_is_one_line_exit_2(run_cli):
    code, _, err = run_cli("frobnicate")
    assert code == 2
    assert "frobnicate" in err and len(err.strip().splitlines()) == 1


def test_bad_flag_value_exit_2(run_cli):
    code, _, err = run_cli("account", "debug", "--ctx", "ten")
    assert code == 2 and "--ctx" in err and "Traceback" not in err


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "tinystories_cli", "account", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown preset" in proc.stderr and "Traceback" not in proc.stderr


def test_debug_shows_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "tinystories_cli", "--debug", "account", "nope"], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr
