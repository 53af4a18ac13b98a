#!/bin/bash
# Session 9, device call 2: kperm around call 1's winners (sweep_kperm.py, FINE=1) at M = 4, 16, 64, 256.
export PYTHONUNBUFFERED=1
L=$OUT/s9call2.log
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >> $L 2>&1
echo "== sweep kperm fine $(date +%T)" >> $L
FINE=1 MS=4,16,64,256 SHAPES=28672x8192,8192x28672,14336x4096,4096x14336,4096x4096 BUDGET=${BUDGET:-300} \
  timeout 420 python3 benchmarks/results/kernels-h200/sweep_kperm.py >> $L 2>&1; echo "rc $?" >> $L
cp $OUT/sweep-kperm.json $OUT/sweep-kperm-fine.json; rm $OUT/sweep-kperm.json
echo "== end $(date +%T)" >> $L
