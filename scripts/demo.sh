#!/usr/bin/env bash
# `make demo`: train a ResNet, an In-ResNet (three seeds), a Hamiltonian and an implicit network on the embedded
# digits dataset with `train.py` (Accelerate, one CPU process each), evaluate the four of them and the 3-member
# In-ResNet ensemble with `eval_robust.py` (sharded over 2 CPU processes by torchrun), print the leaderboard and
# leave the curves and model cards.
#
# Sized for 5 minutes on 2 CPU cores, install included: trainings run two at a time, one thread each, on the
# quick digits recipes shortened to DEMO_EPOCHS epochs with fewer blocks per stage (the sizes tests/test_train.py
# trains), at 16×16 input (`--img-size 16`: the digits are 8×8 images, so nothing is lost, and every convolution
# costs a quarter of 32×32; the exports record the size and the evaluation uses it); the evaluation keeps the
# paper's attacks (FGSM, IFGSM, PGD, noise) and the trust checks on a reduced budget: 10 iterative steps of 2/255
# instead of the protocol's 20 of 1/255 (10 steps of 1/255 barely pass 8/255, and the trust check then rightly
# flags iterative attacks weaker than FGSM). The knobs below trade time for precision:
#   DEMO_EPOCHS (4)     epochs of every training               DEMO_STEPS (10)           IFGSM / PGD steps
#   DEMO_EXAMPLES (64)  first validation digits evaluated     DEMO_STEP_SIZE (2/255)    their step
#   DEMO_QUERIES (50)   Square queries of the black-box check  DEMO_EPS ("4/255 8/255")  L∞ budgets
#   DEMO_IMG_SIZE (16)  input size of every model (32: the     DEMO_DIR (demo)           where everything goes
#                       CIFAR size the recipes are written for)
set -euo pipefail -o noglob  # noglob: model kwargs like layers=[1,1,1] are words, not patterns
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
BIN=$(dirname "$PYTHON")
DEMO_DIR=${DEMO_DIR:-demo}
DEMO_EXAMPLES=${DEMO_EXAMPLES:-64}
DEMO_EPS=${DEMO_EPS:-4/255 8/255}
DEMO_QUERIES=${DEMO_QUERIES:-50}
DEMO_EPOCHS=${DEMO_EPOCHS:-4}
DEMO_STEPS=${DEMO_STEPS:-10}
DEMO_STEP_SIZE=${DEMO_STEP_SIZE:-2/255}
DEMO_IMG_SIZE=${DEMO_IMG_SIZE:-16}
RUNS=$DEMO_DIR/runs
export OMP_NUM_THREADS=1  # two single-threaded processes use 2 cores better than one process with two threads

train() {  # NAME CONFIG SEED MODEL_KWARGS: one training run, its output in RUNS/NAME.log
  local name=$1 config=$2 seed=$3 kwargs=$4
  # plain `python train.py`: the same Accelerate code path as `accelerate launch` on one process, one start-up less
  if "$PYTHON" train.py --config "configs/$config.yaml" --output "$RUNS/$name" --seed "$seed" \
      --epochs "$DEMO_EPOCHS" --img-size "$DEMO_IMG_SIZE" --model-kwargs "$kwargs" > "$RUNS/$name.log" 2>&1; then
    echo "trained $name ($config, seed $seed) in ${SECONDS}s"
  else
    echo "training $name failed; the end of $RUNS/$name.log:" >&2
    tail -n 30 "$RUNS/$name.log" >&2
    return 1
  fi
}

lane() {  # "NAME CONFIG SEED MODEL_KWARGS" ...: trainings one after the other
  local spec
  for spec in "$@"; do
    train $spec || return 1
  done
}

rm -rf "${DEMO_DIR:?}"
mkdir -p "$RUNS"
echo "training 6 models on digits (2 at a time; logs in $RUNS/)"
# two lanes of about equal CPU time (the implicit and the Hamiltonian runs cost about two In-ResNet runs each)
lane "implicit digits_implicit 0 steps=[1,1,1]" "inresnet digits_inresnet 0 layers=[2,2,2]" \
  "resnet digits_resnet 0 layers=[1,1,1]" &
first=$!
lane "hamiltonian digits_hamiltonian 0 layers=[2,2,2]" "inresnet_seed1 digits_inresnet 1 layers=[2,2,2]" \
  "inresnet_seed2 digits_inresnet 2 layers=[2,2,2]" &
second=$!
status=0
wait "$first" || status=1
wait "$second" || status=1
[ "$status" -eq 0 ] || { echo "make demo: a training run failed" >&2; exit 1; }

# shellcheck disable=SC2086  # DEMO_EPS holds several values
"$BIN/torchrun" --standalone --nproc_per_node 2 eval_robust.py --batch-size 32 \
  --checkpoints "$RUNS/resnet/export" "$RUNS/inresnet/export" "$RUNS/hamiltonian/export" "$RUNS/implicit/export" \
  --ensemble "inresnet_x3=$RUNS/inresnet/export,$RUNS/inresnet_seed1/export,$RUNS/inresnet_seed2/export" \
  --n-examples "$DEMO_EXAMPLES" --eps $DEMO_EPS --steps "$DEMO_STEPS" --step-size "$DEMO_STEP_SIZE" \
  --blackbox-queries "$DEMO_QUERIES" --cards --output "$DEMO_DIR/leaderboard"

echo
echo "curves: $DEMO_DIR/leaderboard/robustness_curves.png   cards: $DEMO_DIR/leaderboard/cards/   (${SECONDS}s in all)"
