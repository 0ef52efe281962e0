#!/usr/bin/env bash
# Builds csrc/ as a libtorch library with CMake and runs the C++ tests with ctest.
# Uses the torch of the active Python; works with CPU and CUDA builds of torch (no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build/cmake}
PY=${PYTHON:-python}
prefix=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
args=(-DCMAKE_PREFIX_PATH="$prefix")
if "$PY" -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then
  # A CUDA build of torch makes find_package(Torch) look for the CUDA toolkit (nvcc, nvrtc) even
  # for a CPU-only library: CMakeLists.txt resolves the toolkit as setup.py does; point it at the
  # nvrtc that pip installed with torch.
  nvrtc=$("$PY" -c "import glob, os, torch; print((sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), '..', 'nvidia', '*', 'lib', 'libnvrtc.so*'))) + [''])[0])")
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  args+=(-DPython3_EXECUTABLE="$(command -v "$PY")")
  [ -n "$nvrtc" ] && args+=(-DCUDA_nvrtc_LIBRARY="$nvrtc")
fi
mkdir -p "$BUILD"
cmake -S . -B "$BUILD" "${args[@]}" ${CMAKE_ARGS:-} > "$BUILD.configure.log" 2>&1 || { cat "$BUILD.configure.log"; exit 1; }
cmake --build "$BUILD" -j"$(nproc)"
ctest --test-dir "$BUILD" --output-on-failure -V | grep -E "PASS|FAIL|failed|tests passed"
