#!/usr/bin/env bash
# Packs what benchmarks/gpu_check.py needs beyond python3 + torch for a GPU machine that has
# no network (and none of Ray, DeepSpeed or this project installed), in two parts that travel
# separately (each device run carries at most 64 MiB, the project's own files included):
#
#   OUT/ray/ray.tar.xz   Ray's wheel for CPython $PY (from pyproject's pin), unpacked, with
#                        RLlib, Ray LLM, the Java jars, tests and JS source maps removed and the
#                        native binaries stripped (~27 MB)
#   OUT/rest/            deepspeed.tar.xz (the package as installed in .venv: pure Python, its ops
#                        build on first use, and the project hands it torch's AdamW so none does),
#                        whl/ (the wheels Ray Train, Ray Serve, DeepSpeed and the project import
#                        that such a machine lacks) and install.sh
#
# usage, from the project root after scripts/setup.sh:  bash scripts/gpu_bundle.sh [OUT=.gpu]
# On the GPU machine, from the project root:             source OUT/rest/install.sh
# install.sh unpacks whichever parts are there into .gpu-site/ (Ray only once: a first run can
# carry OUT/ray alone and a second OUT/rest) and puts .gpu-site and the project on PYTHONPATH.
# PY=3.11 builds the same bundle for a CPU machine's Python, to test it there. ~3 min (xz).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.gpu}
PY=${PY:-3.12}
RAY_VERSION=$(sed -n 's/.*"ray\[[^]]*\]==\([0-9.]*\)".*/\1/p' pyproject.toml)
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# Wheels the GPU image lacks (its package list has aiohttp, grpcio, protobuf, prometheus-client,
# pyarrow, pandas, requests, pyyaml, numpy, psutil, py-cpuinfo, msgpack, ninja, six, tokenizers,
# safetensors, annotated-doc; not these). The project's start_ray runs Ray's dashboard (Ray
# Train's state API), so Ray's "default" extra is needed too; py-spy, virtualenv, smart-open
# and colorful of that extra are not imported by this check and stay out.
WHEELS=(
  jsonschema jsonschema-specifications referencing rpds-py              # Ray core
  aiohttp-cors opencensus opencensus-context googleapis-common-protos    # Ray's dashboard
  opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-exporter-prometheus
  opentelemetry-semantic-conventions
  pydantic pydantic-core annotated-types typing-inspection typing-extensions  # Ray Train/Serve, DeepSpeed
  tensorboardX                                                          # Ray Train, the stage's metrics
  hjson                                                                 # DeepSpeed's config reader
  fastapi starlette uvicorn grpcio-reflection annotated-doc             # Ray Serve and the app
  grpcio protobuf                   # the versions grpcio-reflection's and the protos' generated code ask for
  soundfile cffi pycparser                                              # the project's audio I/O (serve)
)

fetch() {  # fetch DEST SPEC...: binary wheels for CPython $PY on manylinux x86-64, no dependencies
  local dest=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$dest" "$@" 2>&1 \
    | { grep -v "^WARNING: Location 'file:" || true; }
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$OUT/rest"
mkdir -p "$OUT/ray" "$OUT/rest/whl" "$work/wheel" "$work/ray"

# Ray's part only when its version or Python changed (xz takes minutes)
stamp="ray==$RAY_VERSION cp${PY/./}"
if [ "$(cat "$OUT/ray/VERSION" 2>/dev/null)" != "$stamp" ] || [ ! -f "$OUT/ray/ray.tar.xz" ]; then
  echo "packing $stamp"
  fetch "$work/wheel" "ray==$RAY_VERSION"
  ( cd "$work/ray"
    unzip -q "$work"/wheel/ray-*.whl
    rm -rf ray/rllib ray/llm ray/jars
    find . -type d -name tests -prune -exec rm -rf {} +
    find ray/dashboard -name '*.map' -delete
    strip --strip-unneeded ray/_raylet.so
    strip ray/core/src/ray/gcs/gcs_server ray/core/src/ray/raylet/raylet )
  tar -cJf "$OUT/ray/ray.tar.xz" -C "$work/ray" .
  echo "$stamp" > "$OUT/ray/VERSION"
else
  echo "$stamp: kept $OUT/ray/ray.tar.xz"
fi

# Versions here win where the venv has them (the ones the project was tested with).
for name in "${WHEELS[@]}"; do
  version=$(.venv/bin/python -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$name")
  fetch "$OUT/rest/whl" "$name${version:+==$version}"
done
tar -cJf "$OUT/rest/deepspeed.tar.xz" -C "$SITE" deepspeed $(cd "$SITE" && ls -d deepspeed-*.dist-info)

cat > "$OUT/rest/install.sh" <<'SH'
# source this from the project root on the GPU machine (bash): unpacks the bundle's parts that
# are present into .gpu-site/ and sets PYTHONPATH and the check's environment.
bundle=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p .gpu-site/py .gpu-site/wheels
if [ -f "$bundle/ray/ray.tar.xz" ] && [ ! -d .gpu-site/py/ray ]; then tar -xJf "$bundle/ray/ray.tar.xz" -C .gpu-site/py; fi
if [ -f "$bundle/rest/deepspeed.tar.xz" ]; then tar -xJf "$bundle/rest/deepspeed.tar.xz" -C .gpu-site/py; fi
if compgen -G "$bundle/rest/whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target .gpu-site/wheels "$bundle"/rest/whl/*.whl
fi
export PYTHONPATH="$PWD:$PWD/.gpu-site/py:$PWD/.gpu-site/wheels${PYTHONPATH:+:$PYTHONPATH}"
export DS_ACCELERATOR=cuda DS_BUILD_OPS=0 RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
  RAY_AUTH_MODE=disabled RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2 RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0 \
  HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
python3 - <<'PY'
import importlib
for name in ("torch", "ray", "deepspeed", "pydantic", "fastapi", "tensorboardX"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}", end="; ")
    except Exception as e:  # the bundle's other part may not be unpacked yet
        print(f"{name}: {type(e).__name__}", end="; ")
import torch
print(f"cuda {torch.cuda.is_available()}")
PY
SH

du -sh "$OUT/ray" "$OUT/rest"
echo "tracked files: $(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1) bytes"
