"""
The demo's table of docs/results.md ("The demo"): what pre-training brings on the embedded
demo, over seeds 0, 1 and 2, with the references that need no model.

python experiments/demo.py            # about 22 minutes on 2 CPU cores
python experiments/demo.py --dry-run  # print each run's command, run nothing

It prepares the demo (python prepare.py, timed), then runs, for each seed S, train.py as a reader
would: both stages (python train.py --seed S), fine-tuning alone from scratch (--stage finetune,
for all its 12 epochs: --patience 0, so that no early stop cuts it short), both stages without the
distant context (--no-distant), and the first seed once more on one thread (the same command: its
scores may differ only by float rounding). A run with a metrics.json (and the seconds.json written
after it) is not run again, so a table cut short (Ctrl-C, a failed run) continues where it stopped;
a train.py command cut short runs again, both its stages. The table goes to <out>/table.md. Every
choice is made on dev: each stage keeps its best dev epoch.
"""
import argparse
import os
import shlex
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanotcmp.files import given_path  # noqa: E402 (the repository's)
from nanotcmp.settings import ranged  # noqa: E402
from tables import (SCORES, add_seeds, epochs_kept, make_table_in, mean_std, means, read_metrics, run,  # noqa: E402
                    run_chain, scores_of, table_head, table_row, write_table)

# row -> (its folder, train.py's options beyond --seed, whether it pre-trains)
ROWS = {"TCMP: pre-trained, then fine-tuned": ("tcmp", [], True),
        "from scratch (no pre-training, every epoch)": ("scratch", ["--stage", "finetune", "--patience", "0"], False),
        "w/o Dist (both stages)": ("wo-dist", ["--no-distant"], True)}
ONE_THREAD = "TCMP on one thread"


def chain(row, seed, args):
    """The one train.py command of a row and seed: [(stage, command, the folder of its fine-tuning)]"""
    folder, options, pretrains = ROWS[row] if row != ONE_THREAD else ("tcmp-one-thread", [], True)
    out = os.path.join(args.out, folder, f"seed{seed}")
    cmd = [sys.executable, "train.py", "--data", args.data, "--out", out, "--seed", str(seed)] + options
    return [("all" if pretrains else "finetune", cmd, os.path.join(out, "finetune") if pretrains else out)]


def table(args, prepare_seconds):
    """The Markdown tables, from the runs' metrics.json"""
    lines = [f"Demo test scores, percent, mean ± standard deviation over seeds {', '.join(map(str, args.seeds))}; "
             f"minutes: one run of train.py (both stages where it pre-trains), on {args.threads} threads "
             f"(python prepare.py: {prepare_seconds:.0f} s)", "",
             *table_head("row", *SCORES.values(), "macro-F1 of each seed", "dev WA", "epochs kept", "minutes a run")]
    # the fine-tunings' metrics (a chain's one stage: its folder third), the one-thread row's on the first seed
    fine = {row: [read_metrics(chain(row, seed, args)[0][2]) for seed in args.seeds] for row in ROWS}
    fine[ONE_THREAD] = [read_metrics(chain(ONE_THREAD, args.seeds[0], args)[0][2])]
    for name, key in (("majority class", "test_majority"),
                      ("last emotion of the target speaker (reads the context's labels)", "test_last_emotion")):
        lines.append(table_row([name, *scores_of(fine[next(iter(ROWS))][0][key]), "–", "–", "–", "–"]))
    for row, ms in fine.items():
        lines.append(table_row([f"{row} (seed {args.seeds[0]})" if row == ONE_THREAD else row,
                                *means([m["test"] for m in ms], SCORES),
                                ", ".join(f"{m['test']['f1']:.1f}" for m in ms), mean_std([m["dev"]["wa"] for m in ms]),
                                epochs_kept(ms), f"{np.mean([m['seconds'] for m in ms]) / 60:.1f}"]))
    gain = [a["test"]["f1"] - b["test"]["f1"] for a, b in zip(*(fine[row] for row in list(ROWS)[:2]))]
    lines += ["", f"Pre-trained minus from scratch, macro-F1 of each seed: {', '.join(f'{g:+.1f}' for g in gain)} "
              f"(mean ± sd {mean_std(gain)})", "",
              "Pre-training: target utterance searching on the test split (chance: R5@1 20, R5@2 40), beside "
              "the word-overlap reference (no model: each candidate scored by the share of its word pieces "
              "found in the context, on the same candidate sets)", "",
              *table_head("pre-training of", "T2T R5@1", "A2A R5@1", "M2M R5@1", "M2M R5@2", "epochs kept")]
    pre = {row: [read_metrics(os.path.join(args.out, folder, f"seed{seed}", "pretrain"), timed=False)
                 for seed in args.seeds] for row, (folder, _, pretrains) in ROWS.items() if pretrains}
    for row, ms in pre.items():
        cells = [mean_std([m["test"][beta][k] for m in ms])
                 for beta, k in (("T2T", "R5@1"), ("A2A", "R5@1"), ("M2M", "R5@1"), ("M2M", "R5@2"))]
        lines.append(table_row([row, *cells, epochs_kept(ms)]))
    overlap = means([m["test_word_overlap"] for m in next(iter(pre.values()))], ("R5@1", "R5@2"))
    lines.append(table_row(["word overlap with the context (no model)", "–", "–", *overlap, "–"]))
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_seeds(p, default=[0, 1, 2])
    p.add_argument("--threads", type=ranged(int, 1), default=os.cpu_count() or 1,
                   help="threads of each run (default: every core); the one-thread row has one")
    p.add_argument("--data", type=given_path, default="data/demo")
    p.add_argument("--out", type=given_path, default="out/demo-table")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    prepare = [sys.executable, "prepare.py", "--out", args.data]
    chains = [(chain(row, seed, args), args.threads) for row in ROWS for seed in args.seeds]
    chains.append((chain(ONE_THREAD, args.seeds[0], args), 1))  # the first seed again, on one thread

    def make_table():
        if args.dry_run:
            for cmd in [prepare] + [cmd for c, _ in chains for _, cmd, _ in c]:
                print(shlex.join(cmd))
            return
        t0 = time.time()
        prepare_seconds = run(prepare)  # its output on the terminal
        for cmds, threads in chains:
            run_chain(cmds, threads)
        write_table(args.out, table(args, prepare_seconds), t0, "demo.py")
    make_table_in(args.out, make_table, "demo.py")


if __name__ == "__main__":
    main()
