#!/usr/bin/env bash
# The Python packages the GPU machine lacks, as wheels for it (CPython 3.12, x86-64 manylinux), in .whl/:
# DeepSpeed (built here as a pure-Python wheel: DS_BUILD_OPS=0, its ops JIT-compile on first use where they are
# needed; ZeRO-2 with torch_adam needs none), its pydantic stack and hjson, and webdataset with braceexpand.
# Everything else the workbench imports is already there (../shared/reference/platform-notes.md; the device tool's
# KINDS.md lists the image's packages).
#
#   launch/gpu_wheels.sh            # or: make gpu-wheels   (needs the package index; about 30 s)
#
# On the GPU machine (carry .whl and start the command with):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
#     export PYTHONPATH=/tmp/site:$PWD
# then, e.g.: python3 benchmarks/gpu_suite.py --out "$OUT"      (docs/benchmarks.md, "GPU suite")
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${WHEELS:-.whl}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
rm -f "$OUT"/*.whl
# one version of each: the target machine's pip refuses two
PURE=(deepspeed==0.19.8 hjson==3.1.0 pydantic==2.14.4 annotated-types==0.7.0 typing-inspection==0.4.4
      typing_extensions==4.16.0 webdataset==1.0.2 braceexpand==0.1.7)
BINARY=(pydantic-core==2.50.5)
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$OUT" "${BINARY[@]}"
for spec in "${PURE[@]}"; do
  if [[ $spec == deepspeed==* ]]; then  # an sdist: build it without its C++/CUDA ops
    DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation -w "$OUT" "$spec"
  else
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform any --platform manylinux2014_x86_64 -d "$OUT" "$spec"
  fi
done
ls -1 "$OUT"
du -sh "$OUT"
