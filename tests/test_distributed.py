"""Several processes and GPUs without a GPU: torchrun + gloo for the real process-group life cycle, mocked CUDA for
the device traps (which GPU ART builds on, the NCCL init), and the numerics flags attacks and GBR run under."""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from robust_enc.attacks import art_adapter
from robust_enc.attacks.evaluation import evaluate_model
from robust_enc.data import build_dataset
from robust_enc.gbr import measure_gbr
from robust_enc.models import ModelSpec
from robust_enc.regularizers import build_model
from robust_enc.runtime import distributed as D
from robust_enc.runtime.device import MEASUREMENT_PRECISION
from robust_enc.runtime.distributed import evaluation_process
from robust_enc.train.epoch import NonFiniteLoss, train_one_epoch
from robust_enc.train.loop import build_training_model
from robust_enc.train.recipe import build_recipe

TINY_PRESET = Path(__file__).resolve().parents[1] / "benchmarks" / "tiny_reproduce.json"


# ------------------------------------------------------------------------------------------------ torchrun reproduce
def _report_numbers(study: Path) -> list[str]:
    """table3.csv of a study: every number of the Table 3 view (no wall times or paths in it)."""
    return (study / "report" / "table3.csv").read_text().splitlines()


@pytest.mark.slow
def test_torchrun_reproduce_completes_five_times_like_one_process(tmp_path, torchrun):
    """The README's multi-GPU study command on 2 gloo processes: one process group per process for every training
    and evaluation (re-creating a destroyed default group hung or failed with connectFullMesh). Five fresh runs each
    finish within the subprocess timeout with the same report, and one process attacking the same checkpoints
    writes that report too (training itself differs: per-rank BatchNorm batches)."""
    reports = []
    for attempt in range(5):
        out = tmp_path / f"study{attempt}"
        done = torchrun("robust_enc.cli", ["reproduce", "--preset", str(TINY_PRESET), "--device", "cpu",
                                           "--out", str(out)], timeout=240)
        assert "report:" in done.stdout
        reports.append(_report_numbers(out))
    assert all(r == reports[0] for r in reports[1:])
    header, *rows = reports[0]
    assert len(rows) == 2 and "adv:fgsm:linf" in header

    # One process, the torchrun study's checkpoints: training is found finished, the attacks and GBR run again.
    single = tmp_path / "single"
    shutil.copytree(tmp_path / "study0", single)
    for results in (single / "runs").glob("*/results.csv"):
        results.unlink()
    shutil.rmtree(single / "report")
    from robust_enc.cli import main

    # One thread, as each torchrun rank runs: ranks take whole batches with per-global-batch seeds, so every batch is
    # computed here as on its rank, and float32 kernels give the same bits only for the same thread count (a
    # reduction split over 2 threads sums in another order). What remains is the order of the float64 sums over
    # ranks (the GBR sums): a relative difference below 60 * 2^-53 ~ 7e-15 for 60 images; rtol 1e-9 is far above it
    # and far below any real difference (one image of 60 moves an accuracy by 1.7e-2).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["reproduce", "--preset", str(TINY_PRESET), "--device", "cpu", "--out", str(single)]) == 0
    finally:
        torch.set_num_threads(threads)
    pd.testing.assert_frame_equal(pd.read_csv(single / "report" / "table3.csv"),
                                  pd.read_csv(tmp_path / "study0" / "report" / "table3.csv"), rtol=1e-9)


# ------------------------------------------------------------------------------------------------ mocked CUDA
@pytest.fixture
def two_fake_gpus(monkeypatch):
    """torch believes in 2 GPUs; ``torch.cuda.device`` switches a recorded current device; every ``nn.Module.to``
    target is recorded (and nothing moves). Returns (recorded targets, [current device index])."""
    current = [0]

    class FakeDevice:
        def __init__(self, device):
            self.index = torch.device(device).index

        def __enter__(self):
            self.previous, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.previous

    targets: list[torch.device] = []

    def record_to(self, *args, **kwargs):
        targets.append(torch._C._nn._parse_to(*args, **kwargs)[0])
        return self

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.__setitem__(0, torch.device(device).index))
    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    monkeypatch.setattr(nn.Module, "to", record_to)
    return targets, current


@pytest.mark.parametrize("loss_type", ["cross_entropy", "difference_logits_ratio"])
def test_apgd_stays_on_the_requested_gpu(two_fake_gpus, monkeypatch, loss_type):
    """ART's APGD wraps the model in a new PyTorchClassifier on ``torch.cuda.current_device()`` and moves the model
    there in place: with --device cuda:1 the evaluation must hold cuda:1 as the current device (without it: cuda:0)."""
    from art.estimators.classification import PyTorchClassifier

    targets, current = two_fake_gpus
    # APGD's constructor predicts one image to reject probability outputs: no real GPU here, so logits of zeros.
    monkeypatch.setattr(PyTorchClassifier, "predict",
                        lambda self, x, **kw: np.zeros((len(x), self.nb_classes), dtype=np.float32))
    model = build_model(ModelSpec("resnet_tiny", 10, (1, 8, 8), (0.5,), (0.5,)))
    with evaluation_process("cuda:1") as (rank, world, device):
        assert (rank, world, device, current[0]) == (0, 1, torch.device("cuda", 1), 1)
        classifier = art_adapter.build_classifier(model, num_classes=10, input_shape=(1, 8, 8), device=device)
        art_adapter.apgd(classifier, eps=0.1, norm="linf", steps=2, step_size=0.05, restarts=1, batch_size=8,
                         loss_type=loss_type)
    assert current[0] == 0  # restored after the evaluation
    assert len(targets) == 2 and set(targets) == {torch.device("cuda", 1)}, targets


class _Joined(Exception):
    """Raised by the recording init_process_group: the test stops right after the join."""


@pytest.mark.parametrize("command", [["train", "--model", "resnet_tiny", "--epochs", "1"],
                                     ["attack", "--checkpoint", "nowhere"],
                                     ["reproduce", "--preset", "quick"]])
def test_every_command_joins_nccl_once_with_the_training_timeout_and_device_id(two_fake_gpus, monkeypatch,
                                                                              command):
    """Under torchrun the CLI joins the process group before the command runs, by one path for training and
    evaluation: NCCL with this rank's GPU as ``device_id`` and a 30-minute timeout (NCCL's default 10 minutes
    timed out the rank that finished its evaluation shard first)."""
    from robust_enc.cli import main

    calls = []

    def record(backend, **kwargs):
        calls.append((backend, kwargs))
        raise _Joined

    monkeypatch.setattr(dist, "init_process_group", record)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(_Joined):
        main([*command, "--device", "cuda"])
    assert calls == [("nccl", {"rank": 1, "world_size": 2, "timeout": datetime.timedelta(seconds=1800),
                               "device_id": torch.device("cuda", 1)})]
    assert two_fake_gpus[1][0] == 1  # the rank's GPU is the current device from then on


# ------------------------------------------------------------------------------------------------ SyncBatchNorm
def _hooks_on_batch_norm(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


def test_sync_bn_keeps_dropblock_hooks():
    """--sync-bn converts BatchNorm before DropBlock hooks its BN layers: ResNet-50 enc+dropblock keeps one hook per
    block of its last two stages (6 + 3), and they fire in train mode."""
    spec = ModelSpec("resnet50", 10, (3, 32, 32), (0.5,) * 3, (0.5,) * 3, regularizer="enc+dropblock")
    plain = build_training_model(spec)
    synced = build_training_model(spec, sync_bn=True)
    batch_norms = [m for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert batch_norms and all(isinstance(m, nn.SyncBatchNorm) for m in batch_norms)
    assert _hooks_on_batch_norm(plain) == _hooks_on_batch_norm(synced) == 6 + 3
    fired = []
    for m in synced.modules():
        if isinstance(m, nn.SyncBatchNorm) and m._forward_hooks:
            m.register_forward_hook(lambda *args: fired.append(1))
    synced.train()(torch.rand(2, 3, 32, 32))  # one process: SyncBatchNorm computes local statistics
    assert len(fired) == 9


# ------------------------------------------------------------------------------------------------ strict fp32
def test_attacks_and_gbr_run_without_tf32_or_cudnn_benchmark():
    """TF32 and cudnn.benchmark (training turns benchmark on) are off in every forward of the attacks and of GBR,
    restored afterwards, and the rows say so."""
    info_data, info = build_dataset("digits", "test", subset=20)
    seen: list[tuple] = []

    class Recording(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = build_model(ModelSpec("resnet_tiny", 10, (1, 8, 8), info.mean, info.std))

        def forward(self, x):
            seen.append((torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
                         torch.get_float32_matmul_precision()))
            return self.net(x)

    before = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")
    try:
        model = Recording()
        rows = evaluate_model(model, info_data, info=info, attacks=("fgsm", "pgd"), eps="8/255", steps=2, device="cpu",
                         batch_size=20, gbr=True)
        attack_forwards = len(seen)
        measure_gbr(model, [next(iter(torch.utils.data.DataLoader(info_data, batch_size=10)))], device="cpu")
        assert len(seen) > attack_forwards > 5
        assert set(seen) == {(False, False, "highest")}
        assert (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()) == (True, "high")
        assert rows and all(r.precision == MEASUREMENT_PRECISION for r in rows) and math.isfinite(rows[0].gbr)
    finally:
        torch.backends.cudnn.benchmark = before[0]
        torch.set_float32_matmul_precision(before[1])


# ------------------------------------------------------------------------------------------------ decisions together
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _epoch_on_rank(rank: int, port: int, out_dir: str) -> None:
    """Two gloo ranks of DDP on a linear model: rank 1's second batch is empty (all images unreadable); in a
    second epoch rank 1's last batch holds a NaN image. Writes what each epoch did on this rank."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        model = nn.parallel.DistributedDataParallel(net)
        recipe = build_recipe("baseline", num_classes=3, batch_size=8, weight_decay=0.0)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        generator = torch.Generator().manual_seed(rank)

        def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.rand(n, 1, 4, 4, generator=generator), torch.randint(0, 3, (n,), generator=generator)

        empty = (torch.zeros(0, 1, 4, 4), torch.zeros(0, dtype=torch.int64))
        loader = [batch(4), empty if rank == 1 else batch(4), batch(4)]
        stats = train_one_epoch(model, loader, recipe, optimizer, device=torch.device("cpu"), epoch=0)
        weights = net[1].weight.detach().sum().item()
        nan_batch = batch(4)
        nan_batch[0][0, 0, 0, 0] = float("nan")
        loader = [batch(4), batch(4), nan_batch if rank == 1 else batch(4)]  # last: no NaN weights used after
        try:
            train_one_epoch(model, loader, recipe, optimizer, device=torch.device("cpu"), epoch=1, check_every=100)
            second = "finished"
        except NonFiniteLoss as err:
            second = str(err)
        result = {"samples_seen": stats["samples_seen"], "weights": weights,
                  "second": second}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_ranks_skip_an_empty_batch_and_stop_on_nan_together(tmp_path):
    """A batch left empty by unreadable images on one rank is skipped by both (it raised on that rank alone while
    the other waited in DDP's all-reduce); a NaN loss on one rank stops both, at the next check."""
    context = mp.start_processes(_epoch_on_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=False,
                                 start_method="spawn")
    try:
        for _ in range(12):  # a hang shows as a timeout here, not as a stuck test run
            if context.join(timeout=10):
                break
        else:
            pytest.fail("the two ranks did not finish within 120 s: a collective is waiting for a rank")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["samples_seen"] == ranks[1]["samples_seen"] == 2 * 2 * 4  # 2 steps, 2 ranks, 4 images each
    assert ranks[0]["weights"] == ranks[1]["weights"]  # the same steps on both: DDP kept them in sync
    assert "nan at epoch 2, step 3" in ranks[1]["second"] and "another process" in ranks[0]["second"]


def test_init_distributed_outside_torchrun_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx, device = D.init_distributed(torch.device("cpu"))
    assert (ctx.world_size, ctx.backend, device, dist.is_initialized()) == (1, "", torch.device("cpu"), False)
    assert not os.environ.get("WORLD_SIZE")


def test_results_without_the_precision_column_still_read(tmp_path):
    """A v2 results file (before the precision column) reads, with the precision not recorded ("")."""
    from robust_enc.results import FIELD_NAMES, ResultRow, read_results, write_results

    row = ResultRow(run_id="r", model="resnet_tiny", regularizer="baseline", dataset="digits", split="test",
                    subset=0, attack="none", norm="none", eps=0.0, n=10, clean_top1=0.9, adv_top1=0.9,
                    precision=MEASUREMENT_PRECISION)
    write_results(tmp_path / "v3.csv", [row])
    assert read_results(tmp_path / "v3.csv")[0].precision == MEASUREMENT_PRECISION
    frame = pd.read_csv(tmp_path / "v3.csv", keep_default_na=False).drop(columns=["precision"])
    frame.to_csv(tmp_path / "v2.csv", index=False)
    (back,) = read_results(tmp_path / "v2.csv")
    assert back.precision == "" and back.clean_top1 == 0.9 and "precision" in FIELD_NAMES


@pytest.mark.slow
def test_autoattack_sharded_over_two_ranks_equals_one_process(tmp_path, torchrun):
    """``attack --attack aa`` under torchrun: the ranks take whole batches with per-(batch, eps, stage) seeds, so two
    ranks count what one process (one thread, as each rank) counts, example for example: the same robust top-1."""
    from robust_enc.cli import main
    from robust_enc.results import read_results

    assert main(["train", "--model", "resnet_tiny", "--dataset", "digits", "--epochs", "10", "--batch-size", "64",
                 "--lr", "0.05", "--device", "cpu", "--out-dir", str(tmp_path), "--run-id", "tiny"]) == 0
    run = tmp_path / "tiny"
    common = ["attack", "--checkpoint", str(run), "--attack", "aa", "--eps", "16/255", "--steps", "5", "--subset",
              "20", "--batch-size", "5", "--device", "cpu"]
    torchrun("robust_enc.cli", [*common, "--out", str(tmp_path / "ranks.csv")])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*common, "--out", str(tmp_path / "one.csv")]) == 0
    finally:
        torch.set_num_threads(threads)
    ranks, one = ({r.attack: r for r in read_results(tmp_path / name)} for name in ("ranks.csv", "one.csv"))
    assert set(ranks) == set(one) == {"none", "autoattack"}
    for attack in ranks:
        assert (ranks[attack].n, ranks[attack].clean_top1, ranks[attack].adv_top1) == \
               (one[attack].n, one[attack].clean_top1, one[attack].adv_top1) and not ranks[attack].flags
    assert 0 < one["autoattack"].adv_top1 < one["none"].clean_top1  # some images broken, some robust
