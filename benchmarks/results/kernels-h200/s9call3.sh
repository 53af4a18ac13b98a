#!/bin/bash
# Session 9, device call 3: the kernel tests on the new launch rules (kperm in gemm_config and dispatch), the
# issue's table (benchmarks/kernels.py, the README's) and the 8B decode at batch 1 and 16.
export PYTHONUNBUFFERED=1
L=$OUT/s9call3.log
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >> $L 2>&1
echo "== tests $(date +%T)" >> $L
timeout 220 python3 -m pytest -q -n 8 tests/test_kernels.py tests/test_llm_int8.py -m "not slow" > $OUT/tests-s9-call3.log 2>&1
echo "rc $?" >> $L; tail -2 $OUT/tests-s9-call3.log >> $L; grep -E "^FAILED|Error" $OUT/tests-s9-call3.log | head -20 >> $L
echo "== kernels $(date +%T)" >> $L
timeout 200 python3 benchmarks/kernels.py --json $OUT/kernels.json >> $L 2>&1; echo "rc $?" >> $L
echo "== decode $(date +%T)" >> $L
timeout 150 python3 -P benchmarks/decode.py --gpu --profile \
  --variants plain,fused+head+glue,fused+head+glue+attn,fused+head+glue+attn+pdl --json $OUT/decode.json >> $L 2>&1
echo "rc $?" >> $L
echo "== end $(date +%T)" >> $L
