#!/bin/bash
# Device call 1 of this session (exploration): M = 1 defaults and sweep, W8A8 sweep, decode variants.
export PYTHONUNBUFFERED=1
L=$OUT/call1.log
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >> $L 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> $L 2>&1
D=benchmarks/results/kernels-h200
echo "== m1_default $(date +%T)" >> $L
timeout 80 python3 $D/m1_default.py > $OUT/m1_default.jsonl 2>> $L; echo "rc $?" >> $L
echo "== decode A $(date +%T)" >> $L
timeout 110 python3 -P benchmarks/decode.py --gpu --batches 1 --variants plain,fused+head+glue \
  --kernels auto,triton_gemv1h --profile --json $OUT/decode-a.json >> $L 2>&1; echo "rc $?" >> $L
echo "== w8a8 $(date +%T)" >> $L
timeout 130 python3 $D/sweep_w8a8.py >> $L 2>&1; echo "rc $?" >> $L
echo "== sweep m1 $(date +%T)" >> $L
timeout 170 python3 $D/sweep_m1_all.py 5 >> $L 2>&1; echo "rc $?" >> $L
echo "== decode B $(date +%T)" >> $L
timeout 75 python3 -P benchmarks/decode.py --gpu --batches 1 --variants fused,fused+head,fused+glue \
  --models "bf16,W4 g128" --kernels auto,triton_gemv1h --json $OUT/decode-b.json >> $L 2>&1; echo "rc $?" >> $L
echo "== end $(date +%T)" >> $L
