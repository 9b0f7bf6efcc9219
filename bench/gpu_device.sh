#!/bin/sh
# The GPU checks of issue 26 (tests/gpu and bench/gpu.py) on a GPU machine lent by the device tool, in one run.
#
# Such a machine has Python 3.12 with PyTorch, numpy, scipy, scikit-image, pytest and pytest-timeout, but not
# the node's other packages, and it cannot download anything: they travel with the working tree as wheels.
#
#   here, once:  PYTHON=.venv/bin/python bench/gpu_device.sh wheels
#                  downloads the missing packages as CPython 3.12 manylinux wheels into .whl/ (about 30 MB; the
#                  versions installed for PYTHON) and adds .whl/ to .git/info/exclude; the tree that travels must
#                  stay under 64 MiB (the checkout is about 30 MB)
#   there:       the device tool's run with carry [".whl"], command "sh bench/gpu_device.sh run", timeout_s 600
#                  installs the wheels into /tmp/site, runs the GPU tests (-s: their figures are printed) and
#                  bench/gpu.py; both logs go to $OUT (gpu-tests.log, gpu-bench.log). About 5-8 minutes on an H100.
#
# Nothing here is needed on a machine of your own with a GPU: install the node (pip install -e .[worker,dev]),
# then `pytest tests/gpu -s` and `python bench/gpu.py`.
set -u

# Packages the device image lacks (its list: the device tool's KINDS.md), as pip names. Not the pylibjpeg and
# pyjpegls decoders: the phantoms are uncompressed, and pydicom needs them only for compressed pixel data.
PACKAGES="SQLAlchemy alembic Mako annotated-types pydantic pydantic_core pydantic-settings python-dotenv
typing-inspection argon2-cffi argon2-cffi-bindings cffi google-re2 highdicom pydicom pynetdicom monai nibabel"

case "${1:-}" in
wheels)
    PYTHON=${PYTHON:-python3}
    mkdir -p .whl
    exclude=$(git rev-parse --git-path info/exclude) || exit 1
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
    for name in $PACKAGES; do
        version=$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name") || {
            echo "gpu_device.sh: $name is not installed for $PYTHON: install the node's [worker,dev] extras" >&2
            exit 1
        }
        "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$name==$version" || exit 1
    done
    du -sh .whl
    ;;
run)
    OUT=${OUT:-/tmp/gpu-out}
    mkdir -p "$OUT"
    export PYTHONUNBUFFERED=1
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || exit 1
        export PYTHONPATH="/tmp/site:$PWD"
    else
        export PYTHONPATH="$PWD"
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu-tests.log"
    python3 -m pytest -q -p no:cacheprovider -rs -s tests/gpu 2>&1 | tee -a "$OUT/gpu-tests.log"
    python3 bench/gpu.py 2>&1 | tee "$OUT/gpu-bench.log"
    ;;
*)
    echo "usage: bench/gpu_device.sh wheels|run (see the comment at the top)" >&2
    exit 2
    ;;
esac
