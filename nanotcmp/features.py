"""
The feature cache: with --freeze-encoders, BERT's and HuBERT's pooled outputs (Eq. 4) never
change, so they are computed once for every utterance of a dataset and kept beside it, in
<dataset>/features/<modality>-<encoder hash>-<precision>.safetensors; training then runs only
the TCMP layers.
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
        if missing and rank() == 0:
            t0 = time.time()
            for s in missing:
                cached[s.name] = split_features(model, key, s, device)
            try:
                make_folder(os.path.dirname(path), remedy=None)
                clean_leftovers(os.path.dirname(path))
                write_atomic(path, lambda p: save_file(cached, p, metadata={
                    "encoder": digest, "splits": json.dumps({name: stamps[name] for name in cached})}), remedy=None)
            except DataError as e:  # a read-only dataset, a full disk: one process can do without the file
                if world() > 1:
                    raise
                print(f"feature cache: {e}; the features stay in memory, for this run only")
            else:
                print(f"feature cache: {key} features of {sum(len(s) for s in missing)} utterances in "
                      f"{time.time() - t0:.1f} s -> {path}")
        barrier()
        if missing and rank() != 0:
            cached = load_file(path)
        for s in splits:
            s.features[key] = cached[s.name].numpy()
