"""
Train TCMP: contrastive pre-training on dialogues (target utterance searching + text-audio
consistency), then fine-tuning to pre-recognise the next emotion.

python train.py                      # both stages on the demo with tiny encoders: a few minutes on a CPU
python train.py --stage pretrain --data data/meld-unlabelled \\
    --text-encoder weights/bert-base-uncased --audio-encoder weights/hubert-base-ls960
python train.py --stage finetune --data data/p-meld --init out/meld-unlabelled-pretrain \\
    --text-encoder weights/bert-base-uncased --audio-encoder weights/hubert-base-ls960
python train.py ... --freeze-encoders  # encode every utterance once, train only the TCMP layers
torchrun --nproc_per_node=4 train.py ...  # one process per GPU; --batch-size is the global batch
"""
import argparse
import contextlib
import dataclasses
import functools
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel as DDP

from nanotcmp import processes
from nanotcmp.checkpoint import Progress, claim_folder, load_init, refuse_mixing, resume, save_model, save_state
from nanotcmp.cuda_graphs import CudaGraphs, compile_encoders
from nanotcmp.data import (DataError, Split, file_sha256, keep_dialogues, load_meta, ranged, to_device, windows,
                           write_json)
from nanotcmp.evaluate import describe, evaluate, final_scores, selection_score
from nanotcmp.features import attach_features
from nanotcmp.loader import Batching, ahead, step_batches, steps_per_epoch
from nanotcmp.meter import Meter, NonFiniteLoss
from nanotcmp.model import Bert, Hubert, TCMP, TCMPConfig, autocast, tiny_bert_config, tiny_hubert_config
from nanotcmp.processes import barrier, broadcast, device_from, print0, rank, world

PAPER_LR = {"pretrain": 2e-4, "finetune": 2e-5}  # everything but the encoders (paper §4.2)
PAPER_LR_ENCODER = 2e-6
TINY_LR = 1e-3  # everything, with tiny randomly initialised encoders
# --batch-size's defaults: the authors' 64 windows a pre-training step (in micro-batches of at most
# 16 windows, accumulated), and 64 samples a fine-tuning step on CUDA, 16 on the CPU. The demo's
# tiny encoders pre-train with 4 windows a step and k = 5 (not the authors' 11) on every device:
# they learn by their number of steps, and their dev retrieval is better so (docs/speed.md,
# "Batch sizes").
BATCH = {"cuda": {"pretrain": 64, "finetune": 64}, "cpu": {"pretrain": 64, "finetune": 16}}
EPOCHS = {"pretrain": 8, "finetune": 12}
# The demo's tiny encoders pre-train for 3 epochs of its 200 unlabelled dialogues, and stop fine-tuning
# after 3 epochs without a better dev score: on its 20 labelled dialogues a pre-trained model is best
# after an epoch or two and then fits the training samples (docs/results.md, "The demo")
TINY_PRETRAIN = {"batch": 4, "k": 5, "epochs": 3}
TINY_PATIENCE = 3
# With --freeze-encoders (checkpoints, not tiny ones) only the TCMP layers learn, from a few thousand
# samples: the paper's width of 768 (10 M parameters) fits them within a few epochs. These settings
# were chosen on P-MELD's dev split over 3 seeds (docs/results.md, "How the settings were chosen"):
# the width and dropout of both stages, each stage's rate, and fine-tuning's epochs and batch (64
# on every device, as they were chosen with it).
FROZEN = {"d": 64, "dropout": 0.3, "lr": {"pretrain": 1e-3, "finetune": 3e-4}, "epochs": 8, "batch": 64}
AUTHORS_K = 11
MICRO_WINDOWS = 16


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["pretrain", "finetune", "all"], default="all")
    p.add_argument("--data", default="data/demo", help="a dataset made by prepare.py")
    p.add_argument("--text-encoder", default="tiny", help="a BERT checkpoint folder, or 'tiny' (random, small)")
    p.add_argument("--audio-encoder", default="tiny", help="a HuBERT checkpoint folder, or 'tiny'")
    p.add_argument("--modalities", choices=["text", "audio", "all"], default="all")
    p.add_argument("--init", help="fine-tune from this pre-training run's folder")
    p.add_argument("--out", help="default: out/<data>-<stage>")
    p.add_argument("--epochs", type=ranged(int, 1), help="default: 8 pre-training (3 tiny encoders), 12 fine-tuning "
                   "(FROZEN's with --freeze-encoders)")
    p.add_argument("--max-steps", type=ranged(int, 1), help="stop (with a resumable state) after this many steps")
    p.add_argument("--patience", type=ranged(int, 0), help="stop a stage after this many epochs without a better dev "
                   "score (default: 0, run every epoch; 3 fine-tuning tiny encoders)")
    p.add_argument("--batch-size", type=ranged(int, 1),
                   help="windows (pre-training) or samples (fine-tuning); default: docs/speed.md, \"Batch sizes\"")
    p.add_argument("--k", type=ranged(int, 2),
                   help="candidates per target in pre-training: 1 true + k-1 noise (default: the authors' 11; "
                        "5 with tiny encoders)")
    p.add_argument("--lr", type=ranged(float, 0),
                   help="default: the paper's, 2e-4 pre-training, 2e-5 fine-tuning; 1e-3 with tiny encoders; "
                        "FROZEN's with --freeze-encoders")
    p.add_argument("--lr-encoder", type=ranged(float, 0),
                   help="default: the paper's 2e-6 with checkpoints, --lr with tiny ones")
    p.add_argument("--d", type=ranged(int, 1),
                   help="model width (default: the paper's 768; 64 with tiny encoders; FROZEN's with "
                        "--freeze-encoders)")
    p.add_argument("--dropout", type=ranged(float, 0, 1, below=True),
                   help="dropout of the TCMP layers (default: 0.1; FROZEN's with --freeze-encoders)")
    p.add_argument("--encoder-dropout", type=ranged(float, 0, 1, below=True),
                   help="dropout inside BERT and HuBERT (default: the checkpoint's, 0.1 for tiny ones)")
    p.add_argument("--no-distant", action="store_true", help="see only the nearby context (w/o Dist)")
    p.add_argument("--tus", choices=["intra", "inter", "both"], default="both")
    p.add_argument("--tus-loss", choices=["bce", "softmax"], default="bce")
    p.add_argument("--train-fraction", type=ranged(float, 0, 1, above=True), default=1.0,
                   help="fine-tune on this share of the training dialogues, drawn by --seed (dev and test stay whole)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last state (with --stage "
                   "all: whichever stage it stopped in)")
    p.add_argument("--overwrite", action="store_true", help="replace the run --out holds (without it, a new run into "
                   "a run's folder is refused)")
    p.add_argument("--max-padding", type=ranged(float, 0, 1), default=0.1,
                   help="length buckets: padding share each encoder batch may have (1: one padded batch)")
    p.add_argument("--shape-grid", choices=["on", "off"],
                   help="pad the encoder batches to shapes from a fixed grid, which a GPU plans once each (default: "
                        "on with CUDA, off on the CPU, where it only pads)")
    p.add_argument("--micro-batches", type=ranged(int, 1),
                   help="micro-batches each step's batch is split into, each with its own noise candidates and "
                        "CLIP negatives, run on the processes in turn; more of them than processes accumulate "
                        "gradients (default: one a process, or more to keep each within 16 windows)")
    p.add_argument("--freeze-encoders", action="store_true",
                   help="keep BERT and HuBERT fixed: their pooled outputs are computed once and cached beside "
                        "the dataset")
    p.add_argument("--no-cache", action="store_true", help="with --freeze-encoders: run the encoders every step")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoders")
    p.add_argument("--cuda-graphs", choices=["off", "context", "all"], default="context",
                   help="on CUDA, run the context interactions (and with 'all' the encoders too) as CUDA graphs, one "
                        "per input shape; each keeps its activations' memory, so 'all' suits encoders of MiniLM's "
                        "size or smaller (default: context)")
    p.add_argument("--workers", type=ranged(int, 0),
                   help="processes building batches ahead of the training loop (default: 4 on CUDA, 0 on the CPU, "
                        "where they would take its cores)")
    p.add_argument("--log-every", type=ranged(int, 1), default=10)
    p.add_argument("--save-every", type=ranged(int, 1), default=50, help="steps between resumable states")
    args = p.parse_args(argv)
    cuda = device_from(args.device, "train.py").type == "cuda"
    args.shape_grid = args.shape_grid == "on" if args.shape_grid else cuda  # default: on where shapes cost
    args.k = args.k or (TINY_PRETRAIN["k"] if is_tiny(args) else AUTHORS_K)
    if args.compile and args.cuda_graphs == "all":
        raise SystemExit("train.py: --compile and --cuda-graphs all both take the encoders: choose one")
    if args.resume and args.overwrite:
        raise SystemExit("train.py: --resume continues the run in --out, --overwrite replaces it: choose one")
    if args.train_fraction < 1 and args.stage == "pretrain":
        raise SystemExit("train.py: --train-fraction is a share of the labelled dialogues, for --stage finetune or all")
    if args.init and args.stage != "finetune":
        raise SystemExit(f"train.py: --init is for --stage finetune (--stage {args.stage} "
                         f"{'fine-tunes from its own pre-training' if args.stage == 'all' else 'starts from scratch'})")
    return args


def is_tiny(args):
    """The demo's set-up: both encoders tiny, randomly initialised"""
    return args.text_encoder == "tiny" and args.audio_encoder == "tiny"


def frozen_defaults(args):
    """FROZEN's settings are the defaults: pretrained encoders, frozen"""
    return args.freeze_encoders and not is_tiny(args)

# -----------------------------------------------------------------------------
# a stage's settings


@dataclass(frozen=True)
class Run:
    """One stage's settings, resolved from the command line and the device. args stays as parsed:
    each stage of --stage all has a Run of its own (its folder, --init and batch size), and past
    plan_run the code reads these settings from the Run, never from args."""
    out: str  # the run folder: model.safetensors, config.json, metrics.json, log.json, state.pt
    init: str | None  # fine-tune from this pre-training run folder
    batching: Batching  # the stage ("pretrain" or "finetune"), its batch size and micro-batches, ...
    epochs: int
    patience: int  # stop after this many epochs without a better dev score; 0: never
    lr: float  # everything but the encoders
    lr_encoder: float
    resume: bool  # continue from out/state.pt
    overwrite: bool  # replace the run out holds

    @property
    def stage(self):
        return self.batching.stage

    @property
    def unit(self):
        return "windows" if self.stage == "pretrain" else "samples"


def plan_run(stage, args, device, out=None, init=None, batch_size=None):
    """-> a stage's Run; out, init, batch_size: this stage's (--out, --init, --batch-size when it runs
    alone), None for the defaults"""
    tiny, n_proc = is_tiny(args), world()
    frozen = frozen_defaults(args)
    batch_size = batch_size or (TINY_PRETRAIN["batch"] if tiny and stage == "pretrain" else
                                FROZEN["batch"] if frozen and stage == "finetune" else
                                BATCH["cuda" if device.type == "cuda" else "cpu"][stage])
    # default: one micro-batch a process, or more where a process's share of windows exceeds MICRO_WINDOWS
    n_micro = (args.micro_batches or
               n_proc * (math.ceil(batch_size / n_proc / MICRO_WINDOWS) if stage == "pretrain" else 1))
    if n_micro % n_proc:
        raise SystemExit(f"train.py: --micro-batches {n_micro} does not divide among {n_proc} processes")
    if batch_size < n_micro:
        raise SystemExit(f"train.py: a batch of {batch_size} cannot be split into {n_micro} micro-batches "
                         f"(--micro-batches or processes): use --batch-size {n_micro} or more")
    if stage == "pretrain" and batch_size < 2 * n_micro:
        print0(f"train.py: micro-batches of one window: their noise candidates come from the whole split and are "
               f"each encoded on top (--batch-size {2 * n_micro} or more avoids it)")
    workers = args.workers if args.workers is not None else 4 if device.type == "cuda" else 0
    batching = Batching(stage, batch_size, n_micro, args.k, args.max_padding, args.shape_grid, args.seed, workers)
    # the paper's rates fine-tune pretrained encoders; tiny ones learn from scratch and need larger steps
    lr = args.lr if args.lr is not None else TINY_LR if tiny else FROZEN["lr"][stage] if frozen else PAPER_LR[stage]
    lr_encoder = args.lr_encoder if args.lr_encoder is not None else lr if tiny else PAPER_LR_ENCODER
    out = out or os.path.join("out", f"{os.path.basename(os.path.normpath(args.data))}-{stage}")
    epochs = args.epochs or (TINY_PRETRAIN["epochs"] if tiny and stage == "pretrain" else FROZEN["epochs"]
                             if frozen and stage == "finetune" else EPOCHS[stage])
    patience = args.patience if args.patience is not None else TINY_PATIENCE if tiny and stage == "finetune" else 0
    # --resume of --stage all: each stage continues where it has a state, the others start (again)
    resume = args.resume and (args.stage != "all" or os.path.isfile(os.path.join(out, "state.pt")))
    overwrite = args.overwrite or (args.resume and not resume)
    return Run(out, init, batching, epochs, patience, lr, lr_encoder, resume, overwrite)


def run_settings(run, args):
    """What a run's results depend on, as the options that set it: --resume refuses a command
    that would give another"""
    b, path = run.batching, lambda p: p if p in (None, "tiny") else os.path.abspath(p)
    return {"--data": path(args.data), "--text-encoder": path(args.text_encoder),
            "--audio-encoder": path(args.audio_encoder), "--modalities": args.modalities, "--init": path(run.init),
            "--epochs": run.epochs, "--patience": run.patience, "--batch-size": b.batch_size,
            "--micro-batches": b.micro_batches, "--k": b.k, "--lr": run.lr, "--lr-encoder": run.lr_encoder,
            "--d": args.d, "--dropout": args.dropout, "--encoder-dropout": args.encoder_dropout,
            "--no-distant": args.no_distant, "--tus": args.tus, "--tus-loss": args.tus_loss, "--seed": args.seed,
            "--train-fraction": args.train_fraction if run.stage == "finetune" else 1.0,
            "--max-padding": b.max_padding, "--shape-grid": b.grid, "--freeze-encoders": args.freeze_encoders}

# -----------------------------------------------------------------------------
# building the model


def encoder_config(path, cls, tiny, dropout):
    """-> (config dict, pretrained weights or None) of an encoder: a checkpoint folder or 'tiny';
    dropout: its dropout rate, None to keep the checkpoint's"""
    try:
        enc = None if path == "tiny" else cls.from_pretrained(path)
    except (FileNotFoundError, ValueError) as e:  # the loader's messages name the file and what is wrong
        raise SystemExit(f"train.py: --{'text' if cls is Bert else 'audio'}-encoder: {e}") from None
    config = asdict(tiny if enc is None else enc.config)
    if dropout is not None:
        config["dropout"] = dropout
    return config, None if enc is None else enc.state_dict()


def modalities_of(args, meta):
    """--modalities -> the modalities to use, all of them in the dataset"""
    modalities = ("text", "audio") if args.modalities == "all" else (args.modalities,)
    missing = [m for m in modalities if m not in meta["modalities"]]
    if missing:
        raise SystemExit(f"train.py: {args.data} has no {', '.join(missing)} (its modalities: "
                         f"{', '.join(meta['modalities'])}); use --modalities {meta['modalities'][0]}")
    return modalities


def build_model(args, meta, stage, init=None):
    """The TCMP model of the command line's settings, with the encoders' checkpoints loaded, and in
    fine-tuning the pre-training run `init` (a folder) when given"""
    modalities = modalities_of(args, meta)
    vocab = os.path.join(args.data, meta["vocab"]["path"])
    if not os.path.isfile(vocab) or file_sha256(vocab) != meta["vocab"]["sha256"]:
        raise SystemExit(f"train.py: {vocab}, the vocabulary {args.data} was prepared with, is "
                         f"{'changed' if os.path.isfile(vocab) else 'not there'}: prepare the dataset again")
    with open(vocab, encoding="utf-8") as f:
        vocab_size = sum(1 for _ in f)
    bert, bert_w, hubert, hubert_w = None, None, None, None  # an unused modality's encoder is never built
    if "text" in modalities:
        bert, bert_w = encoder_config(args.text_encoder, Bert, tiny_bert_config(vocab_size), args.encoder_dropout)
    if "audio" in modalities:
        hubert, hubert_w = encoder_config(args.audio_encoder, Hubert, tiny_hubert_config(), args.encoder_dropout)
    if bert and bert["vocab_size"] != vocab_size:
        raise SystemExit(f"train.py: {args.text_encoder} has {bert['vocab_size']} word pieces, the dataset's "
                         f"vocabulary {vocab_size}: prepare the dataset with this encoder's vocab.txt")
    frozen = frozen_defaults(args)
    config = TCMPConfig(d=args.d or (64 if is_tiny(args) else FROZEN["d"] if frozen else TCMPConfig.d),
                        n_labels=max(len(meta["labels"]), 1), modalities=modalities, distant=not args.no_distant,
                        tus=args.tus, tus_loss=args.tus_loss,
                        dropout=args.dropout if args.dropout is not None else FROZEN["dropout"] if frozen else
                        TCMPConfig.dropout,
                        bert=bert, hubert=hubert)
    model = TCMP(config)
    if bert_w:
        model.bert.load_state_dict(bert_w)
    if hubert_w:
        model.hubert.load_state_dict(hubert_w)
    if stage == "finetune" and init:
        load_init(model, init, meta)
    return model


def set_up_model(run, args, device, meta, splits):
    """-> (the model on the device, ready to train: encoders frozen, features cached, compiled or
    graphed as asked, Eq. 23's class weights set; its optimiser)"""
    torch.manual_seed(args.seed)
    model = build_model(args, meta, run.stage, run.init).to(device)
    if world() > 1:
        torch.manual_seed(args.seed + rank())  # the same initial weights, but each process its own dropout masks
    if args.freeze_encoders:
        model.freeze_encoders()
    # the dataset was checked when prepared; the encoders' input checks are a sync on a GPU
    model.check_inputs = device.type == "cpu"
    if run.stage == "finetune":
        model.class_weights.copy_(class_weights(splits[0], model.config.n_labels))  # the training split's
    if args.freeze_encoders and not args.no_cache:
        attach_features(model, args.data, splits, device)
    if args.compile:
        compile_encoders(model)
    if device.type == "cuda" and args.cuda_graphs != "off":
        CudaGraphs(model, args.cuda_graphs)  # (installs itself on the model)
    return model, optimizer(model, run)


def optimizer(model, run):
    """Adam with two learning rates, the encoders' and the rest's (paper §4.2)"""
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trained if n.startswith(("bert.", "hubert.")) == enc], "lr": rate}
              for enc, rate in ((True, run.lr_encoder), (False, run.lr))]
    return torch.optim.Adam([g for g in groups if g["params"]], betas=(0.9, 0.999), fused=True)


def class_weights(train, n_labels):
    """Eq. 23: inversely proportional to each class's share of the training samples (mean weight 1)"""
    counts = np.bincount(train.samples[:, 2], minlength=n_labels).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / (n_labels * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)

# -----------------------------------------------------------------------------
# a stage: its data, a step, the loop


def open_splits(data, meta, stage, fraction, seed):
    """-> (the training split, its items: windows or samples, dev, test); a dataset that lacks one,
    or whose split has nothing to train or evaluate on, is a one-line error. Fine-tuning keeps the
    samples of a fraction of the training dialogues, drawn by the seed (--train-fraction)."""
    train_name = "pretrain" if stage == "pretrain" and "pretrain" in meta["splits"] else "train"
    missing = [s for s in (train_name, "dev", "test") if s not in meta["splits"]]
    if missing:
        raise SystemExit(f"train.py: {data} has no {' or '.join(missing)} split (it has {', '.join(meta['splits'])}); "
                         f"training needs {train_name}, dev and test: prepare.py dialogues --from a folder of "
                         f"{train_name}.jsonl, dev.jsonl and test.jsonl")
    if stage == "finetune" and not meta["splits"]["train"].get("labelled"):
        raise SystemExit(f"train.py: {data} has no labelled train split to fine-tune on")
    splits = [Split(os.path.join(data, f"{s}.safetensors")) for s in (train_name, "dev", "test")]
    if stage == "finetune" and fraction < 1:
        keep_dialogues(splits[0], fraction, seed)
    items = [windows(split) if stage == "pretrain" else split.samples for split in splits]
    for split, its in zip(splits, items):
        if not len(its):
            what = "window of 3 utterances or more" if stage == "pretrain" else "sample"
            raise SystemExit(f"train.py: {split.path} has no {what} to {stage} on")
        if stage == "pretrain" and len(split.dialogues) < 2:
            raise SystemExit(f"train.py: {split.path} holds one dialogue: pre-training scores each target against "
                             f"noise utterances of other dialogues, so each split needs two or more")
    train_split, dev, test = splits
    return train_split, items[0], dev, test


def train_step(runner, opt, micro):
    """One optimiser step over this process's micro-batches, [(share of the step's items, batch on
    the device)]. The step's loss is the items' mean of the micro-batches' means, and DDP averages
    the processes' gradients. -> (loss, {part: value}), left on the device: nothing here waits for it"""
    runner.train()
    step_loss, step_parts = 0.0, {}
    for n, (share, batch) in enumerate(micro):
        # DDP averages the gradients at the last micro-batch's backward; the others only add up
        last = n == len(micro) - 1
        with runner.no_sync() if isinstance(runner, DDP) and not last else contextlib.nullcontext():
            with autocast(batch["ctx"].device):
                _, loss, parts = runner(batch)  # Eq. 21 or Eq. 23
            # the shares of all processes' micro-batches sum to 1, and DDP divides by the processes
            (loss * share * world()).backward()
        step_loss = step_loss + loss.detach() * share
        step_parts = {k: step_parts.get(k, 0.0) + v.detach() * share for k, v in parts.items()}
    torch.nn.utils.clip_grad_norm_(runner.parameters(), 5.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return step_loss, step_parts


def train_stage(run, args, device):
    """One stage, pre-training or fine-tuning -> its run folder (None when stopped by --max-steps).
    A run that fails before writing anything leaves no empty folder behind."""
    meta = load_meta(args.data)
    modalities_of(args, meta)  # a modality the dataset lacks fails before anything is opened
    splits = open_splits(args.data, meta, run.stage, args.train_fraction, args.seed)
    created = rank() == 0 and not os.path.isdir(run.out)
    try:
        return run_stage(run, args, device, meta, *splits)
    except BaseException:
        if created and os.path.isdir(run.out) and not os.listdir(run.out):
            os.rmdir(run.out)
        raise


def run_stage(run, args, device, meta, train_split, items, dev, test):
    """The set-up, then the loop: a step, a log line every --log-every steps, at each epoch's end an
    evaluation on dev that keeps the best model; a resumable state at each epoch's end, every
    --save-every steps and at --max-steps"""
    model, opt = set_up_model(run, args, device, meta, (train_split, dev, test))
    # each stage leaves parameters unused (the emotion head in pre-training, TUS and CLIP's in fine-tuning)
    runner = DDP(model, find_unused_parameters=True) if world() > 1 else model
    per_epoch = steps_per_epoch(run.batching, items, train_split)
    total = run.epochs * per_epoch
    print0(summary(run, model, len(items), per_epoch, device))
    claim_folder(run.out, run.resume, run.overwrite)  # made, or emptied with --overwrite
    state_path, settings = os.path.join(run.out, "state.pt"), run_settings(run, args)
    progress = resume(state_path, model, opt, device, settings) if run.resume else Progress(settings=settings)
    if os.path.isfile(os.path.join(run.out, "metrics.json")) and (
            progress.step == total or out_of_patience(run, progress.best, progress.step // per_epoch)):
        print0(f"{run.stage} was done: {run.out} (--resume has nothing to continue)")
        return run.out
    meter = Meter(device, progress.step, run.out, run.unit)
    make = functools.partial(step_batches, run.batching, items, train_split, model.config.modalities, per_epoch)
    batches = iter(ahead(make, total, run.batching.workers, progress.step))  # built ahead by worker processes
    while progress.step < total and not out_of_patience(run, progress.best, progress.step // per_epoch):
        micro = meter.fetch(batches)  # this process's micro-batches of the step
        loss, parts = train_step(runner, opt, [(share, to_device(batch, device)) for share, batch, _ in micro])
        progress.step += 1
        meter.add(progress.step, loss, parts)
        if progress.step % args.log_every == 0 or progress.step == total:
            meter.log(progress, total)
        epoch_end = progress.step % per_epoch == 0
        stop = bool(args.max_steps) and args.max_steps <= progress.step < total
        if epoch_end or stop or progress.step % args.save_every == 0:
            with meter.pause(epoch_end):  # (checks that every loss so far is finite)
                if epoch_end:  # evaluate on dev, keep the best model
                    end_epoch(progress.step // per_epoch, progress, model, dev, run, args, meta, device,
                              meter.t_epoch)
                save_state(state_path, model, opt, progress, device)
        if stop:
            print0(f"stopped at step {progress.step} (--max-steps); continue with --resume")
            return None
    if progress.step < total:
        print0(f"stopped after epoch {progress.step // per_epoch}: dev has not improved for {run.patience} epochs")
    if rank() == 0:  # the kept model on test
        model.load_state_dict(load_file(os.path.join(run.out, "model.safetensors")))
        best = progress.best
        report = final_scores(model, run.batching, best["epoch"], train_split, dev, test, meta["labels"], device)
        write_json(os.path.join(run.out, "metrics.json"), {"stage": run.stage, "train_items": len(items),
                                                           "best_epoch": best["epoch"],
                                                           "dev": best["dev"], "test": report.pop("test"),
                                                           "dev_by_epoch": progress.dev_by_epoch, **report})
        print(f"{run.stage} done in {time.time() - meter.t0:.0f} s: {run.out}")
    barrier()
    return run.out


def summary(run, model, n_items, per_epoch, device):
    n_params = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (f"{run.stage}: {n_params / 1e6:.2f} M parameters ({n_trained / 1e6:.2f} M trained), {n_items} {run.unit}, "
            f"{run.epochs} epochs of {per_epoch} steps, lr {run.lr:g} (encoders {run.lr_encoder:g}), {device}"
            + (f" x {world()} processes" if world() > 1 else ""))


def out_of_patience(run, best, epochs_done):
    """--patience: the dev score has not improved for that many epochs"""
    return bool(run.patience and best and epochs_done - best["epoch"] >= run.patience)


def end_epoch(epoch, progress, model, dev, run, args, meta, device, t_start):
    """The first process evaluates on dev and keeps the model if it is the best so far; t_start:
    when the epoch started"""
    if rank() == 0:
        scores = evaluate(model, dev, run.batching, device)
        print(f"epoch {epoch} ({time.time() - t_start:.0f} s) dev: {describe(scores)}")
        progress.dev_by_epoch.append({k: v for k, v in scores.items() if k != "confusion"})
        if progress.best is None or selection_score(scores) > selection_score(progress.best["dev"]):
            progress.best = {"epoch": epoch, "dev": progress.dev_by_epoch[-1]}
            save_model(model, run.out, run.stage, meta, args.data)
    progress.best = broadcast(progress.best)


def plan_runs(args, device):
    """-> the Runs of --stage: one, or pre-training then fine-tuning from it"""
    if args.stage != "all":
        return [plan_run(args.stage, args, device, args.out, args.init, args.batch_size)]
    out = {stage: args.out and os.path.join(args.out, stage) for stage in ("pretrain", "finetune")}
    pretrain = plan_run("pretrain", args, device, out["pretrain"], batch_size=args.batch_size)
    finetune = plan_run("finetune", args, device, out["finetune"], init=pretrain.out)  # the default batch size
    if not os.path.isfile(os.path.join(pretrain.out, "metrics.json")):  # pre-training to do: fine-tune after it
        finetune = dataclasses.replace(finetune, resume=False, overwrite=finetune.overwrite or finetune.resume)
    return [pretrain, finetune]


def interrupted(runs, argv):
    """Ctrl-C: what is kept, and the command that continues from it"""
    states = [p for p in (os.path.join(run.out, "state.pt") for run in runs) if os.path.isfile(p)]
    if not states:
        return "train.py: interrupted before a state was saved (every --save-every steps and at each epoch's end)"
    again = [a for a in argv if a != "--overwrite"] + ([] if "--resume" in argv else ["--resume"])
    return f"train.py: interrupted; kept {', '.join(states)}: continue with python train.py {shlex.join(again)}"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parse_args(argv)
    device = processes.start(device_from(args.device, "train.py"))  # under torchrun: this process's GPU
    runs = plan_runs(args, device)
    try:
        for run in runs:  # before anything is trained: no folder left holding an old run beside a new one
            refuse_mixing(run.out, run.resume, run.overwrite)
        for run in runs:
            if run.overwrite:
                claim_folder(run.out, run.resume, run.overwrite)
        for run in runs:
            if train_stage(run, args, device) is None:  # stopped by --max-steps
                return None
        return runs[-1].out
    except (DataError, NonFiniteLoss) as e:  # a missing, damaged or unfitting file, or a diverged run, named
        raise SystemExit(f"train.py: {e}") from None
    except KeyboardInterrupt:
        print0(interrupted(runs, argv), file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        processes.stop()


if __name__ == "__main__":
    main()
