#!/bin/bash
# Session 7, device call 3: call3.sh's table, decode rows and kernel tests with this commit's dispatch
# (copy-engine launches for 4-bit layers), without the GEMM sweep. Calls 1 and 2 were the sweeps
# (sweep_tma.py); call 2 also ran the tests once (tests-s7-call2.log: 6 failures, all the tests' own scratch
# check meeting the new tensor maps, fixed by giving them their own dict).
LOG=s7call3.log SKIP_GEMM=1 bash benchmarks/results/kernels-h200/call3.sh
