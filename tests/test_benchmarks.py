"""The benchmark harness (benchmarks/): what it imports, the FlexAttention peer's values on the
CPU, the GPU target set run dry on the CPU, the target verdicts and the spread statistics."""

from __future__ import annotations

import csv
import dataclasses
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
import bank_implementations as bank  # noqa: E402
import bank_measure  # noqa: E402
import implementations as impls  # noqa: E402
import installed  # noqa: E402
import memory  # noqa: E402
import memory_bank  # noqa: E402
import memory_step  # noqa: E402
import run  # noqa: E402
import targets  # noqa: E402
import timing  # noqa: E402

import mcsc  # noqa: E402
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
    entry points puts the repository first or times the fallback."""
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"  # `python -m` puts the current directory on sys.path
    elsewhere.mkdir()
    commands = {
        "run.py": ([sys.executable, "benchmarks/run.py", "--quick", "--out", str(out)], ROOT),
        "profile_step.py": ([sys.executable, "benchmarks/profile_step.py"], ROOT),
        "memory_bank.py": (
            [sys.executable, "benchmarks/memory_bank.py", "--out", str(out)],
            ROOT,
        ),
        "memory_step.py": (
            [sys.executable, "benchmarks/memory_step.py", "--out", str(out)],
            ROOT,
        ),
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


# ----------------------------------------------------------------------------------------------
# the cross-batch memory benchmark (memory_bank.py)
# ----------------------------------------------------------------------------------------------


def test_memory_bank_smoke(tmp_path, capsys):
    """Every implementation at every size of a tiny full grid, the key size twice, the tables,
    the plot and the targets; timings are not asserted."""
    sizes_args = ["--grid", "full", "--m", "32,64", "--k", "64,256", "--key", "64x256"]
    csv_path = tmp_path / "memory_bank.csv"
    status = memory_bank.main(
        [
            "--out",
            str(tmp_path),
            "--allow-reference",
            "--grid",
            "full",
            "--m",
            "32,64",
            "--k",
            "64,256",
            "--key",
            "64x256",
            "--d",
            "16",
            "--min-reps",
            "1",
            "--max-reps",
            "1",
            "--key-reps",
            "2",
            "--no-memory",
        ]
    )
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert f"has no {bank.PML_CHUNKED}" in printed
    agreeing = [line.split()[0] for line in printed.splitlines() if line.endswith("  ok")]
    assert agreeing == ["pml_xbm", "pml_loss", "dense"]
    with open(tmp_path / "memory_bank.csv") as handle:
        rows = list(csv.DictReader(handle))
    sizes = {("key", 64, 256), ("grid", 32, 64), ("grid", 32, 256), ("grid", 64, 64)}
    sizes.add(("key_repeat", 64, 256))
    assert {(r["workload"], int(r["M"]), int(r["K"])) for r in rows} == sizes
    for workload, m, k in sizes:
        here = [r for r in rows if (r["workload"], int(r["M"]), int(r["K"])) == (workload, m, k)]
        losses = ("fused", "pml_loss", "pml_xbm") if workload == "key_repeat" else bank.LOSS_IMPLS
        assert {(r["impl"], r["mode"]) for r in here} == {("gemm", "fwd")} | {
            (name, mode) for name in losses for mode in ("fwd", "bwd", "fwd+bwd")
        }
        assert all(r["median_ms"] for r in here), here
        assert {r["x_fused"] for r in here if r["impl"] == "fused"} == {"1"}
        assert {r["backend"] for r in here if r["impl"] == "fused"} == {mcsc.backend("cpu")}
    assert {int(r["reps"]) for r in rows if r["workload"] == "key"} == {2}
    with open(tmp_path / "memory_bank_targets.json") as handle:
        summary = json.load(handle)
    titles = [t["measure"] for t in summary["targets"]]
    assert [
        m.title
        for m in memory_bank.measures(
            memory_bank.parse_args(
                ["--out", "x", "--m", "32,64", "--k", "64,256", "--key", "64x256"]
            ),
            "float32",
        )
    ] == titles
    # the key size's goals all ran (no memory workers: the peak is not measured)
    verdicts = {t["measure"]: t["verdict"] for t in summary["targets"]}
    assert all(v in ("PASS", "FAIL", "context") for t, v in verdicts.items() if "MiB" not in t)
    assert (tmp_path / "cpu_memory_bank_float32.png").stat().st_size > 10_000
    markdown = (tmp_path / "memory_bank.md").read_text()
    assert "| float32 | 64 | 256 | PML CrossBatchMemory |" in markdown
    assert printed.rstrip().splitlines()[-1].startswith("PML CrossBatchMemory / fused (M=32")
    # the same tables and targets again from the CSV alone (numbers rounded to 4 digits there)
    again = tmp_path / "again"
    assert memory_bank.main(sizes_args + ["--out", str(again), "--from-csv", str(csv_path)]) == 0
    with open(again / "memory_bank_targets.json") as handle:
        redone = json.load(handle)["targets"]
    assert [t["verdict"] for t in redone] == [t["verdict"] for t in summary["targets"]]
    for first, second in zip(summary["targets"], redone):
        if first["value"] is None:
            assert second["value"] is None
        else:
            assert second["value"] == pytest.approx(first["value"], rel=2e-3)


def test_memory_bank_pair_indices_are_pmls():
    """The pair indices handed to pml_loss are those CrossBatchMemory builds, with the batch
    wrapping around the end of the memory."""
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    step = bank.make_step(40, 100, 8, 3, seed=2)
    assert step.slots.tolist() == [(80 + i) % 100 for i in range(40)]
    expected = lmu.remove_self_comparisons(
        lmu.get_all_pairs_indices(step.labels, step.memory_labels), step.slots, 100
    )
    mine = bank.pair_indices(step)
    assert len(mine) == 4 and all(torch.equal(a, b) for a, b in zip(mine, expected))


def test_memory_bank_skips_what_does_not_fit():
    """PML at the key size is over an 8 GiB budget (its self-pair removal alone: ~435 GiB);
    the fused op, the dense formula and the GEMMs are not; free memory also limits."""
    names = list(bank.ALL_IMPLS)
    run_names, skipped = bank_measure.plan_point(
        names, 4096, 65536, 128, "float32", 4, 8 * 2**30, float("inf")
    )
    assert run_names == ["gemm", "fused", "dense"]
    assert set(skipped) == {"pml_xbm", "pml_loss"}
    assert all(why.startswith("over budget: estimated") for why in skipped.values())
    removal = bank.same_class_fraction(4) * 4096 * 4096 * 65536
    assert float(skipped["pml_xbm"].split()[3]) * 2**30 > removal > 400 * 2**30
    run_names, skipped = bank_measure.plan_point(
        names, 4096, 65536, 128, "float32", 4, 8 * 2**30, 2 * 2**30
    )
    assert run_names == ["gemm", "fused"]  # the GEMMs hold one 1 GiB M x K product
    assert "80 % of the free memory 1.6 GiB" in skipped["dense"]


def test_memory_bank_largest_k_inverts_the_fit():
    """Peaks made from a known model are fitted back, and the largest K fits the budget while
    1024 keys more do not."""
    model = {"1": 3e6, "MK": 30.0}
    points = [
        (m, k, model["1"] + model["MK"] * m * k)
        for m, k in [(1024, 4096), (4096, 4096), (4096, 65536)]
    ]
    fit = bank_measure.fit_memory("dense", points)
    assert fit["terms"] == pytest.approx(model, rel=1e-9)
    budget = 8 * 2**30
    for m in (1024, 8192):
        largest = bank_measure.largest_k("dense", fit, m, 128, 4, budget)

        def total(k, m=m):
            return bank.held_bytes("dense", m, k, 128, 4) + model["1"] + model["MK"] * m * k

        assert total(largest) <= budget < total(largest + 1024)
    # a term with a negative coefficient is dropped: fused memory that does not grow with M
    flat = [(m, k, 1e6 + 600.0 * k) for m, k in [(1024, 4096), (4096, 4096), (4096, 65536)]]
    assert bank_measure.fit_memory("fused", flat)["terms"].keys() <= {"1", "K"}
    assert bank_measure.fit_memory("dense", points[:1]) is None


def test_memory_bank_worker_measures_a_fresh_process(unbuilt_package):
    job = bank_measure.memory_job("fused", 32, 128, 16, 3, "float32", 1)
    result = bank_measure.measure_cpu_memory(job, unbuilt_package, timeout=120)
    assert "error" not in result, result
    assert result["package"] == os.path.join(unbuilt_package, "mcsc")
    assert set(result) >= {"fwd", "bwd", "fwd+bwd"} and result["fwd+bwd"] >= 0


# ----------------------------------------------------------------------------------------------
# one step of the memory losses as users call them (memory_step.py)
# ----------------------------------------------------------------------------------------------


def test_memory_step_smoke(tmp_path, capsys):
    """Both cross-batch memories at two tiny sizes (PML over budget at the README's larger
    one), the pixel loss with and without memory; then one memory worker."""
    status = memory_step.main(
        [
            "--out",
            str(tmp_path),
            "--allow-reference",
            "--xbm-sizes",
            "16x64,24x80",
            "--queues",
            "0,32",
            "--maps",
            "2",
            "--pixels-per-class",
            "4",
            "--d",
            "16",
            "--min-reps",
            "2",
            "--max-reps",
            "2",
            "--no-memory",
            "--threads",  # the default, 1, would stay set in this process
            str(torch.get_num_threads()),
        ]
    )
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert printed.count("  ok") == 1 and "MISMATCH" not in printed
    with open(tmp_path / "memory_step.csv") as handle:
        rows = list(csv.DictReader(handle))
    expected = {
        ("xbm", impl, m, k, "") for impl in ("mcsc", "pml") for m, k in [(16, 64), (24, 80)]
    }
    # 2 maps x 4 classes x 4 pixels; K: the stored rows, C x Q
    expected |= {("pixel", "mcsc", 32, 0, "0"), ("pixel", "mcsc", 32, 128, "32")}
    assert {(r["benchmark"], r["impl"], int(r["M"]), int(r["K"]), r["Q"]) for r in rows} == expected
    assert len(rows) == 3 * len(expected)  # fwd, bwd, fwd+bwd
    assert all(float(r["median_ms"]) > 0 and int(r["reps"]) == 2 for r in rows), rows
    assert {r["backend"] for r in rows if r["impl"] == "mcsc"} == {mcsc.backend("cpu")}
    assert {r["threads"] for r in rows} == {str(torch.get_num_threads())}
    assert memory_step.parse_args(["--out", "x"]).threads == 1
    markdown = (tmp_path / "memory_step.md").read_text()
    assert "| PML CrossBatchMemory | 24 rows | K=80 |" in markdown
    assert printed.rstrip().splitlines()[-1].startswith("mcsc PixelContrastiveLoss")
    # PML's self-pair removal alone needs ~6 GiB at 1024 x 65536 with 10 classes
    large = memory_step.Case("xbm", "pml", 1024, 65536, 128, 10)
    assert memory_step.over_budget(large, 8 * 2**30).startswith("over budget: estimated")
    job = dict(
        dataclasses.asdict(memory_step.Case("pixel", "mcsc", 2, 32, 16, 4, 4, 28, 56)), threads=1
    )
    (result,) = memory.measure_cpu_jobs(
        [job], os.path.dirname(installed.package_directory()), script=memory_step.__file__
    )
    assert "error" not in result, result
    assert result["fwd+bwd"] >= 0 and result["package"] == installed.package_directory()
