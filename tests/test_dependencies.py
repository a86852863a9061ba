"""The op needs torch alone; the CLI names the extra to install when the trainer's packages are missing."""

import importlib.util
import subprocess
import sys

from mcsc import cli, dependencies

HEAVY = sorted(dependencies.TRAINING_PACKAGES)


def test_import_mcsc_and_the_op_load_none_of_the_trainer_packages():
    code = (
        "import sys, torch\n"
        "by_torch = set(sys.modules)\n"  # torch itself imports some of them (numpy, tqdm)
        "import mcsc\n"
        "z = torch.nn.functional.normalize(torch.randn(64, 8, dtype=torch.float64), dim=1)\n"
        "mcsc.supcon_loss(z.requires_grad_(), torch.arange(64) % 3).backward()\n"
        f"loaded = sorted(m for m in {HEAVY!r} if m in set(sys.modules) - by_torch)\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, check=True)
    assert result.stdout.strip() == ""


def test_cli_names_the_missing_packages_and_the_extra(monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(dependencies, "TRAINING_PACKAGES",
                        {"json": "json", "timm": "timm", "nibabel": "nibabel"})
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("timm", "nibabel") else
                        real_find_spec(name, *a))
    assert dependencies.missing_training_packages() == ["timm", "nibabel"]
    assert cli.main(["train", "--out", "unused"]) == 2
    message = capsys.readouterr().err
    assert "timm, nibabel" in message
    assert "pip install timm nibabel" in message
    assert '".[train]"' in message



def test_an_unbuilt_package_says_how_to_build_it(tmp_path):
    """A copy of the package without its compiled library warns once, with the rebuild command."""
    import shutil
    from pathlib import Path

    import mcsc

    source = Path(mcsc.__file__).resolve().parent
    shutil.copytree(source, tmp_path / "mcsc", ignore=shutil.ignore_patterns("_C.*", "__pycache__"))
    result = subprocess.run(
        [sys.executable, "-W", "always", "-c", "import mcsc; print(mcsc.backend('cpu'))"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=True)
    assert result.stdout.strip() == "reference"
    assert f"mcsc._C is not in {tmp_path / 'mcsc'}" in result.stderr
    assert "pip install --no-build-isolation --no-deps --force-reinstall ." in result.stderr
    assert "circular import" not in result.stderr
