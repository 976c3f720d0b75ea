"""``robust-enc train``: the command line onto ``TrainConfig``; the loop reports to the progress display.

    robust-enc train --model resnet20 --dataset fashion-mnist --reg enc+cutmix+ls --epochs 3
    torchrun --nproc_per_node 8 -m robust_enc.cli train --model resnet50 --dataset imagenet --data-dir /data/in1k \\
        --reg enc --batch-size 256 --amp bf16 --channels-last --workers 8      # 256 = global batch, 32 per GPU

Under torchrun every process runs the same command; rank 0 alone writes the run folder and shows progress.

Options left out keep TrainConfig's defaults (the paper's recipe); ``--set key=value`` reaches any field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any

from robust_enc.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from robust_enc.cli.common import add_data_arguments, add_device_argument
    from robust_enc.train.config import AMP_DTYPES, SCHEDULES, TrainConfig

    d = TrainConfig()
    # None defaults throughout: only the options given override TrainConfig's defaults (one source of truth).
    parser.add_argument("--model", default=None, help=f"model registry name (default {d.model})")
    parser.add_argument("--reg", "--regularizer", dest="regularizer", default=None,
                        help="regularizer spec, '+'-joined, e.g. baseline, enc, enc+cutmix+ls, enc:alpha=2 "
                             f"(default {d.regularizer})")
    add_data_arguments(parser, default_dataset=None)
    parser.set_defaults(batch_size=None)  # TrainConfig's global batch, not the shared data default
    parser.add_argument("--val-subset", type=int, default=None, help="evaluation examples (0 = the whole split)")
    parser.add_argument("--image-size", type=int, default=None, help="image side in pixels for folder/ImageNet data")
    opt = parser.add_argument_group("optimization (--batch-size is the global batch over all processes)")
    opt.add_argument("--epochs", type=int, default=None, help=f"default {d.epochs}")
    opt.add_argument("--lr", type=float, default=None, help=f"base learning rate (default {d.lr})")
    opt.add_argument("--momentum", type=float, default=None, help=f"default {d.momentum}")
    opt.add_argument("--weight-decay", "--wd", type=float, default=None, help=f"default {d.weight_decay}")
    opt.add_argument("--schedule", choices=list(SCHEDULES), default=None, help=f"default {d.schedule}")
    opt.add_argument("--step-epochs", type=int, default=None, help=f"lr / 10 every N epochs (default {d.step_epochs})")
    opt.add_argument("--warmup-epochs", type=int, default=None, help="linear warmup epochs (default 0)")
    opt.add_argument("--seed", type=int, default=None, help="default 0")
    speed = parser.add_argument_group("speed")
    add_device_argument(speed)
    speed.add_argument("--amp", choices=list(AMP_DTYPES), default=None, help="autocast dtype (fp16 needs a GPU)")
    speed.add_argument("--channels-last", action="store_true", default=None, help="NHWC memory format")
    speed.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    speed.add_argument("--sync-bn", action="store_true", default=None, help="SyncBatchNorm across GPUs")
    out = parser.add_argument_group("output")
    out.add_argument("--out-dir", default=None, help=f"parent folder of the run folder (default {d.out_dir})")
    out.add_argument("--run-id", default=None, help="run folder name (default: model-data-regularizer-seed)")
    out.add_argument("--gbr-probe-size", type=int, default=None,
                     help=f"fixed evaluation examples for the per-epoch GBR (default {d.gbr_probe_size}; 0 = none)")
    out.add_argument("--gbr-every", type=int, default=None, help="epochs between GBR estimates (default 1)")
    out.add_argument("--resume", action="store_true", default=None, help="continue an interrupted run")
    out.add_argument("--export", action="store_true", default=None,
                     help="also write exported.pt, the plain model with ENC/WN/WS baked in, and exported.ts, the "
                          "same model as TorchScript (torch.jit.load, no robust-enc needed)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any TrainConfig field, e.g. --set weight_decay=5e-4 (repeatable)")


def _parse_set(items: list[str], hints: dict[str, Any]) -> dict[str, Any]:
    """KEY=VALUE pairs, each value read as its TrainConfig field's type (unknown keys go on to replace_checked, which
    names the known ones)."""
    from robust_enc.config import parse_value

    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UserError(f"--set wants KEY=VALUE, got {item!r}")
        try:
            overrides[key] = parse_value(text.strip(), hints[key]) if key in hints else text
        except ValueError as err:
            raise UserError(f"--set {key}={text!r} must be {err}") from None
    return overrides


def config_from_args(args: argparse.Namespace) -> Any:
    """TrainConfig from parsed arguments: given options, then --set overrides, all type-checked."""
    from robust_enc.config import replace_checked
    from robust_enc.train.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    given["download"] = bool(args.download) or None  # store_true flags: absent = the default
    given = {k: v for k, v in given.items() if v is not None}
    return replace_checked(TrainConfig(), **{**given, **_parse_set(args.set, hints)})


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from robust_enc.runtime.distributed import is_main_process
    from robust_enc.train.config import resolve_config
    from robust_enc.train.loop import train

    config = resolve_config(config_from_args(args))  # the run id, for the line a SIGTERM prints
    args.kept_in = str(Path(config.out_dir) / config.run_id)
    run_dir = train(config)
    if is_main_process():
        card = json.loads((run_dir / "model_card.json").read_text())
        top1, gbr = card.get("val_top1"), card.get("gbr")
        top1_text = f"{100 * top1:.2f}%" if isinstance(top1, (int, float)) else "not measured"
        gbr_text = f"{gbr:.4g}" if isinstance(gbr, (int, float)) else "not measured"
        print(f"{run_dir}: val top-1 {top1_text}, GBR {gbr_text}, checkpoint {card['checkpoint_hash']}")
    return 0
