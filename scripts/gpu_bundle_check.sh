#!/usr/bin/env bash
# Checks the offline GPU bundle (scripts/gpu_bundle.sh) the way a GPU machine without
# network uses it, on this CPU machine: a bundle built for this machine's Python, a fresh
# virtual environment holding only torch and packages a GPU image already has (no Ray, no
# DeepSpeed, not the project), a clean clone of the project's committed files, then
# `source install.sh` and `gpu_check.py --small`, every stage on the CPU. ~8 min on a 2-core
# AMX Xeon (~5 once Ray's part is packed); allow several times that on an AVX2-only machine.
#
# usage, from the project root after scripts/setup.sh:  bash scripts/gpu_bundle_check.sh [WORK=/tmp/gpu-bundle-check]
# It prints each stage's status and exits non-zero when one is not ok.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/gpu-bundle-check}
PY=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
TORCH=$(sed -n 's/^torch==\([0-9.]*\).*/\1/p' constraints.txt)
rm -rf "$WORK/project" "$WORK/venv"
mkdir -p "$WORK"

PY=$PY bash scripts/gpu_bundle.sh "$WORK/bundle"
python3 -m venv "$WORK/venv"
# What the GPU image holds that the check imports (its package list: torch, numpy, pyarrow,
# pandas, pyyaml, pillow, safetensors, tokenizers, requests, aiohttp, psutil, ...), at the
# versions of the project's own environment.
IMAGE=(numpy pyarrow pandas pyyaml pillow safetensors tokenizers requests aiohttp psutil py-cpuinfo msgpack
       six filelock fsspec jinja2 networkx sympy packaging click tqdm prometheus-client scipy einops
       nvidia-ml-py)
specs=()
for name in "${IMAGE[@]}"; do
  version=$(.venv/bin/python -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$name")
  specs+=("$name${version:+==$version}")
done
"$WORK/venv/bin/pip" install -q --disable-pip-version-check "torch==$TORCH" "${specs[@]}" 2>&1 \
  | { grep -v "^WARNING: Location 'file:" || true; }

.venv/bin/python benchmarks/gpu_check.py --make-shards "$WORK/shards" --scenes 40  # made here (espeak-ng), as docs/gpu.md says
git clone -q . "$WORK/project"
cp -r "$WORK/bundle" "$WORK/project/.gpu"
cd "$WORK/project"
export PATH="$WORK/venv/bin:$PATH"
for banned in ray deepspeed omni_model; do
  if (cd / && python3 -c "import $banned" 2>/dev/null); then echo "the fresh environment already has $banned"; exit 1; fi
done
# shellcheck disable=SC1091
source .gpu/rest/install.sh
export DS_ACCELERATOR=cpu  # install.sh sets cuda, for the GPU machine
python3 -m pip --version >/dev/null
python3 benchmarks/gpu_check.py --small --shards "$WORK/shards" --out "$WORK/report.json"
python3 - "$WORK/report.json" <<'PY'
import json, sys
stages = json.load(open(sys.argv[1]))["stages"]
for name, record in stages.items():
    print(f"{name}: {record['status']} ({record.get('seconds', '?')} s)")
sys.exit(0 if all(r["status"] == "ok" for r in stages.values()) else 1)
PY
