#!/usr/bin/env bash
# Transformer Engine on a lent GPU machine (no network there; at most 64 MiB of files per command; ignored files
# sent with an earlier command stay while the machine stays up). NOT RUN YET: no GPU was lent to the session that
# wrote it (docs/performance.md section 7). Steps, from the repository root:
#
#   here:    bash tools/te_gpu/te_gpu.sh prepare     # wheels into .te_gpu/ (ignored): TE's 259 MiB library wheel
#                                                    # split into parts under 60 MiB, one folder per command
#   device:  bash tools/te_gpu/te_gpu.sh receive N   # one command per part, carry [".te_gpu/cu13/partNNN"]
#   device:  bash tools/te_gpu/te_gpu.sh build       # carry [".te_gpu/small"]: join + install the wheels, build
#                                                    # transformer-engine-torch with all cores, pack the results
#   device:  bash tools/te_gpu/te_gpu.sh check       # tools/container_check.sh with TE; its table and logs in $OUT
#   device:  bash tools/te_gpu/te_gpu.sh fetch N     # built parts N.. (under 16 MiB each, 6 per command) to $OUT
#   here:    bash tools/te_gpu/te_gpu.sh unpack DIR... # join the fetched parts into .te_gpu/built/ (SHA-256 checked)
#
# A later session then carries .te_gpu/built (the built extension wheel, the TE Python wheel, and where nvprune
# existed an sm_90-only libtransformer_engine.so, re-split under 60 MiB) and runs `install-built` + `check`.
set -euo pipefail
cd "$(dirname "$0")/../.."
TE_VERSION=${TE_VERSION:-2.20.2}
STATE=.te_gpu
DEVICE_OUT=/tmp/te_gpu_out   # survives between commands while the machine stays up
SITE=/tmp/te_site
PARTS="python3 tools/te_gpu/parts.py"
# nemo-lpo's dependencies that the device image lacks (its package list: /work/.library/device/KINDS.md)
SMALL_WHEELS=("transformer-engine==$TE_VERSION" "megatron-core==0.19.2" "omegaconf" "antlr4-python3-runtime"
              "datasets" "dill" "multiprocess" "mistral-common" "pydantic" "pydantic-core" "annotated-types"
              "typing-inspection" "jsonschema" "jsonschema-specifications" "referencing" "rpds-py" "pycountry"
              "pydantic-extra-types")
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

site_env() { export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"; }

case "${1:-}" in
prepare)
    mkdir -p "$STATE/download" "$STATE/small"
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
        -d "$STATE/download" "transformer-engine-cu13==$TE_VERSION"
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
        -d "$STATE/small" "${SMALL_WHEELS[@]}"
    python3 -m pip download --no-deps --no-binary=:all: -d "$STATE/small" "transformer-engine-torch==$TE_VERSION"
    rm -rf "$STATE/cu13"
    $PARTS split "$STATE"/download/transformer_engine_cu13-*.whl "$STATE/cu13" --max-mib 59 --folders
    du -sh "$STATE/small" "$STATE"/cu13/part*
    n=$(find "$STATE/cu13" -maxdepth 1 -name 'part*' -type d | wc -l)
    echo "send: $n commands 'bash tools/te_gpu/te_gpu.sh receive N' (N = 0..$((n - 1)), carry .te_gpu/cu13/partNNN),"
    echo "then 'bash tools/te_gpu/te_gpu.sh build' (carry .te_gpu/small)"
    ;;
receive)  # the carried part is already in place; say what has arrived so far
    printf -v part "%03d" "${2:?part number}"
    ls -l "$STATE/cu13/part$part"
    find "$STATE/cu13" -name '*.part*' | sort
    ;;
build)
    nvidia-smi -L
    mkdir -p "$DEVICE_OUT" "$SITE"
    wheel_name=$(python3 -c "import json,glob; print(json.load(open(sorted(glob.glob('$STATE/cu13/*/*.manifest.json'))[0]))['file'])")
    $PARTS join "$STATE/cu13" --output "/tmp/$wheel_name"   # every part present and SHA-256 checked
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "/tmp/$wheel_name" "$STATE"/small/*.whl
    site_env
    start=$(date +%s)
    # transformer-engine-torch: 33 C++ files built against the image's torch; all cores
    MAX_JOBS=$(nproc) NVTE_FRAMEWORK=pytorch python3 -m pip wheel -v --no-deps --no-build-isolation --no-index \
        -w "$DEVICE_OUT/wheels" "$STATE"/small/transformer_engine_torch-*.tar.gz >"$DEVICE_OUT/build.log" 2>&1 \
        || { tail -50 "$DEVICE_OUT/build.log"; exit 1; }
    echo "built transformer-engine-torch in $(($(date +%s) - start)) s with $(nproc) jobs"
    python3 -m pip install -q --no-index --no-deps --target "$SITE" "$DEVICE_OUT"/wheels/*.whl
    python3 -c "import transformer_engine.pytorch as te, transformer_engine; print('TE', transformer_engine.__version__)"
    built=("$DEVICE_OUT"/wheels/transformer_engine_torch-*.whl "$STATE"/small/transformer_engine-"$TE_VERSION"-*.whl)
    lib=$(find "$SITE" -name 'libtransformer_engine.so' | head -1)
    if command -v nvprune >/dev/null && [[ -n $lib ]]; then   # sm_90 only: a later run sends far less
        nvprune -gencode arch=compute_90,code=sm_90 -o "$DEVICE_OUT/libtransformer_engine.so" "$lib"
        ls -l "$lib" "$DEVICE_OUT/libtransformer_engine.so"
        # where TE's loader finds it, and the cu13 package's metadata (TE checks its installed packages)
        realpath --relative-to="$SITE" "$lib" >"$DEVICE_OUT/lib_path.txt"
        (cd "$SITE" && tar czf "$DEVICE_OUT/cu13_meta.tgz" transformer_engine_cu13-*.dist-info)
        built+=("$DEVICE_OUT/libtransformer_engine.so" "$DEVICE_OUT/lib_path.txt" "$DEVICE_OUT/cu13_meta.tgz")
    fi
    rm -rf "$DEVICE_OUT/parts"
    for f in "${built[@]}"; do $PARTS split "$f" "$DEVICE_OUT/parts" --max-mib 15.5 >/dev/null; done
    find "$DEVICE_OUT/parts" -type f -printf "%f\n" | sort | tee "$DEVICE_OUT/parts.txt"
    "$0" fetch 0
    ;;
check)
    site_env
    OUT="${OUT:-/tmp}/check" bash tools/container_check.sh
    ;;
fetch)  # parts N.. (6 per command: the files back are at most 8, 16 MiB each, 64 MiB together)
    mapfile -t all < <(find "$DEVICE_OUT/parts" -type f -printf "%f\n" | sort)
    first=${2:?first part index}
    for f in "${all[@]:$first:6}"; do cp "$DEVICE_OUT/parts/$f" "${OUT:?}/"; done
    cp "$DEVICE_OUT/parts.txt" "$OUT/"
    echo "sent parts $first..$((first + 5)) of ${#all[@]}; next: fetch $((first + 6))"
    ;;
unpack)  # here: the folders the fetched parts landed in
    shift
    mkdir -p "$STATE/built"
    for manifest in $(find "$@" -name '*.manifest.json' -printf '%f\n' | sort -u); do
        name=${manifest%.manifest.json}
        $PARTS join "$@" --name "$name" --output "$STATE/built/$name"
    done
    if [[ -f $STATE/built/libtransformer_engine.so ]]; then
        $PARTS split "$STATE/built/libtransformer_engine.so" "$STATE/built/lib" --max-mib 55 --folders >/dev/null
        rm "$STATE/built/libtransformer_engine.so"
    fi
    du -sh "$STATE/built"/*
    ;;
install-built)  # a later session: carry .te_gpu/built (+ .te_gpu/small for megatron-core & co.)
    mkdir -p "$SITE"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$STATE"/built/*.whl "$STATE"/small/*.whl
    if [[ -d $STATE/built/lib ]]; then   # the sm_90-only library where the cu13 wheel had put it
        tar xzf "$STATE/built/cu13_meta.tgz" -C "$SITE"
        $PARTS join "$STATE/built/lib" --output "$SITE/$(cat "$STATE/built/lib_path.txt")"
    fi
    site_env
    python3 -c "import transformer_engine.pytorch; print('TE imports')"
    ;;
*)
    sed -n '2,20p' "$0"
    exit 2
    ;;
esac
