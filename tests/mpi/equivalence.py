#!/usr/bin/python3
"""The equivalence suite under mpirun: every layout trains the same model.

`strata train` (one process) and `mpirun -np N strata-worker` with each layout train the same job
for the same steps; rank 0 of each writes its per-step losses (--metrics, full float precision);
every layout's losses must match the one-process run to <= 1e-5 relative at every step.

  /usr/bin/python3 tests/mpi/equivalence.py BUILD_DIR
"""
import json
import os
import random
import subprocess
import sys
import tempfile

STEPS = 20
TOL = 1e-5
# Mixed precision: each layout against the one-process run in the same precision. Reductions in
# a different order round differently in bf16/fp16, hence the looser (stated) tolerances.
MIXED = [("bf16", 3e-3, [(2, 2, 2, False), (2, 1, 1, True), (1, 2, 1, False)]),
         ("fp16", 1e-3, [(2, 2, 2, False), (2, 1, 1, True)])]
# (dp, tp, pp, zero1); world = dp * tp * pp.
# Every layout in {1,2}^3, plus dp=4 and pp=4, with ZeRO-1 off and on where dp > 1.
LAYOUTS = [(dp, tp, pp, False) for dp in (1, 2) for tp in (1, 2) for pp in (1, 2)
           if dp * tp * pp > 1]
LAYOUTS += [(4, 1, 1, False), (1, 1, 4, False), (1, 4, 1, False)]
LAYOUTS += [(dp, tp, pp, True) for dp, tp, pp, _ in LAYOUTS if dp > 1]


def losses(path):
    with open(path) as f:
        return [json.loads(line)["loss"] for line in f if '"loss"' in line]


def main(build):
    strata = os.path.join(build, "bin", "strata")
    worker = os.path.join(build, "bin", "strata-worker")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    with tempfile.TemporaryDirectory() as d:
        rng = random.Random(3)
        words = "the cat sat on a mat and dog ran to see it was very happy today".split()
        with open(os.path.join(d, "input.txt"), "w") as f:
            f.write(" ".join(rng.choice(words) for _ in range(8000)))
        def make_job(precision):
            job = os.path.join(d, f"job_{precision}.yaml")
            with open(job, "w") as f:
                f.write("model: {layers: 4, heads: 4, d_model: 32, seq_len: 16}\n"
                        "data: {train: input.txt}\n"
                        f"train: {{steps: {STEPS}, global_batch: 8, micro_batch: 2, lr: 3.0e-3,"
                        f" warmup: 3, seed: 11, precision: {precision}}}\n"
                        "eval: {every: 0}\n")
            return job

        runs = [("fp32", TOL, LAYOUTS)] + MIXED
        failed = total = 0
        for precision, tol, layouts in runs:
            job = make_job(precision)
            ref_path = os.path.join(d, f"ref_{precision}.jsonl")
            subprocess.run([strata, "train", job, "--threads", "1", "--metrics", ref_path],
                           check=True, capture_output=True, env=env)
            ref = losses(ref_path)
            assert len(ref) == STEPS, ref
            assert ref[-1] < ref[0] - 0.5, f"reference run did not learn: {ref}"
            for dp, tp, pp, zero1 in layouts:
                total += 1
                name = f"{precision}_dp{dp}_tp{tp}_pp{pp}" + ("_zero1" if zero1 else "")
                out = os.path.join(d, name + ".jsonl")
                cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np",
                       str(dp * tp * pp), worker, "--job", job, "--dp", str(dp), "--tp", str(tp),
                       "--pp", str(pp), "--threads", "1", "--metrics", out]
                cmd += ["--zero1"] if zero1 else []
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
                if proc.returncode != 0:
                    print(f"FAIL {name}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
                    failed += 1
                    continue
                got = losses(out)
                worst = max((abs(a - b) / abs(b) for a, b in zip(got, ref)),
                            default=float("inf"))
                ok = len(got) == len(ref) and worst <= tol
                print(f"{'ok  ' if ok else 'FAIL'} {name}: {len(got)} steps, max relative loss "
                      f"difference {worst:.3g} (tolerance {tol:g})")
                failed += 0 if ok else 1
        print(f"{total - failed} passed, {failed} failed")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
