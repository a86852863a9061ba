"""The optional dependencies of the trainer, data readers, evaluation and CLI.

``import mcsc`` and :func:`mcsc.supcon_loss` need torch alone; everything behind ``mcsc train``
needs the packages of the ``train`` extra (``pip install --no-build-isolation ".[train]"``).
"""

from __future__ import annotations

import importlib.util

# import name -> PyPI name, the packages of the "train" extra in pyproject.toml.
TRAINING_PACKAGES = {
    "numpy": "numpy",
    "timm": "timm",
    "skimage": "scikit-image",
    "scipy": "scipy",
    "h5py": "h5py",
    "nibabel": "nibabel",
    "tqdm": "tqdm",
    "tensorboard": "tensorboard",
    "yaml": "pyyaml",
    "matplotlib": "matplotlib",
}


def missing_training_packages() -> list[str]:
    """PyPI names of the ``train`` extra's packages that cannot be imported here."""
    return [package for module, package in TRAINING_PACKAGES.items()
            if importlib.util.find_spec(module) is None]


def training_packages_problem() -> str:
    """Why the trainer cannot run, with the command that fixes it; '' when nothing is missing."""
    missing = missing_training_packages()
    if not missing:
        return ""
    return ("the trainer needs the packages of mcsc's \"train\" extra, and these are missing: "
            f"{', '.join(missing)}. Install them with `pip install {' '.join(missing)}`, or "
            "reinstall mcsc with the extra: `pip install --no-build-isolation \".[train]\"` in the "
            "mcsc source folder")
