#!/usr/bin/env bash
# The reference implementation for comparisons: llama.cpp as vendored in llama-cpp-python 0.3.36, built for the
# CPU in a virtual environment of its own, outside this repository. Prints that environment's python on stdout
# (everything else goes to stderr), so that
#
#     DSV4_ORACLE_PYTHON=$(tools/oracle/setup.sh) pytest tests/test_reference_loads.py
#
# works. The first run builds (about 9 minutes on 2 cores); later runs only check the build and print the path.
# Where: $DSV4_ORACLE_DIR, default ~/.cache/llama-dsv4-oracle (venv/ and sdist/; the unpacked sdist keeps
# llama.cpp's sources and chat templates, to read). Never import llama_cpp in a process that imported llama_dsv4:
# both load a libggml of their own (tools/oracle/README.md).
set -euo pipefail

version=0.3.36
root="${DSV4_ORACLE_DIR:-$HOME/.cache/llama-dsv4-oracle}"
venv="$root/venv"
python="$venv/bin/python"
sdist="$root/sdist"

built() { [ -x "$python" ] && "$python" -c "import llama_cpp, numpy" 2>/dev/null; }

if built; then
  echo "$python"
  exit 0
fi

echo "building llama-cpp-python $version (llama.cpp, CPU) in $venv" >&2
mkdir -p "$root"
python3 -m venv "$venv"
"$python" -m pip install -q --upgrade pip >&2
"$python" -m pip install -q numpy >&2
# the source distribution, unpacked next to the venv (llama.cpp's sources are read from it)
"$python" -m pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$sdist" >&2
tar -xzf "$sdist/llama_cpp_python-$version.tar.gz" -C "$sdist"
# the library only, tuned for this CPU; no tests, examples, tools, server or multimodal projector
# (DSV4_ORACLE_CMAKE_EXTRA: more CMake arguments, e.g. a build without AMX for "Speed", "Quantized files")
export CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF ${DSV4_ORACLE_CMAKE_EXTRA:-}"
export CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
"$python" -m pip install "$sdist/llama_cpp_python-$version.tar.gz" >&2
"$python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)" >&2
echo "$python"
