#!/bin/bash
# Device call 5 of this session: call3.sh's table, decode rows and kernel tests again with this commit's
# dispatch (gemv1p's rule with the cp.async-pipelined launch on the mid shapes), without the GEMM sweep.
LOG=call5.log SKIP_GEMM=1 bash benchmarks/results/kernels-h200/call3.sh
