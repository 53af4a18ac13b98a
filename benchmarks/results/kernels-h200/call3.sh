#!/bin/bash
# Device call 3 of this session: the README's table and decode rows with this commit's dispatch, the kernel
# tests, then (exploration, not adopted in this run) the GEMM with two groups per K step at M = 16 / 64.
export PYTHONUNBUFFERED=1
L=$OUT/${LOG:-call3.log}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >> $L 2>&1
echo "== kernels $(date +%T)" >> $L
timeout 330 python3 benchmarks/kernels.py --json $OUT/kernels.json >> $L 2>&1; echo "rc $?" >> $L
echo "== decode $(date +%T)" >> $L
timeout 100 python3 -P benchmarks/decode.py --gpu --variants plain,fused+head+glue --profile \
  --json $OUT/decode.json >> $L 2>&1; echo "rc $?" >> $L
echo "== tests $(date +%T)" >> $L
timeout 130 python3 -m pytest -q -n 8 tests/test_kernels.py > $OUT/tests.log 2>&1; echo "rc $?" >> $L
tail -3 $OUT/tests.log >> $L
if [ -z "$SKIP_GEMM" ]; then
echo "== gemm bw $(date +%T)" >> $L
timeout 25 python3 benchmarks/results/kernels-h200/sweep_gemm_bw.py >> $L 2>&1; echo "rc $?" >> $L
fi
echo "== end $(date +%T)" >> $L
