"""setup.py's choice of whether to compile the CUDA kernels (MCSC_FORCE_CUDA and friends)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "setup.py"
RECENT_TORCH = "2.14.1+cu130"  # passed explicitly: the running torch may be an old one


@pytest.fixture(scope="module")
def setup_module():
    spec = importlib.util.spec_from_file_location("mcsc_setup", SETUP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the functions; the build runs only as __main__
    return module


def test_default_builds_cuda_with_cuda_torch_and_nvcc(setup_module):
    assert setup_module.cuda_decision(None, "13.0", "/usr/local/cuda", RECENT_TORCH) == (
        True, "CUDA torch and nvcc present")


@pytest.mark.parametrize("torch_cuda, cuda_home, missing", [
    (None, "/usr/local/cuda", "CUDA build of torch"),
    ("13.0", None, "nvcc"),
])
def test_default_skips_cuda_and_says_why(setup_module, torch_cuda, cuda_home, missing):
    build, why = setup_module.cuda_decision(None, torch_cuda, cuda_home, RECENT_TORCH)
    assert not build and missing in why


def test_force_zero_never_builds(setup_module):
    assert setup_module.cuda_decision("0", "13.0", "/usr/local/cuda", RECENT_TORCH) == (False, "MCSC_FORCE_CUDA=0")


def test_force_one_builds_when_possible(setup_module):
    assert setup_module.cuda_decision("1", "13.0", "/usr/local/cuda", RECENT_TORCH)[0]


@pytest.mark.parametrize("torch_cuda, cuda_home, missing", [
    (None, "/usr/local/cuda", "a CUDA build of torch"),
    ("13.0", None, "nvcc"),
    (None, None, "a CUDA build of torch"),
])
def test_force_one_fails_naming_what_is_missing(setup_module, torch_cuda, cuda_home, missing):
    with pytest.raises(SystemExit, match=missing):
        setup_module.cuda_decision("1", torch_cuda, cuda_home, RECENT_TORCH)


def test_force_rejects_other_values(setup_module):
    with pytest.raises(SystemExit, match="MCSC_FORCE_CUDA must be 1 or 0"):
        setup_module.cuda_decision("yes", "13.0", "/usr/local/cuda", RECENT_TORCH)


def test_forced_install_without_nvcc_fails_before_compiling(tmp_path):
    """The real entry point: a toolkit folder without nvcc stops setup.py with the reason."""
    env = dict(os.environ, MCSC_FORCE_CUDA="1", CUDA_HOME=str(tmp_path))
    env.pop("CUDA_PATH", None)
    result = subprocess.run([sys.executable, str(SETUP), "--name"], cwd=SETUP.parent, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "MCSC_FORCE_CUDA=1 but the CUDA kernels cannot be built" in result.stderr


def test_cuda_kernels_need_a_recent_torch(setup_module):
    build, why = setup_module.cuda_decision(None, "12.1", "/usr/local/cuda", "2.4.1+cu121")
    assert not build and "torch >= 2.10 (found 2.4.1+cu121)" in why
    with pytest.raises(SystemExit, match="torch >= 2.10"):
        setup_module.cuda_decision("1", "12.1", "/usr/local/cuda", "2.9.1")
    assert setup_module.cuda_decision("1", "13.0", "/usr/local/cuda", "2.10.0")[0]
