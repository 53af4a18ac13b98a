#!/bin/bash
# Session 9, device call 1: the kernel tests on the H200 (first GPU run of the triton_wq split and of the
# kperm GEMM), then kperm timed against the rule (sweep_kperm.py).
export PYTHONUNBUFFERED=1
L=$OUT/s9call1.log
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >> $L 2>&1
echo "== tests $(date +%T)" >> $L
timeout 240 python3 -m pytest -q -n 8 tests/test_kernels.py tests/test_llm_int8.py -m "not slow" > $OUT/tests-s9-call1.log 2>&1
echo "rc $?" >> $L; tail -3 $OUT/tests-s9-call1.log >> $L; grep -E "^FAILED|Error" $OUT/tests-s9-call1.log | head -20 >> $L
echo "== sweep kperm $(date +%T)" >> $L
SHAPES=28672x8192,8192x28672,14336x4096,4096x14336,4096x4096 BUDGET=${BUDGET:-270} \
  timeout 330 python3 benchmarks/results/kernels-h200/sweep_kperm.py >> $L 2>&1; echo "rc $?" >> $L
echo "== end $(date +%T)" >> $L
