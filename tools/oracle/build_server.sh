#!/usr/bin/env bash
# llama-server, built from the same llama.cpp source as the reference (the copy vendored in llama-cpp-python
# 0.3.36, unpacked by setup.sh), for the serving benchmark (bench/serve.py). CPU only, Release, tuned for this CPU
# like the reference (GGML_NATIVE), static (its own ggml, no shared library to clash with ours), only the
# llama-server target, no web UI download and no HTTPS. Prints the binary's path as its last line, so that
#
#     python bench/serve.py --llama-server "$(tools/oracle/build_server.sh | tail -n1)"
#
# works. The first run builds (about 7 minutes with -j2 on 2 cores; $DSV4_BUILD_JOBS, default 2); later runs only
# check the binary and print the path. Where: $DSV4_ORACLE_DIR (default ~/.cache/llama-dsv4-oracle)/llama-server/.
# No network, except PyPI when the source distribution is not unpacked yet (as setup.sh).
#
# `build_server.sh llama-speculative-simple` builds, in the same tree, llama.cpp's own in-process speculative
# driver instead (examples on; it decodes one prompt with --spec-type draft-mtp and prints its speed), for
#
#     python bench/speculative.py --llama-speculative "$(tools/oracle/build_server.sh llama-speculative-simple | tail -n1)"
#
# On a CPU with AMX, run the binary with --no-repack for quantized files: the same switch as the reference's
# DSV4_ORACLE_NO_REPACK=1 (llama_model_params.use_extra_bufts = false; tools/oracle/README.md).
set -euo pipefail

version=0.3.36
root="${DSV4_ORACLE_DIR:-$HOME/.cache/llama-dsv4-oracle}"
sdist="$root/sdist"
src="$sdist/llama_cpp_python-$version/vendor/llama.cpp"
target="${1:-llama-server}"
case "$target" in
  llama-server) examples=OFF ;;
  llama-speculative-simple) examples=ON ;;  # llama.cpp's own in-process speculative driver (bench/speculative.py)
  *) echo "build_server.sh: the target is llama-server or llama-speculative-simple, not '$target'" >&2; exit 2 ;;
esac
out="$root/llama-server"
build="$out/build"
binary="$build/bin/$target"
jobs="${DSV4_BUILD_JOBS:-2}"

if [ -x "$binary" ] && "$binary" --version >/dev/null 2>&1; then
  echo "$binary"
  exit 0
fi

if [ ! -f "$src/CMakeLists.txt" ]; then
  echo "unpacking llama-cpp-python $version's source distribution into $sdist" >&2
  mkdir -p "$sdist"
  python3 -m pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$sdist" >&2
  tar -xzf "$sdist/llama_cpp_python-$version.tar.gz" -C "$sdist"
fi

echo "building $target from $src into $build (-j$jobs)" >&2
start=$(date +%s)
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=$examples -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_APP=OFF >&2
cmake --build "$build" --config Release --target "$target" -j "$jobs" >&2
"$binary" --version >&2
echo "built in $(($(date +%s) - start)) s" >&2
echo "$binary"
