"""pytest options of the benchmark cases: they time the ``mcsc`` Python imports, and refuse to
time its dense fallback unless ``pytest benchmarks/ --allow-reference``."""

from __future__ import annotations

import warnings

import pytest

# the package's own fallback warning: refused or restated by installed.py, with what to do
warnings.filterwarnings("ignore", message="mcsc: ")

import installed  # noqa: E402


def pytest_addoption(parser):
    parser.addoption(
        installed.ALLOW_FLAG,
        action="store_true",
        help="time mcsc even when it runs the dense pure-PyTorch fallback",
    )


def pytest_sessionstart(session):
    message = installed.refusal("cpu")
    if message and not session.config.getoption("allow_reference"):
        pytest.exit(message, returncode=pytest.ExitCode.USAGE_ERROR)
