#!/bin/bash
# (BITSMITH_PDL_PREFETCH / BITSMITH_PDL_TRIGGER reached gemv1p through dispatch until the commit after the run;
# dispatch now fixes prefetch 2 and the late trigger, the measured choice: reproduce with gemv1p(..., pdl_trigger=).)
# Session 8, device call 2 (the session's run of record): the kernel tests; the README's table with this
# commit's dispatch (gemm_config's session-8 splits and scale_after); the decode step in all variants, with the
# attention kernel's partials cut to the real query rows and PDL scheduling the next kernel late (after each
# program's main loop); PDL scheduling it early and attention blocks of 32 (W4, batch 1); then gemv1p's M = 1
# launches swept on the decode's shapes.
export PYTHONUNBUFFERED=1
L=$OUT/s8call2.log
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >> $L 2>&1
echo "== tests $(date +%T)" >> $L
timeout 170 python3 -m pytest -q -n 8 tests/test_kernels.py tests/test_llm_int8.py -m "not slow" > $OUT/tests-s8-call2.log 2>&1
echo "rc $?" >> $L; tail -2 $OUT/tests-s8-call2.log >> $L; grep -E "^FAILED|Error" $OUT/tests-s8-call2.log | head -20 >> $L
echo "== kernels $(date +%T)" >> $L
timeout 200 python3 benchmarks/kernels.py --json $OUT/kernels.json >> $L 2>&1; echo "rc $?" >> $L
echo "== decode $(date +%T)" >> $L
D="python3 -P benchmarks/decode.py --gpu"
timeout 150 $D --profile --variants plain,fused+head+glue,fused+head+glue+attn,fused+head+glue+attn+pdl \
  --json $OUT/decode.json >> $L 2>&1; echo "rc $?" >> $L
BITSMITH_PDL_TRIGGER=start timeout 45 $D --batches 1 --models "W4 g128" --variants fused+head+glue+attn+pdl \
  --json $OUT/decode-pdl-start.json >> $L 2>&1; echo "rc $? (trigger start)" >> $L
BITSMITH_ATTN_BLOCK=32 timeout 60 $D --batches 1 --models "bf16,W4 g128" --variants fused+head+glue+attn \
  --json $OUT/decode-attn32.json >> $L 2>&1; echo "rc $? (attention blocks of 32)" >> $L
echo "== sweep m1 $(date +%T)" >> $L
W4_ONLY=1 MS=1 SHAPES=4096x4096,6144x4096,28672x4096,4096x14336,128256x4096 BUDGET=${BUDGET:-50} \
  timeout 110 python3 benchmarks/results/kernels-h200/sweep_tma.py >> $L 2>&1; echo "rc $?" >> $L
cp $OUT/sweep-tma.json $OUT/sweep-m1-decode.json 2>/dev/null
echo "== end $(date +%T)" >> $L
