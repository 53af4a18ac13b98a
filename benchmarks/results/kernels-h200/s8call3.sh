#!/bin/bash
# Session 8, device call 3: the decode step in every variant with the attention kernel's default of 32
# positions per program (call 2 ran 64); PDL in the plain model (W4) and 16-position attention blocks; Nsight
# Compute on the decode's small M = 1 layers (4096x4096, 6144x4096).
export PYTHONUNBUFFERED=1
L=$OUT/s8call3.log
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >> $L 2>&1
echo "== decode $(date +%T)" >> $L
D="python3 -P benchmarks/decode.py --gpu"
timeout 170 $D --profile --variants plain,fused+head+glue,fused+head+glue+attn,fused+head+glue+attn+pdl \
  --json $OUT/decode.json >> $L 2>&1; echo "rc $?" >> $L
timeout 45 $D --batches 1 --models "bf16,W4 g128" --variants plain+pdl --json $OUT/decode-plain-pdl.json >> $L 2>&1
echo "rc $? (plain + pdl)" >> $L
BITSMITH_ATTN_BLOCK=16 timeout 45 $D --batches 1 --models "bf16,W4 g128" --variants fused+head+glue+attn+pdl \
  --json $OUT/decode-attn16.json >> $L 2>&1; echo "rc $? (attention blocks of 16)" >> $L
echo "== ncu $(date +%T)" >> $L
timeout 60 ncu --clock-control none -k regex:gemv1p --section SpeedOfLight --section Occupancy --section LaunchStats \
  python3 benchmarks/results/kernels-h200/diag_gemv1p.py --small > $OUT/ncu-gemv1p-small.txt 2>&1; echo "rc $?" >> $L
echo "== end $(date +%T)" >> $L
