#!/usr/bin/env bash
# Builds Strata's CUDA binaries here (Release, CUDA on, no GPU needed) and packs them, with every
# non-system shared library they load, into a folder small enough to carry to a lent GPU machine
# that has none of our Debian libraries (bench/README-gpu.md has the whole procedure).
#
# Usage: scripts/gpu_bundle.sh [--build-dir DIR] [--out DIR] [--no-build] [--allow-missing]
#   --build-dir  build tree (default build-gpu; configured with -DSTRATA_NATIVE=OFF
#                -march=$STRATA_BUNDLE_MARCH (default x86-64-v3: the GPU host's CPU is not this
#                one) and CMAKE_CUDA_ARCHITECTURES=$STRATA_BUNDLE_CUDA_ARCH (default 90, H100/H200))
#   --out        the folder to carry (default gpu_bundle/ at the repo root; .gitignore'd)
#   --no-build   pack what the build tree already has
#   --allow-missing  pack even when some targets did not build (listed in the manifest)
# Env: STRATA_BUNDLE_JOBS (ninja -j, default 2), STRATA_BUNDLE_MAX_MIB (default 60).
#
# The folder holds:
#   payload.tar.gz  bin/ (strata, strata-worker, strata-coordinator, every tests/cuda *_test,
#                   the GPU benchmarks), lib/ (non-system shared libraries), lib/compat/
#                   (libstdc++, libgcc_s: used only when the GPU machine's own are older),
#                   env.sh, with_env.sh, examples/*.yaml, data/fortunes/ (the examples' text),
#                   MANIFEST.txt
#   unpack.sh       unpacks payload.tar.gz once into $STRATA_BUNDLE_ROOT (default
#                   /tmp/strata_gpu_bundle) and prints that path
#   MANIFEST.txt    a copy, readable without unpacking
# Compressed because the libraries alone (OpenBLAS is 36 MB) exceed the 64 MiB a device call may
# carry; gzip because every Linux has it.
#
# Left out on purpose (the manifest lists each with its reason):
#   glibc (libc, libm, libpthread, libdl, librt, ld-linux, ...): must match the machine's kernel
#     interface; the manifest records the newest GLIBC_ version the binaries need.
#   the CUDA driver (libcuda.so*, libnvidia-*): belongs to the machine.
#   CUDA libraries over $STRATA_BUNDLE_CUDA_MAX_MIB (default 8 MiB) -- cuBLAS (54 MB), cuBLASLt
#     (540 MB), NCCL (218 MB): env.sh finds them on the GPU machine next to its nvcc
#     (../lib64, ../targets/x86_64-linux/lib), in /usr/local/cuda*, in Python's nvidia-* wheels
#     (PyTorch's), or through ldconfig, and says where each came from. cudart (0.7 MB) is bundled.
#
# Fails (exit 1) when CUDA is not configured, a target is missing (unless --allow-missing), or the
# folder is over the size limit.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
build="$repo/build-gpu"
out="$repo/gpu_bundle"
do_build=1
allow_missing=0
while [ $# -gt 0 ]; do
  case "$1" in
    --build-dir) build="$(realpath -m "$2")"; shift 2 ;;
    --out) out="$(realpath -m "$2")"; shift 2 ;;
    --no-build) do_build=0; shift ;;
    --allow-missing) allow_missing=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_bundle.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
jobs="${STRATA_BUNDLE_JOBS:-2}"
max_mib="${STRATA_BUNDLE_MAX_MIB:-60}"
cuda_max_mib="${STRATA_BUNDLE_CUDA_MAX_MIB:-8}"
march="${STRATA_BUNDLE_MARCH:-x86-64-v3}"
cuda_arch="${STRATA_BUNDLE_CUDA_ARCH:-90}"

die() { echo "gpu_bundle.sh: ERROR: $*" >&2; exit 1; }
log() { echo "gpu_bundle.sh: $*" >&2; }

# ---- targets: the binaries named in bench/README-gpu.md
gpu_tests=()
for f in "$repo"/tests/cuda/*_test.cc; do
  [ -e "$f" ] && gpu_tests+=("$(basename "$f" .cc)")
done
benches=(cuda_kernels_bench)
targets=(strata strata-worker strata-coordinator "${gpu_tests[@]}" "${benches[@]}")

# ---- configure + build
if [ "$do_build" = 1 ]; then
  log "configuring $build (Release, CUDA arch $cuda_arch, -march=$march)"
  cfg_log="$(mktemp)"
  if ! cmake -S "$repo" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSTRATA_CUDA=ON \
      -DSTRATA_NATIVE=OFF "-DCMAKE_CXX_FLAGS=-march=$march" \
      "-DCMAKE_CUDA_ARCHITECTURES=$cuda_arch" >"$cfg_log" 2>&1; then
    cat "$cfg_log" >&2
    die "cmake configure failed"
  fi
  grep -q "CUDA targets: ON" "$cfg_log" || { cat "$cfg_log" >&2; die "CUDA is not configured (no nvcc?)"; }
  log "building ${#targets[@]} targets with -j$jobs: ${targets[*]}"
  # -k 0: build every target that can be built; the missing ones are reported below.
  ninja -C "$build" -j"$jobs" -k 0 "${targets[@]}" || log "some targets failed to build (see above)"
fi
[ -d "$build/bin" ] || die "$build/bin does not exist (build first, or drop --no-build)"

present=() missing=()
for t in "${targets[@]}"; do
  if [ -x "$build/bin/$t" ]; then present+=("$t"); else missing+=("$t"); fi
done
if [ ${#missing[@]} -gt 0 ]; then
  log "MISSING (did not build): ${missing[*]}"
  [ "$allow_missing" = 1 ] || die "targets missing; fix the build or pass --allow-missing"
fi
[ ${#present[@]} -gt 0 ] || die "nothing to bundle"

# ---- assemble the tree in the build dir (never inside the carried folder)
stage="$build/gpu_bundle_root"
rm -rf "$stage"
mkdir -p "$stage/bin" "$stage/lib/compat" "$stage/examples" "$stage/data/fortunes"
for t in "${present[@]}"; do
  cp "$build/bin/$t" "$stage/bin/$t"
  strip --strip-unneeded "$stage/bin/$t" 2>/dev/null || true
done

is_glibc() {
  case "$1" in
    linux-vdso.so*|ld-linux*|libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|libutil.so*| \
    libresolv.so*|libnsl.so*|libanl.so*|libmvec.so*|libBrokenLocale.so*|libcrypt.so*) return 0 ;;
  esac
  return 1
}

declare -A seen=()
excluded=() runtime_libs=() bundled=()
while read -r name path; do
  [ -n "$name" ] || continue
  name="$(basename "$name")"
  [ -z "${seen[$name]:-}" ] || continue
  seen[$name]=1
  if is_glibc "$name"; then excluded+=("$name: glibc, from the GPU machine"); continue; fi
  case "$name" in
    libcuda.so*|libnvidia-*) excluded+=("$name: CUDA driver, from the GPU machine"); continue ;;
  esac
  [ -n "$path" ] && [ -e "$path" ] || die "$name: not found here (ldd: '$path')"
  size=$(stat -Lc %s "$path")
  real="$(readlink -f "$path")"
  case "$real" in
    /usr/local/cuda*|/opt/nvidia/*)
      if [ "$size" -gt $((cuda_max_mib << 20)) ]; then
        excluded+=("$name: $((size >> 20)) MiB CUDA library > ${cuda_max_mib} MiB; found at run time on the GPU machine")
        runtime_libs+=("$name")
        continue
      fi ;;
  esac
  case "$name" in
    libstdc++.so*|libgcc_s.so*) dest="$stage/lib/compat/$name" ;;
    *) dest="$stage/lib/$name" ;;
  esac
  cp -L "$path" "$dest"
  bundled+=("$name  <- $real  ($size bytes)")
done < <(for t in "${present[@]}"; do
           ldd "$build/bin/$t" | awk '/=>/ {print $1, $3; next} {print $1, ""}'
         done | sort -u -k1,1)

# Newest symbol versions the binaries and bundled libraries need from the machine.
need_glibc=$(grep -aoh 'GLIBC_2\.[0-9]*' "$stage"/bin/* "$stage"/lib/*.so* 2>/dev/null | sort -uV | tail -1)
need_glibcxx=$(grep -aoh 'GLIBCXX_3\.4\.[0-9]*' "$stage"/bin/* "$stage"/lib/*.so* 2>/dev/null | sort -uV | tail -1)

# ---- data and specs
cp "$repo"/examples/*.yaml "$stage/examples/"
if compgen -G "/usr/share/games/fortunes/*.u8" >/dev/null; then
  for f in /usr/share/games/fortunes/*.u8; do cp -L "$f" "$stage/data/fortunes/"; done
else
  log "WARNING: /usr/share/games/fortunes/*.u8 not found; examples/*.yaml will have no data"
fi

# ---- env.sh / with_env.sh (run on the GPU machine)
cat >"$stage/env.sh" <<EOF
# Source me (bash): sets STRATA_BUNDLE_ROOT, PATH and LD_LIBRARY_PATH for the bundled binaries.
# This LD_LIBRARY_PATH is meant for our binaries: prefer with_env.sh, which sets it for one
# command only, so that python/PyTorch keep their own libraries.
STRATA_BUNDLE_ROOT="\$(cd "\$(dirname "\${BASH_SOURCE[0]}")" && pwd)"
export STRATA_BUNDLE_ROOT
STRATA_BUNDLE_RUNTIME_LIBS="${runtime_libs[*]}"
STRATA_BUNDLE_NEED_GLIBC="$need_glibc"
STRATA_BUNDLE_NEED_GLIBCXX="$need_glibcxx"
_strata_ld="\$STRATA_BUNDLE_ROOT/lib"
# libstdc++ / libgcc_s: the machine's own unless it lacks the version our binaries need.
_strata_sys_cxx=\$( (ldconfig -p 2>/dev/null | awk '/libstdc\+\+\.so\.6 .*x86-64/ {print \$NF; exit}') )
if [ -z "\$_strata_sys_cxx" ] || ! grep -aq "\$STRATA_BUNDLE_NEED_GLIBCXX" "\$_strata_sys_cxx" 2>/dev/null; then
  _strata_ld="\$_strata_ld:\$STRATA_BUNDLE_ROOT/lib/compat"
  STRATA_BUNDLE_CXX="bundled (system: \${_strata_sys_cxx:-none} lacks \$STRATA_BUNDLE_NEED_GLIBCXX)"
else
  STRATA_BUNDLE_CXX="system \$_strata_sys_cxx"
fi
_strata_glibc=\$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print \$2}')
if [ -n "\$_strata_glibc" ] && [ -n "\$STRATA_BUNDLE_NEED_GLIBC" ] && \
   [ "\$(printf '%s\n%s\n' "\${STRATA_BUNDLE_NEED_GLIBC#GLIBC_}" "\$_strata_glibc" | sort -V | head -1)" != "\${STRATA_BUNDLE_NEED_GLIBC#GLIBC_}" ]; then
  echo "strata bundle: WARNING: glibc \$_strata_glibc here, the binaries need \$STRATA_BUNDLE_NEED_GLIBC" >&2
fi
# CUDA libraries too large to carry: look next to nvcc, in /usr/local/cuda*, in Python's nvidia
# wheels, then ldconfig's cache.
_strata_dirs=""
if command -v nvcc >/dev/null 2>&1; then
  _n=\$(dirname "\$(readlink -f "\$(command -v nvcc)")")/..
  _strata_dirs="\$_n/lib64 \$_n/targets/x86_64-linux/lib \$_n/lib"
fi
_strata_dirs="\$_strata_dirs /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda/lib"
_strata_dirs="\$_strata_dirs \$(ls -d /usr/local/cuda-*/lib64 /usr/local/cuda-*/targets/x86_64-linux/lib 2>/dev/null | tr '\n' ' ')"
for _py in python3 /opt/torch/.venv/bin/python3; do
  _site=\$("\$_py" -c 'import nvidia, os; print(" ".join(os.path.dirname(p) for p in nvidia.__path__))' 2>/dev/null) || continue
  for _s in \$_site; do
    _strata_dirs="\$_strata_dirs \$(ls -d "\$_s"/nvidia/*/lib "\$_s"/nvidia/cu*/lib 2>/dev/null | tr '\n' ' ')"
  done
  break
done
STRATA_BUNDLE_FOUND=""
for _lib in \$STRATA_BUNDLE_RUNTIME_LIBS; do
  _hit=""
  for _d in \$_strata_dirs; do
    if [ -e "\$_d/\$_lib" ]; then _hit=\$(readlink -f "\$_d"); break; fi
  done
  if [ -z "\$_hit" ]; then
    _p=\$(ldconfig -p 2>/dev/null | awk -v l="\$_lib" '\$1 == l {print \$NF; exit}')
    [ -n "\$_p" ] && _hit=\$(dirname "\$_p")
  fi
  if [ -n "\$_hit" ]; then
    case ":\$_strata_ld:" in *":\$_hit:"*) ;; *) _strata_ld="\$_strata_ld:\$_hit" ;; esac
    STRATA_BUNDLE_FOUND="\$STRATA_BUNDLE_FOUND \$_lib=\$_hit"
  else
    STRATA_BUNDLE_FOUND="\$STRATA_BUNDLE_FOUND \$_lib=NOT-FOUND"
    echo "strata bundle: WARNING: \$_lib not found on this machine (nvcc dir, /usr/local/cuda*, python nvidia wheels, ldconfig)" >&2
  fi
done
export STRATA_BUNDLE_LD_LIBRARY_PATH="\$_strata_ld"
export LD_LIBRARY_PATH="\$_strata_ld\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export PATH="\$STRATA_BUNDLE_ROOT/bin:\$PATH"
export STRATA_BUNDLE_CXX STRATA_BUNDLE_FOUND
unset _strata_ld _strata_sys_cxx _strata_glibc _strata_dirs _n _py _site _s _lib _hit _d _p
EOF
cat >"$stage/with_env.sh" <<'EOF'
#!/usr/bin/env bash
# Runs one command with the bundle's LD_LIBRARY_PATH and PATH: with_env.sh strata train ...
. "$(dirname "${BASH_SOURCE[0]}")/env.sh" || exit 1
exec "$@"
EOF
chmod +x "$stage/with_env.sh"

# ---- manifest
{
  echo "# Strata GPU bundle"
  echo "created: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -n) ($(. /etc/os-release && echo "$PRETTY_NAME"))"
  echo "git: $(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)$(git -C "$repo" diff --quiet HEAD 2>/dev/null || echo ' + uncommitted changes')"
  echo "build_dir: $build"
  echo "source_dir: $repo"
  echo "cmake: Release, STRATA_NATIVE=OFF, -march=$march, CMAKE_CUDA_ARCHITECTURES=$cuda_arch"
  echo "nvcc: $(/usr/local/cuda/bin/nvcc --version 2>/dev/null | grep -o 'release [0-9.]*, V[0-9.]*' || echo unknown)"
  echo "needs: $need_glibc (glibc), $need_glibcxx (libstdc++; lib/compat has one)"
  echo "gpu_tests: ${gpu_tests[*]}"
  echo "benches: ${benches[*]}"
  echo "missing_targets: ${missing[*]:-none}"
  echo "runtime_libs: ${runtime_libs[*]:-none}"
  echo
  echo "## bin"
  for t in "${present[@]}"; do
    echo "$t  $(stat -c %s "$stage/bin/$t") bytes  sha256 $(sha256sum "$stage/bin/$t" | cut -c1-16)"
  done
  echo
  echo "## lib (bundled)"
  printf '%s\n' "${bundled[@]}"
  echo
  echo "## left out"
  printf '%s\n' "${excluded[@]}"
  echo
  echo "## data"
  echo "examples: $(cd "$stage/examples" && echo *.yaml)"
  echo "data/fortunes: $(ls "$stage/data/fortunes" | wc -l) files, $(du -sb "$stage/data/fortunes" | cut -f1) bytes"
  echo "note: MPI runs (mpirun) are not supported from the bundle: OpenMPI's plugins and mpirun are not in it"
} >"$stage/MANIFEST.txt"

# ---- pack
rm -rf "$out"
mkdir -p "$out"
tar -C "$stage" -czf "$out/payload.tar.gz" .
cp "$stage/MANIFEST.txt" "$out/MANIFEST.txt"
cat >"$out/unpack.sh" <<'EOF'
#!/usr/bin/env bash
# Unpacks payload.tar.gz next to this script into $STRATA_BUNDLE_ROOT (default
# /tmp/strata_gpu_bundle), once per payload, and prints that directory.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="${STRATA_BUNDLE_ROOT:-/tmp/strata_gpu_bundle}"
sum=$(cksum <"$here/payload.tar.gz" | cut -d' ' -f1)
if [ "$(cat "$root/.payload_cksum" 2>/dev/null)" != "$sum" ]; then
  rm -rf "$root"
  mkdir -p "$root"
  tar -C "$root" -xzf "$here/payload.tar.gz"
  echo "$sum" >"$root/.payload_cksum"
fi
echo "$root"
EOF
chmod +x "$out/unpack.sh"

unpacked=$(du -sb "$stage" | cut -f1)
total=$(du -sb "$out" | cut -f1)
log "bundled ${#present[@]} binaries, ${#bundled[@]} libraries; $((unpacked >> 20)) MiB unpacked"
for e in "${excluded[@]}"; do case "$e" in *"found at run time"*) log "left out: $e" ;; esac; done
log "bundle: $out  $((total >> 20)) MiB ($total bytes; limit $max_mib MiB)"
if [ "$total" -gt $((max_mib << 20)) ]; then
  die "bundle is $((total >> 20)) MiB, over the $max_mib MiB limit (the device call carries 64 MiB with the repo)"
fi
[ ${#missing[@]} -eq 0 ] || log "WARNING: bundled without: ${missing[*]}"
