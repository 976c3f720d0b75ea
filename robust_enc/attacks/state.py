"""The state of an evaluation that makes it resumable and shardable: per-(attack, eps) tallies, their reduction over
``torchrun`` ranks, and the progress file."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from robust_enc.io import write_text_atomic
from robust_enc.runtime.distributed import all_reduce_max, all_reduce_sum

log = logging.getLogger(__name__)


@dataclass
class Tally:
    """The counts of one (attack, eps) row over the batches seen so far (the clean row: attack "none", eps 0)."""

    n: int = 0  # examples counted
    clean1: int = 0  # right clean (top-1)
    clean5: int = 0  # right clean (top-5; top-1 again when top-5 is not reported)
    adv1: int = 0  # right clean and under the attack (top-1)
    attacked: int = 0  # examples the attack ran on (on the clean row: the clean gradient was taken on)
    zero_grad: int = 0  # clean row: examples with an all-zero clean loss gradient
    prob_like: int = 0  # clean row: examples whose outputs look like probabilities
    nonfinite: int = 0  # adversarial images with NaN/inf pixels
    roundtrip_checked: int = 0  # clean row: examples whose ART predict (numpy round trip) met the clean pass
    roundtrip_mismatch: int = 0  # of those, with another top-1
    ref_only: int = 0  # examples only the row's reference attack broke (the checks' inputs)
    self_only: int = 0  # examples only the row's attack broke
    prev_eps_only: int = 0  # examples the same attack broke only at the previous eps
    this_eps_only: int = 0  # examples it broke only at this eps
    max_pert: float = 0.0  # largest perturbation, in the row's norm (max over ranks)
    box_excess: float = 0.0  # farthest adversarial pixel outside [0, 1] (max over ranks)
    wall_s: float = 0.0  # summed over batches, max over ranks


SUM_FIELDS = tuple(f.name for f in fields(Tally) if f.type == "int")
MAX_FIELDS = tuple(f.name for f in fields(Tally) if f.type == "float")
TallyKey = tuple[str, float]  # (attack, eps)
Tallies = dict[TallyKey, Tally]
CLEAN: TallyKey = ("none", 0.0)


def all_reduce(tallies: Tallies, gbr_sums: list[float]) -> None:
    """Sum the counts, max the maxima, across ranks, in place (keys are the same on every rank: from the config)."""
    keys = sorted(tallies)
    sums = all_reduce_sum([getattr(tallies[k], f) for k in keys for f in SUM_FIELDS] + list(gbr_sums))
    maxima = all_reduce_max([getattr(tallies[k], f) for k in keys for f in MAX_FIELDS])
    for i, k in enumerate(keys):
        for j, f in enumerate(SUM_FIELDS):
            setattr(tallies[k], f, int(sums[i * len(SUM_FIELDS) + j]))
        for j, f in enumerate(MAX_FIELDS):
            setattr(tallies[k], f, float(maxima[i * len(MAX_FIELDS) + j]))
    gbr_sums[:] = sums[len(keys) * len(SUM_FIELDS):]


# ------------------------------------------------------------------------------------------------ progress file
def progress_path(out: Path, key: str) -> Path:
    """The progress file of one evaluation (``key``: its config, checkpoint, rank, world and the tallies' format):
    keyed by the run, not the results file, so runs that share one results file never resume (or discard) each
    other's progress; a file of an older format has another key, so it is never read."""
    return out.with_name(f"{out.name}.progress.{key}.json")


def load_progress(path: Path, key: str) -> tuple[int, Tallies] | None:
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        if state.get("key") != key:
            log.warning("progress file %s belongs to another config or checkpoint: starting afresh", path)
            return None
        tallies = {(row.pop("attack"), float(row.pop("eps"))): Tally(**row) for row in state["tallies"]}
        return int(state["next_batch"]), tallies
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        log.warning("ignoring unreadable progress file %s", path)
        return None


def save_progress(path: Path, key: str, next_batch: int, tallies: Tallies) -> None:
    rows = [{"attack": attack, "eps": eps, **asdict(t)} for (attack, eps), t in tallies.items()]
    write_text_atomic(path, json.dumps({"key": key, "next_batch": next_batch, "tallies": rows}))
