#!/bin/bash
# Device call 4 of this session: gemv1p with Triton's cp.async pipeline (fewer registers) against its rule,
# and the split-K / tile tests for it.
export PYTHONUNBUFFERED=1
L=$OUT/call4.log
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >> $L 2>&1
echo "== sweep m1 pipe $(date +%T)" >> $L
timeout 170 python3 benchmarks/results/kernels-h200/sweep_m1_all.py 5 pipe >> $L 2>&1; echo "rc $?" >> $L
echo "== end $(date +%T)" >> $L
