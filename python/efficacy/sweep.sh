#!/usr/bin/env bash
# The exploration behind bench/RESULTS.md's demo section: within the paper's method, which
# settings make Q² work on the segmentation task?  One seed, one thread per run, at most
# two runs at a time (the machine's two cores are shared); every run appends a record to
# python/efficacy/results.jsonl and settings are compared on VALIDATION scores only.
#   bash python/efficacy/sweep.sh ROUND        (rounds below, in the order they were run)
#   python python/efficacy/table.py            (the records as a table)
# The FP32 checkpoints come from the demo cache ($Q2EXT_CACHE_DIR or ~/.cache/q2ext/demo):
# the first run of a round trains them when they are missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 PYTHONPATH=.
PY=${PY:-python}
run() { "$PY" python/efficacy/run.py --seeds 0 "$@"; }
B=${BITS:-3}
case "${1:?round}" in
  gap)     # the quantization gap E - A at 4, 3 and 2 bits (the gate), default settings
    run --tag gap-w4 --bits 4 --arms E,A,B
    run --tag gap-w3 --bits 3 --arms E,A,B &
    run --tag gap-w2 --bits 2 --arms A,B; wait ;;
  lr)      # the baseline's QAT learning rate (Adam), chosen on A's validation best
    run --tag lr2e-4 --bits "$B" --arms A,B --recipe qat_lr=2e-4 &
    run --tag lr1e-3 --bits "$B" --arms A,B --recipe qat_lr=1e-3; wait ;;
  sgd)     # SGD + momentum for QAT (the paper's detection recipe): under Adam a per-branch
           # gradient scale is largely normalised away, under SGD it is the branch's step size
    run --tag sgd1e-2 --bits "$B" --arms A,B --recipe qat_optimizer='"sgd"' --recipe qat_lr=1e-2 &
    run --tag sgd3e-2 --bits "$B" --arms A,B --recipe qat_optimizer='"sgd"' --recipe qat_lr=3e-2; wait ;;
  ctrl)    # the controller: gain eta, EMA beta, target tau = FP32-LN's own offsets (arm H)
    run --tag eta0.01 --bits "$B" --arms B --cfg gbf_eta=0.01 "${@:2}" &
    run --tag eta0.2 --bits "$B" --arms B,H --cfg gbf_eta=0.2 "${@:2}"; wait
    run --tag beta0.5 --bits "$B" --arms B,H --cfg gbf_beta=0.5 "${@:2}" ;;
  ada)     # Q-ADA: the paper's sigmoid form at 0.01 (KL, JS) vs the softmax variant; taps
    run --tag ada-sig-kl --bits "$B" --arms C "${@:2}" &
    run --tag ada-sig-js --bits "$B" --arms C --cfg ada_divergence='"js"' "${@:2}"; wait
    run --tag ada-soft1 --bits "$B" --arms C --cfg ada_normalize='"softmax"' --cfg ada_weight=1.0 "${@:2}" &
    run --tag ada-soft-blocks --bits "$B" --arms C --cfg ada_normalize='"softmax"' --cfg ada_weight=1.0 \
        --cfg 'ada_taps=("decoders.0.block","decoders.1.block","decoders.2.block","decoders.3.block")' "${@:2}"
    wait ;;
  eps)     # the nodes' LayerNorm epsilon: 1e-6 (q2ext's GBFusion default) vs 1e-5 (the demo's)
    run --tag eps1e-6 --bits "$B" --arms E,A,B --cfg ln_eps=1e-6 "${@:2}" ;;
  *) echo "unknown round $1" >&2; exit 2 ;;
esac
