"""
The feature cache: with --freeze-encoders, BERT's and HuBERT's pooled outputs (Eq. 4) never
change, so they are computed once for every utterance of a dataset and kept beside it, in
<dataset>/features/<modality>-<encoder hash>-<precision>.safetensors; training then runs only
the TCMP layers. With --fixed-layers n, so are the hidden states of every token after BERT's
first n layers (text-<encoder hash>-layer<n>-<precision>.safetensors); training runs the layers above.
"""
import hashlib
import inspect
import json
import os
import time
from dataclasses import asdict

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from nanotcmp.checkpoint import weights_sha256
from nanotcmp.data import encoder_inputs, to_device
from nanotcmp.files import DataError, clean_leftovers, make_folder, write_atomic
from nanotcmp.processes import autocast, barrier, print0, rank, world

FEATURE_BATCH = 32  # utterances an encoder call while filling the cache


def encoder_hash(encoder):
    """sha256 of what computes an encoder's cached features, which they are keyed by: its config
    (but its dropout, off when frozen), its weights, and the code: this file, the encoder's (model.py:
    a change to the encoders or their pooling is a new key) and data.py's padding, with torch's version"""
    config = {k: v for k, v in asdict(encoder.config).items() if k != "dropout"}
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode() + torch.__version__.encode())
    for path in (__file__, inspect.getfile(type(encoder)), inspect.getfile(encoder_inputs)):
        with open(path, "rb") as f:
            h.update(f.read())
    h.update(weights_sha256(encoder).encode())
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


@torch.no_grad()
def split_hidden(model, split, device):
    """The text encoder's hidden states after its fixed layers (TCMP.fix_layers) for every token of a
    split -> (Nt, D) float32, row i for split.tokens[i]; encoded in order of length, without dropout"""
    order = np.argsort(split.utt_tokens[:, 1], kind="stable")
    out = torch.empty(len(split.tokens), model.bert.config.dim)
    for i in range(0, len(order), FEATURE_BATCH):
        ids = order[i:i + FEATURE_BATCH]
        batch = to_device(encoder_inputs([split.tokens_of(u) for u in ids], max_padding=1, grid=False), device)
        with autocast(device):  # one bucket: sequence j is row text_index[j]
            h = model.bert(batch["text"][0], batch["text_mask"][0], n_layers=model.fixed_layers).float().cpu()
        for u, row in zip(ids, batch["text_index"].tolist()):
            start, length = split.utt_tokens[u]
            out[start:start + length] = h[row, :length]
    return out


def attach_features(model, folder, splits, device):
    """Give each split its utterances' pooled encoder outputs (split.features) of every modality: the
    frozen encoders' (TCMP.freeze_encoders), computed once and kept beside the dataset"""
    for key in model.config.modalities:
        arrays = cached(model, folder, splits, device, key, "", lambda s: split_features(model, key, s, device))
        for s in splits:
            s.features[key] = arrays[s.name].numpy()


def attach_hidden(model, folder, splits, device):
    """Give each split its tokens' hidden states after the text encoder's fixed layers (split.hidden,
    see TCMP.fix_layers), computed once and kept beside the dataset"""
    arrays = cached(model, folder, splits, device, "text", f"-layer{model.fixed_layers}",
                    lambda s: split_hidden(model, s, device))
    for s in splits:
        s.hidden = arrays[s.name].numpy()


def cached(model, folder, splits, device, key, kind, compute):
    """{split name: compute(split)} from <dataset>/features/<key>-<encoder hash><kind>-<precision>.safetensors,
    computing the splits not there yet (or changed since: another size or time). The first process
    computes, the others wait and read. key: the modality, whose encoder the hash is of; kind: what
    is cached, "" for the pooled outputs"""
    model.eval()
    stamps = {}  # each split file's size and time, as they are now
    for f in os.listdir(folder):
        if f.endswith(".safetensors"):
            st = os.stat(os.path.join(folder, f))
            stamps[f.removesuffix(".safetensors")] = [st.st_size, st.st_mtime_ns]
    precision = "bf16" if device.type == "cuda" else "fp32"  # see autocast
    digest = encoder_hash(model.bert if key == "text" else model.hubert)
    path = os.path.join(folder, "features", f"{key}-{digest[:16]}{kind}-{precision}.safetensors")
    arrays = {}
    if os.path.isfile(path):
        try:
            with safe_open(path, "pt") as f:
                known = json.loads(f.metadata()["splits"])
                arrays = {name: f.get_tensor(name) for name in f.keys() if known[name] == stamps.get(name)}
        except (OSError, SafetensorError, KeyError, TypeError, ValueError) as e:
            print0(f"feature cache: {path} is unreadable ({e}); computing it again")
    missing = [s for s in splits if s.name not in arrays]
    if missing and rank() == 0:
        t0 = time.time()
        for s in missing:
            arrays[s.name] = compute(s)
        try:
            make_folder(os.path.dirname(path), remedy=None)
            clean_leftovers(os.path.dirname(path))
            write_atomic(path, lambda p: save_file(arrays, p, metadata={
                "encoder": digest, "splits": json.dumps({name: stamps[name] for name in arrays})}), remedy=None)
        except DataError as e:  # a read-only dataset, a full disk: one process can do without the file
            if world() > 1:
                raise
            print(f"feature cache: {e}; the features stay in memory, for this run only")
        else:
            what = f"hidden states after layer {kind.removeprefix('-layer')}" if kind else "features"
            print(f"feature cache: {key} {what} of {sum(len(s) for s in missing)} utterances in "
                  f"{time.time() - t0:.1f} s -> {path}")
    barrier()
    if missing and rank() != 0:
        arrays = load_file(path)
    return arrays
