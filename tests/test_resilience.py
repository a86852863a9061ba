"""Long runs: --resume auto, stop signals, kills during a checkpoint write, lost ranks and loader
workers, and torchrun restarts that end with the uninterrupted run's weights, bit for bit.

Real processes are signalled (SIGTERM, SIGINT, SIGKILL, SIGSTOP); every wait polls for a file
or an exit within a generous deadline (the 2-core CI machine is shared), never a fixed sleep.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mcsc_fixtures import tiny_config

from mcsc.cli import main
from mcsc.training.checkpoint import load_checkpoint
from mcsc.training.config import Config
from mcsc.training.resilience import (
    EXIT_FAULT,
    EXIT_INTERRUPTED,
    EXIT_STOPPED,
    StopSignals,
    TrainingStopped,
    choose_checkpoint,
)
from mcsc.training.trainer import Trainer

DEADLINE = 300  # seconds for anything to happen on a loaded 2-core machine
ITERATIONS = 30


def resilience_config(iterations: int = ITERATIONS) -> Config:
    config = tiny_config("mcsc", iterations=iterations)
    config.train.checkpoint_every = 5
    config.train.eval_every = 10
    return config


def write_yaml(path: Path, config: Config) -> Path:
    values = config.to_dict()
    # what the data decides (split, classes) is left to it, as for a user's file
    values["data"] = {
        k: v
        for k, v in values["data"].items()
        if k.startswith("synthetic") or k in ("labeled", "patch_size", "num_workers")
    }
    path.write_text(yaml.safe_dump(values))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def iteration_of(path: Path) -> int:
    """The iteration of a checkpoint, -1 while it is absent or being replaced."""
    try:
        return int(load_checkpoint(path)["iteration"])
    except (OSError, ValueError):
        return -1


def wait_until(condition, what: str, processes=(), deadline: float = DEADLINE) -> None:
    """Poll ``condition`` until it holds; fail when a process ended first or time ran out."""
    end = time.monotonic() + deadline
    while not condition():
        for process in processes:
            if process.poll() is not None:
                pytest.fail(f"process ended (status {process.returncode}) before {what}")
        if time.monotonic() > end:
            pytest.fail(f"no {what} within {deadline} s")
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def environment_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(
        item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item
    )


def assert_same_training_state(a: dict, b: dict) -> None:
    """Bit for bit: weights, BatchNorm statistics, optimiser and scheduler states, sampler."""
    assert a["iteration"] == b["iteration"]
    for name, weights in a["models"].items():
        for key, tensor in weights.items():
            assert torch.equal(tensor, b["models"][name][key]), f"{name}.{key} differs"
    for name, optimizer in a["optimizers"].items():
        for pid, values in optimizer["state"].items():
            for key, value in values.items():
                assert torch.equal(
                    torch.as_tensor(value),
                    torch.as_tensor(b["optimizers"][name]["state"][pid][key]),
                ), f"optimizer {name} {pid}.{key} differs"
    assert a["schedulers"] == b["schedulers"] and a["sampler"] == b["sampler"]
    assert torch.equal(a["rng"]["contrastive"], b["rng"]["contrastive"])


def final_state(out: Path) -> dict:
    return load_checkpoint(out / "checkpoints" / "latest.pt")


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted single-process run that every interrupted one must end equal to."""
    out = tmp_path_factory.mktemp("straight") / "run"
    Trainer(resilience_config(), out, progress=False).fit()
    return out


def cli_environment() -> dict[str, str]:
    """The tests' environment (the package they import: installed, or on PYTHONPATH)."""
    return dict(os.environ, OMP_NUM_THREADS="1")


# A `mcsc train` process whose checkpoint writes can be watched and disturbed.
DRIVER = r"""
import os, signal, sys, time
from pathlib import Path
import mcsc.training.checkpoint as checkpoint
import mcsc.training.trainer as trainer
from mcsc.cli import main

mode, marker = os.environ["DRIVER_MODE"], Path(os.environ["DRIVER_MARKER"])
original = trainer.save_checkpoint
saves = []

def save_checkpoint(state, path, previous=None):
    if Path(path).name == "latest.pt":
        saves.append(state["iteration"])
        handler = signal.getsignal(signal.SIGTERM)
        stopping = getattr(getattr(handler, "__self__", None), "requested", None)
        if mode == "signal-again" and stopping:
            # a second and a third signal while the stop checkpoint is written
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
        if mode == "hang-in-write" and len(saves) == 2:
            def fsync(fd):
                marker.write_text(str(state["iteration"]))
                time.sleep(3600)
            os.fsync = fsync
    return original(state, path, previous)

trainer.save_checkpoint = save_checkpoint
sys.exit(main(sys.argv[1:]))
"""


def start_driver(tmp_path: Path, mode: str, *args: str) -> subprocess.Popen:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(cli_environment(), DRIVER_MODE=mode, DRIVER_MARKER=str(tmp_path / "marker"))
    return subprocess.Popen(
        [sys.executable, str(driver), "train", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def descendants(pid: int) -> list[int]:
    found = children(pid)
    for child in list(found):
        found += descendants(child)
    return found


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL a process started with ``start_new_session=True`` and everything it started,
    torchrun's workers included: they run in sessions of their own, and would otherwise outlive
    it holding its output pipes open."""
    for pid in [process.pid, *descendants(process.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def finish(process: subprocess.Popen, deadline: float = DEADLINE) -> tuple[int, str, str]:
    try:
        stdout, stderr = process.communicate(timeout=deadline)
    except subprocess.TimeoutExpired:
        kill_group(process)
        stdout, stderr = process.communicate(timeout=60)
        pytest.fail(f"no exit within {deadline} s:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    return process.returncode, stdout, stderr


# --------------------------------------------------------------------------- stop signals
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_checkpoints_the_current_iteration_and_resume_auto_finishes_it(
    tmp_path, straight, signum
):
    """A real `mcsc train` gets the signal mid-run (and two more while it writes the stop
    checkpoint): it writes the checkpoint of the iteration it reached, exits 75 (130 for
    Ctrl-C) with one line saying so; `--resume auto` ends with the uninterrupted weights."""
    config = write_yaml(tmp_path / "tiny.yaml", resilience_config())
    out = tmp_path / "run"
    latest = out / "checkpoints" / "latest.pt"
    arguments = ["--config", str(config), "--resume", "auto", "--no-progress", "--out", str(out)]
    process = start_driver(tmp_path, "signal-again", *arguments)
    try:
        wait_until(lambda: iteration_of(latest) >= 5, "first checkpoint", [process])
        process.send_signal(signum)
        status, _, stderr = finish(process)
    finally:
        process.kill()
    expected = EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_STOPPED
    assert status == expected, stderr[-3000:]
    stopped_at = iteration_of(latest)
    assert 5 <= stopped_at < ITERATIONS
    how = "interrupted (Ctrl-C)" if signum == signal.SIGINT else "stopped by SIGTERM"
    lines = [line for line in stderr.splitlines() if line.startswith("mcsc: ")]
    assert lines == [
        f"mcsc: {how} after iteration {stopped_at} of {ITERATIONS}: checkpoint {latest} "
        f"written; run the same command with --resume auto to continue"
    ], stderr[-2000:]
    assert not list(latest.parent.glob(".*.tmp"))
    assert main(["train", *arguments]) == 0
    assert_same_training_state(final_state(straight), final_state(out))


def test_sigusr1_during_validation_stops_and_the_resume_validates_first(tmp_path, straight):
    """SIGUSR1 arriving while rank 0 validates cuts the validation short; the checkpoint says
    it is pending, and the resumed run validates before its next step: same best.pt."""

    class SignalledDuringValidation(Trainer):
        def validate(self, iteration):
            if iteration == 20 and not getattr(self, "signalled", False):
                self.signalled = True
                os.kill(os.getpid(), signal.SIGUSR1)
            return super().validate(iteration)

    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(TrainingStopped, match="stopped by SIGUSR1 after iteration 20") as stop:
        SignalledDuringValidation(resilience_config(), out, progress=False).fit()
    assert stop.value.status == EXIT_STOPPED
    state = final_state(out)
    assert state["iteration"] == 20 and state["validation_pending"]
    assert load_checkpoint(out / "checkpoints" / "best.pt")["iteration"] == 10
    Trainer(resilience_config(), out, resume="auto", progress=False).fit()
    assert_same_training_state(final_state(straight), final_state(out))
    best, straight_best = (
        load_checkpoint(run / "checkpoints" / "best.pt") for run in (out, straight)
    )
    assert_same_training_state(straight_best, best)
    assert signal.getsignal(signal.SIGUSR1) is before  # handlers restored


def test_a_second_ctrl_c_outside_a_save_stops_at_once():
    before = signal.getsignal(signal.SIGINT)
    signals = StopSignals(["SIGINT"])
    with signals:
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.requested == signal.SIGINT
        with signals.saving():
            os.kill(os.getpid(), signal.SIGINT)  # ignored while a checkpoint is written
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before


# --------------------------------------------------------------------- checkpoint writes
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_and_resume_auto_finishes(
    tmp_path, straight
):
    config = write_yaml(tmp_path / "tiny.yaml", resilience_config())
    out = tmp_path / "run"
    folder = out / "checkpoints"
    arguments = ["--config", str(config), "--resume", "auto", "--no-progress", "--out", str(out)]
    process = start_driver(tmp_path, "hang-in-write", *arguments)
    try:  # the second write of latest.pt hangs before its rename
        wait_until((tmp_path / "marker").exists, "second checkpoint write", [process])
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert iteration_of(folder / "latest.pt") == 5  # the first checkpoint, intact
    assert len(list(folder.glob(".latest.pt.*.tmp"))) == 1  # the cut write
    assert main(["train", *arguments]) == 0
    assert not list(folder.glob(".*.tmp"))  # removed at the restart
    assert_same_training_state(final_state(straight), final_state(out))


def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, straight, capsys):
    class Crashed(Exception):
        pass

    class CrashAt12(Trainer):
        def on_iteration_end(self, iteration, logs):
            if iteration == 12:
                raise Crashed

    out = tmp_path / "run"
    with pytest.raises(Crashed):
        CrashAt12(resilience_config(), out, progress=False).fit()
    folder = out / "checkpoints"
    assert iteration_of(folder / "latest.pt") == 10 and iteration_of(folder / "previous.pt") == 5
    damaged = bytearray((folder / "latest.pt").read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    (folder / "latest.pt").write_bytes(bytes(damaged))
    config = write_yaml(tmp_path / "tiny.yaml", resilience_config())
    arguments = ["train", "--config", str(config), "--resume", "auto", "--no-progress"]
    assert main([*arguments, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{folder / 'latest.pt'} is unreadable" in printed
    assert f"resuming from {folder / 'previous.pt'} (iteration 5) instead" in printed
    assert (folder / "latest.pt.unreadable").exists()
    assert_same_training_state(final_state(straight), final_state(out))


# ----------------------------------------------------------------------------- resume auto
def test_resume_auto_starts_fresh_continues_its_own_run_and_refuses_another(
    tmp_path, capsys, monkeypatch
):
    config = write_yaml(tmp_path / "tiny.yaml", resilience_config(iterations=3))
    out = str(tmp_path / "run")
    arguments = ["train", "--config", str(config), "--no-progress", "--out", out]
    assert main([*arguments, "--resume", "auto"]) == 0  # nothing there: a fresh run
    assert "resuming" not in capsys.readouterr().out
    assert main([*arguments, "--resume", "auto"]) == 0  # finished: only the test again
    assert "resuming from" in capsys.readouterr().out
    assert main([*arguments, "--resume", "auto", "--set", "train.lr=0.01"]) == 2
    error = capsys.readouterr().err
    assert (
        "belongs to another run" in error
        and "train.lr: 0.002 in the checkpoint, 0.01 here" in error
    )
    monkeypatch.setenv("MCSC_RESUME", "auto")  # the environment's equivalent
    assert main([*arguments, "--iterations", "4"]) == 2
    assert "train.iterations: 3 in the checkpoint, 4 here" in capsys.readouterr().err
    assert main([*arguments, "--set", "train.threads=2", "--set", "data.num_workers=1"]) == 0
    monkeypatch.setenv("MCSC_RESUME", "sometimes")
    assert main(arguments) == 2
    assert "train.resume must be one of" in capsys.readouterr().err


def test_resume_auto_names_changed_data(tmp_path):
    config = resilience_config(iterations=2)
    out = tmp_path / "run"
    Trainer(config, out, progress=False).fit()
    folder = out / "checkpoints"
    state = load_checkpoint(folder / "latest.pt")
    decision, loaded = choose_checkpoint(folder, "auto", state["config"], "0" * 32)
    assert loaded is None and "data fingerprint" in decision.error
    assert state["data_fingerprint"] in decision.error and "training data changed" in decision.error
    decision, loaded = choose_checkpoint(folder, "auto", state["config"], state["data_fingerprint"])
    assert decision.error is None and loaded["iteration"] == 2


# --------------------------------------------------------------------------------- faults
def test_a_killed_data_loader_worker_is_an_error_not_a_hang(tmp_path):
    config = resilience_config(iterations=100_000)
    config.data.num_workers = 1
    config.train.eval_every = 100_000
    yaml_file = write_yaml(tmp_path / "tiny.yaml", config)
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "mcsc", "train", "--config", str(yaml_file), "--no-progress"]
        + ["--out", str(out)],
        cwd=tmp_path,
        env=cli_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(
            lambda: iteration_of(out / "checkpoints" / "latest.pt") >= 5, "checkpoint", [process]
        )
        workers = children(process.pid)
        assert len(workers) == 1, workers
        os.kill(workers[0], signal.SIGKILL)
        status, _, stderr = finish(process, deadline=120)
    finally:
        process.kill()
    assert status == EXIT_FAULT, stderr[-3000:]
    assert "mcsc: error: a data loader worker process died" in stderr
    assert "the last checkpoint" in stderr and "is kept" in stderr


def start_ranks(tmp_path: Path, config: Path, out: Path) -> list[subprocess.Popen]:
    """Two `mcsc train` processes of one job, started the way torchrun would (no agent)."""
    port = free_port()
    processes = []
    for rank in range(2):
        env = dict(
            cli_environment(),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
        )
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "mcsc", "train", "--config", str(config), "--no-progress"]
                + ["--out", str(out)],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return processes


@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL"])
def test_a_rank_that_hangs_or_dies_is_named_within_the_collective_timeout(tmp_path, fault):
    """Rank 1 stops (SIGSTOP: alive, silent) or dies (SIGKILL) mid-run while rank 0 goes on to
    its next collective: rank 0 exits with status 4 and a message naming rank 1, within the
    configured timeout (15 s) plus the 5 s it gives the others to report."""
    config = resilience_config(iterations=100_000)
    config.train.eval_every = 100_000
    config.train.checkpoint_every = 2
    config.train.collective_timeout_minutes = 0.25
    yaml_file = write_yaml(tmp_path / "tiny.yaml", config)
    out = tmp_path / "run"
    rank0, rank1 = start_ranks(tmp_path, yaml_file, out)
    try:
        wait_until(
            lambda: iteration_of(out / "checkpoints" / "latest.pt") >= 2,
            "checkpoint",
            [rank0, rank1],
        )
        rank1.send_signal(getattr(signal, fault))
        started = time.monotonic()
        status, _, stderr = finish(rank0, deadline=120)
        took = time.monotonic() - started
    finally:
        for process in (rank0, rank1):
            process.kill()
            process.communicate()
    assert status == EXIT_FAULT, stderr[-3000:]
    assert "rank 0: a collective failed" in stderr and "rank 1 stopped responding" in stderr
    assert "the last checkpoint" in stderr and "collective_timeout_minutes = 0.25" in stderr
    assert took < 15 + 5 + 60  # a margin for the loaded machine, far below any hang


# ------------------------------------------------------------------------------ torchrun
def start_torchrun(
    launcher: list[str], trainer: list[str], cwd: Path, env: dict[str, str]
) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node=2 LAUNCHER -m mcsc train TRAINER`, in a session of
    its own so that :func:`kill_group` reaches its workers."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.Popen(
        [*command, *launcher, "-m", "mcsc", "train", *trainer],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def torchrun_arguments(folder: Path) -> list[str]:
    config = write_yaml(folder / "tiny.yaml", resilience_config(iterations=24))
    return ["--config", str(config), "--resume", "auto", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def torchrun_straight(tmp_path_factory) -> Path:
    """An uninterrupted 2-process torchrun run, for the killed ones to end equal to."""
    folder = tmp_path_factory.mktemp("torchrun")
    out = folder / "straight"
    process = start_torchrun(
        [], [*torchrun_arguments(folder), "--out", str(out)], folder, cli_environment()
    )
    try:
        status, _, stderr = finish(process)
    finally:
        kill_group(process)
    assert status == 0, stderr[-3000:]
    return out


@pytest.mark.parametrize("killed_rank", ["0", "1"])
def test_torchrun_restarts_a_killed_rank_and_ends_with_the_uninterrupted_weights(
    tmp_path, torchrun_straight, killed_rank
):
    """`torchrun --max-restarts=1 ... --resume auto` with one rank SIGKILLed once the first
    checkpoint is written: the group restarts, resumes and ends bitwise where an uninterrupted
    2-process run ends. The restarted group's process group must come up in torchrun's store,
    which still holds the killed group's keys."""
    out = tmp_path / "killed"
    latest = out / "checkpoints" / "latest.pt"
    process = start_torchrun(
        ["--max-restarts=1"],
        [*torchrun_arguments(tmp_path), "--out", str(out)],
        tmp_path,
        cli_environment(),
    )
    try:
        wait_until(lambda: iteration_of(latest) >= 5, "first checkpoint", [process])
        workers = children(process.pid)
        victim = [pid for pid in workers if environment_of(pid).get("RANK") == killed_rank]
        assert len(victim) == 1, workers
        os.kill(victim[0], signal.SIGKILL)
        status, stdout, stderr = finish(process)
    finally:
        kill_group(process)
    assert status == 0, stderr[-4000:]
    resumed = [line for line in stdout.splitlines() if line.startswith("mcsc: resuming from")]
    assert len(resumed) == 1 and "at iteration" in resumed[0], stdout[-3000:]
    assert_same_training_state(final_state(torchrun_straight), final_state(out))


def test_each_torchrun_restart_starts_its_process_group_in_keys_of_its_own(monkeypatch):
    """Under torchrun's shared store, restart N never reads a key that restart N-1 wrote (a
    killed peer's gloo address); outside torchrun init_process_group makes its own store."""
    from datetime import timedelta

    from mcsc.training.distributed import restart_store

    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert restart_store(2, timedelta(seconds=30)) is None

    agent = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(agent.port))
    stores = {}
    for restart in (0, 1):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(restart))
        stores[restart] = restart_store(2, timedelta(seconds=30))
    stores[0].set("rank_1", "address of the killed rank 1")
    assert not stores[1].check(["rank_1"])
    stores[1].set("rank_1", "address of the restarted rank 1")
    assert stores[0].get("rank_1") == b"address of the killed rank 1"
    assert stores[1].get("rank_1") == b"address of the restarted rank 1"


def test_checkpoints_by_wall_clock_come_between_the_periodic_ones(tmp_path):
    saved = []

    class Watched(Trainer):
        def save_latest(self):
            saved.append(self.iteration)
            super().save_latest()

    config = resilience_config(iterations=4)
    config.train.checkpoint_every = 1000
    config.train.checkpoint_minutes = 1e-9  # due after every step
    Watched(config, tmp_path / "clock", progress=False).fit()
    config = resilience_config(iterations=4)
    config.train.checkpoint_every = 1000  # 15 minutes are not up: only the last iteration
    Watched(config, tmp_path / "steps", progress=False).fit()
    assert saved == [1, 2, 3, 4, 4]


def test_a_broken_connection_to_a_loader_worker_is_a_lost_worker():
    from mcsc.training.resilience import LoaderWorkerLost, loader_batches, loader_worker_error

    class Loader:
        def __init__(self, workers):
            self.num_workers = workers

        def __iter__(self):
            yield {"batch": 0}
            raise ConnectionResetError(104, "Connection reset by peer")

    batches = loader_batches(Loader(2))
    assert next(batches) == {"batch": 0}
    with pytest.raises(LoaderWorkerLost, match="Connection reset by peer") as lost:
        next(batches)
    assert loader_worker_error(lost.value)
    with pytest.raises(ConnectionResetError):  # no workers: not theirs
        list(loader_batches(Loader(0)))


def test_the_checkpoint_cost_benchmark_runs(tmp_path):
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "checkpoint_cost.py"), "--recipe", "small"]
        + ["--config", str(write_yaml(tmp_path / "tiny.yaml", resilience_config()))]
        + ["--repeat", "1", "--out", str(tmp_path / "run")],
        cwd=tmp_path,
        env=cli_environment(),
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MiB on disk" in result.stdout and "write (save_latest) median" in result.stdout
