#!/usr/bin/python3
"""Planner predictions vs measured step time on the CPU layouts this machine can run.

For each layout (dp x tp x pp on N = dp*tp*pp processes) of a job spec, asks the planner for its
predicted step time with those sizes fixed (`strata plan SPEC --workers N --device cpu --json`)
and measures the real one under mpirun (`strata-worker --job SPEC --dp --tp --pp --metrics`,
median over the steps after the first two). Prints one markdown table row per layout with the
ratio predicted / measured.

  /usr/bin/python3 bench/planner_vs_measured.py examples/small.yaml --steps 8

The CPU device profile is static (coordinator/planner.cc: 50 GFLOP/s per worker, 5 GB/s between
processes); the ratio shows how far that is from this machine.
"""
import argparse
import json
import re
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2)]


def with_layout(spec_text, dp, tp, pp):
    """The spec with its parallel block replaced by fixed sizes, and a micro-batch that the data-
    parallel size divides (global_batch / dp at most)."""
    out, skip = [], False
    gb = next((int(re.search(r"global_batch:\s*(\d+)", l).group(1)) for l in spec_text.splitlines()
               if re.search(r"^\s+global_batch:\s*\d+", l)), None)
    for line in spec_text.splitlines():
        m = re.match(r"^(\s+micro_batch:\s*)(\d+)(.*)$", line)
        if m and gb is not None:
            line = f"{m.group(1)}{min(int(m.group(2)), gb // dp)}{m.group(3)}"
        if line.startswith("parallel:"):
            skip = True
            continue
        if skip and line and not line.startswith((" ", "#")):
            skip = False
        if not skip:
            out.append(line)
    out.append(f"parallel: {{dp: {dp}, tp: {tp}, pp: {pp}}}")
    return "\n".join(out) + "\n"


def predicted(build, spec, n):
    r = subprocess.run([f"{build}/bin/strata", "plan", spec, "--workers", str(n), "--device",
                        "cpu", "--json"], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"strata plan failed: {r.stderr.strip()}")
    return json.loads(r.stdout)["best"]["step_seconds"]


def measured(build, spec, dp, tp, pp, steps, metrics):
    n = dp * tp * pp
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    threads = max(1, os.cpu_count() // n)
    # --bind-to none: Open MPI binds each rank to one core by default (np <= 2), which would
    # leave a rank's second thread without a core of its own.
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", str(n),
           f"{build}/bin/strata-worker", "--job", spec, "--dp", str(dp), "--tp", str(tp), "--pp",
           str(pp), "--threads", str(threads), "--max-steps", str(steps), "--metrics", metrics,
           "--log-level", "warn"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    times = []
    with open(metrics) as f:
        for line in f:
            m = json.loads(line)
            if "step_s" in m and m.get("step", 0) > 2:  # steps count from 1; skip warm-up
                times.append(m["step_s"])
    if not times:
        raise RuntimeError("no step metrics")
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", default=os.path.join(ROOT, "examples/small.yaml"))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    args = ap.parse_args()
    text = open(args.spec).read()
    spec_dir = os.path.dirname(os.path.abspath(args.spec))
    print("| layout | processes | predicted step | measured step (median) | predicted / measured |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for dp, tp, pp in LAYOUTS:
            n = dp * tp * pp
            # Beside the original so that relative data paths resolve the same way.
            spec = os.path.join(spec_dir, f".planner-vs-measured-{os.getpid()}.yaml")
            with open(spec, "w") as f:
                f.write(with_layout(text, dp, tp, pp))
            try:
                pred = predicted(args.build, spec, n)
                step_s = measured(args.build, spec, dp, tp, pp, args.steps,
                                  os.path.join(tmp, f"m-{dp}{tp}{pp}.jsonl"))
            except (RuntimeError, KeyError, ValueError) as e:
                print(f"| dp{dp} tp{tp} pp{pp} | {n} | error: {e} | | |")
                continue
            finally:
                os.remove(spec)
            print(f"| dp{dp} tp{tp} pp{pp} | {n} | {pred * 1e3:.1f} ms | {step_s * 1e3:.1f} ms | "
                  f"{pred / step_s:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
