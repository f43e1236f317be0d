#!/usr/bin/env bash
# Install dicom-node on a server: the node and its AI pipelines, pinned by
# deploy/constraints.txt, into $PREFIX/.venv (default /opt/dicom-node/.venv, where
# deploy/dicom-node.service runs it). No test tools, no lab, no Debian test peers.
#
#   sudo ./deploy/install-node.sh                     # node + ai (torch 2.13.0 CPU first)
#   sudo EXTRAS= ./deploy/install-node.sh             # the receiver/router alone, no torch
#   PREFIX=$HOME/dicom-node ./deploy/install-node.sh  # somewhere else
#
# The project is installed as a copy (not editable): the checkout can go away or move on.
# Run it again after pulling a new version; it reinstalls the project each time.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
PREFIX=${PREFIX:-/opt/dicom-node}
EXTRAS=${EXTRAS-ai}
CONSTRAINTS=deploy/constraints.txt
VENV=$PREFIX/.venv

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV"
  mkdir -p "$PREFIX"
  "$PYTHON" -m venv "$VENV"
fi
if [[ ",$EXTRAS," == *,ai,* ]]; then
  # torch first, pinned: an unpinned `torch` would pull a multi-GB CUDA build.
  "$VENV/bin/pip" install -q -c "$CONSTRAINTS" torch==2.13.0
fi
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" ".${EXTRAS:+[$EXTRAS]}"
echo "installed: $VENV/bin/dicom-node ($("$VENV/bin/dicom-node" --version 2>/dev/null || echo "dicom-node"))"
