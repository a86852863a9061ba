"""The benchmark harness (benchmarks/): what it imports, the FlexAttention peer's values on the
CPU, the GPU target set run dry on the CPU, the target verdicts and the spread statistics."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCHMARKS)

import agreement  # noqa: E402
import implementations as impls  # noqa: E402
import installed  # noqa: E402
import memory  # noqa: E402
import run  # noqa: E402
import targets  # noqa: E402
import timing  # noqa: E402

from mcsc import reference  # noqa: E402


@pytest.fixture(scope="module")
def unbuilt_package(tmp_path_factory):
    """A copy of the mcsc sources without the compiled library: what a checkout that was never
    built puts on sys.path. Returns the folder that holds it."""
    parent = tmp_path_factory.mktemp("unbuilt")
    shutil.copytree(
        installed.package_directory(),
        parent / "mcsc",
        ignore=shutil.ignore_patterns("_C.*", "__pycache__"),
    )
    return str(parent)


def _environment(pythonpath: str) -> dict:
    environment = dict(os.environ, PYTHONPATH=pythonpath)
    environment.pop("PYTHONWARNINGS", None)  # the package's own warning must not show
    return environment


# ----------------------------------------------------------------------------------------------
# the benchmarks time what is installed
# ----------------------------------------------------------------------------------------------


def test_every_script_refuses_the_fallback(unbuilt_package, tmp_path):
    """Run from the repository root with an unbuilt package first on the path, none of the
    three entry points puts the repository first or times the fallback."""
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"  # `python -m` puts the current directory on sys.path
    elsewhere.mkdir()
    commands = {
        "run.py": ([sys.executable, "benchmarks/run.py", "--quick", "--out", str(out)], ROOT),
        "profile_step.py": ([sys.executable, "benchmarks/profile_step.py"], ROOT),
        "pytest": (
            [
                sys.executable,
                "-m",
                "pytest",
                BENCHMARKS,
                "--collect-only",
                "-q",
                "-p",
                "no:cacheprovider",
            ],
            str(elsewhere),
        ),
    }
    processes = {
        name: subprocess.Popen(
            command,
            cwd=cwd,
            env=_environment(unbuilt_package),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, (command, cwd) in commands.items()
    }
    for name, process in processes.items():
        output, _ = process.communicate(timeout=120)
        assert process.returncode != 0, f"{name} ran the fallback:\n{output}"
        assert "'reference'" in output, name
        assert os.path.join(unbuilt_package, "mcsc") in output, name
        assert "pip install --no-build-isolation ." in output, name
        assert "--allow-reference" in output, name
        assert "circular import" not in output, name
    assert not out.exists()


def test_allow_reference_times_the_fallback_and_says_so(unbuilt_package, tmp_path):
    command = [
        sys.executable,
        "benchmarks/run.py",
        "--dry-run",
        "--allow-reference",
        "--no-memory",
        "--workloads",
        "sweep_C4_none",
        "--exclude",
        "dense,pml,tiled",
        "--out",
        str(tmp_path),
    ]
    result = subprocess.run(
        command,
        cwd=ROOT,
        env=_environment(unbuilt_package),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING (--allow-reference)" in result.stdout
    with open(tmp_path / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    fused = [row for row in rows if row["impl"] == "fused"]
    assert fused and {row["backend"] for row in fused} == {"reference"}
    assert all(row["median_ms"] for row in fused)


def test_memory_worker_imports_the_callers_package(unbuilt_package):
    """The worker is told where the caller's mcsc is; here one that is not on its path."""
    job = {
        "impl": "gemm",
        "sizes": [64],
        "D": 16,
        "C": 2,
        "dtype": "float32",
        "weighting": "prevalence",
        "temperature": 0.1,
        "threads": 1,
        "blockwise": False,
    }
    (result,) = memory.measure_cpu_jobs([job], unbuilt_package, timeout=120)
    assert "error" not in result, result
    assert result["package"] == os.path.join(unbuilt_package, "mcsc")
    assert result["backend"] == "reference"
    assert result["fwd"] >= 0


# ----------------------------------------------------------------------------------------------
# the FlexAttention peer
# ----------------------------------------------------------------------------------------------


def _reference_loss(z, y, bounds, weighting):
    per_anchor, positives = reference.supcon_per_anchor_reference(
        z.double(),
        y,
        torch.tensor(bounds),
        timing.TEMPERATURE,
        weighting == "prevalence",
        impls.IGNORE_INDEX,
    )
    anchors = (positives > 0).sum()
    return float(per_anchor.sum() / anchors)


@pytest.mark.parametrize(
    "sizes,classes,weighting",
    [
        ([40, 0, 23, 17], 4, "prevalence"),
        ([50, 30], 3, "none"),
    ],
)
def test_flex_forward_matches_the_reference(sizes, classes, weighting):
    """The CPU runs FlexAttention's forward only: the loss value, uncompiled, and through the
    GPU's compiled functions traced by Dynamo without generating code."""
    bounds = impls.segment_bounds(sizes)
    z, y = impls.make_inputs(sum(sizes), 16, classes, seed=3, ignore_fraction=0.15)
    expected = _reference_loss(z, y, bounds, weighting)
    impls.set_compile_backend("eager")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without")
            eager = float(impls.flex(z, y, bounds, timing.TEMPERATURE, weighting))
            attention, build_block_mask = impls.flex_functions("cuda")
            traced = float(
                impls.flex_loss(
                    z,
                    y,
                    bounds,
                    timing.TEMPERATURE,
                    weighting,
                    attention=attention,
                    build_block_mask=build_block_mask,
                )
            )
    finally:
        impls.set_compile_backend("inductor")
    assert eager == pytest.approx(expected, rel=1e-5)
    assert traced == pytest.approx(expected, rel=1e-5)


def test_flex_is_gpu_only_because_the_cpu_has_no_backward():
    z, y = impls.make_inputs(32, 16, 2)
    assert impls.unavailable("flex", "cpu")
    assert not impls.unavailable("flex", "cuda")
    with pytest.raises(NotImplementedError, match="backward"):
        impls.flex(z.requires_grad_(True), y, [0, 32], timing.TEMPERATURE, "prevalence")


# ----------------------------------------------------------------------------------------------
# the GPU target set, dry on the CPU
# ----------------------------------------------------------------------------------------------


def test_gpu_targets_dry_run_covers_every_workload(tmp_path, capsys):
    try:
        status = run.main(
            ["--targets", "--target-set", "gpu", "--dry-run", "--no-memory", "--out", str(tmp_path)]
        )
    finally:
        impls.set_compile_backend("inductor")
    assert status == 0
    printed = capsys.readouterr().out.rstrip().splitlines()
    workloads, measures = targets.target_set("gpu", timing.Rounds(1, 1, 0.0), dry=True)
    with open(tmp_path / "targets.csv") as handle:
        rows = list(csv.DictReader(handle))
    for workload in workloads:
        timed = {
            row["impl"] for row in rows if row["workload"] == workload.name and row["median_ms"]
        }
        # everything but FlexAttention runs on the CPU (float32 in place of bf16)
        assert timed == set(workload.impls) - {"flex"}, workload.name
    assert {row["tf32"] for row in rows if row["workload"].endswith("_tf32")} == {"True"}
    flex_notes = {row["note"] for row in rows if row["impl"] == "flex"}
    assert flex_notes == {f"skipped: {impls.unavailable('flex', 'cpu')}"}
    with open(tmp_path / "targets.json") as handle:
        summary = json.load(handle)
    assert summary["dry_run"] and not summary["stopped"]
    assert [t["measure"] for t in summary["targets"]] == [m.title for m in measures]
    # the last thing printed: one table, one line per measure
    assert printed[-len(measures) - 2].split()[-1] == "pass/fail"
    assert [line.split("  ")[0] for line in printed[-len(measures) :]] == [
        m.title for m in measures
    ]
    verdicts = {t["measure"]: t["verdict"] for t in summary["targets"]}
    assert verdicts[measures[1].title] == "not measured"  # flex / fused: flex did not run
    assert all(
        verdicts[m.title] in ("PASS", "FAIL")
        for m in measures
        if m.is_goal() and "flex" not in m.title and "MiB" not in m.title
    )


def test_agreement_rejects_a_peer_that_disagrees_or_does_not_run(monkeypatch):
    def off_by_one_percent(z, y, bounds, temperature, weighting):
        return impls.fused(z, y, bounds, temperature, weighting) * 1.01

    def does_not_compile(z, y, bounds, temperature, weighting):
        raise RuntimeError("no compiler")

    monkeypatch.setitem(impls.IMPLEMENTATIONS, "dense", off_by_one_percent)
    monkeypatch.setitem(impls.IMPLEMENTATIONS, "compiled", does_not_compile)
    lines, rejected, disagrees = agreement.check_agreement("cpu", ["fused", "dense", "compiled"])
    assert disagrees
    assert rejected["dense"].startswith("disagrees with fused on 'prevalence, 3 segments")
    assert rejected["compiled"] == "does not run (RuntimeError: no compiler)"
    assert sum("MISMATCH" in line for line in lines) == 1  # not checked again after that
    settings = timing.Settings(
        device="cpu",
        rounds=targets.ONCE,
        memory_budget_bytes=2**30,
        common={},
        backend="compiled-cpu",
        package="",
        rejected=rejected,
    )
    workload = timing.Workload("w", [[64]], 16, 2, "prevalence", ("fused", "dense", "compiled"))
    plan = timing.plan_point(workload, [64], settings)
    assert plan.names == ["fused"]
    assert plan.skipped == {name: f"skipped: {reason}" for name, reason in rejected.items()}


def test_target_verdicts():
    rows = [
        {
            "workload": "w",
            "impl": "fused",
            "mode": "fwd+bwd",
            "median_ms": 2.0,
            "peak_mem_mb": 900.0,
        },
        {"workload": "w", "impl": "dense", "mode": "fwd+bwd", "median_ms": 9.0},
    ]
    fused, dense = targets.Cell("w", "fused"), targets.Cell("w", "dense")
    cases = [
        (targets.Measure("t", fused, at_most=1.0), 2.0, "FAIL"),
        (targets.Measure("t", dense, fused, at_least=4.0), 4.5, "PASS"),
        (
            targets.Measure("t", targets.Cell("w", "fused", key="peak_mem_mb"), below=1024),
            900.0,
            "PASS",
        ),
        (
            targets.Measure("t", targets.Cell("w", "flex"), fused, at_least=1.5),
            None,
            "not measured",
        ),
        (targets.Measure("t", dense, fused, expected="~4"), 4.5, "context"),
    ]
    for measure, value, verdict in cases:
        result = measure.evaluate(rows)
        assert result["value"] == value and result["verdict"] == verdict, measure
    assert [m.goal() for m, _, _ in cases] == ["<= 1", ">= 4", "< 1024", ">= 1.5", "~4"]


def test_spread_is_the_linear_20th_and_80th_percentile():
    values = [5.0, 1.0, 4.0, 2.5, 9.0, 3.0, 7.5]
    assert timing.spread(values) == pytest.approx(tuple(np.percentile(values, [20, 80])))
    assert timing.spread([3.0]) == (3.0, 3.0)
