#!/usr/bin/env bash
# Regenerate deploy/constraints.txt (`make lock`): every package that `.[ai,lab,test,dev]`
# resolves to, pinned, so that two fresh machines install the same versions.
#
# pip-compile (pip-tools) runs from a throwaway venv outside the project (.venv is left
# alone) and resolves through pip, so it sees the same indexes and wheels `pip install`
# does. Existing pins are kept where they still satisfy pyproject.toml; UPGRADE=1 moves
# every package to the newest release its range allows (`make lock UPGRADE=1`).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TOOL_VENV=${LOCK_VENV:-${TMPDIR:-/tmp}/dicom-node-lock-venv}
PIP_TOOLS=pip-tools==7.6.2
OUT=deploy/constraints.txt
TORCH=2.13.0   # the CPU build deploy/install-deps.sh installs first; keep the two equal

if [ ! -x "$TOOL_VENV/bin/pip-compile" ]; then
  "$PYTHON" -m venv "$TOOL_VENV"
  "$TOOL_VENV/bin/pip" install -q "$PIP_TOOLS"
fi

# pip-compile keeps the pins of an existing output file: start from ours (or from none:
# an empty file would make it ignore --upgrade-package, the torch pin)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tmp=$work/constraints.txt
if [ -s "$OUT" ]; then cp "$OUT" "$tmp"; fi
# --strip-extras: a constraints file may not name extras. --no-emit-*: where packages came
# from is each machine's pip configuration, not the project's. --unsafe-package dicom-node:
# the `lab` extra names `dicom-node[ai]`, which pip-compile would pin as a file:// URL of
# this checkout; it goes into the "unsafe" section and is dropped below.
CUSTOM_COMPILE_COMMAND="make lock" "$TOOL_VENV/bin/pip-compile" --quiet \
  --all-extras --strip-extras --allow-unsafe --unsafe-package dicom-node \
  --no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
  --upgrade-package "torch==$TORCH" ${UPGRADE:+--upgrade} \
  --output-file "$tmp" pyproject.toml

{
  echo "# Pinned versions of everything dicom-node and its extras (ai, lab, test, dev) install,"
  echo "# for Python 3.11 on Linux x86_64. A constraints file: it pins, it never adds a package."
  echo "#   install:    pip install -c deploy/constraints.txt -e '.[ai,lab,test,dev]'  (make deps)"
  echo "#   server:     pip install -c deploy/constraints.txt '.[ai]'  (deploy/install-node.sh)"
  echo "#   regenerate: make lock   (deploy/lock.sh; UPGRADE=1 to move every pin forward)"
  echo "# torch is written as ==$TORCH without a local label (+cpu): the CPU build that"
  echo "# install-deps.sh puts in first satisfies it, and no CUDA/nvidia package is pinned."
  # drop the project's own file:// line and its annotation; drop a local label on torch
  awk '
    /^# The following packages are considered to be unsafe/ { next }
    /^dicom-node @ /                                         { skip = 1; next }
    skip && /^ +#/                                           { next }
                                                             { skip = 0 }
    /^torch==/                                               { sub(/\+[A-Za-z0-9.]+$/, "") }
                                                             { print }
  ' "$tmp" | sed -e :a -e '/^\n*$/{$d;N;ba' -e '}'
} > "$OUT.new"

if grep -qiE '^(nvidia-|triton==)' "$OUT.new"; then
  echo "lock: CUDA packages in the resolution (is torch $TORCH's CPU build reachable?):" >&2
  grep -iE '^(nvidia-|triton==)' "$OUT.new" >&2
  rm -f "$OUT.new"
  exit 1
fi
mv "$OUT.new" "$OUT"
echo "wrote $OUT ($(grep -c '^[A-Za-z0-9]' "$OUT") pins)"
