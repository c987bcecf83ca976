#!/usr/bin/env bash
# Reproduce the shipped demo model from scratch: autoencoder, then DiT. Resumable: run the same command again.
#
#   scripts/train_demo.sh                 # train (AE, then DiT until stopped); extra args go to train_dit
#   scripts/train_demo.sh export          # export the latest checkpoints to src/qsilk/assets/demo (+ docs images)
#
# Env: PY (python), RUN (run folder, default runs/demo), DEVICE (cpu|cuda), THREADS (1), AE_PRESET, AE_STEPS,
# AE_ARGS (extra train_ae arguments).
# The training code is snapshotted into $RUN/code at start, so edits to the working tree cannot break a long run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/demo}
DEVICE=${DEVICE:-cpu}
THREADS=${THREADS:-1}
AE_PRESET=${AE_PRESET:-narrow}
AE_STEPS=${AE_STEPS:-2400}
export PYTHONUNBUFFERED=1

mkdir -p "$RUN/code"
rm -rf "$RUN/code/qsilk_demo_train"
cp -r src/qsilk/models/demo "$RUN/code/qsilk_demo_train"
export PYTHONPATH="$(cd "$RUN/code" && pwd)${PYTHONPATH:+:$PYTHONPATH}"

if [ "${1:-train}" = export ]; then
    shift
    exec "$PY" -m qsilk_demo_train.export --ae-dir "$RUN/ae" --dit-dir "$RUN/dit" "$@"
fi
[ "${1:-}" = train ] && shift
echo "== $(date -Is) autoencoder ($AE_PRESET, $AE_STEPS steps, $DEVICE, $THREADS thread(s))"
"$PY" -m qsilk_demo_train.train_ae --run-dir "$RUN/ae" --preset "$AE_PRESET" --steps "$AE_STEPS" \
    --threads "$THREADS" --device "$DEVICE" ${AE_ARGS:-}
echo "== $(date -Is) DiT"
"$PY" -m qsilk_demo_train.train_dit --run-dir "$RUN/dit" --ae-dir "$RUN/ae" --threads "$THREADS" \
    --device "$DEVICE" "$@"
echo "== $(date -Is) done"
