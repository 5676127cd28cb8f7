#!/usr/bin/env bash
# The CPU benchmarks behind BENCHMARKS.md, in order; JSON results land in bench/out/.
# Needs the README demo's encoder and index (bash scripts/demo.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
ENC=runs/fashion-mnist/train/encoder.pt
IDX=runs/fashion-mnist/index
OUT=bench/out
mkdir -p $OUT
only=${1:-all}

step() { [[ $only == all || $only == "$1" ]]; }

if step throughput; then
  python bench/throughput.py --rounds 3 --steps 20 --precision bf16,fp32 --json $OUT/throughput-cpu.json
  python bench/throughput.py --rounds 3 --steps 20 --precision bf16,fp32 --channels 3 --json $OUT/throughput-cpu-rgb.json
  python bench/throughput.py --rounds 3 --steps 20 --precision bf16,fp32 --width 32 --json $OUT/throughput-cpu-w32.json
fi
if step quality; then
  retrieval knn-eval --encoder $ENC --json --linear-probe --confusion $OUT/confusion.png > $OUT/knn-eval.json
  retrieval knn-eval --encoder $ENC -k 20 --json > $OUT/knn-eval-k20.json
  retrieval index --encoder $ENC --source fashion-mnist:train --out $OUT/idx-train --no-progress
  retrieval index --encoder $ENC --source fashion-mnist:test --out $OUT/idx-test --no-progress
  retrieval knn-eval --gallery-index $OUT/idx-train --query-index $OUT/idx-test --json > $OUT/knn-eval-index.json
  for p in shared-encoder transductive; do
    retrieval anomaly-eval --protocol $p --encoder $ENC --json > $OUT/anomaly-$p.json
    retrieval anomaly-eval --protocol $p --encoder $ENC --score cosine --json > $OUT/anomaly-$p-cosine.json
  done
  retrieval anomaly-eval --protocol strict --work $OUT/strict --json > $OUT/anomaly-strict.json
fi
if step embed; then
  python bench/embed.py --encoder $ENC --source fashion-mnist:train --json $OUT/embed.json
fi
if step search; then
  python bench/search.py --index $IDX --factories HNSW32,IVF256_Flat,IVF256_PQ64 --json $OUT/search-fmnist.json
  python bench/search.py --n 1000000 --dim 128 --json $OUT/search-1m.json
fi
if step app; then
  python bench/app_load.py --index $IDX --clients 8 --queries 1000 --json $OUT/app-8.json
  python bench/app_load.py --index $IDX --clients 1 --queries 300 --raw --json $OUT/app-1-raw.json
  python bench/app_load.py --index $IDX --clients 32 --queries 5000 --json $OUT/app-32.json
fi
