#!/usr/bin/env bash
# The model.fsdp and rollout.engine=vllm check on a CUDA machine, in one command (what it checks: scripts/gpu_check.py's docstring).
#
#     bash scripts/gpu_check.sh                        # every GPU, bfloat16, a 0.5B model; under 8 minutes on one H200
#     bash scripts/gpu_check.sh --device cpu --small   # the same path on CPU processes, a tiny model
#
# Needs only PyTorch, transformers and peft on the machine, and no network. tether itself is installed
# from this checkout with `pip install --no-deps -e .` (pyproject's version pins are not resolved: the
# machine's own torch and transformers are what is checked). When tether's imports need modules the
# machine lacks (rich, pyyaml, tensorboard, ...), they are installed from wheels in scripts/gpu_wheels/
# if that folder exists; otherwise the check names them and exits 2.
#
# PYTHON picks the interpreter (default: python3). With $OUT set, everything printed also goes to
# $OUT/gpu_check.log, and the tables to $OUT/gpu_check.md. Other arguments go to scripts/gpu_check.py.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
case "$PY" in  # a path relative to where the script was called from, made absolute before the cd below
    */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;;
esac
cd "$ROOT" || exit 2
WHEELS="$ROOT/scripts/gpu_wheels"

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/gpu_check.log") 2>&1
fi

echo "gpu_check.sh: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), $("$PY" --version 2>&1) at $(command -v "$PY")"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader

# The machine's own stack: never installed here (no network, and these are what the check is about).
if ! "$PY" -c "import torch, transformers, peft" 2>/dev/null; then
    echo "gpu_check.sh: $PY cannot import torch, transformers and peft; the check needs all three installed" >&2
    "$PY" -c "import torch, transformers, peft" 2>&1 | tail -n 1 >&2
    exit 2
fi
"$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, '| transformers', transformers.__version__, \
'| peft', peft.__version__, '| CUDA available:', torch.cuda.is_available(), '| GPUs:', torch.cuda.device_count())"

# tether from this checkout. Where the editable install cannot be made (no setuptools, a read-only
# site-packages), PYTHONPATH still makes this checkout's tether the one every process imports.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
installed="$(cd / && env -u PYTHONPATH "$PY" -c 'import pathlib, tether; print(pathlib.Path(tether.__file__).resolve().parent.parent)' 2>/dev/null)"
if [ "$installed" != "$ROOT" ]; then
    # --no-build-isolation --no-index: the build backend (setuptools) is the machine's; nothing is fetched.
    if ! "$PY" -m pip install --quiet --no-deps --no-build-isolation --no-index -e "$ROOT"; then
        echo "gpu_check.sh: note: pip install --no-deps -e . failed; tether is imported from $ROOT through PYTHONPATH"
    fi
fi

# Which modules tether's imports lack: all of them named at once (gpu_check.py --missing-imports
# stands a stub in for each one found and imports again), installed from the wheel folder if there is one.
rounds=3
for round in $(seq 0 "$rounds"); do
    probe="$("$PY" scripts/gpu_check.py --missing-imports 2>&1)"
    status=$?
    [ "$status" -eq 0 ] && break
    if [ "$status" -ne 3 ]; then
        echo "gpu_check.sh: importing tether failed, not for a missing module:" >&2
        echo "$probe" | tail -n 30 >&2
        exit 2
    fi
    modules="$(echo "$probe" | awk '$1 == "MISSING" {print $2}' | xargs)"
    packages="$(echo "$probe" | awk '$1 == "MISSING" {print $3}' | xargs)"
    echo "$probe" | grep '^NOTE' || true
    if [ ! -d "$WHEELS" ]; then
        echo "gpu_check.sh: tether's imports need Python modules this machine lacks: $modules" >&2
        echo "  (pip packages: $packages). Put wheels of them and of their dependencies in scripts/gpu_wheels/" >&2
        echo "  (pip download --only-binary=:all: -d scripts/gpu_wheels $packages, for this machine's Python) and run again." >&2
        exit 2
    fi
    if [ "$round" -eq "$rounds" ]; then
        echo "gpu_check.sh: tether's imports still lack modules after installing from $WHEELS: $modules" >&2
        exit 2
    fi
    echo "gpu_check.sh: installing $packages (for the modules $modules) from $WHEELS"
    # shellcheck disable=SC2086 # one word per package
    if ! "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" $packages; then
        echo "gpu_check.sh: installing $packages from $WHEELS failed (a dependency's wheel missing?)" >&2
        exit 2
    fi
done

device=cuda
for arg in "$@"; do
    case "$arg" in cpu | --device=cpu) device=cpu ;; esac
done
if [ "$device" = cuda ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: CUDA is not available to $PY here; on a CPU machine run: bash scripts/gpu_check.sh --device cpu --small" >&2
    exit 2
fi

"$PY" -u scripts/gpu_check.py "$@"
status=$?
echo "gpu_check.sh: exit status $status"
exit "$status"
