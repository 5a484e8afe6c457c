#!/usr/bin/env python3
"""Training stall per checkpoint save, as a fraction of a step.

    /usr/bin/python3 bench/checkpoint_stall.py [BUILD_DIR]

Trains (1) the tiny demo model (examples/tiny.yaml shape) for 60 steps with a checkpoint every
10 steps, async and sync, and (2) a GPT-2 124M-parameter model (12 x 768, vocabulary 50257)
for 12 steps of one 64-token sample with a checkpoint every 5 steps, async and sync. The
trainer's metrics record each step's time and the time it was blocked by a checkpoint save
(async: the snapshot copy into the staging buffer plus any wait for the previous save; sync: the
whole save). Reports stall per save / median step time (bar: <= 2% on tiny, async).
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build")
STRATA = os.path.join(BUILD, "bin", "strata")

TINY = """name: stall-tiny
model: {preset: tiny}
data: {train: /usr/share/games/fortunes/*.u8, format: text}
train: {steps: 60, global_batch: 32, micro_batch: 8, lr: 3e-3, warmup: 5, seed: 1}
eval: {every: 0}
checkpoint: {dir: CKPT, every: 10, keep: 2, async: ASYNC}
"""
GPT2 = """name: stall-124m
model: {layers: 12, heads: 12, d_model: 768, seq_len: 64, max_seq_len: 1024, vocab_size: 50257}
data: {train: /usr/share/games/fortunes/*.u8, format: text}
train: {steps: 12, global_batch: 1, micro_batch: 1, lr: 3e-4, warmup: 1, seed: 1}
eval: {every: 0}
checkpoint: {dir: CKPT, every: 5, keep: 1, async: ASYNC}
"""


def run(template, is_async, tmp):
    ckpt = os.path.join(tmp, "ckpt")
    shutil.rmtree(ckpt, ignore_errors=True)
    job = os.path.join(tmp, "job.yaml")
    with open(job, "w") as f:
        f.write(template.replace("CKPT", ckpt).replace("ASYNC", "true" if is_async else "false"))
    metrics = os.path.join(tmp, "metrics.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    subprocess.run([STRATA, "train", job, "--metrics", metrics, "--log-level", "warn"],
                   check=True)
    rows = [json.loads(l) for l in open(metrics) if '"loss"' in l]
    every = 10 if "tiny" in template else 5
    saves = [r for r in rows if r["step"] % every == 0 and r["step"] < len(rows)]
    plain = [r["step_s"] for r in rows[1:] if r["step"] % every != 0]
    # Steps right after a save run beside the background writer: report their slowdown too.
    after = [r["step_s"] for r in rows if r["step"] % every == 1 and r["step"] > 1]
    step = statistics.median(plain)
    stall = statistics.mean(r["ckpt_stall_s"] for r in saves)
    return step, stall, statistics.mean(after) if after else float("nan")


def main():
    tmp = tempfile.mkdtemp(prefix="strata_stall_")
    try:
        print(f"{'model':<10} {'mode':<6} {'step ms':>9} {'stall/save ms':>14} {'stall/step':>11} "
              f"{'next step ms':>13}")
        for name, template in (("tiny", TINY), ("124M", GPT2)):
            for is_async in (True, False):
                step, stall, after = run(template, is_async, tmp)
                print(f"{name:<10} {'async' if is_async else 'sync':<6} {step * 1e3:9.1f} "
                      f"{stall * 1e3:14.2f} {100 * stall / step:10.2f}% {after * 1e3:13.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
