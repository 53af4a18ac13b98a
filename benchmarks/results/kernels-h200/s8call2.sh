#!/bin/bash
# Session 8, device call 2: the PDL test with both trigger points; the decode step with the attention kernel's
# partials cut to the real query rows (blocks of 64 and 32 positions), PDL with the next kernel scheduled
# late (after each program's main loop) and early; then gemv1p's M = 1 launches swept on the decode's shapes.
export PYTHONUNBUFFERED=1
L=$OUT/s8call2.log
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >> $L 2>&1
echo "== tests $(date +%T)" >> $L
timeout 150 python3 -m pytest -q -n 8 tests/test_kernels.py -k "programmatic or gemv1_split or match_reference or dispatch" > $OUT/tests-s8-call2.log 2>&1
echo "rc $?" >> $L; tail -2 $OUT/tests-s8-call2.log >> $L; grep -E "^FAILED|Error" $OUT/tests-s8-call2.log | head -20 >> $L
echo "== decode $(date +%T)" >> $L
D="python3 -P benchmarks/decode.py --gpu --batches 1"
timeout 120 $D --models "bf16,W4 g128" --profile --variants fused+head+glue+attn,fused+head+glue+attn+pdl \
  --json $OUT/decode-s8b.json >> $L 2>&1; echo "rc $?" >> $L
BITSMITH_PDL_TRIGGER=start timeout 60 $D --models "W4 g128" --variants fused+head+glue+attn+pdl \
  --json $OUT/decode-s8b-start.json >> $L 2>&1; echo "rc $? (trigger start)" >> $L
BITSMITH_ATTN_BLOCK=32 timeout 70 $D --models "bf16,W4 g128" --variants fused+head+glue+attn \
  --json $OUT/decode-s8b-a32.json >> $L 2>&1; echo "rc $? (attention blocks of 32)" >> $L
echo "== sweep m1 $(date +%T)" >> $L
W4_ONLY=1 MS=1 SHAPES=4096x4096,6144x4096,28672x4096,4096x14336,128256x4096 BUDGET=${BUDGET:-80} \
  timeout 150 python3 benchmarks/results/kernels-h200/sweep_tma.py >> $L 2>&1; echo "rc $?" >> $L
cp $OUT/sweep-tma.json $OUT/sweep-m1-decode.json 2>/dev/null
echo "== end $(date +%T)" >> $L
