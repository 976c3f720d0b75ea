"""``robust-enc reproduce``: the paper's Table 3 study in one command.

For every row of a preset (baseline, ENC, Cutout, Mixup, CutMix, LS and the ENC combinations) and every seed: train
(skipped when finished, resumed when interrupted), attack the checkpoint with FGSM/PGD over an eps sweep with its GBR
measured on the same images (skipped when its rows are already there), then write the report. Presets are JSON files
in ``robust_enc/presets/`` (or any path): readable, editable.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from robust_enc.errors import UserError
from robust_enc.runtime.distributed import is_main_process
from robust_enc.runtime.progress import task

if TYPE_CHECKING:
    from robust_enc.reports import Report

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
    # AttackConfig overrides ("eps" may use k/255 strings); a list of them = one evaluation each, e.g. FGSM over an eps
    # sweep on every image beside AutoAttack at one eps on a subset (AutoAttack costs ~1,000 gradients per image)
    attack: dict[str, Any] | list[dict[str, Any]] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)  # build_report options (baseline)
    # The paper's Figures 1 and 3: {"weight_decay": [0, 1e-4, ...], "row": "baseline", "against": "enc"} trains
    # ``row`` (first seed) once per weight decay and plots GBR per epoch beside ``against``; training only.
    sweep: dict[str, Any] = field(default_factory=dict)


def load_preset(name_or_path: str) -> Preset:
    """A shipped preset by name, or a JSON file of the same shape."""
    path = Path(name_or_path)
    try:
        if path.suffix == ".json" and path.is_file():
            text, name = path.read_text(encoding="utf-8"), path.stem
        elif name_or_path in PRESET_NAMES:
            text = resources.files("robust_enc.presets").joinpath(f"{name_or_path}.json").read_text(encoding="utf-8")
            name = name_or_path
        else:
            raise UserError(f"unknown preset {name_or_path!r}: use one of {', '.join(PRESET_NAMES)} or a .json file")
    except UnicodeDecodeError as err:
        raise UserError(f"preset {name_or_path}: not a UTF-8 text file ({err.reason})") from None
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise UserError(f"preset {name}: must be a JSON object with keys rows, model, dataset, ...")
        known = set(Preset.__dataclass_fields__) - {"name"}
        unknown = set(data) - known
        if unknown:
            raise UserError(f"preset {name}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        # A bare string would be split into characters by tuple(): "baseline" -> 'b', 'a', ...
        for key, example in (("rows", '["baseline", "enc"]'), ("seeds", "[0, 1, 2]")):
            if key in data and not isinstance(data[key], list):
                raise UserError(f"preset {name}: \"{key}\" must be a list, e.g. {example}; got {data[key]!r}")
        if not all(isinstance(r, str) and r.strip() for r in data["rows"]):
            raise UserError(f"preset {name}: \"rows\" must be regularizer specs (strings), got {data['rows']!r}")
        try:
            seeds = tuple(int(s) for s in data.get("seeds", [0]))
        except (TypeError, ValueError):
            raise UserError(f"preset {name}: \"seeds\" must be integers, e.g. [0, 1, 2]; "
                            f"got {data['seeds']!r}") from None
        data["rows"], data["seeds"] = tuple(data["rows"]), seeds
        for section in data.get("attack") if isinstance(data.get("attack"), list) else [data.get("attack")]:
            only = section.get("rows") if isinstance(section, dict) else None
            if only is not None and (not isinstance(only, list) or not set(only) <= set(data["rows"])):
                raise UserError(f"preset {name}: an attack section's \"rows\" must be a list of the preset's rows "
                                f"({', '.join(data['rows'])}), got {only!r}")
        return Preset(name=name, **data)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"preset {name} is malformed ({err.__class__.__name__}: {err})") from None


def plan(preset: Preset, out: Path, *, device: str = "auto", data_dir: str | None = None,
         epochs: int | None = None, workers: int | None = None) -> list[tuple[Any, Any]]:
    """(TrainConfig, AttackConfig) for every row x seed x evaluation that runs on the row; validates every spec and
    setting before anything runs."""
    from robust_enc.attacks.config import AttackConfig
    from robust_enc.attacks.registry import parse_attacks
    from robust_enc.config import replace_checked
    from robust_enc.results import parse_eps
    from robust_enc.train.config import TrainConfig, resolve_config

    train_overrides = dict(preset.train)
    if epochs is not None:
        train_overrides["epochs"] = epochs
    if workers is not None:
        train_overrides["workers"] = workers
    evaluations = []
    for i, section in enumerate(preset.attack if isinstance(preset.attack, list) else [preset.attack]):
        if not isinstance(section, dict):
            raise UserError(f"preset {preset.name}: \"attack\" must be an object or a list of objects, got {section!r}")
        attack_overrides = dict(section)
        # "rows": the regularizer specs this evaluation runs on (default every row), e.g. AutoAttack only on the
        # rows a demo compares, where it would cost minutes per model on all of them
        only = attack_overrides.pop("rows", None)  # checked against the preset's rows by load_preset
        if workers is not None:
            attack_overrides["workers"] = workers
        attack_overrides["eps"] = parse_eps(attack_overrides.get("eps", "1/255,2/255,4/255"),
                                            attack_overrides.get("norm", "linf"))
        attack_overrides["attacks"] = parse_attacks(attack_overrides.get("attacks", ("fgsm",)))
        attack_overrides.setdefault("gbr", i == 0)  # GBR once per model, with the first evaluation
        evaluations.append((attack_overrides, None if only is None else set(only)))
    pairs = []
    for spec in preset.rows:
        for seed in preset.seeds:
            train_config = resolve_config(replace_checked(
                TrainConfig(), model=preset.model, dataset=preset.dataset, data_dir=data_dir, regularizer=spec,
                seed=seed, device=device, out_dir=str(out / "runs"), resume=True, **train_overrides))
            run_dir = Path(train_config.out_dir) / train_config.run_id
            for attack_overrides, rows in evaluations:
                if rows is not None and spec not in rows:
                    continue
                attack_config = replace_checked(AttackConfig(), checkpoint=str(run_dir), data_dir=data_dir,
                                                device=device, seed=seed, out=str(run_dir / "results.csv"),
                                                **attack_overrides)
                pairs.append((train_config, attack_config))
    return pairs


SWEEP_DIR = "wd-sweep"  # under the study folder, beside runs/: the sweep's runs are not Table 3 rows
SWEEP_PLOT = "gbr_weight_decay.png"


def sweep_plan(preset: Preset, out: Path, *, device: str = "auto", data_dir: str | None = None,
               epochs: int | None = None, workers: int | None = None) -> list[Any]:
    """TrainConfigs of the weight-decay sweep (``Preset.sweep``): ``row`` at each weight decay, first seed, under
    ``out/wd-sweep/`` with run ids ``<model>-<data>-<row>-wd<lambda>-s<seed>``; [] without a sweep."""
    from robust_enc.config import replace_checked
    from robust_enc.regularizers import run_name
    from robust_enc.train.config import TrainConfig, dataset_short, resolve_config

    if not preset.sweep:
        return []
    unknown = set(preset.sweep) - {"weight_decay", "row", "against"}
    values = preset.sweep.get("weight_decay")
    if unknown or not isinstance(values, list) or not values:
        raise UserError(f"preset {preset.name}: \"sweep\" must be {{\"weight_decay\": [0, 1e-4, ...], \"row\": "
                        f"\"baseline\", \"against\": \"enc\"}}; got {preset.sweep!r}")
    row, seed = preset.sweep.get("row", "baseline"), preset.seeds[0]
    overrides = dict(preset.train, **({"epochs": epochs} if epochs is not None else {}),
                     **({"workers": workers} if workers is not None else {}))
    configs = []
    for wd in values:
        run_id = f"{preset.model}-{dataset_short(preset.dataset)}-{run_name(row)}-wd{float(wd):g}-s{seed}"
        configs.append(resolve_config(replace_checked(
            TrainConfig(), model=preset.model, dataset=preset.dataset, data_dir=data_dir, regularizer=row, seed=seed,
            device=device, out_dir=str(out / SWEEP_DIR), resume=True, run_id=run_id,
            **{**overrides, "weight_decay": float(wd)})))
    return configs


def plot_sweep(preset: Preset, sweep: list[Any], pairs: list[tuple[Any, Any]], path: Path) -> Path | None:
    """GBR per epoch of the sweep's runs, of ``row`` at the preset's weight decay and of ``against`` (first seed):
    the analogue of the paper's Figures 1 and 3, one plot."""
    import pandas as pd

    from robust_enc.regularizers import canonical_spec
    from robust_enc.reports.plots import plot_gbr_over_epochs

    seed = preset.seeds[0]
    row, against = preset.sweep.get("row", "baseline"), preset.sweep.get("against", "enc")
    row_spec = canonical_spec(row)
    wanted = {row_spec: f"{row} λ={float(preset.train.get('weight_decay', 0)):g}", canonical_spec(against): against}
    runs = [(f"{row} λ={c.weight_decay:g}", c) for c in sweep]
    runs += [(wanted[t.regularizer], t) for t, _ in dict.fromkeys(pairs) if t.seed == seed and t.regularizer in wanted]
    # The legend in the paper's order: the row at increasing weight decay (the preset's own among them), then `against`.
    runs.sort(key=lambda item: (item[1].regularizer != row_spec, item[1].weight_decay))
    histories = {}
    for label, config in dict.fromkeys(runs):
        metrics = Path(config.out_dir) / config.run_id / "metrics.csv"
        if metrics.is_file():
            histories[label] = pd.read_csv(metrics)
    return plot_gbr_over_epochs(histories, path, title=f"GBR during training: weight decay vs {against} "
                                                        f"({preset.model}, {preset.dataset})")


def _attack_done(attack_config: Any) -> bool:
    """Every row this config would write is already in the run's results for the current checkpoint: the same
    attacks, eps, norm, steps, step size and restarts (as the attack registry resolves them), subset and seed, with a
    finite GBR when the config measures it. Rows of another config (a PGD-3 sweep when PGD-10 is asked) do not
    count."""
    from robust_enc.attacks.registry import ATTACKS
    from robust_enc.checkpoint import load_checkpoint
    from robust_enc.results import parse_eps, read_results

    results = Path(attack_config.out)
    if not results.is_file():
        return False
    ckpt = load_checkpoint(attack_config.checkpoint)
    settings = attack_config.settings()
    plans = [ATTACKS.get(a).plan(a, settings, ckpt.spec.num_classes) for a in attack_config.attacks]
    eps = parse_eps(attack_config.eps, attack_config.norm)

    def threat(attack: str, norm: str, e: float, steps: int = 0, step_size: float = 0.0, restarts: int = 0) -> tuple:
        return attack, norm, round(e, 9), steps, round(step_size, 9), restarts

    want = {threat("none", "none", 0.0)}
    want |= {threat(p.name, p.norm, e, p.steps, p.step_size_at(e) if e > 0 else 0.0, p.restarts)
             for p in plans for e in eps}
    if len(plans) > 1:  # the per-example worst case over the attacks
        want |= {threat("worst", attack_config.norm, e) for e in eps}
    have = {threat(r.attack, r.norm, r.eps, r.steps, r.step_size, r.restarts) for r in read_results(results)
            if r.checkpoint_hash == ckpt.content_hash and r.subset == attack_config.subset
            and r.seed == attack_config.seed and (not attack_config.gbr or math.isfinite(r.gbr))}
    return want <= have


def sanity_flags(pairs: list[tuple[Any, Any]]) -> list[str]:
    """Every sanity flag in the study's results for the current checkpoints, one line each (for the end panel)."""
    from robust_enc.attacks.checks import flag_lines
    from robust_enc.checkpoint import load_checkpoint
    from robust_enc.results import read_results

    lines: list[str] = []
    for out, checkpoint in dict.fromkeys((a.out, a.checkpoint) for _, a in pairs):
        if Path(out).is_file():
            current = load_checkpoint(checkpoint).content_hash
            lines += flag_lines([r for r in read_results(out) if r.checkpoint_hash == current])
    return lines


def reproduce(preset: Preset, out: str | Path, *, device: str = "auto", data_dir: str | None = None,
              epochs: int | None = None, workers: int | None = None) -> tuple[Report | None, dict[str, Path]]:
    """Train, attack and measure every row x seed of ``preset`` under ``out``, then write the report to
    ``out/report`` (Table 3 rows in the preset's order). Finished trainings and attacks are skipped, so an
    interrupted study resumes. Returns the report and its files; (None, {}) on the other ranks under torchrun, where
    only rank 0 writes the report."""
    from robust_enc.attacks.evaluation import evaluate
    from robust_enc.reports import make_report, write_report
    from robust_enc.train.loop import train

    out = Path(out)
    pairs = plan(preset, out, device=device, data_dir=data_dir, epochs=epochs, workers=workers)
    sweep = sweep_plan(preset, out, device=device, data_dir=data_dir, epochs=epochs, workers=workers)
    start = time.perf_counter()
    trained = set()
    main_process = is_main_process()
    with task(f"study {preset.name}", len(pairs) + len(sweep), show=main_process) as study:
        for i, (train_config, attack_config) in enumerate(pairs, 1):
            log.info("[%d/%d] %s: %s", i, len(pairs), train_config.run_id, ",".join(attack_config.attacks))
            study.update(info=train_config.run_id)
            if train_config.run_id not in trained:  # a model with several evaluations is trained once
                train(train_config)
                trained.add(train_config.run_id)
            if _attack_done(attack_config):
                log.info("%s: attacks already done, skipped", train_config.run_id)
            else:
                evaluate(attack_config)
            study.update(advance=1)
        for i, train_config in enumerate(sweep, 1):
            log.info("[sweep %d/%d] %s", i, len(sweep), train_config.run_id)
            study.update(info=train_config.run_id)
            train(train_config)
            study.update(advance=1)
    log.info("trained and attacked %d models in %.0f s", len(trained), time.perf_counter() - start)
    if not main_process:
        return None, {}
    report = make_report([out / "runs"], baseline=preset.report.get("baseline"), link_base=out / "report",
                         order=preset.rows)
    written = write_report(report, out / "report")
    if sweep and (figure := plot_sweep(preset, sweep, pairs, out / "report" / "plots" / SWEEP_PLOT)) is not None:
        written[f"plots/{SWEEP_PLOT}"] = figure
    return report, written
