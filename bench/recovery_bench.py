#!/usr/bin/env python3
"""Daemon-mode recovery time: kill -9 of a busy worker -> first step of the new generation.

    /usr/bin/python3 bench/recovery_bench.py [BUILD_DIR] [--trials 3]

Starts strata-coordinator and 3 strata-worker daemons on loopback, submits a 2-worker tiny job
(checkpoint every 5 steps), kills one busy worker with SIGKILL after step 12, and splits the
time to the first step of the new generation using the job's log timestamps (coordinator
clock): detection (kill -> "RUNNING -> RECOVERING"), re-plan and assignment (-> "RECOVERING ->
RUNNING"), then rendezvous + checkpoint load + the first step (-> the first step line of the
new generation). Repeats --trials times (a fresh cluster each) and prints each split.
"""
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRIALS = int(sys.argv[sys.argv.index("--trials") + 1]) if "--trials" in sys.argv else 3
args = [a for i, a in enumerate(sys.argv[1:], 1)
        if not a.startswith("--") and sys.argv[i - 1] != "--trials"]
BUILD = args[0] if args else os.path.join(ROOT, "build")
BIN = os.path.join(BUILD, "bin")

JOB = """name: recovery
model: {layers: 4, heads: 4, d_model: 128, seq_len: 128}
data: {train: /usr/share/games/fortunes/*.u8, format: text}
train: {steps: 40, global_batch: 16, micro_batch: 8, lr: 3e-3, warmup: 5, seed: 1}
eval: {every: 0}
checkpoint: {every: 5, async: true}
resources: {workers: 2, min_workers: 1}
"""


def get(api, path):
    with urllib.request.urlopen(f"http://{api}{path}", timeout=10) as r:
        return json.loads(r.read())


def trial(tmp):
    coord = subprocess.Popen([os.path.join(BIN, "strata-coordinator"), "--data-dir",
                              os.path.join(tmp, "c"), "--listen", "127.0.0.1:0",
                              "--control-listen", "127.0.0.1:0"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = coord.stdout.readline()
    while "workers connect to" not in line:
        line = coord.stdout.readline()
        if not line:
            raise RuntimeError("strata-coordinator did not start")
    api = re.search(r"listening on (\S+) ", line).group(1)
    control = re.search(r"workers connect to (\S+)", line).group(1)
    workers = {}
    for i in range(3):
        workers[f"w{i}"] = subprocess.Popen(
            [os.path.join(BIN, "strata-worker"), "--coordinator", control, "--worker-id",
             f"w{i}", "--threads", "1", "--log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        job = os.path.join(tmp, "job.yaml")
        with open(job, "w") as f:
            f.write(JOB)
        env = dict(os.environ, STRATA_COORDINATOR=api)
        jid = subprocess.run([os.path.join(BIN, "strata"), "submit", job], env=env, check=True,
                             capture_output=True, text=True).stdout.strip()
        while int(get(api, f"/v1/jobs/{jid}").get("step", 0)) < 12:
            time.sleep(0.02)
        busy = [w["id"] for w in get(api, "/v1/workers")["workers"] if w.get("job_id") == jid]
        workers[busy[0]].send_signal(signal.SIGKILL)
        kill_ms = time.time() * 1000
        deadline = time.time() + 120
        lines = []
        while time.time() < deadline:
            lines = get(api, f"/v1/jobs/{jid}/logs?offset=0&limit=10000").get("entries", [])
            texts = [e["text"] for e in lines]
            rec = [i for i, t in enumerate(texts) if "-> RECOVERING" in t]
            if rec:
                run = [i for i, t in enumerate(texts) if "RECOVERING -> RUNNING" in t and i > rec[0]]
                if run and any(t.startswith("step") for t in texts[run[0] + 1:]):
                    break
            time.sleep(0.05)
        texts = [e["text"] for e in lines]
        ms = [datetime.datetime.strptime(e["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
            tzinfo=datetime.timezone.utc).timestamp() * 1000 for e in lines]
        rec = next(i for i, t in enumerate(texts) if "-> RECOVERING" in t)
        run = next(i for i, t in enumerate(texts) if "RECOVERING -> RUNNING" in t and i > rec)
        first = next(i for i in range(run + 1, len(texts)) if texts[i].startswith("step"))
        return (ms[rec] - kill_ms, ms[run] - ms[rec], ms[first] - ms[run], ms[first] - kill_ms,
                texts[first])
    finally:
        for p in workers.values():
            p.kill()
        coord.send_signal(signal.SIGTERM)
        coord.wait(timeout=30)
        for p in workers.values():
            p.wait()


def main():
    print(f"{'trial':>5} {'detect ms':>10} {'re-plan ms':>11} {'resume+1st step ms':>19} "
          f"{'total ms':>9}  first step of the new generation")
    for t in range(TRIALS):
        tmp = tempfile.mkdtemp(prefix="strata_recovery_")
        try:
            d, p, r, total, first = trial(tmp)
            print(f"{t + 1:>5} {d:10.0f} {p:11.0f} {r:19.0f} {total:9.0f}  {first}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
