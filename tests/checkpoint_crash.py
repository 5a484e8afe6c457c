#!/usr/bin/python3
"""Crash tests with real processes: `strata train` killed with SIGKILL at random moments.

A tiny job saves a checkpoint every 1 or 2 steps (async and sync alternating between
iterations). Each iteration starts `strata train` (with --resume after the first), kills it with
SIGKILL at a random moment within its first few steps (start-up included), then checks the root:
  - `strata ckpt ls` succeeds; whenever a committed checkpoint exists, `strata ckpt verify`
    succeeds on the latest one (and on every other committed step): a kill never leaves a torn
    checkpoint committed;
  - the next run resumes exactly from the latest committed step (its first metrics step is that
    step + 1, no "unusable" fallback is logged), so a torn checkpoint is never chosen;
  - every step any run got to has the bitwise same loss as an uninterrupted reference run (same
    layout: one process, one thread).
The loop runs with --max-steps CAP < train.steps so it never finishes the job; at the end one
run with --resume trains to completion, its steps must continue the count after the resumed step
with losses bitwise equal to the reference's, and its final checkpoint's parameters (through
`strata export`) must equal the reference's final checkpoint's bitwise.

  /usr/bin/python3 tests/checkpoint_crash.py BUILD_DIR [--seed N] [--iterations N] [--budget S]

The seed (random unless given, or STRATA_CRASH_SEED) is printed so a failure can be replayed.
Exits 0 when every check holds, 1 with a message naming the failed check otherwise.
"""
import argparse
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time

STEPS = 60           # train.steps of the job
CAP = STEPS - 6      # crash-loop runs stop here (--max-steps), so the final run has steps to do
WINDOW = 4           # a kill comes within one of a run's first WINDOW steps (or its start-up)


class Failure(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Failure(msg)


def read_metrics(path):
    """(step, loss) of each complete step line; a line torn by the kill is ignored."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in rec and "step" in rec:
                out.append((rec["step"], rec["loss"]))
    return out


def read_safetensors(path):
    """name -> raw little-endian bytes of each tensor (metadata dropped)."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    base = 8 + n
    return {name: blob[base + h["data_offsets"][0]:base + h["data_offsets"][1]]
            for name, h in header.items() if name != "__metadata__"}


class Crash:
    def __init__(self, build, work, seed):
        self.strata = os.path.join(build, "bin", "strata")
        self.work = work
        self.root = os.path.join(work, "ckpt")
        self.rng = random.Random(seed)
        self.stats = dict(iterations=0, killed=0, finished=0, kill_before_first_step=0,
                          kill_during_save=0, durable_not_committed=0, gc_leftovers=0,
                          no_checkpoint_yet=0, verified=0)

    def job(self, name, every, async_, ckpt_dir):
        path = os.path.join(self.work, name + ".yaml")
        with open(path, "w") as f:
            f.write("model: {layers: 4, heads: 4, d_model: 32, seq_len: 16}\n"
                    "data: {train: input.txt}\n"
                    f"train: {{steps: {STEPS}, global_batch: 8, micro_batch: 2, lr: 3.0e-3,"
                    " warmup: 3, seed: 11, precision: fp32}\n"
                    "eval: {every: 0}\n"
                    f"checkpoint: {{dir: {ckpt_dir}, every: {every}, keep: 2,"
                    f" async: {'true' if async_ else 'false'}}}\n")
        return path

    def strata_cmd(self, *args):
        return subprocess.run([self.strata, *args], capture_output=True, text=True, timeout=120)

    def committed(self):
        """Committed steps per `strata ckpt ls` (which must succeed)."""
        p = self.strata_cmd("ckpt", "ls", self.root)
        check(p.returncode == 0, f"`strata ckpt ls {self.root}` exited {p.returncode}:\n"
              f"{p.stdout}{p.stderr}")
        steps = []
        for line in p.stdout.splitlines():
            tok = line.split()
            if tok and tok[0].isdigit():
                check("committed" in line, f"`ckpt ls` lists step {tok[0]} oddly: {line!r}")
                steps.append(int(tok[0]))
        check(steps == sorted(steps), f"`ckpt ls` steps out of order: {steps}")
        return steps

    def verify(self, steps):
        """`ckpt verify` on the latest committed checkpoint and on each other one."""
        p = self.strata_cmd("ckpt", "verify", self.root)
        check(p.returncode == 0, f"latest committed checkpoint (step {steps[-1]}) fails "
              f"`strata ckpt verify {self.root}` (exit {p.returncode}):\n{p.stdout}{p.stderr}")
        check(f"step {steps[-1]} " in p.stdout,
              f"`ckpt verify` did not check the latest step {steps[-1]}: {p.stdout}")
        for s in steps[:-1]:
            p = self.strata_cmd("ckpt", "verify", self.root, "--step", str(s))
            # Garbage collection of a resumed run may remove an older step between `ls` and
            # here only when a process runs; none does now, so every listed step must verify.
            check(p.returncode == 0, f"committed step {s} fails `ckpt verify --step {s}` "
                  f"(exit {p.returncode}):\n{p.stdout}{p.stderr}")
        self.stats["verified"] += len(steps)

    def step_dirs(self):
        """step -> (inode, mtime) of each step directory under the root."""
        out = {}
        if os.path.isdir(self.root):
            for name in os.listdir(self.root):
                m = re.fullmatch(r"step-(\d{8})", name)
                if m:
                    st = os.stat(os.path.join(self.root, name))
                    out[int(m.group(1))] = (st.st_ino, st.st_mtime_ns)
        return out

    def classify_leftovers(self, committed, before):
        """Counts what the kill left on disk next to the committed checkpoints: an uncommitted
        step directory above the latest commit that this run created or changed means it was
        killed during a save."""
        latest = committed[-1] if committed else -1
        during_save = False
        for step, ident in self.step_dirs().items():
            if step in committed:
                continue
            if step < latest:
                self.stats["gc_leftovers"] += 1
            elif before.get(step) != ident:
                during_save = True
                durable = os.path.join(self.root, f"step-{step:08d}", "rank-00000.durable")
                self.stats["durable_not_committed"] += os.path.exists(durable)
        self.stats["kill_during_save"] += during_save

    def check_run(self, what, metrics, log, first_expected, last_expected, ref):
        got = read_metrics(metrics)
        steps = [s for s, _ in got]
        if got:
            check(steps[0] == first_expected,
                  f"{what}: first step {steps[0]}, expected {first_expected} (the latest "
                  f"committed step + 1); log:\n{log[-2000:]}")
            check(steps == list(range(steps[0], steps[0] + len(steps))),
                  f"{what}: steps are not consecutive: {steps}")
        if last_expected is not None:
            check(steps and steps[-1] == last_expected,
                  f"{what}: ran steps {steps[:1]}..{steps[-1:]}, expected to end at "
                  f"{last_expected}")
        for s, loss in got:
            check(loss == ref.get(s), f"{what}: step {s} loss {loss!r} differs from the "
                  f"uninterrupted run's {ref.get(s)!r} (same layout: must be bitwise equal)")
        check("is unusable" not in log and "falling back" not in log,
              f"{what}: a committed checkpoint was found unusable on resume:\n{log[-2000:]}")
        return got

    def run_and_kill(self, cmd, logf, metrics, k):
        """Runs cmd and SIGKILLs it at a random moment within its (k+1)-th step: once it has
        reported k steps (k = 0: from its start, so start-up and resume are covered too), after
        a further uniform delay within one step's time as observed so far (step times vary a
        lot with the disk's fsync latency). Returns (exit code, killed, seconds it ran)."""
        est = sorted(self.step_times)[len(self.step_times) // 2]
        t0 = last_t = time.monotonic()
        kill_at = None if k > 0 else t0 + self.rng.uniform(0.0, 0.1 + est)
        seen = 0
        with open(logf, "w") as log:
            proc = subprocess.Popen(cmd, cwd=self.work, stdout=log, stderr=subprocess.STDOUT)
            while proc.poll() is None:
                now = time.monotonic()
                if kill_at is not None and now >= kill_at:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return proc.returncode, True, now - t0
                check(now - t0 < 120, f"`{' '.join(cmd)}` still runs after 120 s")
                if kill_at is None and os.path.exists(metrics):
                    with open(metrics, "rb") as f:
                        n = f.read().count(b"\n")
                    if n > seen:
                        if seen > 0:
                            self.step_times.append((now - last_t) / (n - seen))
                        seen, last_t = n, now
                    if seen >= k:
                        kill_at = now + self.rng.uniform(0.0, est)
                time.sleep(0.002)
        return proc.returncode, False, time.monotonic() - t0

    def run(self, max_iterations, budget_s):
        with open(os.path.join(self.work, "input.txt"), "w") as f:
            wrng = random.Random(3)
            words = "the cat sat on a mat and dog ran to see it was very happy today".split()
            f.write(" ".join(wrng.choice(words) for _ in range(8000)))

        # The uninterrupted reference (checkpoints every step, like the crash runs).
        ref_root = os.path.join(self.work, "ref_ckpt")
        ref_job = self.job("ref", 1, True, ref_root)
        ref_metrics = os.path.join(self.work, "ref.jsonl")
        t0 = time.monotonic()
        p = subprocess.run([self.strata, "train", ref_job, "--threads", "1", "--metrics",
                            ref_metrics], cwd=self.work, capture_output=True, text=True,
                           timeout=300)
        ref_seconds = time.monotonic() - t0
        self.step_times = [ref_seconds / STEPS]
        check(p.returncode == 0, f"reference run exited {p.returncode}:\n{p.stderr[-2000:]}")
        ref = dict(read_metrics(ref_metrics))
        check(sorted(ref) == list(range(1, STEPS + 1)), f"reference steps: {sorted(ref)}")
        print(f"reference: {STEPS} steps in {ref_seconds:.1f} s, loss {ref[1]:.4f} -> "
              f"{ref[STEPS]:.4f}")

        start = time.monotonic()
        latest = -1          # latest committed step after the previous iteration
        i = 0
        while i < max_iterations and time.monotonic() - start < budget_s and latest < CAP:
            async_ = i % 2 == 0
            every = 1 if (i // 2) % 2 == 0 else 2
            job = self.job(f"crash{i}", every, async_, self.root)
            metrics = os.path.join(self.work, f"crash{i}.jsonl")
            logf = os.path.join(self.work, f"crash{i}.log")
            cmd = [self.strata, "train", job, "--threads", "1", "--max-steps", str(CAP),
                   "--metrics", metrics] + (["--resume"] if i > 0 else [])
            remaining = CAP - max(latest, 0)
            before = self.step_dirs()
            rc, killed, delay = self.run_and_kill(cmd, logf, metrics,
                                                  self.rng.randrange(min(remaining, WINDOW)))
            with open(logf) as f:
                log_text = f.read()
            what = f"iteration {i} ({'async' if async_ else 'sync'}, every {every})"
            check(killed or rc == 0, f"{what}: exited {rc} on its own:\n{log_text[-2000:]}")
            got = self.check_run(what, metrics, log_text, latest + 1 if latest > 0 else 1,
                                 None if killed else CAP, ref)
            self.stats["iterations"] += 1
            self.stats["killed"] += killed
            self.stats["finished"] += not killed
            self.stats["kill_before_first_step"] += killed and not got

            committed = self.committed()
            if committed:
                self.verify(committed)
                check(committed[-1] >= latest, f"{what}: latest committed step went back from "
                      f"{latest} to {committed[-1]}")
                if not killed:
                    check(committed[-1] == CAP, f"{what}: finished at {CAP} but the latest "
                          f"committed step is {committed[-1]}")
            else:
                check(latest < 0, f"{what}: committed step {latest} is gone, nothing committed")
                self.stats["no_checkpoint_yet"] += 1
            self.classify_leftovers(committed, before)
            print(f"{what}: {'killed after %.2f s' % delay if killed else 'finished'}, "
                  f"steps {got[0][0] if got else '-'}..{got[-1][0] if got else '-'}, "
                  f"committed {committed[-2:] if committed else 'none'}")
            latest = committed[-1] if committed else -1
            i += 1

        # The final run: resume and train to completion.
        job = self.job("final", 2, True, self.root)
        metrics = os.path.join(self.work, "final.jsonl")
        p = subprocess.run([self.strata, "train", job, "--threads", "1", "--resume",
                            "--metrics", metrics], cwd=self.work, capture_output=True,
                           text=True, timeout=300)
        log_text = p.stdout + p.stderr
        check(p.returncode == 0, f"final run exited {p.returncode}:\n{log_text[-2000:]}")
        got = self.check_run("final run", metrics, log_text, latest + 1 if latest > 0 else 1,
                             STEPS, ref)
        check(got, "final run reported no steps")
        if latest > 0:
            check(f"loaded checkpoint step {latest}" in log_text,
                  f"final run did not log resuming from step {latest}:\n{log_text[-2000:]}")
        committed = self.committed()
        check(committed and committed[-1] == STEPS,
              f"after the final run the latest committed step is {committed}, expected {STEPS}")
        self.verify(committed)

        # Final parameters against the reference's final checkpoint (same layout: bitwise).
        exported = []
        for root in (self.root, ref_root):
            out = root + ".safetensors"
            p = self.strata_cmd("export", root, "--format", "safetensors", "-o", out)
            check(p.returncode == 0, f"`strata export {root}` exited {p.returncode}:\n"
                  f"{p.stdout}{p.stderr}")
            exported.append(read_safetensors(out))
        crash, ref_t = exported
        check(sorted(crash) == sorted(ref_t) and crash,
              f"exported tensor names differ: {sorted(crash)} vs {sorted(ref_t)}")
        differ = [name for name in crash if crash[name] != ref_t[name]]
        check(not differ, f"final parameters differ from the uninterrupted run's: {differ}")

        print(f"final run: resumed after step {max(latest, 0)}, steps {got[0][0]}..{got[-1][0]}, "
              f"losses and {len(crash)} final tensors bitwise equal to the uninterrupted run")
        return time.monotonic() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("build")
    ap.add_argument("--seed", type=int,
                    default=int(os.environ.get("STRATA_CRASH_SEED", "0")) or None)
    ap.add_argument("--iterations", type=int, default=25)
    ap.add_argument("--budget", type=float, default=90.0, help="seconds for the crash loop")
    a = ap.parse_args()
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1, 2**31)
    print(f"seed {seed} (replay: --seed {seed})")
    with tempfile.TemporaryDirectory(prefix="strata_crash_") as work:
        crash = Crash(os.path.abspath(a.build), work, seed)
        try:
            seconds = crash.run(a.iterations, a.budget)
        except Failure as e:
            print(f"FAIL (seed {seed}): {e}")
            print("summary so far: " + ", ".join(f"{k} {v}" for k, v in crash.stats.items()))
            return 1
        s = crash.stats
        print(f"summary: {s['iterations']} iterations in {seconds:.1f} s: {s['killed']} killed "
              f"({s['kill_before_first_step']} before the first step, {s['kill_during_save']} "
              f"during a save, {s['durable_not_committed']} between durable and commit), "
              f"{s['finished']} finished; {s['no_checkpoint_yet']} with no checkpoint yet, "
              f"{s['gc_leftovers']} garbage-collection leftovers; {s['verified']} committed "
              f"checkpoints verified")
        print("ok")
        return 0


if __name__ == "__main__":
    sys.exit(main())
