#!/usr/bin/env bash
# Our package on aarch64 Linux (the CPU of Apple Silicon and of Graviton/Ampere servers), proven on an x86-64 host
# under qemu-user emulation (issue 21, item 2). End to end:
#   1. Debian's qemu-user-static and debootstrap (apt), binfmt_misc mounted and qemu-aarch64 registered;
#   2. a Debian bookworm arm64 userland (debootstrap, Debian's packages: python3.11, gcc 12) in $ROOT;
#   3. in it, under emulation: a venv, the aarch64 manylinux wheel of libggml-python from PyPI, this repository's
#      tracked files built there (`pip install ".[test]"`: Cython and gcc run as aarch64 programs);
#   4. the main job (the demo model answers its two sums), and the forward-agreement (committed llama.cpp logits,
#      the numpy reference, ubatch schedules: on test models written on this host, see below), kernel, GEMM and
#      tokenizer tests, all as aarch64 code.
# Speed is not the point (emulation is 10-30x slower than native). Needs root (chroot, mounts) and the network to
# Debian's and PyPI's registries. The userland is kept for reruns (AARCH64_ROOT, default /var/tmp/llama-dsv4-arm64;
# about 0.7 GB, 1.5 GB with the venv); AARCH64_FRESH=1 makes a new one. A log of each run goes to
# $ROOT/aarch64_check.log; docs/install.md holds the last run's figures.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
ROOT=${AARCH64_ROOT:-/var/tmp/llama-dsv4-arm64}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
TESTS="tests/test_forward.py tests/test_kernels.py tests/test_gemm.py tests/test_tokenizer.py"

[ "$(id -u)" = 0 ] || { echo "aarch64_check.sh: needs root (debootstrap, chroot, mounts)" >&2; exit 2; }
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
  apt-get install -y qemu-user-static debootstrap binfmt-support
fi
[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  update-binfmts --enable qemu-aarch64 || true
fi
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || { echo "qemu-aarch64 is not registered with binfmt_misc" >&2; exit 2; }
# the F flag: the kernel opens the interpreter at registration, so it runs inside the chroot without a copy there
grep -q '^flags: .*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 || { echo "qemu-aarch64 lacks binfmt flag F" >&2; exit 2; }

if [ "${AARCH64_FRESH:-0}" = 1 ]; then rm -rf "$ROOT"; fi
if [ ! -x "$ROOT/usr/bin/python3.11" ]; then
  rm -rf "$ROOT"
  debootstrap --arch=arm64 --variant=minbase \
    --include=python3,python3-venv,python3-dev,python3-pip,gcc,libc6-dev,ca-certificates "$SUITE" "$ROOT" "$MIRROR"
fi

mounted=()
cleanup() { for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[$i]}" || true; done; }
trap cleanup EXIT
for m in proc dev; do
  if ! mountpoint -q "$ROOT/$m"; then
    if [ "$m" = proc ]; then mount -t proc proc "$ROOT/proc"; else mount --bind /dev "$ROOT/dev"; fi
    mounted+=("$ROOT/$m")
  fi
done
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
# this host's trust store (it may hold a local registry proxy's CA): pip and Python's ssl in the chroot use it
cp -L /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/host-ca-certificates.crt"

# this checkout's tracked files (committed or not), as a fresh clone would have them
rm -rf "$ROOT/src" && mkdir -p "$ROOT/src"
git -C "$repo" ls-files -z | (cd "$repo" && tar --null -T - -cf -) | tar -xf - -C "$ROOT/src"

# the forward tests' models, written on this x86-64 host: ggml's K-quant quantizer rounds differently on aarch64
# (its C compiled with fused multiply-adds), so a Q5_K tensor written there is another model than the one llama.cpp's
# committed logits were computed on; the tests check each file's SHA-256 against the fixture's all the same.
# HOST_PYTHON: a host Python with this package installed; else a venv beside $ROOT gets it (about a minute).
host_py=${HOST_PYTHON:-}
if [ -z "$host_py" ]; then
  host_venv="$ROOT.host-venv"
  [ -x "$host_venv/bin/python" ] || python3 -m venv "$host_venv"
  "$host_venv/bin/pip" install -q "$repo"
  host_py="$host_venv/bin/python"
fi
rm -rf "$ROOT/forward-models" && mkdir -p "$ROOT/forward-models"
(cd / && "$host_py" - "$repo/tests" "$ROOT/forward-models" <<'EOF'
import os
import sys

sys.path.insert(0, sys.argv[1])
from forward_models import MODELS, SEED  # noqa: E402

from llama_dsv4.model.writer import write_model  # noqa: E402

for name, (params, init, dtype) in MODELS.items():
    write_model(os.path.join(sys.argv[2], f"{name}.gguf"), params, dtype=dtype, vocab="none", init=init, seed=SEED)
EOF
)

chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
  PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/host-ca-certificates.crt /bin/bash -euo pipefail -c "
  echo \"machine: \$(uname -m), \$(python3 --version), \$(gcc --version | head -1)\"
  [ \"\$(uname -m)\" = aarch64 ]
  [ -x /venv/bin/python ] || python3 -m venv /venv
  . /venv/bin/activate
  t0=\$(date +%s)
  pip install -q --upgrade pip
  pip install -q --only-binary libggml-python 'libggml-python==0.20.2.post1'
  python -c 'import libggml, pathlib; print(\"libggml:\", sorted(p.name for p in pathlib.Path(libggml.__file__).parent.glob(\"lib*/libggml*.so\")))'
  cd /src && pip install -q '.[test]'
  t1=\$(date +%s)
  echo \"install (wheel of libggml-python, our package built here): \$((t1 - t0)) s\"
  cd /tmp && python -c 'import llama_dsv4._ggml as g, platform; print(platform.machine(), \"gemm isa:\", g.gemm_isa(), [d[\"name\"] for d in g.devices()])'
  llama-dsv4  # the main job: the embedded demo model answers two sums
  cd /src && LLAMA_DSV4_FORWARD_MODELS=/forward-models pytest -q -p no:cacheprovider $TESTS  # the console script: the installed package, not ./llama_dsv4
  echo \"tests: \$((\$(date +%s) - t1)) s\"
" 2>&1 | tee "$ROOT/aarch64_check.log"
