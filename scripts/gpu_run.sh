#!/usr/bin/env bash
# The one command to run on a lent GPU machine: GPU tests, kernel benchmarks, the GPT-2 124M
# comparison with PyTorch, and profiles, each stage under 10 minutes, with one markdown summary.
#
# Usage (from the repo root on the GPU machine, with gpu_bundle/ carried; bench/README-gpu.md):
#   here:        scripts/gpu_bundle.sh                       # builds + packs gpu_bundle/ (<= 60 MiB)
#   GPU machine: scripts/gpu_run.sh [--results DIR] STAGE...
#     STAGE  info     nvidia-smi, driver / CUDA / nvcc / torch versions, library resolution
#            tests    every GPU test binary (bundle manifest's gpu_tests), --gtest_output=json
#            bench    cuda_kernels_bench and bench/torch_kernels.py, merged side by side
#            compare  bench/gpu_vs_torch.py: strata train --device cuda vs PyTorch, GPT-2 124M
#            profile  bench/gpu_vs_torch.py --profile: STRATA_CUDA_PROFILE=1, nsys, ncu, torch.profiler
#            all      info tests bench compare profile (over 10 minutes: split it across calls)
#     default stages: info tests. `info` runs first in every call (it is a few seconds).
#   One device call per group, e.g.:
#     device run, carry [gpu_bundle]:  scripts/gpu_run.sh tests bench     (~5 min)
#     device run, carry [gpu_bundle]:  scripts/gpu_run.sh compare         (~4 min)
#     device run, carry [gpu_bundle]:  scripts/gpu_run.sh profile         (~5 min)
#
# Results (DIR = $OUT when set, else gpu_results/): summary.md (paste-ready for
# docs/BENCHMARKS.md), results.tar.gz (every JSON, log, CSV, spec; files over 12 MiB are listed in
# the summary and left out), run.log (everything printed). Three files: the device tool returns at
# most eight.
# Env: STRATA_GPU_TEST_TIMEOUT (s per test binary, default 300), STRATA_GPU_STAGE_BUDGET (s a call
# may spend before later stages are skipped, default 560), STRATA_BUNDLE_ROOT (unpack dir).
# Exit status: 0 when every stage that ran passed, 1 otherwise.
set -uo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
results="${OUT:-$repo/gpu_results}"
stages=()
while [ $# -gt 0 ]; do
  case "$1" in
    --results) results="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    info|tests|bench|compare|profile) stages+=("$1"); shift ;;
    all) stages+=(tests bench compare profile); shift ;;
    *) echo "gpu_run.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#stages[@]} -gt 0 ] || stages=(tests)
mkdir -p "$results"
work="/tmp/strata_gpu_run"
rm -rf "$work"
mkdir -p "$work"
summary="$work/summary.md"
exec > >(tee "$results/run.log") 2>&1
t_start=$(date +%s)
budget="${STRATA_GPU_STAGE_BUDGET:-560}"
status=0
cmdline="scripts/gpu_run.sh ${stages[*]}"

say() { printf '\n===== %s =====\n' "$*"; }
md() { printf '%s\n' "$@" >>"$summary"; }
py() { command -v python3 >/dev/null && python3 "$@"; }

# ---- the bundle
[ -x "$repo/gpu_bundle/unpack.sh" ] || { echo "gpu_run.sh: gpu_bundle/ not found: run scripts/gpu_bundle.sh here and carry gpu_bundle" >&2; exit 1; }
root="$("$repo/gpu_bundle/unpack.sh")" || { echo "gpu_run.sh: cannot unpack the bundle" >&2; exit 1; }
# shellcheck source=/dev/null
. "$root/env.sh"
# env.sh exported LD_LIBRARY_PATH for the whole shell: keep it for our binaries only (with_env.sh),
# so python3 / PyTorch load their own libstdc++ and CUDA libraries.
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH#"$STRATA_BUNDLE_LD_LIBRARY_PATH"}"
LD_LIBRARY_PATH="${LD_LIBRARY_PATH#:}"
[ -n "$LD_LIBRARY_PATH" ] || unset LD_LIBRARY_PATH
wenv="$root/with_env.sh"
manifest_get() { sed -n "s/^$1: //p" "$root/MANIFEST.txt" | head -1; }

# Paths compiled into the test binaries (STRATA_SOURCE_DIR / STRATA_BINARY_DIR) and the data the
# examples name: make them exist here. This is a scratch machine; nothing is overwritten.
src_dir="$(manifest_get source_dir)"
build_dir="$(manifest_get build_dir)"
if [ -n "$src_dir" ] && [ ! -e "$src_dir" ]; then
  mkdir -p "$(dirname "$src_dir")" && ln -s "$repo" "$src_dir" && echo "linked $src_dir -> $repo"
fi
if [ -n "$build_dir" ] && [ ! -e "$build_dir/bin" ]; then
  mkdir -p "$build_dir" && ln -s "$root/bin" "$build_dir/bin" && echo "linked $build_dir/bin -> $root/bin"
fi
if ! compgen -G "/usr/share/games/fortunes/*.u8" >/dev/null && [ -d "$root/data/fortunes" ]; then
  mkdir -p /usr/share/games/fortunes 2>/dev/null && cp "$root"/data/fortunes/* /usr/share/games/fortunes/ 2>/dev/null &&
    echo "installed the examples' fortunes text into /usr/share/games/fortunes"
fi

over_budget() {
  local now
  now=$(date +%s)
  if [ $((now - t_start)) -gt "$budget" ]; then
    echo "gpu_run.sh: $((now - t_start)) s spent (budget $budget s): skipping stage $1"
    md "" "_stage $1 skipped: the call's time budget ($budget s) was spent; run it in its own call_"
    return 0
  fi
  return 1
}

# ---- info (always)
say info
gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 2>/dev/null || echo 'no GPU')"
driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader -i 0 2>/dev/null || echo '?')"
cuda_drv="$(nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9.]*' | awk '{print $3}')"
nvcc_v="$(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' | awk '{print $2}')"
torch_v="$(py -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>/dev/null || echo 'none')"
nvidia-smi || status=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.sm,power.limit,pstate --format=csv 2>/dev/null
echo "driver $driver | CUDA (driver) ${cuda_drv:-?} | nvcc ${nvcc_v:-none} | torch $torch_v"
echo "bundle: $root ($(manifest_get git))"
echo "libstdc++: $STRATA_BUNDLE_CXX"
echo "large CUDA libraries:$STRATA_BUNDLE_FOUND"
unresolved=$("$wenv" bash -c 'for b in "$STRATA_BUNDLE_ROOT"/bin/*; do ldd "$b" | sed -n "s|^|$(basename "$b"): |; /not found/p"; done')
[ -z "$unresolved" ] || { echo "UNRESOLVED LIBRARIES:"; echo "$unresolved"; status=1; }
{
  echo "## GPU run $(date -u +%Y-%m-%d) — $gpu"
  echo
  echo "- command: \`$cmdline\` (device tool, repo root, gpu_bundle carried)"
  echo "- GPU: $gpu; driver $driver; CUDA (driver) ${cuda_drv:-?}; nvcc ${nvcc_v:-none}; torch $torch_v"
  echo "- host: $(nproc) cores, $(uname -r)"
  echo "- bundle: $(manifest_get git); built $(manifest_get created)"
  echo "- libraries: libstdc++ $STRATA_BUNDLE_CXX; CUDA:${STRATA_BUNDLE_FOUND:- (none needed)}"
  [ -z "$unresolved" ] || printf -- '- **unresolved libraries**:\n```\n%s\n```\n' "$unresolved"
} >>"$summary"

# ---- tests
run_tests() {
  say tests
  mkdir -p "$work/tests"
  local t_to="${STRATA_GPU_TEST_TIMEOUT:-300}" name rc
  md "" "### GPU tests" "" "| binary | tests | failed | skipped | time (s) | result |" "|---|---|---|---|---|---|"
  for name in $(manifest_get gpu_tests); do
    if [ ! -x "$root/bin/$name" ]; then
      md "| $name | | | | | not built |"; status=1; continue
    fi
    over_budget "tests:$name" && { status=1; continue; }
    echo "--- $name"
    timeout -k 10 "$t_to" "$wenv" "$root/bin/$name" --gtest_output="json:$work/tests/$name.json" \
      --gtest_color=no >"$work/tests/$name.log" 2>&1
    rc=$?
    tail -n 25 "$work/tests/$name.log"
    [ $rc -eq 0 ] || status=1
    py - "$work/tests/$name.json" "$name" "$rc" "$t_to" >>"$summary" <<'PY' || md "| $name | | | | | exit $rc, no JSON |"
import json, sys
path, name, rc, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
try:
    d = json.load(open(path))
except Exception:
    print(f"| {name} | | | | | {'TIMEOUT after ' + limit + ' s' if rc in (124, 137) else f'exit {rc}'}, no JSON |")
    sys.exit(0)
tests = failed = skipped = 0
fails = []
for suite in d.get("testsuites", []):
    for t in suite.get("testsuite", []):
        tests += 1
        if t.get("failures"):
            failed += 1
            msg = t["failures"][0].get("failure", "").strip().splitlines()
            fails.append(f"{suite['name']}.{t['name']}: {msg[0] if msg else ''}"[:200])
        elif t.get("result") == "SKIPPED" or t.get("status") == "NOTRUN":
            skipped += 1
result = "PASS" if rc == 0 and not failed else f"FAIL (exit {rc})"
print(f"| {name} | {tests} | {failed} | {skipped} | {d.get('time', '?').rstrip('s')} | {result} |")
for f in fails[:10]:
    print(f"|   ↳ `{f}` | | | | | |")
PY
  done
}

# ---- kernel benchmarks
run_bench() {
  say bench
  mkdir -p "$work/bench"
  over_budget bench && { status=1; return; }
  if [ -x "$root/bin/cuda_kernels_bench" ]; then
    timeout -k 10 240 "$wenv" "$root/bin/cuda_kernels_bench" --json "$work/bench/cuda_kernels.json" \
      2>&1 | tee "$work/bench/cuda_kernels.txt" || status=1
  else
    echo "cuda_kernels_bench not in the bundle"; status=1
  fi
  timeout -k 10 240 python3 "$repo/bench/torch_kernels.py" --json "$work/bench/torch_kernels.json" \
    2>&1 | tee "$work/bench/torch_kernels.txt" || status=1
  py - "$work/bench/cuda_kernels.json" "$work/bench/torch_kernels.json" >>"$summary" <<'PY'
import json, os, sys
def load(p):
    return json.load(open(p)) if os.path.exists(p) else None
s, t = load(sys.argv[1]), load(sys.argv[2])
print("\n### CUDA kernels vs PyTorch ops (GPT-2 124M shapes, bf16, median; %: of the measured ceiling)\n")
for name, d in (("strata", s), ("torch", t)):
    if d:
        print(f"- {name} ceilings: copy {d['copy_gbps']:.0f} GB/s (read+write), gemm {d['gemm_tflops']:.0f} TFLOP/s")
    else:
        print(f"- {name}: no results (see results.tar.gz: bench/)")
print("\n| kernel | shape | strata ms | torch ms | torch/strata | strata | torch |\n|---|---|---|---|---|---|---|")
rows_s = {r["name"]: r for r in (s or {}).get("rows", [])}
rows_t = {r["name"]: r for r in (t or {}).get("rows", [])}
def perf(r):
    if not r:
        return ""
    if r.get("flops"):
        return f"{r['tflops']:.0f} TFLOP/s ({100 * r['frac_gemm']:.0f}%)"
    return f"{r['gbps']:.0f} GB/s ({100 * r['frac_copy']:.0f}%)"
for name in list(rows_s) + [n for n in rows_t if n not in rows_s]:
    a, b = rows_s.get(name), rows_t.get(name)
    ratio = f"{b['ms'] / a['ms']:.2f}" if a and b else ""
    print(f"| {name} | {(a or b)['shape']} | {a['ms']:.4f} | " if a else f"| {name} | {b['shape']} | | ", end="")
    print(f"{b['ms']:.4f} | " if b else " | ", end="")
    print(f"{ratio} | {perf(a)} | {perf(b)} |")
PY
}

# ---- GPT-2 124M: strata vs torch
run_compare() {
  say compare
  over_budget compare && { status=1; return; }
  mkdir -p "$work/compare"
  PYTHONUNBUFFERED=1 python3 "$repo/bench/gpu_vs_torch.py" --strata "$wenv $root/bin/strata" \
    --results "$work/compare" --timeout 300 || status=1
  md "" "### GPT-2 124M training step, strata vs PyTorch" ""
  if [ -f "$work/compare/gpu_vs_torch.md" ]; then cat "$work/compare/gpu_vs_torch.md" >>"$summary"; else md "_no result (see run.log)_"; fi
}

run_profile() {
  say profile
  over_budget profile && { status=1; return; }
  mkdir -p "$work/profile"
  PYTHONUNBUFFERED=1 python3 "$repo/bench/gpu_vs_torch.py" --profile --strata "$wenv $root/bin/strata" \
    --results "$work/profile" --timeout 240 || status=1
  md "" "### Profile (files in results.tar.gz: profile/)" ""
  [ -f "$work/profile/profile_notes.md" ] && cat "$work/profile/profile_notes.md" >>"$summary"
  if [ -f "$work/profile/ncu_summary.md" ]; then
    md "" "ncu, Speed of Light, by total time (first 25 kernels):" ""
    head -n 27 "$work/profile/ncu_summary.md" >>"$summary"
  fi
  if [ -f "$work/profile/strata_cuda_profile.log" ]; then
    md "" "STRATA_CUDA_PROFILE=1, last lines:" '```'
    tail -n 30 "$work/profile/strata_cuda_profile.log" >>"$summary"
    md '```'
  fi
}

for st in "${stages[@]}"; do
  case "$st" in
    info) ;;  # done above
    tests) run_tests ;;
    bench) run_bench ;;
    compare) run_compare ;;
    profile) run_profile ;;
  esac
done

# ---- pack the results: summary.md, results.tar.gz, run.log
elapsed=$(( $(date +%s) - t_start ))
md "" "_$cmdline: ${elapsed} s, exit status ${status}_"
big=$(find "$work" -type f -size +12M)
if [ -n "$big" ]; then
  md "" "Left out of results.tar.gz (over 12 MiB):" "$(echo "$big" | sed "s|^$work/|- |")"
fi
cp "$summary" "$results/summary.md"
tar -C "$work" -czf "$results/results.tar.gz" --exclude-from=<(echo "$big" | sed "s|^$work/|./|") . 2>/dev/null ||
  tar -C "$work" -czf "$results/results.tar.gz" .
say summary
cat "$summary"
sleep 1  # let tee finish run.log
exit $status
