#!/bin/bash
# Device call 2 of this session: the packed-half2 GEMV (gemv1p) swept on the M = 1 shapes, decode with it,
# the W8A8 defaults on the three 4096-wide shapes, and the kernel tests.
export PYTHONUNBUFFERED=1
L=$OUT/call2.log
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >> $L 2>&1
D=benchmarks/results/kernels-h200
echo "== sweep m1 p $(date +%T)" >> $L
timeout 150 python3 $D/sweep_m1_all.py 4 p >> $L 2>&1; echo "rc $?" >> $L
echo "== decode C $(date +%T)" >> $L
timeout 100 python3 -P benchmarks/decode.py --gpu --batches 1 --variants fused+head+glue,plain \
  --kernels auto,triton_gemv1h,triton_gemv1p --profile --json $OUT/decode-c.json >> $L 2>&1; echo "rc $?" >> $L
echo "== w8a8 quick $(date +%T)" >> $L
QUICK=1 timeout 60 python3 $D/sweep_w8a8.py 4096x4096,14336x4096,4096x14336 2048,256 >> $L 2>&1; echo "rc $?" >> $L
echo "== tests $(date +%T)" >> $L
timeout 220 python3 -m pytest -q -n 8 tests/test_kernels.py > $OUT/tests.log 2>&1; echo "rc $?" >> $L
tail -3 $OUT/tests.log >> $L
echo "== end $(date +%T)" >> $L
