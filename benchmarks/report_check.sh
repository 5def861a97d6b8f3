#!/usr/bin/env bash
# Make a model report and screenshot it in headless Chromium; prints the screenshot's path.
#
#   benchmarks/report_check.sh MODEL_DIR [DATA] [LABELS]
#
# DATA: a Zarr array or AnnData .zarr store (KEY env var picks the array, e.g. obsm/X_pca);
# LABELS: a key in DATA (e.g. obs/cell_type) or a .npy file. The report and the screenshot
# go to OUT_DIR (default: a new temporary directory). Needs chromium (apt-get install
# chromium) and matplotlib.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 3 ]]; then
    echo "usage: $0 MODEL_DIR [DATA] [LABELS]" >&2
    exit 2
fi
MODEL_DIR=$1
DATA=${2:-}
LABELS=${3:-}
OUT_DIR=${OUT_DIR:-$(mktemp -d -t pumap-report-XXXXXX)}
HERE=$(cd "$(dirname "$0")/.." && pwd)

BROWSER=""
for b in chromium chromium-browser google-chrome; do
    if command -v "$b" >/dev/null 2>&1; then BROWSER=$(command -v "$b"); break; fi
done
if [[ -z $BROWSER ]]; then
    echo "no chromium found: install it (apt-get install -y chromium)" >&2
    exit 2
fi

mkdir -p "$OUT_DIR"
PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" python - "$MODEL_DIR" "$OUT_DIR" "$DATA" \
    "$LABELS" "${KEY:-}" <<'EOF'
import logging
import sys
import time

from pumap_dask.report import write_report

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
model, out, data, labels, key = sys.argv[1:6]
t0 = time.perf_counter()
rep = write_report(model, out, data=data or None, labels=labels or None, key=key or None)
print(f"report written in {time.perf_counter() - t0:.2f} s: {rep['paths']['html']}",
      file=sys.stderr)
EOF

SHOT="$OUT_DIR/report.png"
# --no-sandbox: root in a container; the page is local and self-contained
timeout 120 "$BROWSER" --headless --no-sandbox --disable-gpu --hide-scrollbars \
    --screenshot="$SHOT" --window-size=1280,${HEIGHT:-4000} "file://$OUT_DIR/report.html" \
    >/dev/null 2>&1 || { echo "chromium failed to take the screenshot" >&2; exit 1; }
[[ -s $SHOT ]] || { echo "no screenshot written" >&2; exit 1; }
echo "$SHOT"
