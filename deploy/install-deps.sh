#!/usr/bin/env bash
# Install what dicom-node needs to be developed and tested on a Debian/Ubuntu machine,
# skipping what is there: Debian packages (dcmtk, orthanc, dicom3tools, chromium) and the
# Python venv at .venv/ with every extra (ai, lab, test, dev), pinned by
# deploy/constraints.txt. Runs `apt-get update` at most once. Safe to run again.
# A server that only runs the node: deploy/install-node.sh (no test tools, no lab).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.deps-stamp
CONSTRAINTS=deploy/constraints.txt
EXTRAS=ai,lab,test,dev

# --- Debian packages -------------------------------------------------------------------
# dcmtk: the test scanner (storescu/echoscu); orthanc: the PACS stand-in; dicom3tools:
# dciodvfy, the IOD validator; chromium + chromium-driver: the web page tests;
# orthanc-dicomweb: Orthanc's DICOMweb plugin, the DICOMweb archive of the priors tests;
# redis-server: the Celery broker of the scale-out tests; postgresql (below).
declare -A NEED=( [/usr/bin/storescu]=dcmtk [/usr/sbin/Orthanc]=orthanc [/usr/bin/dciodvfy]=dicom3tools
                  [/usr/bin/chromium]=chromium [/usr/bin/chromedriver]=chromium-driver
                  [/usr/share/orthanc/plugins/libOrthancDicomWeb.so]=orthanc-dicomweb
                  [/usr/bin/redis-server]=redis-server )
missing=()
for bin in "${!NEED[@]}"; do
  [ -e "$bin" ] || missing+=("${NEED[$bin]}")
done
# postgresql: the server the PostgreSQL tests start in a temporary directory (its binaries
# live under a versioned path, /usr/lib/postgresql/<major>/bin)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else
    echo "dicom-node: need root (or sudo) to install: ${missing[*]}" >&2; exit 1
  fi
  echo "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The Debian orthanc package starts a system service on port 4242/8042; the node and
  # its tests run their own Orthanc instances, so stop it if the init system started it.
  # Likewise Redis (6379) and PostgreSQL (5432): the tests start their own on loopback.
  if command -v service >/dev/null 2>&1; then
    for svc in orthanc redis-server postgresql; do $SUDO service "$svc" stop >/dev/null 2>&1 || true; done
  fi
fi

# --- Python venv -----------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ "$CONSTRAINTS" -nt "$STAMP" ]; then
  # torch first, pinned: a CPU build of exactly this version is what the project ships for;
  # an unpinned `torch` would pull a multi-GB CUDA build. (Reading the installed version
  # from its metadata is instant; importing torch is not.)
  "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('torch').split('+')[0] != '2.13.0')" \
    2>/dev/null || "$VENV/bin/pip" install -q -c "$CONSTRAINTS" torch==2.13.0
  "$VENV/bin/pip" install -q -c "$CONSTRAINTS" -e ".[$EXTRAS]"
  touch "$STAMP"
fi
