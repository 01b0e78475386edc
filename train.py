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
import functools
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP

from nanotcmp.data import (DataError, Split, device_from, dialogue_batches, encoder_inputs, file_sha256, finetune_batch,
                           last_own_labels, load_meta, load_run, padding, pretrain_batch, ranged, shapes, targets_batch,
                           to_device, window_targets, windows, write_atomic, write_json)
from nanotcmp.metrics import emotion_scores, last_emotion_scores, majority_scores, recall_at
from nanotcmp.model import Bert, Hubert, TCMP, TCMPConfig, autocast, tiny_bert_config, tiny_hubert_config

PAPER_LR = {"pretrain": 2e-4, "finetune": 2e-5}  # everything but the encoders (paper §4.2)
PAPER_LR_ENCODER = 2e-6
TINY_LR = 1e-3  # everything, with tiny randomly initialised encoders
# --batch-size's defaults: the authors' 64 windows a pre-training step (in micro-batches of at most
# 16 windows, accumulated), and 64 samples a fine-tuning step on CUDA, 16 on the CPU. The demo's
# tiny encoders pre-train with 4 windows a step and k = 5 (not the authors' 11) on every device:
# they learn by their number of steps, and their dev retrieval is better so (README, "Results on P-MELD").
BATCH = {"cuda": {"pretrain": 64, "finetune": 64}, "cpu": {"pretrain": 64, "finetune": 16}}
EPOCHS = {"pretrain": 8, "finetune": 12}
# The demo's tiny encoders pre-train for 3 epochs of its 200 unlabelled dialogues, and stop fine-tuning
# after 3 epochs without a better dev score: on its 20 labelled dialogues a pre-trained model is best
# after an epoch or two and then fits the training samples (README, "Training")
TINY_PRETRAIN = {"batch": 4, "k": 5, "epochs": 3}
TINY_PATIENCE = 3
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
    p.add_argument("--epochs", type=ranged(int, 1), help="default: 8 pre-training (3 tiny encoders), 12 fine-tuning")
    p.add_argument("--max-steps", type=ranged(int, 1), help="stop (with a resumable state) after this many steps")
    p.add_argument("--patience", type=ranged(int, 0), help="stop a stage after this many epochs without a better dev "
                   "score (default: 0, run every epoch; 3 fine-tuning tiny encoders)")
    p.add_argument("--batch-size", type=ranged(int, 1),
                   help="windows (pre-training) or samples (fine-tuning); default: README, \"Speed and scale\"")
    p.add_argument("--k", type=ranged(int, 2),
                   help="candidates per target in pre-training: 1 true + k-1 noise (default: the authors' 11; "
                        "5 with tiny encoders)")
    p.add_argument("--lr", type=ranged(float, 0),
                   help="default: the paper's, 2e-4 pre-training, 2e-5 fine-tuning; 1e-3 with tiny encoders")
    p.add_argument("--lr-encoder", type=ranged(float, 0),
                   help="default: the paper's 2e-6 with checkpoints, --lr with tiny ones")
    p.add_argument("--d", type=ranged(int, 1), help="model width (default: 768, or 64 with tiny encoders)")
    p.add_argument("--dropout", type=ranged(float, 0, 1, below=True), default=0.1, help="dropout of the TCMP layers")
    p.add_argument("--encoder-dropout", type=ranged(float, 0, 1, below=True),
                   help="dropout inside BERT and HuBERT (default: the checkpoint's, 0.1 for tiny ones)")
    p.add_argument("--no-distant", action="store_true", help="see only the nearby context (w/o Dist)")
    p.add_argument("--tus", choices=["intra", "inter", "both"], default="both")
    p.add_argument("--tus-loss", choices=["bce", "softmax"], default="bce")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last state")
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
    return args


def is_tiny(args):
    """The demo's set-up: both encoders tiny, randomly initialised"""
    return args.text_encoder == "tiny" and args.audio_encoder == "tiny"

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
    tiny = is_tiny(args)
    config = TCMPConfig(d=args.d or (64 if tiny else 768), n_labels=max(len(meta["labels"]), 1),
                        modalities=modalities, distant=not args.no_distant, tus=args.tus, tus_loss=args.tus_loss,
                        dropout=args.dropout, bert=bert, hubert=hubert)
    model = TCMP(config)
    if bert_w:
        model.bert.load_state_dict(bert_w)
    if hubert_w:
        model.hubert.load_state_dict(hubert_w)
    if stage == "finetune" and init:
        load_init(model, init, meta)
    return model


def load_init(model, folder, meta):
    """Start fine-tuning from a pre-training run of the same vocabulary: every tensor but the
    emotion head must fit."""
    try:
        config, ckpt = load_run(folder)
    except DataError as e:
        raise SystemExit(f"train.py: --init: {e}") from None
    if config["vocab"]["sha256"] != meta["vocab"]["sha256"]:
        raise SystemExit(f"train.py: --init {folder} was trained with the vocabulary {config['vocab']['path']}, "
                         f"the dataset is prepared with another ({meta['vocab']['path']}): their ids differ")
    path, state = os.path.join(folder, "model.safetensors"), model.state_dict()
    wanted = [n for n in state if not n.startswith(("head1.", "head2."))]
    bad = [f"{n}: model {tuple(state[n].shape)}, checkpoint "
           f"{tuple(ckpt[n].shape) if n in ckpt else 'missing'}" for n in wanted
           if n not in ckpt or ckpt[n].shape != state[n].shape]
    if bad:
        raise SystemExit(f"train.py: --init {path} does not fit this model:\n  " + "\n  ".join(bad))
    model.load_state_dict({n: ckpt[n] for n in wanted}, strict=False)

# -----------------------------------------------------------------------------
# the feature cache: frozen encoders' pooled outputs, computed once

FEATURE_BATCH = 32  # utterances an encoder call while filling the cache


def encoder_hash(encoder):
    """sha256 of an encoder's config (but its dropout, off when frozen) and weights: what its
    cached features are keyed by"""
    config = {k: v for k, v in asdict(encoder.config).items() if k != "dropout"}
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, t in encoder.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


@torch.no_grad()
def split_features(model, key, split, device):
    """One modality's pooled encoder outputs for every utterance of a split -> (U, D) float32,
    encoded in order of length, so that each call's buckets are tight"""
    text = key == "text"
    order = np.argsort(split.utt_tokens[:, 1] if text else split.utt_audio[:, 1], kind="stable")
    out = torch.empty(len(split), (model.bert if text else model.hubert).config.dim)
    for i in range(0, len(order), FEATURE_BATCH):
        ids = order[i:i + FEATURE_BATCH]
        batch = encoder_inputs([split.tokens_of(u) for u in ids] if text else None,
                               None if text else [split.audio_of(u) for u in ids], grid=device.type == "cuda")
        with autocast(device):
            out[torch.from_numpy(ids)] = model.pooled(key, to_device(batch, device)).float().cpu()
    return out


def attach_features(model, folder, splits, device):
    """Give each split its utterances' pooled encoder outputs (split.features) from
    <dataset>/features/<modality>-<encoder hash>-<precision>.safetensors, computing the splits not
    there yet (or changed since: another size or time). The first process computes, the others
    wait and read."""
    model.eval()
    stamps = {}  # each split file's size and time, as they are now
    for f in os.listdir(folder):
        if f.endswith(".safetensors"):
            st = os.stat(os.path.join(folder, f))
            stamps[f.removesuffix(".safetensors")] = [st.st_size, st.st_mtime_ns]
    precision = "bf16" if device.type == "cuda" else "fp32"  # see autocast
    for key in model.config.modalities:
        digest = encoder_hash(model.bert if key == "text" else model.hubert)
        path = os.path.join(folder, "features", f"{key}-{digest[:16]}-{precision}.safetensors")
        cached = {}
        if os.path.isfile(path):
            try:
                with safe_open(path, "pt") as f:
                    known = json.loads(f.metadata()["splits"])
                    cached = {name: f.get_tensor(name) for name in f.keys() if known[name] == stamps.get(name)}
            except (OSError, SafetensorError, KeyError, TypeError, ValueError) as e:
                print0(f"feature cache: {path} is unreadable ({e}); computing it again")
        missing = [s for s in splits if s.name not in cached]
        if missing and RANK == 0:
            t0 = time.time()
            for s in missing:
                cached[s.name] = split_features(model, key, s, device)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_atomic(path, lambda p: save_file(cached, p, metadata={
                "encoder": digest, "splits": json.dumps({name: stamps[name] for name in cached})}))
            print(f"feature cache: {key} features of {sum(len(s) for s in missing)} utterances in "
                  f"{time.time() - t0:.1f} s -> {path}")
        barrier()
        if missing and RANK != 0:
            cached = load_file(path)
        for s in splits:
            s.features[key] = cached[s.name].numpy()

# -----------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def predict(model, split, args, device):
    """-> (true labels, predicted labels) of every sample of a labelled split"""
    model.eval()
    preds = []
    for batch in eval_batches(split, "finetune", split.samples, model.config.modalities, args, device):
        with autocast(device):
            preds.append(model.classify(to_device(batch, device)).argmax(-1).cpu())
    return split.samples[:, 2], torch.cat(preds).numpy()


@torch.no_grad()
def retrieval_scores(model, split, args, device):
    """TUS on a split's windows with candidate sets fixed by the seed: R5@1, R5@2, R11@1, R11@2
    (percent) for T2T, A2A and M2M. The 5 candidates are the true one and the first 4 of 10 noise."""
    model.eval()
    scores = {beta: [] for beta in model.streams}
    for batch in eval_batches(split, "pretrain", windows(split), model.config.modalities, args, device):
        batch = to_device(batch, device)
        with autocast(device):
            H = model.encode(batch)
            s = model.tus_scores(H, model.interact(H, batch["ctx"], batch["ctx_mask"]), batch)
        for beta in model.streams:
            scores[beta].append(s[beta].float().cpu())
    names = {"t": "T2T", "a": "A2A", "m": "M2M"}
    return {names[beta]: recalls(torch.cat(batches).numpy()) for beta, batches in scores.items()}


def recalls(scores):
    """(N, 11) scores of each target's candidates, the true one first -> R5@1, R5@2, R11@1, R11@2"""
    true = np.zeros(len(scores), dtype=np.int64)
    return {f"R{k}@{m}": recall_at(scores[:, :k], true, m) for k in (5, 11) for m in (1, 2)}


def word_overlap_scores(split, args):
    """Target utterance searching without a model, on retrieval_scores' candidate sets: each
    candidate scored by the share of its word pieces that occur in the target's context. What
    words shared within a dialogue (names, topics) give away -> R5@1, R5@2, R11@1, R11@2"""
    wins, scores = windows(split), []
    for i in range(math.ceil(len(wins) / EVAL_BATCH)):
        rows, targets, noise = eval_targets(split, wins, args, i)
        for (b, j), others in zip(targets, noise):
            context = set(np.concatenate([split.tokens_of(u)[1:-1] for u in rows[b][:j]]).tolist())
            words = [set(split.tokens_of(u)[1:-1].tolist()) for u in [rows[b][j], *others]]  # without [CLS], [SEP]
            scores.append([len(w & context) / max(len(w), 1) for w in words])
    return recalls(np.array(scores))


EVAL_BATCH = 64  # samples or windows; without gradients, large batches are cheap


def eval_batches(split, stage, items, modalities, args, device):
    """A split's evaluation batches, EVAL_BATCH items each, built ahead of use"""
    return ahead(functools.partial(eval_batch, split, stage, items, modalities, args),
                 math.ceil(len(items) / EVAL_BATCH), args, device)


def eval_batch(split, stage, items, modalities, args, i):
    """The i-th evaluation batch of a split's items: samples, or windows (eval_targets)"""
    if stage == "finetune":
        return finetune_batch(split, items[i * EVAL_BATCH:(i + 1) * EVAL_BATCH], modalities, args.max_padding,
                              args.shape_grid)
    return targets_batch(split, *eval_targets(split, items, args, i), modalities, args.max_padding, args.shape_grid)


def eval_targets(split, wins, args, i):
    """The i-th evaluation batch's windows, targets and their noise candidates: 10 a target, from
    the whole split, fixed by the seed and i, so that every evaluation meets the same ones"""
    return window_targets(split, wins[i * EVAL_BATCH:(i + 1) * EVAL_BATCH], 11, np.random.default_rng((args.seed, i)),
                          in_batch=False)

# -----------------------------------------------------------------------------
# batches, built ahead of use


class Batches(torch.utils.data.Dataset):
    """Batches made on demand, make(i) for i < n: what a DataLoader's worker processes build while
    the model works on the ones before"""

    def __init__(self, make, n):
        self.make, self.n = make, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.make(i)


def ahead(make, n, args, device, start=0):
    """make(start), ..., make(n - 1), in order, built by --workers processes up to 4 batches each
    ahead of use (0 workers: here, when asked for). to_device pins them on CUDA, in this thread: a
    pinning thread's CUDA calls would break the capture of a CUDA graph."""
    workers = args.workers if args.workers is not None else 4 if device.type == "cuda" else 0
    return torch.utils.data.DataLoader(
        Batches(make, n), batch_size=None, sampler=range(start, n), num_workers=workers,
        prefetch_factor=4 if workers else None,
        multiprocessing_context="fork" if workers else None,  # the workers share the memory-mapped splits
        generator=torch.Generator())  # the workers' seeds come from here: the global generator is dropout's

# -----------------------------------------------------------------------------
# a stage's settings


@dataclass(frozen=True)
class Run:
    """One stage's settings, resolved from the command line and the device. args stays as parsed:
    each stage of --stage all has a Run of its own (its folder, --init and batch size), and past
    plan_run the code reads these settings from the Run, never from args."""
    stage: str  # "pretrain" or "finetune"
    out: str  # the run folder: model.safetensors, config.json, metrics.json, log.json, state.pt
    init: str | None  # fine-tune from this pre-training run folder
    batch_size: int  # windows (pre-training) or samples (fine-tuning) a step, over all processes
    micro_batches: int  # a step's batch is split into these, each with its own noise candidates and CLIP negatives
    epochs: int
    patience: int  # stop after this many epochs without a better dev score; 0: never
    lr: float  # everything but the encoders
    lr_encoder: float

    @property
    def unit(self):
        return "windows" if self.stage == "pretrain" else "samples"


def plan_run(stage, args, device, out=None, init=None, batch_size=None):
    """-> a stage's Run; out, init, batch_size: this stage's (--out, --init, --batch-size when it runs
    alone), None for the defaults"""
    tiny = is_tiny(args)
    batch_size = batch_size or (TINY_PRETRAIN["batch"] if tiny and stage == "pretrain" else
                                BATCH["cuda" if device.type == "cuda" else "cpu"][stage])
    # default: one micro-batch a process, or more where a process's share of windows exceeds MICRO_WINDOWS
    n_micro = (args.micro_batches or
               WORLD * (math.ceil(batch_size / WORLD / MICRO_WINDOWS) if stage == "pretrain" else 1))
    if n_micro % WORLD:
        raise SystemExit(f"train.py: --micro-batches {n_micro} does not divide among {WORLD} processes")
    if batch_size < n_micro:
        raise SystemExit(f"train.py: a batch of {batch_size} cannot be split into {n_micro} micro-batches "
                         f"(--micro-batches or processes): use --batch-size {n_micro} or more")
    if stage == "pretrain" and batch_size < 2 * n_micro:
        print0(f"train.py: micro-batches of one window: their noise candidates come from the whole split and are "
               f"each encoded on top (--batch-size {2 * n_micro} or more avoids it)")
    # the paper's rates fine-tune pretrained encoders; tiny ones learn from scratch and need larger steps
    lr = args.lr if args.lr is not None else TINY_LR if tiny else PAPER_LR[stage]
    lr_encoder = args.lr_encoder if args.lr_encoder is not None else lr if tiny else PAPER_LR_ENCODER
    out = out or os.path.join("out", f"{os.path.basename(os.path.normpath(args.data))}-{stage}")
    epochs = args.epochs or (TINY_PRETRAIN["epochs"] if tiny and stage == "pretrain" else EPOCHS[stage])
    patience = args.patience if args.patience is not None else TINY_PATIENCE if tiny and stage == "finetune" else 0
    return Run(stage, out, init, batch_size, n_micro, epochs, patience, lr, lr_encoder)

# -----------------------------------------------------------------------------
# the model to train, and a training step


def set_up_model(run, args, device, meta, splits):
    """-> (the model on the device, ready to train: encoders frozen, features cached, compiled or
    graphed as asked, Eq. 23's class weights set; its optimiser)"""
    torch.manual_seed(args.seed)
    model = build_model(args, meta, run.stage, run.init).to(device)
    if WORLD > 1:
        torch.manual_seed(args.seed + RANK)  # the same initial weights, but each process its own dropout masks
    if args.freeze_encoders:
        model.freeze_encoders()
    model.check_inputs = device.type == "cpu"  # prepare.py checked the dataset; a check is a sync on a GPU
    if run.stage == "finetune":
        model.class_weights.copy_(class_weights(splits[0], model.config.n_labels))  # the training split's
    if args.freeze_encoders and not args.no_cache:
        attach_features(model, args.data, splits, device)
    if args.compile:
        compile_encoders(model)
    if device.type == "cuda" and args.cuda_graphs != "off":
        use_cuda_graphs(model, args.cuda_graphs)
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


def step_chunks(run, items, split, rng):
    """One epoch's global batches, in order: windows (pre-training) or dialogue-ordered samples
    (fine-tuning). A batch too small to give each micro-batch an item is left out."""
    if run.stage == "pretrain":
        order = rng.permutation(len(items))
        chunks = [[items[j] for j in order[i:i + run.batch_size]] for i in range(0, len(items), run.batch_size)]
    else:
        chunks = dialogue_batches(split, run.batch_size, rng)
    return [c for c in chunks if len(c) >= run.micro_batches]


def micro_batch(split, modalities, stage, items, rng, args):
    """A micro-batch of items -> (batch, {modality: (padded, all) positions}). A pre-training
    micro-batch draws its noise candidates, and so its CLIP negatives, from itself."""
    if stage == "pretrain":
        batch = pretrain_batch(split, items, args.k, rng, modalities, max_padding=args.max_padding,
                               grid=args.shape_grid)
    else:
        batch = finetune_batch(split, items, modalities, max_padding=args.max_padding, grid=args.shape_grid)
    return batch, {key: padding(batch, key) for key in ("text", "audio") if key + "_mask" in batch}


def step_batches(run, items, split, args, modalities, steps_per_epoch, step):
    """-> (the step's number of items, this process's micro-batches of them: [(share of the step's
    items, batch, {modality: (padded, all) positions})]). The epoch's order and each micro-batch's
    noise candidates are fixed by the seed, the epoch and the step, wherever and whenever the batch
    is built."""
    epoch, i = divmod(step, steps_per_epoch)
    chunk = step_chunks(run, items, split, np.random.default_rng((args.seed, epoch)))[i]
    shards = np.array_split(np.arange(len(chunk)), run.micro_batches)
    mine = range(RANK * run.micro_batches // WORLD, (RANK + 1) * run.micro_batches // WORLD)  # this process's shards
    return len(chunk), [(len(shards[g]) / len(chunk), *micro_batch(
        split, modalities, run.stage, [chunk[j] for j in shards[g]], np.random.default_rng((args.seed, epoch, i, g)),
        args)) for g in mine]


def train_step(runner, opt, micro):
    """One optimiser step over this process's micro-batches, [(share of the step's items, batch on
    the device)]. The step's loss is the items' mean of the micro-batches' means, and DDP averages
    the processes' gradients. -> (loss, {part: value}), left on the device: nothing here waits for it"""
    runner.train()
    step_loss, step_parts = 0.0, {}
    for n, (share, batch) in enumerate(micro):
        for uses in GRAPH_USES:  # a new forward: every CUDA graph is free again
            uses.clear()
        with runner.no_sync() if isinstance(runner, DDP) and n < len(micro) - 1 else contextlib.nullcontext():
            with autocast(batch["ctx"].device):
                _, loss, parts = runner(batch)  # Eq. 21 or Eq. 23
            (loss * share * WORLD).backward()
        step_loss = step_loss + loss.detach() * share
        step_parts = {k: step_parts.get(k, 0.0) + v.detach() * share for k, v in parts.items()}
    torch.nn.utils.clip_grad_norm_(runner.parameters(), 5.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return step_loss, step_parts

# -----------------------------------------------------------------------------
# bookkeeping: log lines, the state a run resumes from, files


class Meter:
    """The loop's bookkeeping: the loss and its parts summed over a log interval, the first
    non-finite loss, the steps' time (less the pauses to evaluate and save) and the share of it
    spent waiting for batches, padding shares and encoder shapes. The sums and the first non-finite
    loss stay on the device, so that a step never waits for them: they are read at log lines and
    saves."""

    def __init__(self, device, step, state_path):
        self.device, self.state_path, self.first_step, self.last_log = device, state_path, step, step
        self.t0 = self.t_epoch = time.time()  # t_epoch: when the current epoch started
        self.first_bad = torch.full((), math.inf, device=device)  # the first step with a non-finite loss
        self.bad_parts = {}  # its loss's parts
        self.seen_shapes = {}  # modality -> the (rows, length) shapes its encoder has been called with
        self.new_interval()

    def new_interval(self):
        self.sums, self.pad, self.n_items, self.waited, self.paused = {}, {}, 0, 0.0, 0.0
        self.t_log = time.time()

    def fetch(self, batches):
        """-> the next step's micro-batches from the loader, counting the wait, items, padding and shapes"""
        t = time.time()
        n_items, micro = next(batches)
        self.waited += time.time() - t
        self.n_items += n_items
        for _, batch, counts in micro:
            for key, c in counts.items():
                self.pad[key] = self.pad.get(key, np.zeros(2)) + c
                self.seen_shapes.setdefault(key, set()).update(shapes(batch, key))
        return micro

    def add(self, step, loss, parts):
        """The loss of step `step` (counted from 1) and its parts, on the device"""
        fresh = torch.isinf(self.first_bad) & ~torch.isfinite(loss)  # this step's loss is the first bad one
        self.first_bad = torch.where(fresh, step, self.first_bad)
        self.bad_parts = {k: torch.where(fresh, v, self.bad_parts.get(k, v)) for k, v in parts.items()}
        for k, v in {"loss": loss, **parts}.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def check_finite(self):
        """Waits for the device; a non-finite loss so far stops the run, naming its step and the last good state"""
        bad = all_reduce(self.first_bad.clone(), dist.ReduceOp.MIN).item()
        if math.isfinite(bad):
            parts = ", ".join(f"{k} {v.item():.4g}" for k, v in self.bad_parts.items())
            where = f": {parts}" if WORLD == 1 else ""  # the parts are one process's share: shown when alone
            raise SystemExit(f"train.py: non-finite loss at step {int(bad)}{where}; "
                             f"the last good state is {self.state_path}")

    @contextlib.contextmanager
    def pause(self, epoch_end):
        """Evaluating or saving: once the steps so far are done and finite, timed apart from them; at
        an epoch's end the next epoch starts after it"""
        self.check_finite()
        t = time.time()
        yield
        self.paused += time.time() - t
        if epoch_end:
            self.t_epoch = time.time()

    def log(self, progress, total, run):
        """The interval's log line, printed, and its record (means over its steps and the processes)
        added to the history and log.json"""
        self.check_finite()  # waits for the device: the time below is the steps', not their dispatch's
        step = progress.step
        n = step - self.last_log
        means = {k: all_reduce(v / n).item() for k, v in self.sums.items()}
        dt = (time.time() - self.t_log - self.paused) / n
        shares = {k: float(c[0] / c[1]) for k, c in
                  ((k, all_reduce(torch.tensor(v, device=self.device))) for k, v in self.pad.items())}
        wait = self.waited / (dt * n)  # the share of the steps' time spent waiting for a batch
        n_shapes = {k: len(v) for k, v in self.seen_shapes.items()}  # (this process's)
        print0(f"step {step}/{total} | loss {means['loss']:.4f} ("
               + ", ".join(f"{k} {v:.4f}" for k, v in means.items() if k != "loss")
               + f") | {dt * 1000:.0f} ms/step | {self.n_items / (dt * n):.1f} {run.unit}/s | waits {wait:.0%}"
               + "".join(f" | padding {k} {v:.0%}" for k, v in shares.items())
               + "".join(f" | {k} shapes {v}" for k, v in n_shapes.items())
               + f" | ETA {(total - step) * (time.time() - self.t0) / (step - self.first_step) / 60:.1f} min")
        progress.history.append({"step": step, **means, "ms_per_step": dt * 1000, "padding": shares, "wait": wait,
                                 "shapes": n_shapes})
        if RANK == 0:
            write_json(os.path.join(run.out, "log.json"), progress.history)
        self.last_log = step
        self.new_interval()


@dataclass
class Progress:
    """Where a run is: saved in state.pt with the model, the optimiser and the random states"""
    step: int = 0  # steps done
    best: dict | None = None  # the kept model's epoch and dev scores
    history: list = field(default_factory=list)  # log.json: a record every --log-every steps
    dev_by_epoch: list = field(default_factory=list)


def save_state(path, model, opt, progress, device):
    """state.pt, which --resume continues from, with every process's random state (dropout's)"""
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    rngs = [rng] * WORLD
    if WORLD > 1:
        dist.all_gather_object(rngs, rng)
    if RANK == 0:
        write_atomic(path, lambda p: torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                                                 **asdict(progress), "rng": rngs}, p))
    barrier()


def resume(path, model, opt, device):
    """--resume: the model, the optimiser and this process's random state from state.pt -> its Progress"""
    if not os.path.isfile(path):
        raise SystemExit(f"train.py: --resume: no {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        missing = [k for k in ("model", "opt", "step", "best", "history", "rng") if k not in state]
    except Exception as e:  # torch.load raises what the unpickler meets: EOFError, UnpicklingError, ...
        raise SystemExit(f"train.py: --resume: {path} is unreadable or incomplete "
                         f"({type(e).__name__}); start again without --resume") from None
    if missing:
        raise SystemExit(f"train.py: --resume: {path} has no {', '.join(missing)}: not a state of train.py")
    if len(state["rng"]) != WORLD:
        raise SystemExit(f"train.py: --resume: {path} was saved by {len(state['rng'])} processes, this run has {WORLD}")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    cpu_rng, cuda_rng = state["rng"][RANK]
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng, device)
    print0(f"resumed at step {state['step']}")
    # (a state saved before train.py kept the dev scores of every epoch has none)
    return Progress(state["step"], state["best"], state["history"], state.get("dev_by_epoch", []))


def save_model(model, run, args, meta):
    """The kept model: model.safetensors, and config.json for sample.py and fine-tuning's --init"""
    write_atomic(os.path.join(run.out, "model.safetensors"),
                 lambda p: save_file({k: v.contiguous() for k, v in model.state_dict().items()}, p))
    config = {"stage": run.stage, "model": asdict(model.config), "labels": meta["labels"],
              "vocab": {**meta["vocab"], "path": os.path.abspath(os.path.join(args.data, meta["vocab"]["path"]))},
              "max_tokens": meta["settings"]["max_tokens"], "max_context": meta["settings"]["max_context"],
              "data": os.path.abspath(args.data)}
    write_json(os.path.join(run.out, "config.json"), config)

# -----------------------------------------------------------------------------
# a stage: set-up, the loop, the scores


def open_splits(data, meta, stage):
    """-> (the training split, its items: windows or samples, dev, test); a dataset that lacks one,
    or whose split has nothing to train or evaluate on, is a one-line error"""
    train_name = "pretrain" if stage == "pretrain" and "pretrain" in meta["splits"] else "train"
    missing = [s for s in (train_name, "dev", "test") if s not in meta["splits"]]
    if missing:
        raise SystemExit(f"train.py: {data} has no {' or '.join(missing)} split (it has {', '.join(meta['splits'])}); "
                         f"training needs {train_name}, dev and test: prepare.py dialogues --from a folder of "
                         f"{train_name}.jsonl, dev.jsonl and test.jsonl")
    if stage == "finetune" and not meta["splits"]["train"].get("labelled"):
        raise SystemExit(f"train.py: {data} has no labelled train split to fine-tune on")
    splits = [Split(os.path.join(data, f"{s}.safetensors")) for s in (train_name, "dev", "test")]
    items = [windows(split) if stage == "pretrain" else split.samples for split in splits]
    for split, its in zip(splits, items):
        if not len(its):
            what = "window of 3 utterances or more" if stage == "pretrain" else "sample"
            raise SystemExit(f"train.py: {split.path} has no {what} to {stage} on")
    train_split, dev, test = splits
    return train_split, items[0], dev, test


def train_stage(run, args, device):
    """One stage, pre-training or fine-tuning -> its run folder (None when stopped by --max-steps).
    A run that fails before writing anything leaves no empty folder behind."""
    meta = load_meta(args.data)
    modalities_of(args, meta)
    splits = open_splits(args.data, meta, run.stage)
    created = RANK == 0 and not os.path.isdir(run.out)
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
    runner = DDP(model, find_unused_parameters=True) if WORLD > 1 else model
    steps_per_epoch = len(step_chunks(run, items, train_split, np.random.default_rng(0)))
    total = run.epochs * steps_per_epoch
    print0(summary(run, model, len(items), steps_per_epoch, device))
    if RANK == 0:
        os.makedirs(run.out, exist_ok=True)
    state_path = os.path.join(run.out, "state.pt")
    progress = resume(state_path, model, opt, device) if args.resume else Progress()
    meter = Meter(device, progress.step, state_path)
    batches = iter(ahead(functools.partial(step_batches, run, items, train_split, args, model.config.modalities,
                                           steps_per_epoch), total, args, device, progress.step))
    while progress.step < total and not out_of_patience(run, progress.best, progress.step // steps_per_epoch):
        micro = meter.fetch(batches)
        loss, parts = train_step(runner, opt, [(share, to_device(batch, device)) for share, batch, _ in micro])
        progress.step += 1
        meter.add(progress.step, loss, parts)
        if progress.step % args.log_every == 0 or progress.step == total:
            meter.log(progress, total, run)
        epoch_end = progress.step % steps_per_epoch == 0
        stop = bool(args.max_steps) and args.max_steps <= progress.step < total
        if epoch_end or stop or progress.step % args.save_every == 0:
            with meter.pause(epoch_end):
                if epoch_end:  # evaluate on dev, keep the best model
                    end_epoch(progress.step // steps_per_epoch, progress, model, dev, run, args, meta, device,
                              meter.t_epoch)
                save_state(state_path, model, opt, progress, device)
        if stop:
            print0(f"stopped at step {progress.step} (--max-steps); continue with --resume")
            return None
    if progress.step < total:
        print0(f"stopped after epoch {progress.step // steps_per_epoch}: dev has not improved for {run.patience} "
               f"epochs")
    if RANK == 0:
        final_scores(model, run, args, meta, progress, train_split, test, device)
        print(f"{run.stage} done in {time.time() - meter.t0:.0f} s: {run.out}")
    barrier()
    return run.out


def summary(run, model, n_items, steps_per_epoch, device):
    n_params = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (f"{run.stage}: {n_params / 1e6:.2f} M parameters ({n_trained / 1e6:.2f} M trained), {n_items} {run.unit}, "
            f"{run.epochs} epochs of {steps_per_epoch} steps, lr {run.lr:g} (encoders {run.lr_encoder:g}), {device}"
            + (f" x {WORLD} processes" if WORLD > 1 else ""))


def out_of_patience(run, best, epochs_done):
    """--patience: the dev score has not improved for that many epochs"""
    return bool(run.patience and best and epochs_done - best["epoch"] >= run.patience)


def end_epoch(epoch, progress, model, dev, run, args, meta, device, t_start):
    """The first process evaluates on dev and keeps the model if it is the best so far; t_start:
    when the epoch started"""
    if RANK == 0:
        scores = evaluate(model, dev, run.stage, args, device)
        print(f"epoch {epoch} ({time.time() - t_start:.0f} s) dev: {describe(scores)}")
        progress.dev_by_epoch.append({k: v for k, v in scores.items() if k != "confusion"})
        if progress.best is None or selection_score(scores) > selection_score(progress.best["dev"]):
            progress.best = {"epoch": epoch, "dev": progress.dev_by_epoch[-1]}
            save_model(model, run, args, meta)
    progress.best = broadcast(progress.best)


def evaluate(model, split, stage, args, device):
    """Dev or test scores: retrieval (pre-training) or WA, AA, macro-F1 and the confusion matrix"""
    if stage == "pretrain":
        return retrieval_scores(model, split, args, device)
    y, p = predict(model, split, args, device)
    return emotion_scores(y, p, model.config.n_labels)


def selection_score(scores):
    """What keeps a model: dev WA in fine-tuning; in pre-training the mean of the dev recalls
    (R5@1, R5@2, R11@1, R11@2 of every retrieval the model does)"""
    if "wa" in scores:
        return scores["wa"]
    return float(np.mean([v for s in scores.values() for v in s.values()]))


def describe(scores):
    """Scores as a log line: emotion scores, recalls, or recalls by retrieval (T2T, A2A, M2M)"""
    if "wa" in scores:
        return f"WA {scores['wa']:.2f} AA {scores['aa']:.2f} F1 {scores['f1']:.2f}"
    if all(isinstance(v, float) for v in scores.values()):
        return " ".join(f"{k} {v:.1f}" for k, v in scores.items())
    return " | ".join(f"{b} {describe(s)}" for b, s in scores.items())


def final_scores(model, run, args, meta, progress, train_split, test, device):
    """The end of a stage: the kept model's scores on test, into metrics.json with the dev scores
    of every epoch, and beside them references that need no model (README, "Results on P-MELD"):
    word overlap in pre-training, the majority class and the last emotion in fine-tuning"""
    model.load_state_dict(load_file(os.path.join(run.out, "model.safetensors")))
    scores = evaluate(model, test, run.stage, args, device)
    best = progress.best
    metrics = {"stage": run.stage, "best_epoch": best["epoch"], "dev": best["dev"], "test": scores,
               "dev_by_epoch": progress.dev_by_epoch}
    print(f"test (best dev epoch {best['epoch']}): {describe(scores)}")
    if run.stage == "pretrain":
        metrics["test_word_overlap"] = word_overlap_scores(test, args)
        print(f"  word overlap (no model): {describe(metrics['test_word_overlap'])}")
    else:
        n, y_train = model.config.n_labels, train_split.samples[:, 2]
        metrics["test_majority"] = majority_scores(y_train, test.samples[:, 2], n)
        metrics["test_last_emotion"] = last_emotion_scores(y_train, test.samples[:, 2], last_own_labels(test), n)
        for name, key in (("majority class", "test_majority"), ("last emotion", "test_last_emotion")):
            print(f"  {name}: {describe(metrics[key])}")
            del metrics[key]["confusion"]
        print("confusion (rows true, columns predicted; " + ", ".join(meta["labels"]) + "):")
        for row in scores["confusion"]:
            print("  " + " ".join(f"{v:6d}" for v in row))
    write_json(os.path.join(run.out, "metrics.json"), metrics)

# -----------------------------------------------------------------------------
# speed: CUDA graphs and torch.compile


GRAPH_USES = []  # each graphed module's uses of each shape in the current forward (cuda_graphs)


def cuda_graphs(module, **fixed):
    """Run a module's training calls as CUDA graphs, one per shape of its inputs, each captured on
    first use (torch.cuda.make_graphed_callables): the hundreds of small kernels of a call, forward
    and backward, are then launched as one. The grid of shapes (data.buckets) bounds how many
    graphs a run captures; each keeps the memory of its activations. fixed: keyword arguments
    every call has (the encoders' check=False)."""
    eager, graphs, uses = module.forward, {}, {}
    GRAPH_USES.append(uses)

    def forward(*args, **kwargs):
        if not (module.training and torch.is_grad_enabled()) or kwargs != fixed:
            return eager(*args, **kwargs)
        key = tuple((a.shape, a.dtype, a.requires_grad) for a in args) + (torch.is_autocast_enabled(),)
        # a graph's activations live in it until its backward: a shape met again in the same
        # forward (two buckets of one shape) needs a graph of its own
        uses[key] = uses.get(key, -1) + 1
        key += (uses[key],)
        if key not in graphs:
            module.forward = functools.partial(eager, **fixed)  # what the capture runs
            samples = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
            graphs[key] = torch.cuda.make_graphed_callables(module, samples, num_warmup_iters=1,
                                                            allow_unused_input=True).forward
            module.forward = forward
        return graphs[key](*args)

    module.forward = forward


def use_cuda_graphs(model, which):
    """--cuda-graphs: the context interactions (Eq. 7-10, GRU loops of ~40 kernels a step), and with
    "all" the encoders too, as CUDA graphs"""
    for module in model.context.values():
        cuda_graphs(module)
    for enc in model.encoders() if which == "all" else ():
        cuda_graphs(enc, check=False)


def compile_encoders(model):
    """torch.compile BERT and HuBERT, the bulk of the work, for any batch and sequence length"""
    model.check_inputs = False  # prepare.py checked the dataset; a check would break the graph
    for enc in model.encoders():
        enc.compile(dynamic=True)

# -----------------------------------------------------------------------------
# processes: one, or one per GPU (or CPU share) under torchrun

RANK, WORLD = 0, 1


def print0(*args):
    if RANK == 0:
        print(*args)


def all_reduce(x, op=dist.ReduceOp.SUM):
    if WORLD > 1:
        dist.all_reduce(x, op)
    return x


def broadcast(obj):
    """-> the first process's obj, in every process"""
    if WORLD > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        obj = box[0]
    return obj


def barrier():
    if WORLD > 1:
        dist.barrier()


def set_up_device(device):
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        # cuDNN's attention builds a plan for every new shape: 25 ms a call on an H100, more than a
        # tiny model's whole step; the other attention kernels need none
        torch.backends.cuda.enable_cudnn_sdp(False)
    else:
        # oneDNN prepares a kernel for every new convolution shape, and length buckets bring new
        # shapes every step: torch's own convolutions are faster here (bench.py train)
        torch.backends.mkldnn.enabled = False


def main(argv=None):
    global RANK, WORLD
    args = parse_args(argv)
    device = device_from(args.device, "train.py")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # started by torchrun: one process per GPU (or CPU share)
        RANK, WORLD = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        # the others wait while the first process fills the feature cache and evaluates
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    set_up_device(device)
    try:
        if args.stage != "all":
            return train_stage(plan_run(args.stage, args, device, args.out, args.init, args.batch_size), args, device)
        out = {stage: args.out and os.path.join(args.out, stage) for stage in ("pretrain", "finetune")}
        pretrain = plan_run("pretrain", args, device, out["pretrain"], batch_size=args.batch_size)
        finetune = plan_run("finetune", args, device, out["finetune"], init=pretrain.out)  # the default batch size
        if train_stage(pretrain, args, device) is None:  # stopped by --max-steps
            return None
        return train_stage(finetune, args, device)
    except DataError as e:  # a missing, damaged or truncated dataset file, named
        raise SystemExit(f"train.py: {e}") from None
    finally:
        if WORLD > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
