"""
Results tables made of train.py runs (experiments/): run each stage's command once, its output in a log beside
its folder and its wall time in <folder>/seconds.json, and summarise the runs' metrics.json as mean ± standard
deviation over seeds. A run with a metrics.json and a seconds.json is never run again, so a table cut short
(Ctrl-C, a failed run) continues where it stopped: the same command runs the others, a run cut short from its start.
"""
import argparse
import contextlib
import os
import shlex
import subprocess
import sys
import time

import numpy as np

from nanotcmp.files import DataError, one_line_errors, read_json, write_json, write_text
from nanotcmp.settings import SEED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: where commands run


def script():
    return os.path.basename(sys.argv[0])


def shown(cmd):
    """A command as a reader types it: python for this interpreter"""
    return shlex.join(["python" if c == sys.executable else c for c in cmd])


def run(cmd, log=None, env=None, stop=None):
    """cmd, its output into the file log (None: onto the terminal) -> wall seconds. A failure stops
    the table with one line naming the command and where its output is; stop (a threading.Event),
    once set, ends the command: another run of the table failed, or Ctrl-C"""
    t0 = time.time()
    try:
        output = open(log, "w") if log else contextlib.nullcontext()
    except OSError as e:
        raise SystemExit(f"{script()}: cannot write {log} ({e.strerror})") from None
    with output as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT if log else None, env=env)
        try:
            while True:
                try:
                    code = proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    if stop is not None and stop.is_set():
                        proc.terminate()
        except BaseException:  # Ctrl-C (KeyboardInterrupt): the command, which met it too, ends with the table
            try:
                proc.wait(timeout=30)  # its own clean stop: what it keeps, said
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
    if code and stop is not None and stop.is_set():
        raise SystemExit(f"{script()}: {shown(cmd)} stopped")
    if code:
        if log is None:
            raise SystemExit(f"{script()}: {shown(cmd)} failed (exit {code}); its error is above")
        with open(log, errors="replace") as f:
            last = ([line.strip() for line in f if line.strip()] or ["(no output)"])[-1]
        raise SystemExit(f"{script()}: {shown(cmd)} failed (exit {code}): {last} (all of its output: {log})")
    return time.time() - t0


def done(out):
    return all(os.path.isfile(os.path.join(ROOT, out, name)) for name in ("metrics.json", "seconds.json"))


def run_chain(cmds, threads, stop=None):
    """Run a row's stages, [(stage, command, its folder)], that have not finished (done), each on
    `threads` threads; each one's wall time goes into <its folder>/seconds.json. stop: see run"""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for stage, cmd, out in cmds:
        if done(out):
            continue
        if stop is not None and stop.is_set():
            return
        folder = os.path.join(ROOT, out)
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise SystemExit(f"{script()}: {folder}, the folder of a {stage} run, is a file: move it away")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:  # a part of the path a file, no permission
            raise SystemExit(f"{script()}: cannot make {folder} ({e.strerror})") from None
        if "train.py" in cmd:  # not done: a run cut short (or none), started again from its start
            cmd = cmd + ["--overwrite"]
        seconds = run(cmd, folder + ".log", env, stop)
        try:
            write_json(os.path.join(folder, "seconds.json"), seconds)
        except DataError as e:  # (write_json's errors: one line of what to do)
            raise SystemExit(f"{script()}: {e}") from None
        print(f"{out}: {seconds / 60:.1f} min", flush=True)


def make_table_in(out, make, name):
    """make(): a table and its runs into the folder out (from the repository), which must not be a
    file; Ctrl-C stops it with one line saying what is kept. name: the script's, for the messages"""
    folder = os.path.join(ROOT, out)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise SystemExit(f"{name}: --out {out} is a file; give a folder")
    with one_line_errors(name, lambda: f"interrupted; the runs finished so far are kept in {out} (each with its "
                                       f"metrics.json and seconds.json): the same command again runs the rest, a "
                                       f"train.py run cut short from its start"):
        make()


def write_table(out, text, t0, name, file="table.md"):
    """The table into <out>/<file>, and onto the terminal with the minutes since t0; name: the script's"""
    try:
        write_text(os.path.join(ROOT, out, file), text)
    except DataError as e:  # (write_text's errors: one line of what to do)
        raise SystemExit(f"{name}: {e}") from None
    print(text + f"\n{(time.time() - t0) / 60:.1f} min: {os.path.join(out, file)}")


def read_metrics(out, timed=True):
    """metrics.json of a run, with its wall time (seconds.json) as its "seconds" where timed"""
    try:
        metrics = read_json(os.path.join(ROOT, out, "metrics.json"), ("test",), "a run of train.py")
        seconds = read_json(os.path.join(ROOT, out, "seconds.json"), (), "a run of this table") if timed else None
    except DataError as e:
        raise SystemExit(f"{script()}: {e}") from None
    return {**metrics, "seconds": seconds} if timed else metrics


def mean_std(values, digits=1):
    """mean ± standard deviation; one run's value alone (it has no deviation, not one of 0)"""
    v = np.asarray(values, dtype=np.float64)
    return f"{v.mean():.{digits}f}" + (f" ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else "")


class Seeds(argparse.Action):
    """--seeds: each once (a seed given twice would count twice in every mean)"""

    def __call__(self, parser, namespace, values, option_string=None):
        if twice := sorted({s for s in values if values.count(s) > 1}):
            parser.error(f"{option_string}: seed {twice[0]} is given twice; give each seed once")
        setattr(namespace, self.dest, values)


def add_seeds(p, **kwargs):
    p.add_argument("--seeds", type=SEED, nargs="+", action=Seeds, **kwargs)


SCORES = {"wa": "WA", "aa": "AA", "f1": "macro-F1", "wf1": "weighted-F1"}  # an emotion table's scores, its columns


def scores_of(s):
    """One run's emotion scores (a dict) as table cells"""
    return [f"{s[k]:.1f}" for k in SCORES]


def means(scores, keys):
    """mean ± standard deviation over the runs' scores (dicts) of each key"""
    return [mean_std([s[k] for s in scores]) for k in keys]


def epochs_kept(runs):
    """The best dev epoch of each run, the one it keeps: "3, 5, 4" """
    return ", ".join(str(m["best_epoch"]) for m in runs)


def table_row(cells):
    return "| " + " | ".join(cells) + " |"


def table_head(*columns):
    """A Markdown table's first two lines: its columns' names, then the line under them"""
    return [table_row(columns), "|---" * len(columns) + "|"]
