#!/usr/bin/env bash
# Download here the wheels that the GPU machine lacks, for benchmarks/device_check.sh there.
#
#     bash benchmarks/fetch_device_wheels.sh            # -> .wheels/ (git-ignored), for cp312
#     PYVER=3.11 bash benchmarks/fetch_device_wheels.sh /tmp/wheels311   # a set for this machine
#
# The GPU machine has Python 3.12 with torch, torchvision, numpy, pandas, pyarrow, scipy,
# matplotlib, seaborn, scikit-learn and pytest, no network, and no snakemake, mlxtend or
# jsonschema. Everything it gets travels with the working tree (64 MiB in all), so the set is an
# explicit list: snakemake, mlxtend and jsonschema at the versions envs/requirements.txt pins, and
# their dependencies except those the image has (numpy, pandas, scipy, scikit-learn, matplotlib
# and theirs: contourpy, cycler, fonttools, kiwisolver, pillow, pyparsing, python-dateutil,
# joblib, threadpoolctl, tzdata) -- never torch. The list is the closure pip resolves for the pins:
#     pip install --dry-run --ignore-installed --report r.json -c envs/requirements.txt \
#         snakemake==... mlxtend==... jsonschema==...
# regenerate it that way when a pin changes (device_check.sh says which wheel it misses).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/.wheels}"
PYVER="${PYVER:-3.12}"
PIP="${PIP:-python3 -m pip}"

pin() {  # the version envs/requirements.txt pins for package $1
    sed -n "s/^$1==\([^ ]*\).*/\1/p" "$ROOT/envs/requirements.txt"
}

TOP=("snakemake==$(pin snakemake)" "mlxtend==$(pin mlxtend)" "jsonschema==$(pin jsonschema)")
DEPS=(
    # snakemake
    ConfigArgParse==1.9.0 GitPython==3.2.1 gitdb==4.0.12 smmap==5.0.3 Jinja2==3.1.6
    MarkupSafe==3.0.4 PuLP==3.3.2 PyYAML==6.0.3 SQLAlchemy==2.0.58 greenlet==3.5.6
    sqlmodel==0.0.37 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
    typing-inspection==0.4.5 typing_extensions==4.16.0 argparse-dataclass==2.0.0
    conda-inject==1.3.2 docutils==0.22.4 dpath==2.2.0 humanfriendly==10.0 immutables==0.21
    nbformat==5.11.1 fastjsonschema==2.22.3 jupyter_core==5.9.1 traitlets==5.16.1
    platformdirs==4.14.9 packaging==25.0 psutil==7.2.2 requests==2.34.2 certifi==2026.10.19.post1
    charset-normalizer==3.5.3 idna==3.20 urllib3==2.8.0 smart_open==7.7.1 wrapt==2.5.2
    snakemake-interface-common==1.23.0 snakemake-interface-executor-plugins==9.4.0
    snakemake-interface-logger-plugins==2.1.0 snakemake-interface-report-plugins==1.3.0
    snakemake-interface-scheduler-plugins==2.0.2 snakemake-interface-storage-plugins==4.4.1
    tabulate==0.10.0 tenacity==9.2.1 throttler==1.2.3 yte==1.9.4 cloudpickle==3.1.3
    narwhals==2.29.0
    # jsonschema
    attrs==26.1.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
)
SDIST_ONLY=(connection_pool==0.0.3)  # no wheel on PyPI: built here (pure Python, any version)

quiet() {  # pip's warnings about local index folders that lack a package are noise here
    "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

mkdir -p "$DEST"
# --no-deps: exactly this list; the platform flags pick the GPU machine's wheels, not ours.
quiet $PIP download --quiet --no-deps --only-binary=:all: --dest "$DEST" \
    --python-version "$PYVER" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 \
    "${TOP[@]}" "${DEPS[@]}"
quiet $PIP wheel --quiet --no-deps --wheel-dir "$DEST" "${SDIST_ONLY[@]}"

count=$(ls "$DEST"/*.whl | wc -l)
echo "$count wheels in $DEST for Python $PYVER: $(du -sh "$DEST" | cut -f1) ($(du -sb "$DEST" | cut -f1) bytes)"
