#!/usr/bin/env python3
"""GPT-2 124M training throughput on one GPU: `strata train --device cuda` vs the PyTorch reference
(bench/gpt2_torch.py), same shape, same micro-batch, same data, one after the other on the same
GPU (bench/README-gpu.md).

What it does:
  1. Writes an llm.c token shard (uint16 tokens, 1024-byte header; worker/data.h) of random GPT-2
     token ids in [0, 50257) -- the llmc format gives Strata its 50257-token vocabulary -- unless
     --data names one.
  2. Writes a job spec: model.preset gpt2 (12 layers, 12 heads, d_model 768, seq 1024, vocabulary
     50257), train.micro_batch = global_batch = --batch, precision bf16, eval off, no checkpoints,
     resources.device cuda.
  3. Runs `strata train SPEC --max-steps N --metrics FILE [--device cuda]` and reads the per-step
     JSON lines; the first --skip steps are warm-up and are left out of the mean.
  4. Runs bench/gpt2_torch.py with the same layers / width / seq / batch / data (vocabulary
     --torch-vocab, default 50304 = 50257 padded to a multiple of 128 as nanoGPT does; pass 50257
     for the identical matrix shapes), torch.compile unless --torch-no-compile.
  5. Prints tokens/s of each and their ratio, MFU of each (6N and 6N + 12LCT per token over
     --peak-tflops, default 989 = H100 SXM dense bf16; N = all parameters, tied wte once), and peak
     memory of each: PyTorch's max_memory_allocated, Strata's from its metrics or log when it
     reports one ("not reported" otherwise), and for both the largest device memory in use that
     nvidia-smi saw while the run lasted (CUDA context and allocator cache included).
  Results: gpu_vs_torch.json and gpu_vs_torch.md in --results.

--profile (instead of the comparison):
  a. strata with STRATA_CUDA_PROFILE=1 (per-kernel-class timing, if the CUDA model prints one):
     log in strata_cuda_profile.log;
  b. nsys profile --stats=true, if an nsys is found (PATH, /opt/nvidia/nsight-systems*/bin,
     /usr/local/cuda/bin): strata_nsys.txt (+ the .nsys-rep);
  c. ncu --section SpeedOfLight on --ncu-count kernels after skipping --ncu-skip (by default the
     first step): ncu_strata.csv and ncu_summary.md (per kernel: launches, time, % of peak memory
     and SM throughput -- the roofline fractions);
  d. the PyTorch reference under torch.profiler: torch_profile.txt.
  Each step is independent: a missing tool is reported and skipped.

  python3 bench/gpu_vs_torch.py --strata "gpu_bundle_root/with_env.sh gpu_bundle_root/bin/strata" \
      [--steps 30] [--batch 8] [--results DIR] [--profile]

--strata is a command prefix (shell words): the bundle's with_env.sh sets LD_LIBRARY_PATH for the
strata binary only, so PyTorch (run with sys.executable) keeps its own libraries.
"""
import argparse
import glob
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT2 = dict(layers=12, heads=12, embd=768, seq=1024)
VOCAB = 50257


def n_params(vocab, layers=12, c=768, seq=1024):
    """All parameters of GPT-2 with tied embeddings (wte once, wpe included)."""
    return vocab * c + seq * c + layers * (12 * c * c + 13 * c) + 2 * c


def flops_per_token(vocab, attn):
    f = 6.0 * n_params(vocab)
    if attn:
        f += 12.0 * GPT2["layers"] * GPT2["embd"] * GPT2["seq"]
    return f


def write_llmc_shard(path, count, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, size=count, dtype=np.uint16)
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = 20240520, 1, count
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.tobytes())


def write_spec(path, data, batch, steps):
    with open(path, "w") as f:
        f.write(f"""# Written by bench/gpu_vs_torch.py: GPT-2 124M on one GPU, bf16.
name: gpt2-124m-gpu-bench
model:
  preset: gpt2            # 12 layers, 12 heads, d_model 768, seq_len 1024; vocab 50257 (llmc)
data:
  train: {data}
  format: llmc
train:
  steps: {steps}
  global_batch: {batch}
  micro_batch: {batch}
  lr: 6.0e-4
  min_lr: 6.0e-5
  warmup: 10
  weight_decay: 0.1
  grad_clip: 1.0
  precision: bf16
  seed: 1337
eval:
  every: 0
resources:
  device: cuda
""")


class GpuMemSampler(threading.Thread):
    """Largest memory.used (MiB) nvidia-smi reports while running, minus the value before."""

    def __init__(self, period=0.25):
        super().__init__(daemon=True)
        self.period, self.stop, self.peak, self.base = period, threading.Event(), None, None
        self.smi = shutil.which("nvidia-smi")

    def _read(self):
        try:
            out = subprocess.run([self.smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                  "-i", "0"], capture_output=True, text=True, timeout=10).stdout
            return float(out.strip().splitlines()[0])
        except Exception:  # noqa: BLE001 -- sampling is best effort
            return None

    def run(self):
        if not self.smi:
            return
        self.base = self._read()
        while not self.stop.is_set():
            v = self._read()
            if v is not None and (self.peak is None or v > self.peak):
                self.peak = v
            self.stop.wait(self.period)

    def result_bytes(self):
        self.stop.set()
        self.join(timeout=15)
        if self.peak is None or self.base is None:
            return None
        return int((self.peak - self.base) * 2**20)


def strata_supports_device_flag(strata):
    out = subprocess.run(strata + ["help"], capture_output=True, text=True)
    m = re.search(r"^\s*train JOB\.yaml.*?(?=^\s{2}[a-z]+ )", out.stdout + out.stderr, re.S | re.M)
    return bool(m and "--device" in m.group(0))


def run_strata(args, strata, spec, steps, metrics, log_path, env_extra=None, prefix=None):
    if os.path.exists(metrics):
        os.remove(metrics)
    cmd = list(prefix or []) + strata + ["train", spec, "--max-steps", str(steps),
                                          "--metrics", metrics]
    if args.device_flag:
        cmd += ["--device", "cuda"]
    env = dict(os.environ, **(env_extra or {}))
    print("+ " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
    sampler = GpuMemSampler()
    sampler.start()
    t0 = time.time()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    wall = time.time() - t0
    return rc, wall, sampler.result_bytes()


def strata_result(args, metrics, log_path, rc, wall, smi_bytes):
    res = {"impl": "strata", "rc": rc, "wall_s": round(wall, 1), "smi_peak_bytes": smi_bytes}
    steps = []
    extra = {}
    if os.path.exists(metrics):
        for line in open(metrics):
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if "tokens_per_s" in d:
                steps.append(d)
            for k, v in d.items():  # any memory figure the CUDA path reports
                if re.search(r"mem|bytes|alloc", k) and isinstance(v, (int, float)):
                    extra[k] = max(v, extra.get(k, v))
    log = open(log_path, errors="replace").read() if os.path.exists(log_path) else ""
    res["log_tail"] = log.strip().splitlines()[-15:]
    if not steps:
        res["error"] = "no step metrics (see log_tail)"
        return res
    timed = steps[args.skip:] or steps[-1:]
    secs = sum(d["step_s"] for d in timed)
    toks = sum(d["tokens_per_s"] * d["step_s"] for d in timed)
    tps = toks / secs
    res.update({
        "steps_timed": len(timed),
        "step_ms_mean": round(1e3 * secs / len(timed), 3),
        "step_ms_median": round(1e3 * statistics.median(d["step_s"] for d in timed), 3),
        "tokens_per_s": round(tps, 1),
        "mfu_6n": tps * flops_per_token(VOCAB, False) / (args.peak_tflops * 1e12),
        "mfu_attn": tps * flops_per_token(VOCAB, True) / (args.peak_tflops * 1e12),
        "loss_first": steps[0].get("loss"),
        "loss_last": steps[-1].get("loss"),
    })
    if "mfu" in steps[-1]:
        res["reported_mfu"] = steps[-1]["mfu"]
    m = re.findall(r"MFU ([0-9.]+)%", log)
    if m:
        res["log_mfu_pct_last"] = float(m[-1])
    if extra:
        res["reported_memory"] = extra
    # A "peak ... 12.3 GiB" style line from the CUDA model, if it prints one.
    mm = re.findall(r"peak[^\n]*?([0-9.]+)\s*(GiB|MiB|GB|MB)", log, re.I)
    if mm:
        v, unit = mm[-1]
        res["log_peak_bytes"] = int(float(v) * {"GiB": 2**30, "MiB": 2**20, "GB": 1e9,
                                                "MB": 1e6}[unit])
    return res


def run_torch(args, data, json_path, extra=()):
    cmd = [args.python, os.path.join(ROOT, "bench", "gpt2_torch.py"), "--device", "cuda",
           "--batch", str(args.batch), "--steps", str(args.torch_steps), "--vocab",
           str(args.torch_vocab), "--data", data, "--peak-tflops", str(args.peak_tflops),
           "--json", json_path] + list(extra)
    if args.torch_no_compile:
        cmd.append("--no-compile")
    print("+ " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
    sampler = GpuMemSampler()
    sampler.start()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = 124, e.stdout or "", e.stderr or ""
        out, err = (x.decode() if isinstance(x, bytes) else x for x in (out, err))
    smi = sampler.result_bytes()
    res = {"impl": "torch", "rc": rc, "smi_peak_bytes": smi}
    if rc == 0 and os.path.exists(json_path):
        res.update(json.load(open(json_path)))
    else:
        res["error"] = f"exit {rc}"
        res["log_tail"] = (out + err).strip().splitlines()[-15:]
    return res


def fmt_bytes(b):
    return "n/a" if b is None else f"{b / 2**30:.2f} GiB"


def fmt_pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def report(args, s, t):
    lines = [f"GPT-2 124M, micro-batch {args.batch} x seq 1024, bf16, one GPU "
             f"({t.get('gpu') or 'GPU'}); MFU over {args.peak_tflops:g} TFLOP/s",
             "",
             "| | strata --device cuda | PyTorch |",
             "|---|---|---|"]
    torch_desc = (f"torch {t.get('torch_version', '?')}, "
                  f"{'compile' if t.get('compile') else 'eager'}, vocab {args.torch_vocab}")
    lines.append(f"| build | vocab {VOCAB} | {torch_desc} |")
    tps_s, tps_t = s.get("tokens_per_s"), t.get("tokens_per_s")
    lines.append(f"| tokens/s | {tps_s if tps_s else 'FAILED'} | {tps_t if tps_t else 'FAILED'} |")
    lines.append(f"| ms/step (median) | {s.get('step_ms_median', 'n/a')} | "
                 f"{t.get('step_ms_median', 'n/a')} |")
    lines.append(f"| MFU 6N | {fmt_pct(s.get('mfu_6n'))} | {fmt_pct(t.get('mfu_6n'))} |")
    lines.append(f"| MFU 6N+12LCT | {fmt_pct(s.get('mfu_attn'))} | {fmt_pct(t.get('mfu_attn'))} |")
    strata_mem = s.get("log_peak_bytes")
    if strata_mem is None and s.get("reported_memory"):
        strata_mem = max(s["reported_memory"].values())
    lines.append(f"| peak memory (own report) | "
                 f"{fmt_bytes(strata_mem) if strata_mem is not None else 'not reported'} | "
                 f"{fmt_bytes(t.get('peak_mem_bytes'))} allocated, "
                 f"{fmt_bytes(t.get('peak_reserved_bytes'))} reserved |")
    lines.append(f"| peak device memory (nvidia-smi, incl. context) | "
                 f"{fmt_bytes(s.get('smi_peak_bytes'))} | {fmt_bytes(t.get('smi_peak_bytes'))} |")
    lines.append(f"| loss first -> last | {s.get('loss_first')} -> {s.get('loss_last')} | "
                 f"{t.get('loss_first')} -> {t.get('loss_last')} |")
    if tps_s and tps_t:
        lines += ["", f"**strata / torch tokens/s = {tps_s / tps_t:.3f}**"]
    for name, r in (("strata", s), ("torch", t)):
        if r.get("error"):
            lines += ["", f"{name} FAILED: {r['error']}", "```"] + r.get("log_tail", []) + ["```"]
    return "\n".join(lines) + "\n"


def find_nsys():
    cands = [shutil.which("nsys")] + sorted(glob.glob("/opt/nvidia/nsight-systems*/bin/nsys")) + \
        ["/usr/local/cuda/bin/nsys"] + sorted(glob.glob("/opt/nvidia/nsight-compute/*/host/target-linux-x64/nsys"))
    return next((c for c in cands if c and os.path.exists(c)), None)


def summarize_ncu(csv_path, md_path):
    import csv

    rows = []
    with open(csv_path, errors="replace") as f:
        lines = [ln for ln in f if ln.startswith('"')]
    if not lines:
        return "ncu wrote no CSV rows"
    for r in csv.DictReader(lines):
        rows.append(r)
    per = {}
    for r in rows:
        k = (r.get("Kernel Name") or "?")[:70]
        d = per.setdefault(k, {"ids": set(), "dur_us": 0.0, "mem": [], "sm": [], "dram": []})
        d["ids"].add(r.get("ID"))
        metric, unit = r.get("Metric Name", ""), r.get("Metric Unit", "")
        try:
            v = float(str(r.get("Metric Value", "")).replace(",", ""))
        except ValueError:
            continue
        if metric == "Duration":
            d["dur_us"] += v * {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}.get(unit, 1.0)
        elif metric == "Memory Throughput" and unit == "%":
            d["mem"].append(v)
        elif metric.startswith("Compute (SM)") and unit == "%":
            d["sm"].append(v)
        elif metric == "DRAM Throughput" and unit == "%":
            d["dram"].append(v)
    total = sum(d["dur_us"] for d in per.values()) or 1.0
    out = ["| kernel | launches | time us | % of time | memory % of peak | DRAM % | SM % |",
           "|---|---|---|---|---|---|---|"]
    mean = lambda xs: f"{statistics.mean(xs):.0f}" if xs else "n/a"  # noqa: E731
    for k, d in sorted(per.items(), key=lambda kv: -kv[1]["dur_us"]):
        out.append(f"| `{k}` | {len(d['ids'])} | {d['dur_us']:.0f} | {100 * d['dur_us'] / total:.1f} | "
                   f"{mean(d['mem'])} | {mean(d['dram'])} | {mean(d['sm'])} |")
    text = "\n".join(out) + "\n"
    with open(md_path, "w") as f:
        f.write(text)
    return text


def profile(args, strata, spec, res_dir):
    notes = []
    metrics = os.path.join(args.work, "profile_metrics.jsonl")
    steps = args.profile_steps
    # a. the model's own per-kernel-class timing
    rc, wall, _ = run_strata(args, strata, spec, steps, metrics,
                             os.path.join(res_dir, "strata_cuda_profile.log"),
                             env_extra={"STRATA_CUDA_PROFILE": "1"})
    notes.append(f"STRATA_CUDA_PROFILE=1 run: exit {rc}, {wall:.0f} s -> strata_cuda_profile.log")
    # b. nsys
    nsys = find_nsys()
    if nsys:
        out = os.path.join(res_dir, "strata_nsys")
        rc, wall, _ = run_strata(args, strata, spec, steps, metrics, out + ".txt",
                                 prefix=[nsys, "profile", "--stats=true", "--force-overwrite=true",
                                         "--trace=cuda,nvtx", "-o", out])
        notes.append(f"nsys ({nsys}): exit {rc}, {wall:.0f} s -> strata_nsys.txt")
    else:
        notes.append("nsys: not found (PATH, /opt/nvidia/nsight-systems*/bin, /usr/local/cuda/bin); skipped")
    # c. ncu roofline fractions
    ncu = shutil.which("ncu") or next(iter(sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"))), None)
    if ncu:
        csv_path = os.path.join(res_dir, "ncu_strata.csv")
        rc, wall, _ = run_strata(args, strata, spec, 3, metrics, csv_path,
                                 prefix=[ncu, "--target-processes", "all", "--clock-control", "none",
                                         "--section", "SpeedOfLight", "--launch-skip",
                                         str(args.ncu_skip), "--launch-count", str(args.ncu_count),
                                         "--csv", "--page", "details"])
        notes.append(f"ncu ({ncu}): exit {rc}, {wall:.0f} s -> ncu_strata.csv, ncu_summary.md")
        summary = summarize_ncu(csv_path, os.path.join(res_dir, "ncu_summary.md"))
        print(summary)
    else:
        notes.append("ncu: not found; skipped")
    # d. PyTorch's own profile of the reference
    if not args.no_torch:
        t = run_torch(args, args.data_path, os.path.join(args.work, "torch_profile.json"),
                      extra=["--profile", os.path.join(res_dir, "torch_profile.txt")])
        notes.append(f"torch.profiler: exit {t['rc']} -> torch_profile.txt")
    text = "\n".join("- " + n for n in notes) + "\n"
    with open(os.path.join(res_dir, "profile_notes.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--strata", default=os.path.join(ROOT, "build", "bin", "strata"),
                    help="command prefix that runs the strata binary (shell words)")
    ap.add_argument("--python", default=sys.executable, help="python with PyTorch, for gpt2_torch.py")
    ap.add_argument("--steps", type=int, default=30, help="strata steps (incl. --skip warm-up steps)")
    ap.add_argument("--skip", type=int, default=5, help="strata warm-up steps left out of the mean")
    ap.add_argument("--torch-steps", type=int, default=20, help="timed PyTorch steps (after its warm-up)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--torch-vocab", type=int, default=50304)
    ap.add_argument("--torch-no-compile", action="store_true")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-strata", action="store_true")
    ap.add_argument("--data", default="", help="an llm.c .bin shard (default: random tokens)")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--results", default=os.environ.get("OUT") or os.path.join(ROOT, "gpu_results"))
    ap.add_argument("--work", default="/tmp/strata_gpu_vs_torch", help="scratch (token file, spec)")
    ap.add_argument("--timeout", type=int, default=420, help="seconds per run")
    ap.add_argument("--device-flag", choices=["auto", "yes", "no"], default="auto",
                    help="pass --device cuda to strata train (auto: if its usage lists it)")
    ap.add_argument("--profile", action="store_true", help="profile instead of comparing (see above)")
    ap.add_argument("--profile-steps", type=int, default=6)
    ap.add_argument("--ncu-skip", type=int, default=600, help="kernels to skip (about one step)")
    ap.add_argument("--ncu-count", type=int, default=200, help="kernels to profile")
    args = ap.parse_args()

    os.makedirs(args.results, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    strata = shlex.split(args.strata)
    if args.data:
        args.data_path = os.path.abspath(args.data)
    else:
        args.data_path = os.path.join(args.work, "gpt2_random_tokens.bin")
        need = max(args.steps, args.profile_steps) * args.batch * 1024 * 2 + 200_000
        write_llmc_shard(args.data_path, max(need, 4_000_000), seed=1337)
    spec = os.path.join(args.work, "gpt2_124m_cuda.yaml")
    write_spec(spec, args.data_path, args.batch, max(args.steps, args.profile_steps))
    shutil.copy(spec, os.path.join(args.results, "gpt2_124m_cuda.yaml"))

    if not args.no_strata:
        args.device_flag = {"yes": True, "no": False}.get(args.device_flag)
        if args.device_flag is None:
            try:
                args.device_flag = strata_supports_device_flag(strata)
            except OSError as e:
                print(f"gpu_vs_torch.py: cannot run {args.strata}: {e}", file=sys.stderr)
                return 2

    if args.profile:
        return profile(args, strata, spec, args.results)

    s = {"impl": "strata", "error": "skipped (--no-strata)"}
    if not args.no_strata:
        metrics = os.path.join(args.results, "strata_metrics.jsonl")
        log = os.path.join(args.results, "strata_train.log")
        rc, wall, smi = run_strata(args, strata, spec, args.steps, metrics, log)
        s = strata_result(args, metrics, log, rc, wall, smi)
        if rc != 0:
            s["error"] = s.get("error", "") + f" exit {rc}"
    t = {"impl": "torch", "error": "skipped (--no-torch)"}
    if not args.no_torch:
        t = run_torch(args, args.data_path, os.path.join(args.results, "torch_gpt2.json"))
    text = report(args, s, t)
    print(text)
    with open(os.path.join(args.results, "gpu_vs_torch.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.results, "gpu_vs_torch.json"), "w") as f:
        json.dump({"strata": s, "torch": t, "batch": args.batch, "peak_tflops": args.peak_tflops},
                  f, indent=1)
    return 0 if (s.get("tokens_per_s") or args.no_strata) and (t.get("tokens_per_s") or args.no_torch) else 1


if __name__ == "__main__":
    sys.exit(main())
