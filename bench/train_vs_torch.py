#!/usr/bin/python3
"""Training throughput of `strata train` vs PyTorch on the identical model, side by side.

For each job: Strata trains it for --steps steps through the real CLI, then PyTorch trains the
same GPT (scripts/torch_gpt.py: same layers, widths, sequence length, batch, fp32, AdamW with the
same hyper-parameters, gradient clipping, same text file) for the same number of steps on the same
number of cores. Both report mean tokens/s over all steps but the first (warm-up).

Debian's PyTorch calls GEMMs in the pthread build of OpenBLAS, whose thread pool is separate from
PyTorch's OpenMP pool and ignores torch.set_num_threads. So PyTorch is run in fresh processes with
OPENBLAS_NUM_THREADS = the core budget and torch.set_num_threads in {1, budget}, and the best of
those is the reference (with 2 pools of 2 threads on 2 cores they fight, and 1 intra-op thread wins).

  /usr/bin/python3 bench/train_vs_torch.py [--steps 20] [--threads 2] examples/tiny.yaml ...

Needs build/bin/strata (README command 2 builds it) and Debian's python3-torch.
"""
import argparse
import glob
import math
import os
import platform
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import torch_gpt  # noqa: E402


def resolved_spec(strata, job):
    """The job with every default filled in, as `strata validate` prints it (flat key paths)."""
    out = subprocess.run([strata, "validate", job], check=True, capture_output=True, text=True).stdout
    spec, section = {}, None
    for line in out.splitlines():
        if not line.strip() or line.strip().startswith("#"):
            continue
        m = re.match(r"^(\s*)([A-Za-z0-9_]+):\s*(.*)$", line)
        if not m:
            continue
        indent, key, value = m.groups()
        if not indent:
            section = key
            if value:
                spec[key] = value.strip("'\"")
        else:
            spec[f"{section}.{key}"] = value.strip("'\"")
    return spec


def run_strata(strata, job, steps, threads):
    proc = subprocess.run([strata, "train", job, "--max-steps", str(steps), "--threads", str(threads)],
                          check=True, capture_output=True, text=True)
    m = re.search(r"done: .* \| ([0-9.]+) tok/s", proc.stdout + proc.stderr)
    if not m:
        raise RuntimeError("no summary line from strata:\n" + proc.stdout + proc.stderr)
    return float(m.group(1))


def run_torch(spec, steps, threads):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layers, heads = int(spec["model.layers"]), int(spec["model.heads"])
    c, t = int(spec["model.d_model"]), int(spec["model.seq_len"])
    vocab, max_seq = int(spec["model.vocab_size"]), int(spec["model.max_seq_len"])
    gb, mb = int(spec["train.global_batch"]), int(spec["train.micro_batch"])
    accum = gb // mb
    model = torch_gpt.GPT(vocab, max_seq, layers, heads, c)
    for name, p in model.named_parameters():  # GPT-2 init
        if p.dim() == 2:
            torch.nn.init.normal_(p, 0.0, 0.02)
    files = sorted(glob.glob(spec["data.train"]))
    data = np.concatenate([np.fromfile(f, dtype=np.uint8) for f in files]).astype(np.int64)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": float(spec["train.weight_decay"])},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=float(spec["train.lr"]),
                            betas=(float(spec["train.beta1"]), float(spec["train.beta2"])),
                            eps=float(spec["train.eps"]), foreach=True)
    rng = np.random.default_rng(1)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for _ in range(accum):
            starts = rng.integers(0, len(data) - t - 1, mb)
            x = torch.from_numpy(np.stack([data[s:s + t] for s in starts]))
            y = torch.from_numpy(np.stack([data[s + 1:s + t + 1] for s in starts]))
            loss = model(x, y) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(spec["train.grad_clip"]))
        opt.step()
        times.append(time.perf_counter() - t0)
    if not math.isfinite(loss.item()):
        raise RuntimeError("torch loss is not finite")
    timed = times[1:]
    return gb * t * len(timed) / sum(timed)


def torch_best(job, strata, steps, threads):
    """Best PyTorch tok/s over its thread settings, each in a fresh process; (best, details)."""
    results = []
    for intra in sorted({1, threads}):
        env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(intra))
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--torch-only",
                              "--steps", str(steps), "--threads", str(intra), "--strata", strata, job],
                             env=env, check=True, capture_output=True, text=True).stdout
        results.append((float(out.strip().splitlines()[-1]), intra))
    best = max(results)
    return best[0], ", ".join(f"{tps:.0f} (intra-op {n})" for tps, n in results)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("jobs", nargs="+")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--strata", default=os.path.join(ROOT, "build", "bin", "strata"))
    ap.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_only:
        print(run_torch(resolved_spec(args.strata, args.jobs[0]), args.steps, args.threads))
        return
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor())
    print(f"# {time.strftime('%Y-%m-%d')} | {cpu} | {os.cpu_count()} cores | threads {args.threads} | "
          f"torch {torch.__version__} | {args.steps} steps")
    print("| job | model | tokens/step | strata tok/s | pytorch tok/s (best) | strata / pytorch | pytorch runs |")
    print("|---|---|---|---|---|---|---|")
    for job in args.jobs:
        spec = resolved_spec(args.strata, job)
        s = run_strata(args.strata, job, args.steps, args.threads)
        p, details = torch_best(job, args.strata, args.steps, args.threads)
        model = (f"L{spec['model.layers']} H{spec['model.heads']} C{spec['model.d_model']} "
                 f"T{spec['model.seq_len']}")
        tokens = int(spec["train.global_batch"]) * int(spec["model.seq_len"])
        print(f"| {os.path.basename(job)} | {model} | {tokens} | {s:.0f} | {p:.0f} | {s / p:.2f}x "
              f"| {details} |", flush=True)


if __name__ == "__main__":
    main()
