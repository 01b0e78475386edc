"""
Results tables made of train.py runs (experiments/): run each stage's command once, its output in a
log beside its folder and its wall time in <folder>/seconds.json, and summarise the runs' metrics.json
as mean ± standard deviation over seeds. A run with a metrics.json is never run again, so a table cut
short continues where it stopped.
"""
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np

from nanotcmp.data import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: where commands run


def run(cmd, log, env=None):
    """cmd, its output into log -> wall seconds; a failure stops the table, naming the log"""
    t0 = time.time()
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        with open(log) as f:
            tail = f.read()[-2000:]
        raise SystemExit(f"{os.path.basename(sys.argv[0])}: {shlex.join(cmd)} failed (exit {done.returncode}); "
                         f"{log} ends:\n{tail}")
    return time.time() - t0


def run_chain(cmds, threads):
    """Run a row's stages, [(stage, command, its folder)], that have no metrics.json yet, each on
    `threads` threads; each one's wall time goes into <its folder>/seconds.json"""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for stage, cmd, out in cmds:
        if not os.path.isfile(os.path.join(ROOT, out, "metrics.json")):
            os.makedirs(os.path.join(ROOT, out), exist_ok=True)
            seconds = run(cmd, os.path.join(ROOT, out + ".log"), env)
            write_json(os.path.join(ROOT, out, "seconds.json"), seconds)
            print(f"{out}: {seconds / 60:.1f} min", flush=True)


def read_metrics(out):
    """metrics.json of a run, with its wall time (seconds.json) as its "seconds" """
    with open(os.path.join(ROOT, out, "metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(ROOT, out, "seconds.json")) as f:
        return {**metrics, "seconds": json.load(f)}


def mean_std(values, digits=1):
    v = np.asarray(values, dtype=np.float64)
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.{digits}f}"
