#!/bin/bash
# Session 8, device call 4: the kernel tests on the final commit (gemv1p's host-side PDL check added after
# call 2), and the decode glue check.
export PYTHONUNBUFFERED=1
L=$OUT/s8call4.log
echo "== tests $(date +%T)" >> $L
timeout 200 python3 -m pytest -q -n 8 tests/test_kernels.py tests/test_llm_int8.py -m "not slow" > $OUT/tests-s8-call4.log 2>&1
echo "rc $?" >> $L; tail -2 $OUT/tests-s8-call4.log >> $L; grep -E "^FAILED|Error" $OUT/tests-s8-call4.log | head -20 >> $L
python3 -c "from benchmarks import decode_glue as g; print(g.check())" >> $L 2>&1
echo "== end $(date +%T)" >> $L
