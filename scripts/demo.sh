#!/usr/bin/env bash
# Install everything, then the main job on Fashion-MNIST: train an encoder (about 10 minutes on a
# laptop CPU; the full recipe on a GPU), report its kNN accuracy, index the 70k images, serve the app.
# Work already done is skipped: a second run goes straight to the app.
# Options go to `retrieval train` (for example: --minutes 30, or --epochs 20; on a CPU the default is
# a 10-minute budget: the step count is fixed from the first steps' time so that the run ends on time).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

RUN=runs/fashion-mnist
ENCODER=$RUN/train/encoder.pt
INDEX=$RUN/index

if [[ -f $RUN/train/checkpoint.pt ]]; then
  echo "[demo] continuing (or confirming) the training run in $RUN/train"
  retrieval train --out "$RUN/train" --resume
else
  echo "[demo] training a SimCLR encoder on fashion-mnist:train"
  retrieval train --data fashion-mnist:train --out "$RUN/train" "$@"
fi

current=$(python - "$ENCODER" "$INDEX" <<'PY'
import hashlib, json, sys, pathlib
enc, idx = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]) / "manifest.json"
try:
    m = json.loads(idx.read_text())
except (OSError, ValueError):
    print("no"); sys.exit()
# An index from before anomaly spaces (no "anomaly" entry) is rebuilt.
ok = m.get("encoder_sha256") == hashlib.sha256(enc.read_bytes()).hexdigest() and m.get("count", 0) >= 70000 and m.get("anomaly")
print("yes" if ok else "no")
PY
)
if [[ $current == yes ]]; then
  echo "[demo] $INDEX is up to date"
else
  echo "[demo] indexing Fashion-MNIST (train and test, 70k images)"
  retrieval index --encoder "$ENCODER" --source fashion-mnist:train --out "$INDEX"
  retrieval index --append --source fashion-mnist:test --out "$INDEX"
fi
retrieval info "$INDEX"
echo "[demo] serving the app on http://127.0.0.1:7860 (Ctrl+C to stop)"
exec retrieval serve "$INDEX"
