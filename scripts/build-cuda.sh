#!/usr/bin/env bash
# Builds `harness` with candle's CUDA backend on a machine that has no CUDA toolkit.
#
# NVIDIA publishes the CUDA 13 compiler, headers and libraries on PyPI (the `nvidia-*`
# wheels below); installed with `pip --target` they form a toolkit tree under
# $CUDA_TOOLKIT_DIR/nvidia/cu13. Two things are missing from it and made here:
#   - unversioned library names (libcublas.so, ...) for the linker;
#   - libcuda.so, the driver library, which ships with the GPU driver and not on PyPI.
#     candle links cudarc with `dynamic-linking`, so the linker wants it: we compile a stub
#     that defines every driver entry point cudarc declares. The binary records
#     `libcuda.so.1` and gets the real driver on the GPU machine.
#
# Needs: python3 with pip (and access to PyPI), gcc, cargo. Takes 20-40 minutes on 2 cores
# (candle's kernels are compiled by nvcc). Output: target/cuda/release/harness (stripped).
# Running it needs an NVIDIA driver for CUDA >= 13.0 and the CUDA libraries on the library
# path:  LD_LIBRARY_PATH=$CUDA_TOOLKIT_DIR/nvidia/cu13/lib target/cuda/release/harness ...
#
# `scripts/build-cuda.sh test [ARGS]` runs `cargo test` in the same build instead (on a GPU
# machine: the GPU tests of tests/precision.rs run there; elsewhere they say why they skip).
#
# Environment: CUDA_COMPUTE_CAP (default 90: Hopper, H100/H200), CUDA_TOOLKIT_DIR (default
# target/cuda-toolkit), PIP (default `python3 -m pip`).
set -euo pipefail
cd "$(dirname "$0")/.."

export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
toolkit_dir="$(realpath -m "${CUDA_TOOLKIT_DIR:-target/cuda-toolkit}")"
pip=(${PIP:-python3 -m pip})
root="$toolkit_dir/nvidia/cu13"

# One CUDA release throughout (13.0: the oldest 13.x, so the oldest driver that runs it).
wheels=(
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
)
if [[ ! -x "$root/bin/nvcc" || ! -e "$root/lib/libcublas.so.13" ]]; then
    echo "installing the CUDA 13.0 toolkit wheels into $toolkit_dir" >&2
    "${pip[@]}" install --quiet --no-deps --target "$toolkit_dir" "${wheels[@]}"
fi

for lib in cudart.so.13 cublas.so.13 cublasLt.so.13 curand.so.10 nvrtc.so.13; do
    ln -sf "lib$lib" "$root/lib/lib${lib%.so.*}.so"
done

# The driver stub: every `pub unsafe fn cu*` of the cudarc version Cargo.lock pins.
cudarc_dir="$(cargo metadata --format-version 1 --features cuda \
    | python3 -c 'import json,sys,os; m=json.load(sys.stdin); print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"]=="cudarc"))')"
mkdir -p "$root/lib/stubs"
grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$cudarc_dir/src/driver/sys/mod.rs" \
    | awk '{print "int " $4 "(void) { return 999; /* CUDA_ERROR_UNKNOWN: the stub is not a driver */ }"}' \
    | sort -u > "$root/lib/stubs/libcuda-stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib/stubs/libcuda.so" "$root/lib/stubs/libcuda-stub.c"

export CUDA_HOME="$root" CUDA_PATH="$root" PATH="$root/bin:$PATH"
# A target folder of its own, so the CPU build's artefacts are left exactly as they are.
if [[ "${1:-}" == test ]]; then
    # `scripts/build-cuda.sh test [ARGS]`: the test suite in the cuda build, GPU tests included.
    shift
    export LD_LIBRARY_PATH="$root/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    exec cargo test --release --features cuda --target-dir target/cuda "$@"
fi
cargo build --release --features cuda --target-dir target/cuda --bin harness "$@"
strip target/cuda/release/harness
ls -l target/cuda/release/harness
echo "run with: LD_LIBRARY_PATH=$root/lib target/cuda/release/harness --device cuda ..." >&2
