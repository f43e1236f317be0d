#!/usr/bin/env bash
# Fingerprint `dicom-node run` outputs, to show a refactor changed nothing a user gets.
#
#   tests/bench/fingerprint_runs.sh SRC_TREE INPUTS OUT
#
# Runs restoration (INPUTS/in-ldct/low-dose), sct (INPUTS/in-sct/mr), denoise-classical and
# forward (INPUTS/in-ct) from the source tree SRC_TREE (e.g. a `git worktree` of the old
# commit) with this checkout's venv, and writes OUT/fingerprint.txt: one line per output
# object with its SOP class, Series and SOP Instance UIDs and a hash of its pixel data.
# Make INPUTS once with `dicom-node simulate ldct|sct|ct` (SIMULATED studies), run both
# trees on the same INPUTS, and diff the two fingerprint files.
set -euo pipefail
SRC=$(cd "$1" && pwd); IN=$(cd "$2" && pwd); OUT=$3
PY=$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin/python
rm -rf "$OUT"; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$SRC"; export PYTHONPATH="$SRC"
for p in restoration:in-ldct/low-dose sct:in-sct/mr denoise-classical:in-ct forward:in-ct; do
  name=${p%%:*}; src=${p#*:}
  "$PY" -m dicom_node run "$name" "$IN/$src" --out "$OUT/out-$name" --home "$OUT/home-$name" --json \
    > "$OUT/run-$name.json" 2> "$OUT/run-$name.err" || echo "run $name failed: see $OUT/run-$name.err"
done
"$PY" - "$OUT" <<'PY'
import hashlib, pathlib, sys

import pydicom

out = pathlib.Path(sys.argv[1])
rows = []
for d in sorted(out.glob("out-*")):
    for f in sorted(d.rglob("*.dcm")):
        ds = pydicom.dcmread(f)
        pixels = hashlib.sha256(ds.PixelData).hexdigest()[:16] if "PixelData" in ds else "-"
        kind = ds.SOPClassUID.name.replace(" ", "_")
        rows.append(f"{d.name} {f.name} {kind} {ds.SeriesInstanceUID} {ds.SOPInstanceUID} {pixels}")
(out / "fingerprint.txt").write_text("\n".join(rows) + "\n")
print(f"{len(rows)} objects: {out / 'fingerprint.txt'}")
PY
