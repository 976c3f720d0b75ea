"""What an evaluation is asked to do (``AttackConfig``), what its rows say about the model (``Provenance``) and what
it reports after every batch (``BatchReport``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from robust_enc.attacks.registry import AttackSettings
from robust_enc.preprocessing import Overrides, parse_overrides


@dataclass(frozen=True)
class AttackConfig:
    """One ``robust-enc attack`` run. Either ``checkpoint`` or ``model`` + ``weights``."""

    checkpoint: str = ""  # run folder or checkpoint file
    model: str = ""  # model registry name, with ``weights`` (a plain torchvision/timm state dict)
    weights: str = ""
    dataset: str = ""  # data set registry name; "" = the checkpoint's
    data_dir: str | None = None
    download: bool = False
    split: str = ""  # "" = the data set's natural evaluation split (test, else val)
    subset: int = 0  # deterministic class-balanced subset; 0 = whole split
    subset_list: str = ""  # file naming the images to take, in its order (e.g. RobustBench's 5,000); "" = none
    cache: str = ""  # folder of decoded evaluation images (robust_enc.cache); "" = decode every run
    batch_size: int = 128  # images per batch, also ART's batch size
    workers: int = 0  # DataLoader worker processes
    device: str = "auto"
    attacks: tuple[str, ...] = ("fgsm",)  # attack registry names
    eps: tuple[float, ...] = (1 / 255, 2 / 255, 4 / 255)  # pixel units, images in [0, 1]
    norm: str = "linf"  # "linf" or "l2"
    steps: int | None = None  # iterations; None = each attack's default (pgd 10, apgd 100, square 1000 queries)
    step_size: float | None = None  # pixel units; None = each attack's rule (pgd 2.5 * eps / steps)
    random_start: bool = True  # PGD starts at a random point in the ball
    restarts: int = 1  # random starts / restarts; the per-example best is kept
    seed: int = 0  # seeds random, numpy and torch per batch
    out: str = ""  # results file (.csv/.json); "" = <run>/results.csv next to the checkpoint
    gbr: bool = False  # attach the model's GBR (paper eq. 18) measured on the same examples
    channels_last: bool = False  # convolution weights in NHWC while measuring (faster kernels; same values)
    # Over the model's own preprocessing (timm's data config, torchvision's weights' transforms, the suite's pipeline):
    mean: tuple[float, ...] = ()  # per channel, in the model's Normalize layer (pixel units); () = the model's
    std: tuple[float, ...] = ()
    interpolation: str = ""  # of the resize ("bilinear", "bicubic", ...); "" = the model's
    crop_pct: float | None = None  # centre crop / resized short side, in (0, 1]; None = the model's

    def settings(self) -> AttackSettings:
        return AttackSettings(self.norm, self.steps, self.step_size, self.random_start, self.restarts)

    def overrides(self) -> Overrides:
        return parse_overrides(self.mean, self.std, self.interpolation, self.crop_pct)


@dataclass
class Provenance:
    """What the rows say about the model."""

    run_id: str
    model: str
    regularizer: str = "baseline"
    checkpoint_hash: str = ""
    train_top1: float = math.nan
    weight_sq_norm: float = math.nan
    weights: str = ""  # which weights ran: the file's name or the library's tag (e.g. "timm:resnet50.a1_in1k")
    preprocessing: str = ""  # the evaluation transform and normalization (``Preprocessing.text``)


@dataclass
class BatchReport:
    """Sent to ``on_batch`` after every batch (rank 0 of a sharded run reports its own shard)."""

    done: int  # images counted so far on this process (resumed ones included)
    total: int  # images this process will count
    images_per_s: float  # over this session's batches, attacks included
    running: dict[str, float] = field(default_factory=dict)  # "attack@eps" -> running robust accuracy
    data_wait_s: float = 0.0  # this session: seconds the loop waited for the DataLoader (decoding, transfer)
    compute_s: float = 0.0  # this session: seconds in the model and the attacks (clean pass, attacks, checks)
    session_images: int = 0  # images counted in this session (not resumed ones)
    stopped: bool = False  # the session was cut short (``max_batches``): its progress is kept for a later call

    def time_split(self) -> str:
        """Where this session's time went: waiting for data vs model compute, with images/s for each (a data wait
        near zero means the loaders keep up; a large one, more --workers or --cache)."""
        n = self.session_images

        def rate(seconds: float) -> str:
            return f"{n / seconds:,.0f} img/s" if seconds > 0 else "-"

        return (f"time: data wait {self.data_wait_s:.1f} s ({rate(self.data_wait_s)}), model compute "
                f"{self.compute_s:.1f} s ({rate(self.compute_s)}), {n} images")


OnBatch = Callable[[BatchReport], None]
