#!/usr/bin/env bash
# The Fashion-MNIST evidence study, run across sessions on 2 CPU cores (6-14 hours in all, by machine).
#   run.sh start     two workers, one CPU thread each at nice 19, detached; each claims the next (row, seed) that is
#                    neither claimed nor already recorded in runs/ here, and runs it with `robust-enc reproduce`
#   run.sh collect   copy each finished model's small files (results, metrics, config, card; never the checkpoint)
#                    from the work folder into runs/ here, to be committed: the checkpoints live only on the machine
#                    that trained them, and a session's machine is not always kept for the next
#   run.sh status    how many models are recorded here, and the workers' last log lines
# The work folder is $STUDY_DIR (default /work/study). Workers import a frozen copy of the product (a git worktree
# at the commit they started from), so editing the checkout does not change a model halfway through.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
STUDY_DIR="${STUDY_DIR:-/work/study}"
ROWS="${ROWS:-baseline enc ls mixup cutmix enc+ls enc+cutmix+ls}"
SEEDS="${SEEDS:-1 2 0}"
# The preset's last evaluation, AutoAttack at 2/255, as its row reads in results.csv (columns attack, norm, eps)
LAST_EVAL='autoattack,linf,0.00784313725490196,'

finished() { [ -f "$1/results.csv" ] && grep -q "$LAST_EVAL" "$1/results.csv"; }

run_name() { echo "resnet20-fmnist-$1-s$2"; }

worker() {
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH="$STUDY_DIR/product"
  for seed in $SEEDS; do
    for row in $ROWS; do
      finished "$HERE/runs/$(run_name "$row" "$seed")" && continue
      mkdir "$STUDY_DIR/claims/$row-s$seed" 2>/dev/null || continue
      echo "$(date -u +%FT%TZ) worker $1 start $row s$seed" >> "$STUDY_DIR/log.txt"
      rc=0
      nice -n 19 "$REPO/.venv/bin/robust-enc" reproduce --preset "$STUDY_DIR/preset.json" --out "$STUDY_DIR/out" \
        --rows "$row" --seeds "$seed" > "$STUDY_DIR/logs/$row-s$seed.log" 2>&1 || rc=$?
      echo "$(date -u +%FT%TZ) worker $1 end $row s$seed rc=$rc" >> "$STUDY_DIR/log.txt"
    done
  done
}

case "${1:-}" in
  start)
    # A second pair of workers would reset the claims and train the same models into the same folders.
    if pgrep -f "run.sh worker" > /dev/null; then
      echo "workers are already running (see: $0 status); to restart, first: pkill -f 'run.sh worker'; pkill -f 'robust-enc reproduce'" >&2; exit 1
    fi
    [ -x "$REPO/.venv/bin/robust-enc" ] || make -C "$REPO" .venv/.installed-stamp
    mkdir -p "$STUDY_DIR/logs"
    rm -rf "$STUDY_DIR/claims" && mkdir -p "$STUDY_DIR/claims"
    [ -d "$STUDY_DIR/product" ] || git -C "$REPO" worktree add --detach "$STUDY_DIR/product" HEAD
    # The shipped preset without its weight-decay sweep (training only, not part of the AutoAttack columns).
    "$REPO/.venv/bin/python" -c 'import json, sys; p = json.load(open(sys.argv[1])); p.pop("sweep"); print(json.dumps(p))' \
      "$REPO/robust_enc/presets/fashion-mnist.json" > "$STUDY_DIR/preset.json"
    for w in 1 2; do setsid nohup "$0" worker "$w" > /dev/null 2>&1 < /dev/null & done
    echo "two workers started; their log: $STUDY_DIR/log.txt" ;;
  worker) worker "${2:?usage: run.sh worker N (run.sh start runs two)}" ;;
  collect)
    for run in "$STUDY_DIR"/out/runs/*/; do
      finished "$run" || continue
      dest="$HERE/runs/$(basename "$run")"
      mkdir -p "$dest" && cp "$run"/{config.json,metrics.csv,model_card.json,results.csv} "$dest/"
      echo "recorded $(basename "$run")"
    done ;;
  status)
    echo "recorded here: $(ls "$HERE/runs" 2>/dev/null | wc -l) of 21 models"
    tail -n 6 "$STUDY_DIR/log.txt" 2>/dev/null || echo "no worker has run in $STUDY_DIR" ;;
  *) echo "usage: $0 start|collect|status" >&2; exit 2 ;;
esac
