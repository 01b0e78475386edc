"""
The pieces train.py puts together: a stage's data, the model of a stage's settings with its
checkpoints loaded, its optimiser, and one training step (which bench.py times, with the optimiser).
"""
import contextlib
import math
import os
from dataclasses import asdict

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from nanotcmp.checkpoint import ENCODERS, load_init, weights_sha256
from nanotcmp.cuda_graphs import CudaGraphs, compile_encoders
from nanotcmp.data import Split, keep_dialogues, positions, windows
from nanotcmp.features import attach_features, attach_hidden
from nanotcmp.files import DataError, file_sha256
from nanotcmp.model import Bert, BertConfig, Hubert, HubertConfig, TCMP, TCMPConfig
from nanotcmp.processes import autocast, print0, rank, world
from nanotcmp.settings import TINY_BERT, TINY_HUBERT


def open_splits(s, meta):
    """-> (the training split, its items: windows or samples, dev, test); a dataset that lacks one,
    or whose split has nothing to train or evaluate on, is a one-line error. Fine-tuning keeps the
    samples of a share of the training dialogues, drawn by the seed (--train-fraction)."""
    modalities_of(s, meta)  # a modality the dataset lacks is named first, before the splits are read
    train_name = "pretrain" if s.stage == "pretrain" and "pretrain" in meta["splits"] else "train"
    missing = [name for name in (train_name, "dev", "test") if name not in meta["splits"]]
    if missing:
        raise DataError(f"{s.data} has no {' or '.join(missing)} split (it has {', '.join(meta['splits'])}); "
                        f"training needs {train_name}, dev and test: prepare.py dialogues --from a folder of "
                        f"{train_name}.jsonl, dev.jsonl and test.jsonl")
    if s.stage == "finetune" and not meta["splits"]["train"].get("labelled"):
        raise DataError(f"{s.data} has no labelled train split to fine-tune on")
    splits = [Split(os.path.join(s.data, f"{name}.safetensors")) for name in (train_name, "dev", "test")]
    if s.stage == "finetune" and s.train_fraction < 1:
        keep_dialogues(splits[0], s.train_fraction, s.seed)
    items = [windows(split) if s.stage == "pretrain" else split.samples for split in splits]
    for split, its in zip(splits, items):
        if not len(its):
            what = "window of 3 utterances or more" if s.stage == "pretrain" else "sample"
            raise DataError(f"{split.path} has no {what} to {s.stage} on")
        if s.stage == "pretrain" and len(split.dialogues) < 2:
            raise DataError(f"{split.path} holds one dialogue: pre-training scores each target against noise "
                            f"utterances of other dialogues, so each split needs two or more")
    train, dev, test = splits
    return train, items[0], dev, test


def modalities_of(s, meta):
    """--modalities -> the modalities to use, all of them in the dataset"""
    modalities = ("text", "audio") if s.modalities == "all" else (s.modalities,)
    missing = [m for m in modalities if m not in meta["modalities"]]
    if missing:
        raise DataError(f"{s.data} has no {', '.join(missing)} (its modalities: {', '.join(meta['modalities'])}); "
                        f"use --modalities {meta['modalities'][0]}")
    return modalities


def encoder_config(path, cls, tiny, dropout):
    """-> (config dict, pretrained weights or None) of an encoder: a checkpoint folder or 'tiny';
    dropout: its dropout rate, None to keep the checkpoint's"""
    option = f"--{'text' if cls is Bert else 'audio'}-encoder"
    if path == "tiny" and os.path.exists("tiny"):
        print0(f"train.py: {option} tiny is the tiny random encoder, not the folder ./tiny here (give ./tiny for it)")
    try:
        enc = None if path == "tiny" else cls.from_pretrained(path)
    except (FileNotFoundError, ValueError) as e:  # the loader's messages name the file and what is wrong
        raise DataError(f"{option}: {e}") from None
    config = asdict(tiny if enc is None else enc.config)
    if dropout is not None:
        config["dropout"] = dropout
    return config, None if enc is None else enc.state_dict()


def build_model(s, meta):
    """The TCMP model of a stage's settings, with the encoders' checkpoints loaded, and in
    fine-tuning the pre-training run s.init (a folder) when given"""
    modalities = modalities_of(s, meta)
    vocab = os.path.join(s.data, meta["vocab"]["path"])
    if not os.path.isfile(vocab) or file_sha256(vocab) != meta["vocab"]["sha256"]:
        raise DataError(f"{vocab}, the vocabulary {s.data} was prepared with, is "
                        f"{'changed' if os.path.isfile(vocab) else 'not there'}: prepare the dataset again")
    with open(vocab, encoding="utf-8") as f:
        vocab_size = sum(1 for _ in f)
    bert, bert_w, hubert, hubert_w = None, None, None, None  # an unused modality's encoder is never built
    if "text" in modalities:
        tiny = BertConfig(vocab_size=vocab_size, **TINY_BERT)
        bert, bert_w = encoder_config(s.text_encoder, Bert, tiny, s.encoder_dropout)
    if "audio" in modalities:
        hubert, hubert_w = encoder_config(s.audio_encoder, Hubert, HubertConfig(**TINY_HUBERT), s.encoder_dropout)
    if bert and bert["vocab_size"] != vocab_size:
        raise DataError(f"{s.text_encoder} has {bert['vocab_size']} word pieces, the dataset's vocabulary "
                        f"{vocab_size}: prepare the dataset with this encoder's vocab.txt")
    own = os.path.join(s.text_encoder, "vocab.txt")  # a checkpoint's own vocabulary, which its ids are of
    if bert_w and os.path.isfile(own) and file_sha256(own) != meta["vocab"]["sha256"]:
        raise DataError(f"{s.data} was prepared with another vocabulary than {own}, of the same size: its ids "
                        f"would mean other word pieces; prepare it with --vocab {own}")
    if bert and meta["settings"]["max_tokens"] > (limit := positions(bert["max_positions"])):
        raise DataError(f"{s.data} was prepared with --max-tokens {meta['settings']['max_tokens']}, longer than the "
                        f"{limit} word pieces the text encoder takes: prepare it again with --max-tokens {limit}")
    config = TCMPConfig(d=s.d, n_labels=max(len(meta["labels"]), 1), modalities=modalities, distant=not s.no_distant,
                        tus=s.tus, tus_loss=s.tus_loss, dropout=s.dropout, bert=bert, hubert=hubert,
                        context_emotions=s.context_emotions if s.stage == "finetune" else 0.0)
    model = TCMP(config)
    if bert_w:
        model.bert.load_state_dict(bert_w)
    if hubert_w:
        model.hubert.load_state_dict(hubert_w)
    if s.stage == "finetune" and s.init:
        load_init(model, s.init, meta)
    # what config.json names: the encoders a frozen run reads from their folders, and the vocabulary
    folders = {"text": s.text_encoder if bert_w else None, "audio": s.audio_encoder if hubert_w else None}
    model.checkpoints = {key: (path, weights_sha256(getattr(model, ENCODERS[key])))
                         for key, path in folders.items() if path and s.freeze_encoders}
    model.vocab_file = own if bert_w and os.path.isfile(own) else vocab
    return model


def set_up_model(s, meta, splits, device):
    """-> the model on the device, ready to train: encoders frozen, features cached, compiled or
    graphed as asked, Eq. 23's class weights set from the training split (splits[0])"""
    torch.manual_seed(s.seed)
    model = build_model(s, meta).to(device)
    if world() > 1:
        torch.manual_seed(s.seed + rank())  # the same initial weights, but each process its own dropout masks
    if s.freeze_encoders:
        model.freeze_encoders()
    # the dataset was checked when prepared; the encoders' input checks are a sync on a GPU
    model.check_inputs = device.type == "cpu"
    if s.stage == "finetune":
        model.class_weights.copy_(class_weights(splits[0], model.config.n_labels))
    if s.freeze_encoders and not s.no_cache:
        attach_features(model, s.data, splits, device)
    if s.fixed_layers:
        if s.fixed_layers >= model.bert.config.n_layer:
            raise DataError(f"--fixed-layers {s.fixed_layers} leaves none of {s.text_encoder}'s "
                            f"{model.bert.config.n_layer} layers to train: give fewer, or --freeze-encoders")
        attach_hidden(model.fix_layers(s.fixed_layers), s.data, splits, device)
    if s.compile:
        compile_encoders(model)
    if device.type == "cuda" and s.cuda_graphs != "off":
        CudaGraphs(model, s.cuda_graphs)  # (installs itself on the model)
    return model


def class_weights(train, n_labels):
    """Eq. 23: inversely proportional to each class's share of the training samples (mean weight 1)"""
    counts = np.bincount(train.samples[:, 2], minlength=n_labels).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / (n_labels * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def optimizer(model, s):
    """Adam with two learning rates, the encoders' and the rest's (paper §4.2), each its group's "peak"
    (see set_rates)"""
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    encoders = tuple(name + "." for name in ENCODERS.values())
    groups = [{"params": [p for n, p in trained if n.startswith(encoders) == enc], "lr": rate, "peak": rate}
              for enc, rate in ((True, s.lr_encoder), (False, s.lr))]
    return torch.optim.Adam([g for g in groups if g["params"]], betas=(0.9, 0.999), fused=True)


def set_rates(opt, s, step, total):
    """--lr-schedule: each group's rate for step (counted from 0) of the stage's total: its peak, or
    with cosine its peak * (1 + cos(pi * step / total)) / 2"""
    factor = 1.0 if s.lr_schedule == "constant" else (1 + math.cos(math.pi * step / total)) / 2
    for g in opt.param_groups:
        g["lr"] = g["peak"] * factor


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
