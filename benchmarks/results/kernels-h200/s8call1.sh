#!/bin/bash
# (BITSMITH_PDL_PREFETCH / BITSMITH_PDL_TRIGGER reached gemv1p through dispatch until the commit after the run;
# dispatch now fixes prefetch 2 and the late trigger, the measured choice: reproduce with gemv1p(..., pdl_trigger=).)
# Session 8, device call 1: the kernel tests on the H200 (first GPU run of 136c711's refactor, of the
# scale_after GEMM and of the PDL launches), the decode step with the Triton attention and programmatic
# dependent launches (attn, pdl variants; L2 prefetch depth 0 / 2 / 4), then scale_after timed against the
# rule at M = 2..64 (sweep_tma.py, SA=1).
export PYTHONUNBUFFERED=1
L=$OUT/s8call1.log
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >> $L 2>&1
echo "== tests $(date +%T)" >> $L
timeout 200 python3 -m pytest -q -n 8 tests/test_kernels.py tests/test_llm_int8.py -m "not slow" > $OUT/tests-s8-call1.log 2>&1
echo "rc $?" >> $L; tail -3 $OUT/tests-s8-call1.log >> $L; grep -E "^FAILED|Error" $OUT/tests-s8-call1.log | head -20 >> $L
echo "== decode $(date +%T)" >> $L
timeout 150 python3 -P benchmarks/decode.py --gpu --batches 1 --models "bf16,W4 g128" --profile \
  --variants fused+head+glue,fused+head+glue+attn,fused+head+glue+attn+pdl --json $OUT/decode-s8a.json >> $L 2>&1
echo "rc $?" >> $L
for pf in 0 4; do
BITSMITH_PDL_PREFETCH=$pf timeout 60 python3 -P benchmarks/decode.py --gpu --batches 1 --models "W4 g128" \
  --variants fused+head+glue+attn+pdl --json $OUT/decode-s8-pf$pf.json >> $L 2>&1; echo "rc $? (prefetch $pf)" >> $L
done
echo "== sweep sa $(date +%T)" >> $L
SA=1 SKIP_DEQUANT=1 MS=2,16,64 SHAPES=28672x8192,8192x28672,14336x4096,4096x14336,4096x4096 BUDGET=${BUDGET:-120} \
  timeout 200 python3 benchmarks/results/kernels-h200/sweep_tma.py >> $L 2>&1; echo "rc $?" >> $L
cp $OUT/sweep-tma.json $OUT/sweep-sa.json 2>/dev/null
echo "== end $(date +%T)" >> $L
