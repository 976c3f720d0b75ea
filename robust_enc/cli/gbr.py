"""``robust-enc gbr``: the Generalization Bound Regularizer (paper eq. 18) of a model, with its error bars."""

from __future__ import annotations

import argparse
import json
import math

from robust_enc.cli.common import (
    add_channels_last_argument,
    add_data_arguments,
    add_device_argument,
    add_model_arguments,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from robust_enc.gbr import OUTPUTS

    add_model_arguments(parser)
    add_data_arguments(parser, default_dataset=None)  # default: the checkpoint's data set
    parser.add_argument("--split", default="", help="data split (default: test, or val where there is no test)")
    gbr = parser.add_argument_group("gbr")
    gbr.add_argument("--output", default="logits", help=f"what f is: {', '.join(OUTPUTS.names())} (default: logits)")
    gbr.add_argument("--method", default="auto", help="auto (exact up to --max-exact-classes outputs), exact or "
                                                      "hutchinson (random projections)")
    gbr.add_argument("--probes", type=int, default=4, help="Rademacher probes per example for hutchinson")
    gbr.add_argument("--max-exact-classes", type=int, default=100, help="auto uses exact up to this many outputs")
    gbr.add_argument("--train-mode", action="store_true",
                     help="measure in train mode: BN uses each batch's statistics and each example's own Jacobian "
                          "block is taken, which costs --batch-size times the eval-mode backward passes")
    gbr.add_argument("--seed", type=int, default=0, help="seed of the hutchinson probes")
    add_device_argument(parser)
    add_channels_last_argument(parser, "measuring")
    parser.add_argument("--json", default=None, help="also write the result (and its provenance) to this JSON file")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from robust_enc.checkpoint import state_hash
    from robust_enc.cli.common import preprocessing_overrides
    from robust_enc.data import build_dataset, build_loader, evaluation_split
    from robust_enc.gbr import check_options, measure_gbr
    from robust_enc.io import write_text_atomic
    from robust_enc.model_sources import ModelSource, completed, preprocessing_text
    from robust_enc.preprocessing import Overrides
    from robust_enc.results import library_versions
    from robust_enc.runtime.device import resolve_device

    check_options(args.output, args.method, args.probes, args.max_exact_classes)  # fail before loading anything
    overrides = Overrides(**preprocessing_overrides(args))
    device = resolve_device(args.device)
    source = ModelSource.open(checkpoint=args.checkpoint, model=args.model, weights=args.weights)
    prep = source.preprocessing(overrides)
    name = source.dataset(args.dataset)
    dataset, info = build_dataset(name, args.split or evaluation_split(name), data_dir=args.data_dir,
                                  download=args.download, subset=args.subset, image_size=source.image_size,
                                  preprocessing=prep)
    prep = completed(prep, info, overrides)
    model = source.build(info, prep)
    ckpt = source.checkpoint
    if ckpt is not None:
        provenance = {"run_id": ckpt.run_id, "checkpoint": ckpt.path, "checkpoint_hash": ckpt.content_hash,
                      "model": ckpt.spec.name, "regularizer": ckpt.spec.regularizer}
    else:
        provenance = {"run_id": source.run_name, "model": source.model, "regularizer": "baseline",
                      "checkpoint_hash": state_hash(model.state_dict())}
    provenance.update(weights=source.weights_label, preprocessing=preprocessing_text(prep, info),
                      image_set=info.image_set, pixels=info.pixels)
    loader = build_loader(dataset, batch_size=args.batch_size, workers=args.workers)
    result = measure_gbr(model, loader, output=args.output, method=args.method, probes=args.probes, device=device,
                         train_mode=args.train_mode, seed=args.seed, max_exact_classes=args.max_exact_classes,
                         channels_last=args.channels_last)

    console = Console()
    probes = f", {result.probes} probes" if result.method == "hutchinson" else ""
    mode = "train" if args.train_mode else "eval"
    console.print(f"[bold]GBR[/bold] ({result.output}, {result.method}{probes}, {mode} mode) of "
                  f"{escape(str(provenance['run_id']))} on {escape(info.name)}/{escape(info.split)}: "
                  f"[bold]{result.mean:.6g}[/bold] ± {result.stderr:.3g} (stderr)")
    # escape: rich reads "[nan, nan]" (n = 1) as a markup tag and drops it.
    console.print(escape(f"  95% CI [{result.ci_low:.6g}, {result.ci_high:.6g}], n = {result.n}; per sample median "
                         f"{result.median:.4g}, p05 {result.p05:.4g}, p95 {result.p95:.4g}; {result.wall_s:.1f} s"))
    if math.isfinite(result.logit_spread):
        scale_free = f"GBR / spread {result.gbr_scale_free:.4g}, " if math.isfinite(result.gbr_scale_free) else ""
        console.print(escape(f"  scale-free: logit spread {result.logit_spread:.4g}, {scale_free}"
                             f"loss GBR {result.gbr_loss:.4g}"))
    if args.json:
        payload = {**provenance, "dataset": info.name, "split": info.split, "subset": args.subset,
                   "train_mode": args.train_mode, "seed": args.seed, "device": str(device),
                   **result.to_dict(), **library_versions()}
        # JSON has no NaN or inf: NaN (undefined) becomes null, an overflowed GBR the string "inf".
        payload = {k: ((None if math.isnan(v) else str(v)) if isinstance(v, float) and not math.isfinite(v) else v)
                   for k, v in payload.items()}
        write_text_atomic(args.json, json.dumps(payload, indent=2, allow_nan=False) + "\n")
        console.print(f"  wrote {escape(str(args.json))}")
    return 0
