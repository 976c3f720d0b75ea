"""The one results schema: a ``ResultRow`` per model x data set x attack x eps.

Numbers stay numbers: eps is a float in [0, 1] pixel units, accuracies are fractions in [0, 1]; only renderers show
percent or "4/255". The clean row is attack ``none`` with eps 0. ``adv_top1`` counts an example as robust only when it
is classified correctly both clean and under attack (RobustBench/AutoAttack), so ``adv_top1 <= clean_top1`` always.
Missing numbers (top-5 with <= 10 classes, GBR not measured) are NaN, an empty CSV cell / JSON null; a GBR that
overflowed is inf, written ``inf`` (a JSON string), never blank.

Reading is strict: every cell of every row must parse completely (see ``_parse_cell``), or the whole file is refused
with one line naming the row and column; a truncated file, a hand-edited typo or ``n=inf`` never becomes a number.
Appending takes a file lock, so concurrent writers into one results file keep each other's rows.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from robust_enc.errors import UserError
from robust_enc.io import locked, write_atomic

log = logging.getLogger(__name__)

SCHEMA_NAME = "robust-enc/results"
SCHEMA_VERSION = 5  # v5 drops v4's adv_top5 (an untargeted attack's top-5 is no robust top-5)
# Columns added in v2 (the scale-free GBR companions): a v1 file reads with them as NaN (not measured).
ADDED_IN_V2 = ("logit_spread", "gbr_scale_free", "gbr_loss")
# Added in v3 (the arithmetic of attacks and GBR): older files read with it empty (not recorded).
ADDED_IN_V3 = ("precision",)
# Added in v4 (what exactly was measured: the image set, its preprocessing, where the pixels came from, which weights):
# older files read with them empty (not recorded), and the report never merges such rows with recorded ones.
ADDED_IN_V4 = ("image_set", "preprocessing", "pixels", "weights")
ADDED_GROUPS = (ADDED_IN_V2, ADDED_IN_V3, ADDED_IN_V4)
DROPPED = ("adv_top5",)  # columns of older files that are read and ignored (adv_top5 was no robust top-5)
NAN = float("nan")


def library_versions() -> dict[str, str]:
    """Versions that every row and checkpoint records."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from robust_enc import __version__

    try:
        art = version("adversarial-robustness-toolbox")
    except PackageNotFoundError:
        art = ""
    return {"robust_enc_version": __version__, "torch_version": torch.__version__, "art_version": art}


def parse_eps_value(item: str | float, norm: str = "linf") -> float:
    """"8/255", "0.03" or 0.03 -> a float in pixel units: in [0, 1] for linf; >= 0 for l2, where the field's radii go
    past 1 (RobustBench's CIFAR-10 L2 eps is 0.5, ImageNet's common one 3.0)."""
    if isinstance(item, (int, float)):
        value = float(item)
    else:
        num, sep, den = item.strip().partition("/")
        try:
            value = float(num) / float(den) if sep else float(num)
        except (ValueError, ZeroDivisionError):
            raise UserError(f"bad eps {item!r}: give floats or k/255 fractions, e.g. 1/255,2/255,0.03") from None
    if norm == "l2":
        if not (math.isfinite(value) and value >= 0.0):
            raise UserError(f"L2 eps {item} = {value:g} must be a finite number >= 0 (pixel units, e.g. 0.5)")
    elif not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise UserError(f"eps {item} = {value:g} is outside [0, 1]: eps is in pixel units of images in [0, 1]; "
                        "write e.g. 8/255, not 8")
    return value


def parse_eps(text: str | float | Sequence[str | float], norm: str = "linf") -> tuple[float, ...]:
    """"1/255,2/255,0.03" (or a list of such items) -> sorted unique floats in pixel units (see ``parse_eps_value``)."""
    items = text.split(",") if isinstance(text, str) else ([text] if isinstance(text, (int, float)) else list(text))
    values = [parse_eps_value(item, norm) for item in items if not isinstance(item, str) or item.strip()]
    if not values:
        raise UserError("--eps needs at least one value, e.g. --eps 1/255,2/255,4/255")
    return tuple(sorted(set(values)))


@dataclass
class ResultRow:
    # what was evaluated
    run_id: str  # name of the training run (or of the weights file)
    model: str  # model registry name, e.g. "resnet20"
    regularizer: str  # canonical regularizer spec, e.g. "enc:variant=eq22,alpha=1+cutmix"
    dataset: str  # dataset registry name
    split: str  # "test", "val", ...
    subset: int  # requested subset size; 0 = the whole split
    # the threat
    attack: str  # attack registry name; "none" = clean row, "worst" = per-example worst case over attacks
    norm: str  # "linf", "l2" or "none"
    eps: float  # pixel units: [0, 1] for linf, up to sqrt(C*H*W) for l2
    steps: int = 0
    step_size: float = 0.0  # pixel units
    restarts: int = 0
    seed: int = 0
    # what was measured
    n: int = 0  # examples evaluated
    clean_top1: float = NAN  # fraction
    clean_top5: float = NAN
    adv_top1: float = NAN  # fraction correct clean AND adversarial
    gbr: float = NAN  # eq. 18 of the paper, on logits unless gbr_output says otherwise
    gbr_stderr: float = NAN
    gbr_output: str = ""
    logit_spread: float = NAN  # E ||z - mean_c z||^2 of the class-centred logits on the same examples as gbr
    gbr_scale_free: float = NAN  # gbr / logit_spread: unchanged when the logits are scaled (gbr on logits only)
    gbr_loss: float = NAN  # eq. 18 of the per-example cross-entropy (loss sensitivity), (nats / pixel)^2
    train_top1: float = NAN  # from the checkpoint, for the generalization gap
    weight_sq_norm: float = NAN  # sum of ||W||_F^2 over conv/linear weights (as used in forward)
    wall_s: float = NAN
    images_per_s: float = NAN
    flags: str = ""  # ";"-separated sanity-check failures (empty = all checks passed)
    # provenance
    checkpoint_hash: str = ""
    robust_enc_version: str = ""
    torch_version: str = ""
    art_version: str = ""
    precision: str = ""  # the arithmetic of the attacks and GBR, e.g. "fp32 (TF32 off, cudnn.benchmark off)"
    image_set: str = ""  # digest of the exact images evaluated (data set, split, index or file list); "" = not recorded
    preprocessing: str = ""  # the evaluation transform, e.g. "resize 256 bilinear, crop 224"; "" = not recorded
    pixels: str = ""  # where the pixels came from: "decoded", or "cache <key>" when the decode cache served them
    weights: str = ""  # which weights ran: a file's name, a library's pretrained tag, or "checkpoint"
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError when the row breaks the schema's invariants."""
        if not (0.0 <= self.eps <= 1.0 or (self.norm == "l2" and 0.0 <= self.eps < math.inf)):
            raise ValueError(f"eps {self.eps} outside [0, 1] pixel units (only an L2 eps may exceed 1)")
        if self.attack == "none" and self.eps != 0.0:
            raise ValueError("the clean row (attack 'none') must have eps 0")
        for name in ("clean_top1", "clean_top5", "adv_top1"):
            value = getattr(self, name)
            if not math.isnan(value) and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} is not a fraction in [0, 1]")
        both = not math.isnan(self.adv_top1) and not math.isnan(self.clean_top1)
        if both and self.adv_top1 > self.clean_top1 + 1e-12:
            raise ValueError(f"adv_top1 {self.adv_top1} > clean_top1 {self.clean_top1}")

    def key(self) -> tuple:
        """Identity of a measurement: rows with the same key are duplicates of one another. The provenance is part of
        it: the model's bytes and which weights file, the exact image set and its preprocessing (not ``pixels``: the
        cache serves the decoded pixels bit for bit)."""
        return (self.run_id, self.checkpoint_hash, self.dataset, self.split, self.subset, self.attack, self.norm,
                round(self.eps, 9), self.steps, round(self.step_size, 9), self.restarts, self.seed, self.weights,
                self.image_set, self.preprocessing)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELD_NAMES = [f.name for f in fields(ResultRow)]
_FIELD_TYPES = {f.name: f.type for f in fields(ResultRow)}


# What a cell read back must hold, beyond its type: text that may not be empty, numbers that must be given (not NaN),
# numbers that may be inf (an overflowed GBR, logit spread or weight norm), the least value of each integer. Every
# float is >= 0.
_NON_EMPTY = frozenset({"run_id", "model", "dataset", "split", "attack", "norm", "created_at"})
_REQUIRED_NUMBERS = frozenset({"eps", "step_size", "clean_top1", "adv_top1"})
_MAY_BE_INF = frozenset({"gbr", "gbr_stderr", "logit_spread", "gbr_scale_free", "gbr_loss", "weight_sq_norm"})
_LEAST_INT = {"n": 1, "subset": 0, "steps": 0, "restarts": 0, "seed": 0}
NORMS = ("linf", "l2", "none")
_INTEGER = re.compile(r"^[+-]?\d+$")


def _parse_cell(name: str, value: Any) -> Any:
    """One cell (CSV text or a JSON value) as its field's type; ValueError says what is wrong with it."""
    kind = _FIELD_TYPES[name]
    if value is None and kind != "float":  # JSON null (CSV rows lacking cells are refused before)
        raise ValueError("missing")
    if kind == "int":
        if isinstance(value, bool) or not (isinstance(value, int) or _INTEGER.match(str(value).strip())):
            raise ValueError(f"{value!r} is not an integer")
        number = int(value)
        if number < _LEAST_INT[name]:
            raise ValueError(f"{number} is below {_LEAST_INT[name]}")
        return number
    if kind == "float":
        if value is None or value == "" or (isinstance(value, str) and value.strip().lower() == "nan"):
            number = NAN
        elif isinstance(value, bool):
            raise ValueError(f"{value!r} is not a number")
        else:
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{value!r} is not a number") from None
        if math.isnan(number):
            if name in _REQUIRED_NUMBERS:
                raise ValueError("empty, but this number is required")
            return number
        if math.isinf(number) and (name not in _MAY_BE_INF or number < 0):
            raise ValueError(f"{value!r} is not a finite number")
        if number < 0:
            raise ValueError(f"{number} is negative")
        return number
    text = str(value)
    if name in _NON_EMPTY and not text.strip():
        raise ValueError("empty")
    if name == "norm" and text not in NORMS:
        raise ValueError(f"{text!r} is not one of {', '.join(NORMS)}")
    if name == "created_at":
        try:
            datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{text!r} is not an ISO date-time (the file may be truncated)") from None
    return text


def row_from_dict(data: dict[str, Any], *, source: str = "results", row: int | None = None) -> ResultRow:
    """One row read back; every cell must parse (``_parse_cell``) or a UserError names the row and column."""
    where = f"{source}: row {row}" if row is not None else source
    if not isinstance(data, dict):
        raise UserError(f"{where}: a results row must be an object of column -> value, got {type(data).__name__} "
                        f"{str(data)[:40]!r}; re-create the file with robust-enc")
    if None in data:  # csv.DictReader's key for cells beyond the header
        raise UserError(f"{where} has {len(data[None])} more cells than the header; the file is refused: fix that "
                        "row or re-create the file")
    data = {k: v for k, v in data.items() if k not in DROPPED}
    for added in ADDED_GROUPS:  # a row of an older version: what it lacks was not measured
        if all(n not in data for n in added):
            data = {**data, **dict.fromkeys(added, "")}
    missing = [n for n in FIELD_NAMES if n not in data]
    extra = [n for n in data if n not in _FIELD_TYPES]
    if missing or extra:
        raise UserError(
            f"{source}: not a robust-enc v{SCHEMA_VERSION} results file (missing columns {missing[:5]}, unknown "
            f"{extra[:5]}); re-create it with this version of robust-enc"
        )
    values = {}
    for name in FIELD_NAMES:
        try:
            values[name] = _parse_cell(name, data[name])
        except ValueError as err:
            raise UserError(f"{where}, column {name!r}: {err}; the file is refused: fix that row or re-create the "
                            "file") from None
    try:
        return ResultRow(**values)
    except (TypeError, ValueError) as err:
        raise UserError(f"{where}: invalid row ({err}); the file is refused: fix that row or re-create the "
                        "file") from None


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


def _nan_to_empty(value: Any) -> Any:
    return "" if isinstance(value, float) and math.isnan(value) else value


def check_writable(path: Path, rows: Sequence[ResultRow]) -> None:
    """Each row's cells as the file will hold them must pass the reader's rules (``_parse_cell``): a row written and
    read back never fails (a checkpoint metric ``train_top1 = -0.5`` would block every later run on the file)."""
    for i, r in enumerate(rows, 1):
        for name, value in r.to_dict().items():
            try:
                _parse_cell(name, str(_nan_to_empty(value)) if _FIELD_TYPES[name] != "str" else value)
            except ValueError as err:
                raise UserError(f"{path}: refusing to write row {i} ({r.run_id}, {r.attack} eps {r.eps:.4g}): column "
                                f"{name!r}: {err}; nothing was written") from None


ACCURACIES = tuple(name for name in ("clean_top1", "clean_top5", "adv_top1", "adv_top5") if name in FIELD_NAMES)


def measurement_problems(rows: Sequence[ResultRow]) -> list[str]:
    """What makes rows of measurements impossible: an accuracy that is not k/n for an integer k, or a clean_top1 that
    contradicts the clean ('none') row of the same evaluation (same run, weights, model hash, image set and n)."""
    problems = []
    for r in rows:
        for name in ACCURACIES:
            value = getattr(r, name)
            if not math.isnan(value) and abs(value * r.n - round(value * r.n)) > 1e-6:
                problems.append(f"{r.run_id} {r.attack} eps {r.eps:.4g}: {name} {value:g} is not k/{r.n} for an "
                                "integer k")
    clean = {(r.run_id, r.weights, r.checkpoint_hash, r.image_set, r.n): r for r in rows
             if r.attack == "none" and r.image_set}
    for r in rows:
        ref = clean.get((r.run_id, r.weights, r.checkpoint_hash, r.image_set, r.n))
        if ref is not None and abs(r.clean_top1 - ref.clean_top1) > 1e-9:
            problems.append(f"{r.run_id} {r.attack} eps {r.eps:.4g}: clean_top1 {r.clean_top1:g} contradicts the "
                            f"clean row's {ref.clean_top1:g} on the same images")
    return problems


def write_results(path: str | Path, rows: Iterable[ResultRow]) -> Path:
    """Write rows atomically; the format follows the suffix (.csv or .json). Rows that would not read back are
    refused first (``check_writable``)."""
    path = Path(path)
    rows = list(rows)
    check_writable(path, rows)
    if path.suffix == ".json":
        # JSON has no NaN or inf: NaN (not measured) becomes null, inf (overflowed) the string "inf".
        payload = {"schema": SCHEMA_NAME, "version": SCHEMA_VERSION,
                   "rows": [{k: _json_number(v) for k, v in r.to_dict().items()} for r in rows]}
        return write_atomic(path, lambda f: json.dump(payload, f, indent=1, allow_nan=False))

    def write_csv(f) -> None:
        writer = csv.DictWriter(f, fieldnames=FIELD_NAMES)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _nan_to_empty(v) for k, v in r.to_dict().items()})

    return write_atomic(path, write_csv)


def read_results(path: str | Path) -> list[ResultRow]:
    """Read a .csv or .json results file; a file of another schema raises a UserError saying so."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"results file {path} does not exist")
    try:
        return _read_results(path)
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start}); results files are "
                        "UTF-8 CSV or JSON") from None


def _read_results(path: Path) -> list[ResultRow]:
    if path.suffix == ".json":
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(payload, dict) or payload.get("schema") != SCHEMA_NAME:
            raise UserError(f"{path}: not a robust-enc results file (no '\"schema\": \"{SCHEMA_NAME}\"')")
        if payload.get("version") not in range(1, SCHEMA_VERSION + 1):
            raise UserError(f"{path}: results schema v{payload.get('version')}, this robust-enc reads "
                            f"v{SCHEMA_VERSION}; re-create the file")
        rows = payload.get("rows", [])
        if not isinstance(rows, list):
            raise UserError(f"{path}: \"rows\" must be a list of row objects, got {type(rows).__name__}")
        return [row_from_dict(d, source=str(path), row=i) for i, d in enumerate(rows, 1)]
    try:
        return _read_csv(path)
    except csv.Error as err:  # e.g. a cell over csv's field size limit (131,072 characters)
        raise UserError(f"{path}: not a results CSV ({err}); the file is refused: re-create it with robust-enc") \
            from None


def _read_csv(path: Path) -> list[ResultRow]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        # Today's header, or it without any of the column groups added since v1 (v3's lacks v4's group, v1's all);
        # the columns dropped since (v4's adv_top5) are read and ignored.
        accepted = [[n for n in FIELD_NAMES if not any(n in group for group in dropped)]
                    for dropped in itertools.chain.from_iterable(
                        itertools.combinations(ADDED_GROUPS, k) for k in range(len(ADDED_GROUPS) + 1))]
        if [n for n in reader.fieldnames or [] if n not in DROPPED] not in accepted:
            raise UserError(f"{path}: CSV header does not match the robust-enc v{SCHEMA_VERSION} results schema "
                            f"(expected {len(FIELD_NAMES)} columns starting {FIELD_NAMES[:3]})")
        rows = []
        for i, data in enumerate(reader, 1):
            if None in data.values():  # csv.DictReader's value for cells the row lacks
                missing = next(name for name, value in data.items() if value is None)
                raise UserError(f"{path}: row {i}, column {missing!r}: missing (the row has fewer cells than the "
                                "header: the file may be truncated); the file is refused: fix that row or re-create "
                                "the file")
            rows.append(row_from_dict(data, source=str(path), row=i))
        return rows


def check_results_target(path: str | Path) -> Path:
    """Fail before any work when rows could not be appended to ``path`` later: a folder in its place, a wrong suffix,
    or an existing file that is not a readable results file."""
    path = Path(path)
    if path.suffix not in (".csv", ".json"):
        raise UserError(f"results file {path} must end in .csv or .json")
    if path.is_dir():
        raise UserError(f"results file {path} is a folder; give a file name ending in .csv or .json")
    if path.exists():
        read_results(path)  # refused now, not after the whole evaluation
    return path


def _replaces(new: Sequence[ResultRow]) -> Any:
    """Which old rows the ``new`` ones replace: a row of the same measurement (same ``key``, provenance included),
    and a row of an older checkpoint of the same run folder (``weights`` "checkpoint", same run and data set, another
    hash: the run was retrained in place, its old checkpoint is gone). Rows of any other weights file, or of an
    unrecorded source (older files), are never replaced by another hash's."""
    keys = {r.key() for r in new}
    retrained = {(r.run_id, r.dataset): r.checkpoint_hash for r in new if r.weights == "checkpoint"}

    def replaced(r: ResultRow) -> str:
        if r.key() in keys:
            return "same measurement"
        current = retrained.get((r.run_id, r.dataset))
        if r.weights == "checkpoint" and current is not None and current != r.checkpoint_hash:
            return f"earlier checkpoint {r.checkpoint_hash}"
        return ""

    return replaced


def append_results(path: str | Path, rows: Iterable[ResultRow]) -> Path:
    """Add rows to a results file atomically (read, extend, rewrite, under a lock so concurrent writers take turns),
    replacing only rows of the same measurement and the rows of earlier checkpoints of the same run folder (see
    ``_replaces``; each replacement is logged). Rows that are not measurements (``measurement_problems``) are
    refused with one line."""
    path = Path(path)
    new = list(rows)
    if problems := measurement_problems(new):
        raise UserError(f"{path}: refusing {len(problems)} impossible row(s): {problems[0]}; nothing was written")
    replaced = _replaces(new)
    with locked(path):
        old = read_results(path) if path.exists() else []
        for why in sorted({why for r in old if (why := replaced(r))}):
            dropped = [r for r in old if replaced(r) == why]
            # Re-measuring is routine (info); a retrained run's rows going is worth a warning.
            log.log(logging.INFO if why == "same measurement" else logging.WARNING, "%s: replaced %d row(s) of %s (%s)",
                    path, len(dropped), ", ".join(sorted({r.run_id for r in dropped})), why)
        return write_results(path, [r for r in old if not replaced(r)] + new)
