"""torch.distributed: 2 CPU processes (gloo) give the single-process step on the global batch.

The processes are spawned once per module (bounded by a timeout, never a hang); each runs a
few checks and saves its results, which the tests compare with the same computations done in
one process on the whole batch.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mcsc.data.distributed_sampling import ShardedTwoStreamBatchSampler
from mcsc.data.sampling import TwoStreamBatchSampler
from mcsc.losses import MultiScaleContrastiveLoss, PixelContrastiveLoss
from mcsc.models import SwinUNet, UNet, build_projection_heads, feature_index
from mcsc.training import distributed as mdist
from mcsc.training.trainer import method_losses

WORLD = 2
SPAWN_TIMEOUT = 240  # seconds for the whole 2-process run (a shared 2-core machine is slow)
SIZE, CLASSES = 32, 4
LABELLED, UNLABELLED = 4, 4  # global batch
STRIDES = (1, 4)


# --------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_data():
    """The global batch: images (8, 1, 32, 32), labels (8, 32, 32) with class blobs."""
    g = torch.Generator().manual_seed(123)
    images = torch.randn(LABELLED + UNLABELLED, 1, SIZE, SIZE, generator=g)
    labels = torch.randint(0, CLASSES, (LABELLED + UNLABELLED, SIZE // 4, SIZE // 4), generator=g)
    labels = labels.repeat_interleave(4, 1).repeat_interleave(4, 2)
    images = images + labels[:, None].float()
    return images, labels


def samplers(rank: int, world: int):
    args = (
        list(range(LABELLED)),
        list(range(LABELLED, LABELLED + UNLABELLED)),
        LABELLED,
        UNLABELLED,
        3,
        7,
    )
    return TwoStreamBatchSampler(*args), ShardedTwoStreamBatchSampler(
        *args, rank=rank, world_size=world
    )


def local_indices(rank: int, world: int) -> list[int]:
    """This rank's images of iteration 0 (the whole batch for one process)."""
    base, sharded = samplers(rank, world)
    return [i for i, _ in (sharded if world > 1 else base).batch(0)]


def images_in_global_order(context: mdist.DistributedContext, layout) -> torch.Tensor:
    """The images of the global batch in the single-process order, as gather_batch gives it."""
    world = context.world_size
    everyone = [i for r in range(world) for i in local_indices(r, world)]
    return torch.tensor(everyone)[layout.global_order()]


def build_models():
    torch.manual_seed(0)
    cnn = UNet(1, CLASSES, channels=(4, 8, 8, 8), dropout=(0.0,) * 4)
    swin = SwinUNet(
        img_size=SIZE,
        in_channels=1,
        num_classes=CLASSES,
        embed_dim=8,
        depths=(2, 2),
        num_heads=(1, 2),
        window_size=4,
        drop_path_rate=0.0,
    )
    heads = build_projection_heads(
        [cnn.feature_channels[feature_index(cnn, s)] for s in STRIDES],
        [swin.feature_channels[feature_index(swin, s)] for s in STRIDES],
        hidden=16,
        out=8,
    )
    return {"cnn": cnn, "swin": swin, "heads": heads}


def train_step(context: mdist.DistributedContext, sampler: str = "blocks") -> dict:
    """One SGD step of the method (as the trainer composes it) on this process's share."""
    images, labels = global_data()
    mine = local_indices(context.rank, context.world_size)
    images, labels = images[mine], labels[mine]
    lab = LABELLED // context.world_size
    models = build_models()
    forward = mdist.wrap_models(models, context, sync_batchnorm=True)
    params = [p for m in models.values() for p in m.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.5)
    contrastive = mdist.DistributedContrastiveLoss(
        MultiScaleContrastiveLoss(sampler=sampler, block_sizes=(8, 4), pixels_per_class=16, seed=5)
    )

    cnn_out, swin_out = forward["cnn"](images), forward["swin"](images)
    cnn_logits, swin_logits, all_labels, all_lab = cnn_out.logits, swin_out.logits, labels, lab
    layout = None
    if context.enabled:
        layout = mdist.batch_layout(images.shape[0], lab)
        cnn_logits, swin_logits = (
            mdist.gather_batch(cnn_logits, layout),
            mdist.gather_batch(swin_logits, layout),
        )
        all_labels, all_lab = mdist.gather_batch(labels, layout), layout.total_labelled
    cnn_emb, swin_emb = forward["heads"](
        [cnn_out.features[feature_index(models["cnn"], s)] for s in STRIDES],
        [swin_out.features[feature_index(models["swin"], s)] for s in STRIDES],
    )
    con = contrastive(
        cnn_emb, swin_emb, all_labels[:all_lab], cnn_logits, swin_logits, all_lab, layout=layout
    )
    terms = method_losses(
        cnn_logits,
        swin_logits,
        all_labels,
        all_lab,
        CLASSES,
        cross_teaching_weight=0.3,
        contrastive=con,
        contrastive_weight=0.5,
    )  # the trainer's composition
    optimizer.zero_grad()
    terms["loss"].backward()
    grads = {f"{n}.{k}": p.grad.clone() for n, m in models.items() for k, p in m.named_parameters()}
    optimizer.step()
    return {
        "losses": {name: float(v.detach()) for name, v in terms.items()},
        "rows": contrastive.diagnostics.rows,
        "grads": grads,
        "state": {
            f"{n}.{k}": v.detach().clone()
            for n, m in models.items()
            for k, v in m.state_dict().items()
        },
    }


def contrastive_only(context: mdist.DistributedContext, sampler: str, use_unlabelled: bool) -> dict:
    """The gathered contrastive loss on leaf embeddings; returns the loss and this rank's gradients."""
    g = torch.Generator().manual_seed(9)
    batch = LABELLED + UNLABELLED
    maps = [
        torch.nn.functional.normalize(torch.randn(batch, 8, s, s, generator=g), dim=1)
        for s in (16, 8)
    ]
    swin_maps = [
        torch.nn.functional.normalize(torch.randn(batch, 8, s, s, generator=g), dim=1)
        for s in (16, 8)
    ]
    logits = torch.randn(2, batch, CLASSES, 16, 16, generator=g)
    _, labels = global_data()
    labels = labels[:, ::2, ::2].contiguous()
    mine = local_indices(context.rank, context.world_size)
    cnn = [m[mine].requires_grad_() for m in maps]
    swin = [m[mine].requires_grad_() for m in swin_maps]
    layout = mdist.batch_layout(len(mine), LABELLED // context.world_size)
    global_images = images_in_global_order(context, layout)
    loss = mdist.DistributedContrastiveLoss(
        MultiScaleContrastiveLoss(sampler=sampler, block_sizes=(4, 4), pixels_per_class=8, seed=3)
    )
    value = loss(
        cnn,
        swin,
        labels[global_images][:LABELLED],
        logits[0][global_images],
        logits[1][global_images],
        LABELLED,
        use_unlabelled=use_unlabelled,
        layout=layout,
    )
    value.backward()
    return {
        "loss": float(value.detach()),
        "rows": loss.diagnostics.rows,
        "indices": mine,
        "grads": [t.grad for t in cnn + swin],
    }


MEMORY_STEPS = 3


def memory_steps(context: mdist.DistributedContext) -> dict:
    """Pixel memories over a few steps, two ways: the method's gathered loss (its set is already
    global) and per-rank plain losses that share their rows through ``gather_memory_rows``."""
    batch = LABELLED + UNLABELLED
    mine = local_indices(context.rank, context.world_size)
    layout = mdist.batch_layout(len(mine), LABELLED // context.world_size)
    global_images = images_in_global_order(context, layout)
    _, labels = global_data()
    labels = labels[:, ::2, ::2].contiguous()
    method = mdist.DistributedContrastiveLoss(
        MultiScaleContrastiveLoss(
            sampler="balanced", pixels_per_class=6, seed=3, memory_per_class=10
        )
    )
    plain = PixelContrastiveLoss(sampler="all", temperature=0.2, memory_per_class=12)
    rank_order = [i for r in range(WORLD) for i in local_indices(r, WORLD)]
    if context.enabled:
        plain.memory_gather = mdist.gather_memory_rows
    losses = []
    for step in range(MEMORY_STEPS):
        g = torch.Generator().manual_seed(100 + step)
        maps = [
            [
                torch.nn.functional.normalize(torch.randn(batch, 8, s, s, generator=g), dim=1)
                for s in (16, 8)
            ]
            for _ in range(2)
        ]
        logits = torch.randn(2, batch, CLASSES, 16, 16, generator=g)
        cnn = [m[mine].requires_grad_() for m in maps[0]]
        swin = [m[mine].requires_grad_() for m in maps[1]]
        value = method(
            cnn,
            swin,
            labels[global_images][:LABELLED],
            logits[0][global_images],
            logits[1][global_images],
            LABELLED,
            layout=layout,
        )
        value.backward()
        # the plain loss of this rank's own images; one process takes all ranks' images in
        # rank order, which is the order in which the ranks' gathered rows are written
        own = local_indices(context.rank, WORLD) if context.enabled else rank_order
        plain(maps[0][1][own], labels[own])
        losses.append(float(value.detach()))
    pixel = method.loss.pixel_loss
    return {
        "losses": losses,
        "method": {k: v.clone() for k, v in pixel.state_dict().items()},
        "plain": {k: v.clone() for k, v in plain.state_dict().items()},
    }


CONTRASTIVE_CASES = [("blocks", True), ("balanced", True), ("all", True), ("blocks", False)]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    context = mdist.init_distributed("cpu", timeout_minutes=3)
    try:
        results = {
            "context": (context.rank, context.world_size, context.backend, context.is_main),
            "step": train_step(context),
            "contrastive": {case: contrastive_only(context, *case) for case in CONTRASTIVE_CASES},
            "mean": mdist.all_reduce_mean({"a": float(rank), "b": 2.0 * rank}),
            "memory": memory_steps(context),
        }
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        mdist.destroy_distributed()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run :func:`_worker` on 2 gloo processes; the per-rank results."""
    out = tmp_path_factory.mktemp("ddp")
    run_processes(_worker, out)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def assert_close_dicts(a: dict, b: dict, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(
            a[key], b[key], rtol=rtol, atol=atol, msg=lambda m, key=key: f"{key}: {m}"
        )


# ----------------------------------------------------------------------------- tests
def test_sharded_sampler_splits_every_global_batch():
    for iteration in range(6):
        base, _ = samplers(0, 1)
        whole = base.batch(iteration)
        parts = [samplers(r, WORLD)[1].batch(iteration) for r in range(WORLD)]
        for part in parts:  # each rank: its labelled share first, then its unlabelled share
            assert len(part) == (LABELLED + UNLABELLED) // WORLD
            assert all(i < LABELLED for i, _ in part[: LABELLED // WORLD])
            assert all(i >= LABELLED for i, _ in part[LABELLED // WORLD :])
        labelled = [x for part in parts for x in part[: LABELLED // WORLD]]
        unlabelled = [x for part in parts for x in part[LABELLED // WORLD :]]
        assert labelled + unlabelled == whole  # disjoint, same items and augmentation seeds
    # an epoch of the labelled stream (4 items, 1 batch) holds no duplicates across ranks
    assert sorted(i for r in range(WORLD) for i, _ in samplers(r, WORLD)[1].batch(0)) == list(
        range(8)
    )


def test_sharded_sampler_resumes_and_is_deterministic():
    _, sharded = samplers(1, WORLD)
    straight = list(sharded)
    assert len(straight) == 3 and straight == list(samplers(1, WORLD)[1])
    resumed = samplers(1, WORLD)[1]
    resumed.load_state_dict({"seed": 7, "start": 2})
    assert list(resumed) == straight[2:] and resumed.state_dict() == {"seed": 7, "start": 2}
    other = ShardedTwoStreamBatchSampler(
        list(range(4)), list(range(4, 8)), 4, 4, 3, seed=8, rank=1, world_size=2
    )
    assert list(other) != straight


def test_sharded_sampler_rejects_uneven_shares():
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        ShardedTwoStreamBatchSampler([0, 1, 2], [3, 4], 3, 2, 5, 0, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        ShardedTwoStreamBatchSampler([0, 1], [3, 4], 2, 2, 5, 0, rank=2, world_size=2)


def test_batch_layout_order():
    layout = mdist.BatchLayout((2, 1), (1, 3), rank=1)
    # rank 0 holds [L0 L1 U0], rank 1 [L2 U1 U2 U3]; global: L0 L1 L2 U0 U1 U2 U3
    assert layout.global_order() == [0, 1, 3, 2, 4, 5, 6]
    assert layout.owners() == ([0, 0, 1, 0, 1, 1, 1], [0, 1, 0, 2, 1, 2, 3])
    assert layout.owners(use_unlabelled=False) == ([0, 0, 1], [0, 1, 0])


def test_single_process_context_is_a_no_op(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    context = mdist.init_distributed("cpu")
    assert not context.enabled and context.is_main and mdist.is_main_process()
    models = {"m": torch.nn.Linear(2, 2)}
    assert mdist.wrap_models(models, context)["m"] is models["m"]
    assert mdist.all_reduce_mean({"x": 1.5}) == {"x": 1.5}


def test_ranks_agree_on_the_context_and_metrics(ranks):
    assert [r["context"] for r in ranks] == [(0, 2, "gloo", True), (1, 2, "gloo", False)]
    assert all(r["mean"] == {"a": 0.5, "b": 1.0} for r in ranks)


def test_one_ddp_step_equals_one_process_on_the_global_batch(ranks):
    single = train_step(mdist.DistributedContext())
    assert single["rows"] > 0 and single["losses"]["contrast"] > 0
    for r in ranks:
        step = r["step"]
        assert step["rows"] == single["rows"]
        for name, value in single["losses"].items():
            assert step["losses"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
        # DDP averaged gradients and the updated weights (BatchNorm running stats included)
        assert_close_dicts(step["grads"], single["grads"])
        assert_close_dicts(step["state"], single["state"])
    assert_close_dicts(ranks[0]["step"]["state"], ranks[1]["step"]["state"], rtol=0, atol=0)


@pytest.mark.parametrize(
    "case", CONTRASTIVE_CASES, ids=lambda c: f"{c[0]}-{'all' if c[1] else 'labelled'}"
)
def test_gathered_contrastive_loss_equals_one_process(ranks, case):
    single = contrastive_only(mdist.DistributedContext(), *case)
    for r in ranks:
        part = r["contrastive"][case]
        assert part["rows"] == single["rows"] > 0
        assert part["loss"] == pytest.approx(single["loss"], rel=1e-5)
        # without DDP each rank holds world_size x its rows' share of the gradient (DDP's
        # averaging divides it back); see mcsc.training.distributed
        position = [single["indices"].index(i) for i in part["indices"]]
        for mine, whole in zip(part["grads"], single["grads"]):
            torch.testing.assert_close(mine / WORLD, whole[position], rtol=1e-4, atol=1e-7)


def test_pixel_memories_are_identical_on_all_ranks_and_equal_one_process(ranks):
    single = memory_steps(mdist.DistributedContext())
    for name in ("method", "plain"):
        first = ranks[0]["memory"][name]
        assert first["memory_count"].sum() > 0
        # 10 per class and scale: the method's memory is full after 3 steps of 6 x 16 maps
        if name == "method":
            assert int(first["memory_count"].min()) == 10
        for r in ranks[1:]:
            for key, tensor in first.items():
                assert torch.equal(r["memory"][name][key], tensor), f"{name}.{key}"
        for key, tensor in first.items():
            torch.testing.assert_close(tensor, single[name][key], rtol=0, atol=0, msg=key)
    for r in ranks:
        assert r["memory"]["losses"] == pytest.approx(single["losses"], rel=1e-5)


# ------------------------------------------------------------- the trainer under DDP
class Interrupted(Exception):
    pass


def _resume_worker(rank: int, world: int, port: int, out: str) -> None:
    """Straight 5-iteration run; a run killed after iteration 3 and resumed from iteration 2."""
    from mcsc_fixtures import tiny_config

    from mcsc.training.checkpoint import load_checkpoint
    from mcsc.training.config import Config
    from mcsc.training.trainer import Trainer

    class Killed(Trainer):
        def on_iteration_end(self, iteration, logs):
            if iteration == 3:
                raise Interrupted

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    mdist.init_distributed("cpu", timeout_minutes=3)  # the caller owns the process group
    try:
        Trainer(tiny_config("mcsc", iterations=5), Path(out) / "straight", progress=False).fit()
        try:
            Killed(tiny_config("mcsc", iterations=5), Path(out) / "killed", progress=False).fit()
        except Interrupted:
            pass
        mdist.barrier()  # rank 0's checkpoint of iteration 2 is on disk
        partial = load_checkpoint(Path(out) / "killed" / "checkpoints" / "latest.pt")
        Trainer(
            Config.from_dict(partial["config"]), Path(out) / "killed", resume=True, progress=False
        ).fit()
        # the disk fills up on rank 0 at its second checkpoint: every rank stops with the path
        # in its message (no rank waits for the others), the first checkpoint intact
        import errno

        from mcsc.training import trainer as trainer_module

        original = trainer_module.save_checkpoint

        def disk_full_at_the_second(state, path, previous=None):
            if state["iteration"] == 4 and Path(path).name == "latest.pt":
                raise OSError(errno.ENOSPC, f"{path}: cannot write the checkpoint (disk full)")
            original(state, path, previous)

        trainer_module.save_checkpoint = disk_full_at_the_second
        try:
            Trainer(tiny_config("mcsc", iterations=5), Path(out) / "full", progress=False).fit()
        except OSError as error:
            (Path(out) / f"disk_full{rank}.txt").write_text(f"{error.errno} {error}")
    finally:
        mdist.destroy_distributed()


def run_processes(worker, out: Path) -> None:
    context = mp.start_processes(
        worker, args=(WORLD, free_port(), str(out)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT
    try:
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD}-process run did not finish within {SPAWN_TIMEOUT} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def test_ddp_trainer_resumes_exactly(tmp_path):
    from mcsc.training.checkpoint import load_checkpoint

    run_processes(_resume_worker, tmp_path)
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "latest.pt")
    resumed = load_checkpoint(tmp_path / "killed" / "checkpoints" / "latest.pt")
    assert straight["iteration"] == resumed["iteration"] == 5
    assert straight["sampler"] == resumed["sampler"]
    for name, weights in straight["models"].items():
        for key, tensor in weights.items():
            assert torch.equal(tensor, resumed["models"][name][key]), f"{name}.{key}"
    assert not list((tmp_path / "straight").glob("**/rank*"))  # nothing written per rank
    full = tmp_path / "full" / "checkpoints" / "latest.pt"
    for rank in range(WORLD):
        message = (tmp_path / f"disk_full{rank}.txt").read_text()
        assert message.startswith("28 ") and f"{full}: cannot write the checkpoint" in message
    assert "rank 0 writes the checkpoints" in (tmp_path / "disk_full1.txt").read_text()
    assert load_checkpoint(full)["iteration"] == 2


def test_torchrun_two_processes_train_and_resume(tmp_path):
    """``torchrun --nproc_per_node=2 -m mcsc train``: completes, rank 0 alone writes and reports."""
    import yaml
    from mcsc_fixtures import tiny_config

    values = tiny_config("mcsc", iterations=3).to_dict()
    values["data"] = {
        k: v
        for k, v in values["data"].items()
        if k.startswith("synthetic") or k in ("labeled", "patch_size", "num_workers")
    }
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(values))
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def torchrun(*args):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={WORLD}",
            f"--master_port={free_port()}",
            "-m",
            "mcsc",
            "train",
            *args,
            "--device",
            "cpu",
            "--no-progress",
            "--out",
            str(out),
        ]
        # not from the repository root, where `-m mcsc` would import the source tree (which may
        # lack the compiled extension) instead of the package the tests import
        result = subprocess.run(
            command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=SPAWN_TIMEOUT
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    stdout = torchrun("--config", str(config), "--iterations", "3")
    assert stdout.count("; outputs in") == 1  # only rank 0 reports
    for name in (
        "config.yaml",
        "split.json",
        "metrics.json",
        "metrics.txt",
        "predictions.png",
        "checkpoints/latest.pt",
        "checkpoints/best.pt",
    ):
        assert (out / name).is_file(), name
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0's
    assert torch.load(out / "checkpoints" / "latest.pt", weights_only=True)["iteration"] == 3

    torchrun("--resume", "--iterations", "4")
    assert torch.load(out / "checkpoints" / "latest.pt", weights_only=True)["iteration"] == 4
