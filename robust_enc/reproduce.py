"""``robust-enc reproduce``: the paper's Table 3 study in one command.

For every row of a preset (baseline, ENC, Cutout, Mixup, CutMix, LS and the ENC combinations) and every seed: train
(skipped when finished, resumed when interrupted), attack the checkpoint with FGSM/PGD over an eps sweep with its GBR
measured on the same images (skipped when its rows are already there), then write the report. Presets are JSON files
in ``robust_enc/presets/`` (or any path): readable, editable.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from robust_enc.errors import UserError

log = logging.getLogger(__name__)

PRESET_NAMES = ("quick", "fashion-mnist", "cifar10", "imagenet")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model: str  # model registry name
    dataset: str  # data set registry name
    rows: tuple[str, ...]  # regularizer specs, one trained model each (per seed)
    seeds: tuple[int, ...] = (0,)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides
    attack: dict[str, Any] = field(default_factory=dict)  # AttackConfig overrides ("eps" may use k/255 strings)
    report: dict[str, Any] = field(default_factory=dict)  # build_report options (baseline)


def load_preset(name_or_path: str) -> Preset:
    """A shipped preset by name, or a JSON file of the same shape."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        text, name = path.read_text(), path.stem
    elif name_or_path in PRESET_NAMES:
        text, name = resources.files("robust_enc.presets").joinpath(f"{name_or_path}.json").read_text(), name_or_path
    else:
        raise UserError(f"unknown preset {name_or_path!r}: use one of {', '.join(PRESET_NAMES)} or a .json file")
    try:
        data = json.loads(text)
        known = set(Preset.__dataclass_fields__) - {"name"}
        unknown = set(data) - known
        if unknown:
            raise UserError(f"preset {name}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        data["rows"], data["seeds"] = tuple(data["rows"]), tuple(int(s) for s in data.get("seeds", [0]))
        return Preset(name=name, **data)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"preset {name} is malformed ({err.__class__.__name__}: {err})") from None


def plan(preset: Preset, out: Path, *, device: str = "auto", data_dir: str | None = None,
         epochs: int | None = None, workers: int | None = None) -> list[tuple[Any, Any]]:
    """(TrainConfig, AttackConfig) for every row x seed; validates every spec and setting before anything runs."""
    from robust_enc.attacks.registry import parse_eps
    from robust_enc.attacks.runner import AttackConfig
    from robust_enc.config import replace_checked
    from robust_enc.train.loop import TrainConfig, resolve_config

    train_overrides = dict(preset.train)
    attack_overrides = dict(preset.attack)
    if epochs is not None:
        train_overrides["epochs"] = epochs
    if workers is not None:
        train_overrides["workers"] = attack_overrides["workers"] = workers
    attack_overrides["eps"] = parse_eps(attack_overrides.get("eps", "1/255,2/255,4/255"))
    attack_overrides["attacks"] = tuple(attack_overrides.get("attacks", ("fgsm",)))
    pairs = []
    for spec in preset.rows:
        for seed in preset.seeds:
            train_config = resolve_config(replace_checked(
                TrainConfig(), model=preset.model, dataset=preset.dataset, data_dir=data_dir, regularizer=spec,
                seed=seed, device=device, out_dir=str(out / "runs"), resume=True, **train_overrides))
            run_dir = Path(train_config.out_dir) / train_config.run_id
            attack_config = replace_checked(AttackConfig(), checkpoint=str(run_dir), data_dir=data_dir, device=device,
                                            seed=seed, gbr=True, out=str(run_dir / "results.csv"), **attack_overrides)
            pairs.append((train_config, attack_config))
    return pairs


def _attack_done(attack_config: Any) -> bool:
    """Every (attack, eps) row of this config is already in the run's results for the current checkpoint."""
    from robust_enc.checkpoint import load_checkpoint
    from robust_enc.results import read_results

    results = Path(attack_config.out)
    if not results.is_file():
        return False
    ckpt_hash = load_checkpoint(attack_config.checkpoint).content_hash
    have = {(r.attack, round(r.eps, 9)) for r in read_results(results)
            if r.checkpoint_hash == ckpt_hash and r.subset == attack_config.subset}
    want = {(a, round(e, 9)) for a in attack_config.attacks for e in attack_config.eps} | {("none", 0.0)}
    return want <= have


def reproduce(preset: Preset, out: str | Path, *, device: str = "auto", data_dir: str | None = None,
              epochs: int | None = None, workers: int | None = None) -> dict[str, Path]:
    """Train, attack and measure every row x seed of ``preset`` under ``out``, then write the report to
    ``out/report``. Finished trainings and attacks are skipped, so an interrupted study resumes. Returns the report's
    files."""
    from robust_enc.attacks.runner import evaluate
    from robust_enc.reports import build_report
    from robust_enc.train.loop import train

    out = Path(out)
    pairs = plan(preset, out, device=device, data_dir=data_dir, epochs=epochs, workers=workers)
    start = time.perf_counter()
    for i, (train_config, attack_config) in enumerate(pairs, 1):
        log.warning("[%d/%d] %s", i, len(pairs), train_config.run_id)
        train(train_config)
        if _attack_done(attack_config):
            log.info("%s: attacks already done, skipped", train_config.run_id)
        else:
            evaluate(attack_config)
    log.warning("trained and attacked %d models in %.0f s", len(pairs), time.perf_counter() - start)
    return build_report([out / "runs"], out / "report", baseline=preset.report.get("baseline"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="quick",
                        help=f"{', '.join(PRESET_NAMES)} or a preset .json file (default: quick, on embedded data)")
    parser.add_argument("--out", type=Path, default=None, help="study folder (default: reports/<preset>)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds, overriding the preset's (e.g. 0,1,2)")
    parser.add_argument("--rows", default=None,
                        help="only these rows of the preset, separated by commas (e.g. baseline,enc)")
    parser.add_argument("--epochs", type=int, default=None, help="override the preset's training epochs")
    parser.add_argument("--data-dir", default=None, help="folder holding the data set files")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader worker processes")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from rich.console import Console

    from robust_enc.reports import make_report
    from robust_enc.reports.render import rich_table
    from robust_enc.reports.tables import select_threats

    preset = load_preset(args.preset)
    if args.seeds:
        try:
            preset = dataclasses.replace(preset, seeds=tuple(int(s) for s in args.seeds.split(",")))
        except ValueError:
            raise UserError(f"--seeds {args.seeds!r}: give integers separated by commas, e.g. 0,1,2") from None
    if args.rows:
        rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
        missing = [r for r in rows if r not in preset.rows]
        if missing:
            raise UserError(f"--rows {missing} are not rows of preset {preset.name}: {', '.join(preset.rows)}")
        preset = dataclasses.replace(preset, rows=rows)
    out = args.out or Path("reports") / preset.name
    plan(preset, out, device=args.device, data_dir=args.data_dir, epochs=args.epochs)  # bad settings fail first
    console = Console(stderr=True)
    console.print(f"[bold]robust-enc reproduce[/] preset [cyan]{preset.name}[/]: {preset.description}")
    written = reproduce(preset, out, device=args.device, data_dir=args.data_dir, epochs=args.epochs,
                        workers=args.workers)
    # The terminal gets the paper's view: FGSM (Table 3's attack) at every eps; the report has every attack.
    report = make_report([out / "runs"], baseline=preset.report.get("baseline"))
    view = select_threats(report.full_table3, attack="fgsm")
    Console(width=None if sys.stdout.isatty() else 200).print(
        rich_table(view, "table3", "Table 3 view: clean and FGSM top-1 (%), difference to the baseline, GBR"))
    print(f"report: {written['index.md']}  (tables: {out / 'report' / 'table3.md'}, "
          f"plots: {out / 'report' / 'plots'})")
    return 0
