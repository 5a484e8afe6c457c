#!/usr/bin/python3
"""Exposed communication per step with data-parallel overlap on vs off, side by side.

Runs `mpirun -np 2 strata-worker --dp 2` on each job twice: gradient all-reduces launched in
buckets while backward runs (default) and one all-reduce after backward (--no-overlap). Rank 0's
--metrics give, per step, the step time and the time it spent blocked on collectives after its
compute ("exposed communication"). Reports the means over all steps but the first two, and
the median step's exposed communication (robust to a step slowed by other load on the machine).
--repeat N alternates the off/on runs N times and pools their steps.

  /usr/bin/python3 bench/dp_overlap.py [--steps 12] [--threads 1] [--repeat 1] examples/tiny.yaml
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(worker, job, steps, threads, overlap, extra):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "m.jsonl")
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", worker, "--job", job,
               "--dp", "2", "--threads", str(threads), "--max-steps", str(steps), "--metrics", out]
        cmd += extra + ([] if overlap else ["--no-overlap"])
        env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        rows = [json.loads(l) for l in open(out) if '"comm_wait_s"' in l][2:]
    return [(r["step_s"], r["comm_wait_s"]) for r in rows]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("jobs", nargs="+")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--micro-batch", type=int, default=0, help="override train.micro_batch")
    ap.add_argument("--repeat", type=int, default=1, help="alternate off/on runs this often")
    ap.add_argument("--worker", default=os.path.join(ROOT, "build", "bin", "strata-worker"))
    args = ap.parse_args()
    print(f"# {time.strftime('%Y-%m-%d')} | {os.cpu_count()} cores | mpirun -np 2, dp 2, "
          f"{args.threads} thread(s) per rank | {args.steps} steps (first 2 excluded)"
          f"{f' x {args.repeat} runs' if args.repeat > 1 else ''}")
    print("| job | overlap | step ms | exposed comm ms | exposed / step | median exposed ms |")
    print("|---|---|---|---|---|---|")
    for job in args.jobs:
        rows = {False: [], True: []}
        for _ in range(args.repeat):
            for overlap in (False, True):
                rows[overlap] += run(args.worker, job, args.steps, args.threads, overlap,
                                     ["--micro-batch", str(args.micro_batch)]
                                     if args.micro_batch else [])
        res = {}
        for overlap in (False, True):
            step = statistics.mean(r[0] for r in rows[overlap])
            wait = statistics.mean(r[1] for r in rows[overlap])
            med = statistics.median(r[1] for r in rows[overlap])
            res[overlap] = (wait, med)
            print(f"| {os.path.basename(job)} | {'on' if overlap else 'off'} | {step * 1e3:.1f} | "
                  f"{wait * 1e3:.2f} | {100 * wait / step:.1f}% | {med * 1e3:.2f} |", flush=True)
        (off, off_med), (on, on_med) = res[False], res[True]
        hidden = 1 - on / off if off > 0 else float("nan")
        hidden_med = 1 - on_med / off_med if off_med > 0 else float("nan")
        print(f"| {os.path.basename(job)} | hidden by overlap | | {1e3 * (off - on):.2f} | "
              f"{100 * hidden:.0f}% of the exposed all-reduce time | {100 * hidden_med:.0f}% |")


if __name__ == "__main__":
    sys.exit(main())
