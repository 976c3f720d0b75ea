"""The state of an evaluation that makes it resumable and shardable: per-(attack, eps) tallies, their reduction over
``torchrun`` ranks, and the progress file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from robust_enc.io import write_text_atomic
from robust_enc.runtime.distributed import all_reduce_max, all_reduce_sum

log = logging.getLogger(__name__)

# zero_grad / attacked on the clean tally: examples with an all-zero clean loss gradient / examples it was taken on;
# roundtrip_*: examples whose ART predict (numpy round trip) was compared with the clean pass / disagreed;
# ref_only / self_only: examples only the row's reference attack / only the row's attack broke; prev_eps_only /
# this_eps_only: examples the same attack broke only at the previous eps / only at this one (the checks' inputs).
SUM_FIELDS = ("n", "clean1", "clean5", "adv1", "adv5", "attacked", "zero_grad", "prob_like", "nonfinite",
              "roundtrip_checked", "roundtrip_mismatch", "ref_only", "self_only", "prev_eps_only", "this_eps_only")
MAX_FIELDS = ("max_pert", "box_excess", "wall_s")  # wall_s: summed over batches, max over ranks
Tallies = dict[str, dict[str, float]]  # "attack@eps" -> counts and maxima


def tally_key(attack: str, eps: float) -> str:
    return f"{attack}@{eps!r}"


def new_tally() -> dict[str, float]:
    return {name: 0 for name in SUM_FIELDS} | {name: 0.0 for name in MAX_FIELDS}


def all_reduce(tallies: Tallies, gbr_sums: list[float]) -> None:
    """Sum the counts, max the maxima, across ranks, in place (keys are the same on every rank: from the config)."""
    keys = sorted(tallies)
    sums = all_reduce_sum([tallies[k][f] for k in keys for f in SUM_FIELDS] + list(gbr_sums))
    maxima = all_reduce_max([tallies[k][f] for k in keys for f in MAX_FIELDS])
    for i, k in enumerate(keys):
        row = sums[i * len(SUM_FIELDS):(i + 1) * len(SUM_FIELDS)]
        tallies[k].update({f: int(v) for f, v in zip(SUM_FIELDS, row)})
        tallies[k].update(dict(zip(MAX_FIELDS, maxima[i * len(MAX_FIELDS):(i + 1) * len(MAX_FIELDS)])))
    gbr_sums[:] = sums[len(keys) * len(SUM_FIELDS):]


# ------------------------------------------------------------------------------------------------ progress file
def progress_path(out: Path, key: str) -> Path:
    """The progress file of one evaluation (``key``: its config, checkpoint, rank and world): keyed by the run, not the
    results file, so runs that share one results file never resume (or discard) each other's progress."""
    return out.with_name(f"{out.name}.progress.{key}.json")


def load_progress(path: Path, key: str) -> tuple[int, Tallies] | None:
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        log.warning("ignoring unreadable progress file %s", path)
        return None
    if state.get("key") != key:
        log.warning("progress file %s belongs to another config or checkpoint: starting afresh", path)
        return None
    return int(state["next_batch"]), state["tallies"]


def save_progress(path: Path, key: str, next_batch: int, tallies: Tallies) -> None:
    write_text_atomic(path, json.dumps({"key": key, "next_batch": next_batch, "tallies": tallies}))
