#!/usr/bin/python3
"""Memory per rank for each layout: measured buffers vs the analytic estimate, side by side.

  /usr/bin/python3 bench/memory.py [examples/tiny.yaml]

Runs `mpirun -np N strata-worker --memory-report --max-steps 1` for each layout; every rank
prints its parameter, gradient, optimizer and activation bytes as held, and the estimate from
the model shape and layout (Trainer::Memory). Prints the largest rank of each layout.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = [(1, 1, 1, False), (2, 1, 1, False), (2, 1, 1, True), (4, 1, 1, True), (1, 2, 1, False),
           (1, 4, 1, False), (1, 1, 2, False), (1, 1, 4, False), (2, 2, 2, False), (2, 2, 2, True)]


def main(job):
    worker = os.path.join(ROOT, "build", "bin", "strata-worker")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    print(f"# {os.path.basename(job)}: MiB on the largest rank, measured / estimated")
    print("| layout | params | grads | optimizer | activations | act. est/measured |")
    print("|---|---|---|---|---|---|")
    for dp, tp, pp, zero1 in LAYOUTS:
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(dp * tp * pp), worker,
               "--job", job, "--dp", str(dp), "--tp", str(tp), "--pp", str(pp), "--max-steps", "1",
               "--threads", "1", "--memory-report", "--log-level", "warn"]
        cmd += ["--zero1"] if zero1 else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        ranks = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
        r = max(ranks, key=lambda x: x["params"] + x["optimizer"] + x["activations"])
        name = f"dp{dp} tp{tp} pp{pp}" + (" zero1" if zero1 else "")
        print(f"| {name} | {mib(r['params'])} / {mib(r['est_params'])} | {mib(r['grads'])} / "
              f"{mib(r['est_grads'])} | {mib(r['optimizer'])} / {mib(r['est_optimizer'])} | "
              f"{mib(r['activations'])} / {mib(r['est_activations'])} | "
              f"{r['est_activations'] / r['activations']:.2f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "examples", "tiny.yaml"))
