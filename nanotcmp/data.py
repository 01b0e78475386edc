"""
Packed datasets: what prepare.py writes once and train.py / sample.py read directly.

A dataset is a folder: meta.json (labels, modalities, vocabulary, settings, per-split counts) and
one <split>.safetensors per split. Each split file is a plain safetensors file, so any tool can
open it, but nanotcmp never loads it: numpy memory-maps its arrays in place.

  utt_dialogue int32 (U,)    index into the split's dialogue names (metadata "names": "dialogues")
  utt_speaker  int32 (U,)    index into the split's speaker names (metadata "names": "speakers")
  utt_label    int32 (U,)    class index; -1 when unlabelled or never a target (IEMOCAP's xxx)
  utt_tokens   int64 (U, 2)  (start, length) in tokens: [CLS] ... [SEP]
  utt_audio    int64 (U, 2)  (start, length) in audio; length 0 in a text-only dataset
  utt_text     int64 (U, 2)  (start, length) in text, UTF-8 bytes
  tokens       int32 (Nt,)   word-piece ids, all utterances concatenated
  audio        int16 (Na,)   16 kHz mono samples, all utterances concatenated
  text         uint8 (Nb,)   the utterances' text, for sample.py, debugging and teaching
  samples      int64 (S, 3)  (first context utterance, target utterance, label): the context is
                             utterances first .. target-1, all of one dialogue (README, "Data")

Utterances are stored dialogue by dialogue, in spoken order.
"""
import functools
import json
import os
import struct

import numpy as np
import torch

from nanotcmp.files import DataError, file_sha256, read_json

DTYPES = {"I16": np.int16, "I32": np.int32, "I64": np.int64, "U8": np.uint8}


def make_samples(speakers, labels, max_context):
    """The paper's sample rule (README, "Data") for one dialogue: a sample for every position t >= 2
    whose speaker is the speaker at t-2 (the source), labelled with the label at t; the context is
    the up to max_context utterances before t, never t itself. -> list of (first, t, label),
    positions in the dialogue"""
    return [(max(0, t - max_context), t, labels[t]) for t in range(2, len(labels))
            if speakers[t] == speakers[t - 2] and labels[t] >= 0]


class Split:
    """One split of a packed dataset, memory-mapped."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.name = os.path.basename(self.path).removesuffix(".safetensors")  # e.g. "train"
        try:
            with open(self.path, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
            names = json.loads(header.pop("__metadata__")["names"])
            ends = [info["data_offsets"][1] for info in header.values()]
        except (OSError, struct.error, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{self.path}: not a packed nanotcmp split ({type(e).__name__}: {e}); "
                            f"run prepare.py again") from None
        if os.path.getsize(self.path) < 8 + n + max(ends, default=0):
            raise DataError(f"{self.path}: truncated ({os.path.getsize(self.path)} bytes, its header describes "
                            f"{8 + n + max(ends)}); run prepare.py again")
        self.dialogues, self.speakers = names["dialogues"], names["speakers"]
        self.features = {}  # "text"/"audio" -> (U, D) pooled encoder outputs, when a feature cache is attached
        self.hidden = None  # (Nt, D): each token's hidden states after BERT's fixed layers, when attached
        for name, info in header.items():
            start, end = info["data_offsets"]
            dtype = DTYPES[info["dtype"]]
            count = (end - start) // np.dtype(dtype).itemsize
            arr = (np.memmap(self.path, dtype=dtype, mode="r", offset=8 + n + start, shape=(count,))
                   if count else np.zeros(0, dtype))
            setattr(self, name, arr.reshape(info["shape"]))

    def __len__(self):
        return len(self.utt_label)

    @functools.cached_property
    def text_id(self):
        """(U,) int64: an id of each utterance's word pieces, the same for utterances that read alike"""
        ids = {}
        return np.array([ids.setdefault(self.tokens_of(i).tobytes(), len(ids)) for i in range(len(self))], np.int64)

    def tokens_of(self, i):
        start, length = self.utt_tokens[i]
        return self.tokens[start:start + length]

    def hidden_of(self, i):
        start, length = self.utt_tokens[i]
        return self.hidden[start:start + length]

    def audio_of(self, i):
        start, length = self.utt_audio[i]
        return self.audio[start:start + length]


def load_meta(folder):
    """meta.json, and as "sha256" its own: which dataset a run trains on, for --resume (it holds the
    sha256 of every split)"""
    path = os.path.join(folder, "meta.json")
    meta = read_json(path, ("labels", "modalities", "vocab", "settings", "splits"),
                     "a dataset made by prepare.py (python prepare.py makes the demo's)")
    return meta | {"sha256": file_sha256(path)}


def is_dataset(folder):
    """Whether folder holds a dataset prepare.py wrote: its meta.json says so"""
    try:
        load_meta(folder)
    except (DataError, OSError):
        return False
    return True

# -----------------------------------------------------------------------------
# batches: every distinct utterance of a batch is encoded once, contexts index into them


# Every encoder call gets a shape (rows x length) from a fixed grid, so that a whole run sees a
# bounded set of shapes: the GPU libraries plan their kernels, and cuda_graphs.py captures its
# graphs, once per shape, and a new shape every step costs more than the step (docs/speed.md,
# "Length buckets on a grid of shapes"). Lengths: 4 steps an octave, every power of two among them
# (so a model's max_positions of 128 or 512 is never overrun). Rows: the powers of two, the missing
# rows filled with copies of the bucket's first sequence, whose outputs are dropped.
LENGTH_GRID = np.unique(np.round(2 ** (np.arange(4 * 30 + 1) / 4))).astype(np.int64)
ROW_GRID = 2 ** np.arange(17)


def on_grid(n, grid):
    """-> the smallest grid value >= n"""
    return int(grid[np.searchsorted(grid, n)])


def positions(max_positions):
    """The longest utterance, in word pieces, that a text encoder of max_positions takes: the length
    of the grid at or below it, as an utterance may be padded up to the next (max_positions itself
    for the usual powers of two)"""
    return int(LENGTH_GRID[LENGTH_GRID <= max_positions].max())


def buckets(lengths, max_padding=0.1, grid=True):
    """Length buckets for an encoder batch, each padded to a shape on the grid (grid=False: to its
    own longest sequence and rows): sorted by length, a bucket grows while its padding share (padded
    positions, the filler rows' included, over all positions) stays within max_padding, or within
    its longest sequence's own share on the grid, which no bucket avoids (1: one bucket).
    -> list of (index array into lengths, padded rows, padded length)"""
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    rows = (lambda n: on_grid(n, ROW_GRID)) if grid else (lambda n: n)  # a bucket of n sequences -> its rows
    out, i = [], 0
    while i < len(order):
        T = on_grid(lengths[order[i]], LENGTH_GRID) if grid else int(lengths[order[i]])
        allowed = max(max_padding, 1 - lengths[order[i]] / T)
        end, total = i + 1, 0
        for j in range(i, len(order)):
            total += lengths[order[j]]
            n = j - i + 1
            if total < (1 - allowed) * n * T:  # too much padding already, before rounding the rows
                break
            if total >= (1 - allowed) * rows(n) * T:
                end = j + 1
        out.append((order[i:end], rows(end - i), T))
        i = end
    return out


def pad(key, seqs, max_padding=0.1, grid=True):
    """Sequences (arrays (T, ...)) of one modality -> its encoder inputs, bucketed by length (see buckets):
      key [(R_b, T_b, ...)], key_mask [(R_b, T_b) bool]  one padded tensor per bucket, zeros at the padding;
                                                  rows past the bucket's sequences repeat its first
      key_index (U,) long                         sequence i's row in the buckets' rows, concatenated"""
    xs, masks, index, first_row = [], [], torch.empty(len(seqs), dtype=torch.long), 0
    for g, R, T in buckets([len(s) for s in seqs], max_padding, grid):
        filled = np.r_[g, np.repeat(g[0], R - len(g))]
        x = torch.zeros(R, T, *seqs[0].shape[1:], dtype=torch.from_numpy(seqs[0]).dtype)
        for row, i in enumerate(filled):
            x[row, :len(seqs[i])] = torch.from_numpy(seqs[i])
        xs.append(x)
        masks.append(torch.arange(T)[None, :] < torch.tensor([len(seqs[i]) for i in filled])[:, None])
        index[torch.from_numpy(g)] = first_row + torch.arange(len(g))
        first_row += R
    return {key: xs, key + "_mask": masks, key + "_index": index}


def encoder_inputs(tokens=None, waves=None, max_padding=0.1, grid=True):
    """The utterances to encode: word-piece ids and/or int16 16 kHz waveforms (lists of arrays,
    None for a modality not used) -> their batch entries, bucketed by length (see pad)"""
    out = {}
    if tokens is not None:
        out |= pad("text", [np.asarray(t, dtype=np.int64) for t in tokens], max_padding, grid)
    if waves is not None:
        out |= pad("audio", [np.asarray(w).astype(np.float32) / 2 ** 15 for w in waves], max_padding, grid)
    return out


def padding(batch, key):
    """-> (padded positions, all positions) of a batch's encoder inputs (key "text" or "audio");
    their ratio is the padding share"""
    masks = batch[key + "_mask"]
    all_ = sum(m.numel() for m in masks)
    real = torch.cat([m.sum(1) for m in masks])[batch[key + "_index"]]  # (U,) the filler rows left out
    return all_ - int(real.sum()), all_


def shapes(batch, key):
    """-> the (rows, length) shapes of a batch's encoder calls, for key "text" or "audio" """
    return {tuple(x.shape) for x in batch.get(key, ())}


def make_batch(split, rows, extra=(), modalities=("text", "audio"), max_padding=0.1, grid=True):
    """rows: one list of utterance ids (in the split) per context or window, in spoken order;
    extra: more utterances to encode (candidates). -> (batch of tensors, {utterance id: row in the batch})
      text, text_mask, text_index      the distinct utterances' word pieces, bucketed (see pad), or
                                       their hidden states after BERT's fixed layers (split.hidden)
      audio, audio_mask, audio_index   their 16 kHz waveforms in [-1, 1), bucketed
      text_feat (U, D), audio_feat     instead, their pooled encoder outputs when the split has
                                       a feature cache (split.features)
      ctx (B, L) long, ctx_mask (B, L) bool   each row's utterances, as rows of the above"""
    ids = sorted({u for row in rows for u in row} | {int(u) for u in extra})
    where = {u: i for i, u in enumerate(ids)}
    L = max(len(row) for row in rows)
    ctx = torch.tensor([[where[u] for u in row] + [0] * (L - len(row)) for row in rows])
    batch = {"ctx": ctx, "ctx_mask": torch.arange(L)[None, :] < torch.tensor([len(r) for r in rows])[:, None]}
    raw = []  # the modalities to encode
    for key in modalities:
        if key in split.features:
            batch[key + "_feat"] = torch.from_numpy(split.features[key][ids])
        elif key == "text" and split.hidden is not None:
            batch |= pad("text", [split.hidden_of(u) for u in ids], max_padding, grid)
        else:
            raw.append(key)
    batch |= encoder_inputs([split.tokens_of(u) for u in ids] if "text" in raw else None,
                            [split.audio_of(u) for u in ids] if "audio" in raw else None, max_padding, grid)
    return batch, where


def to_device(batch, device):
    """A batch's tensors (lists of them for bucketed inputs) -> device; on CUDA through pinned
    memory, so the copies run while the host goes on"""
    def move(t):
        return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)
    return {k: [move(t) for t in v] if isinstance(v, list) else move(v) for k, v in batch.items()}


def finetune_batch(split, samples, modalities, max_padding=0.1, grid=True):
    """samples: (B, 3) rows of split.samples -> batch with labels (B,) and the label of each of its
    distinct utterances, utt_labels (U,) (-1 where unlabelled)"""
    batch, where = make_batch(split, [list(range(first, target)) for first, target, _ in samples],
                              modalities=modalities, max_padding=max_padding, grid=grid)
    batch["labels"] = torch.tensor([int(y) for _, _, y in samples])
    batch["utt_labels"] = torch.from_numpy(split.utt_label[list(where)].astype(np.int64))  # (where: in batch order)
    return batch


def dialogue_ranges(utt_dialogue):
    """Utterances are stored dialogue by dialogue -> list of (first, end) utterance ids, one a dialogue"""
    d = np.asarray(utt_dialogue)
    starts = np.flatnonzero(np.r_[True, d[1:] != d[:-1]]).tolist() if len(d) else []
    return list(zip(starts, starts[1:] + [len(d)]))


def last_own_labels(split):
    """For each sample, the label of the last labelled utterance of its context spoken by the target
    speaker (-1 where there is none) -> (S,) int64: what the "last emotion" reference predicts"""
    out = np.full(len(split.samples), -1, dtype=np.int64)
    for i, (first, target, _) in enumerate(split.samples):
        for u in range(target - 1, first - 1, -1):  # the context, latest first
            if split.utt_speaker[u] == split.utt_speaker[target] and split.utt_label[u] >= 0:
                out[i] = split.utt_label[u]
                break
    return out


def windows(split, size=11, stride=5):
    """Dialogues cut into windows of up to size utterances, every stride (the authors' pre-training
    windows); a window needs 3 utterances to hold a target. -> list of (first, end) utterance ids"""
    out = []
    for s, e in dialogue_ranges(split.utt_dialogue):
        a = s
        while True:
            if e - a >= 3:
                out.append((a, min(a + size, e)))
            if a + size >= e:
                break
            a += stride
    return out


def draw_noise(split, targets, k, rng, among=None):
    """k-1 noise candidates for each target utterance id, from other dialogues and never reading as
    the target does (MELD repeats a scene's lines under other dialogue ids): drawn among (utterance
    ids, e.g. the batch's own, which are encoded anyway) when it spans two dialogues or more, else
    from the whole split -> (N, k-1) utterance ids"""
    if len(split.dialogues) < 2:  # no other dialogue to draw from: the redraws below would never end
        raise DataError(f"{split.path} holds one dialogue: noise candidates come from other dialogues")
    targets, text_id = np.asarray(targets), split.text_id

    def clash(noise):  # (N, k-1) bool: of the target's dialogue, or the target's very word pieces
        return (split.utt_dialogue[noise] == split.utt_dialogue[targets][:, None]) | \
            (text_id[noise] == text_id[targets][:, None])
    if among is None or len(set(split.utt_dialogue[among].tolist())) < 2:
        among = np.arange(len(split))
    among = np.asarray(among)
    noise = among[rng.integers(len(among), size=(len(targets), k - 1))]
    for _ in range(100):  # redraw the ones that clash
        if not (bad := clash(noise)).any():
            return noise
        noise[bad] = among[rng.integers(len(among), size=int(bad.sum()))]
    for i in np.flatnonzero(clash(noise).any(1)):  # few of among fit these targets: the split's that do
        fit = np.flatnonzero((split.utt_dialogue != split.utt_dialogue[targets[i]]) & (text_id != text_id[targets[i]]))
        if not len(fit):
            raise DataError(f"{split.path}: every utterance of other dialogues reads as utterance {targets[i]} "
                            f"does: there is no noise candidate for it")
        noise[i] = fit[rng.integers(len(fit), size=k - 1)]
    return noise


def window_targets(split, wins, k, rng, in_batch=True):
    """Windows -> (rows: each window's utterance ids, targets: (window, position) of every position
    j >= 2, noise (N, k-1): each target's noise candidates, utterance ids). in_batch: noise from the
    other windows' utterances (training); else from the whole split."""
    rows = [list(range(a, e)) for a, e in wins]
    targets = [(w, j) for w, row in enumerate(rows) for j in range(2, len(row))]
    among = [u for row in rows for u in row] if in_batch else None
    return rows, targets, draw_noise(split, [rows[w][j] for w, j in targets], k, rng, among)


def pretrain_batch(split, wins, k, rng, modalities, in_batch=True, max_padding=0.1, grid=True):
    """Windows -> batch where every position j >= 2 of a window is a target (window_targets)"""
    return targets_batch(split, *window_targets(split, wins, k, rng, in_batch), modalities, max_padding, grid)


def targets_batch(split, rows, targets, noise, modalities, max_padding=0.1, grid=True):
    """window_targets' windows, targets and noise -> batch with targets (N, 2) = (window, position)
    and noise (N, k-1) rows of the batch's utterances"""
    batch, where = make_batch(split, rows, extra=noise.ravel(), modalities=modalities, max_padding=max_padding,
                              grid=grid)
    batch["targets"] = torch.tensor(targets)
    batch["noise"] = torch.tensor([[where[int(u)] for u in row] for row in noise])
    return batch


def keep_dialogues(split, fraction, seed):
    """--train-fraction: keep the samples of that share of the split's dialogues (those with samples,
    one at least), drawn by the seed; a seed's smaller shares are within its larger ones"""
    dialogues = np.unique(split.utt_dialogue[split.samples[:, 1]])
    kept = np.random.default_rng(seed).permutation(dialogues)[:max(1, round(fraction * len(dialogues)))]
    split.samples = split.samples[np.isin(split.utt_dialogue[split.samples[:, 1]], kept)]


def dialogue_batches(split, batch_size, rng):
    """Fine-tuning batches: the dialogues in random order, each one's samples together, so that a
    batch's contexts share their utterances (each is encoded once) -> list of sample-row arrays"""
    rank = np.argsort(rng.permutation(len(split.dialogues)))  # each dialogue's place in the new order
    order = np.argsort(rank[split.utt_dialogue[split.samples[:, 1]]], kind="stable")
    return [split.samples[order[i:i + batch_size]] for i in range(0, len(order), batch_size)]

# -----------------------------------------------------------------------------
# the generic JSONL dialogue format, read by prepare.py and sample.py


def line_problem(obj, required, optional):
    """What is wrong with a parsed line of the generic JSONL dialogue format (README, "Data"), or
    None: the required fields are non-empty strings, the optional ones strings or null, and none
    holds what UTF-8 cannot write (JSON's "\\ud83d" escape alone is half a character)"""
    if not isinstance(obj, dict):
        return f"a line must be a JSON object, not {type(obj).__name__}"
    missing = [k for k in required if k not in obj]
    if missing:
        return f"missing field {', '.join(missing)}"
    for k in required + optional:
        v = obj.get(k)
        if v is None and k in optional:
            continue
        if not isinstance(v, str):
            return f"field {k!r} must be a string{' or null' if k in optional else ''}, not {json.dumps(v)}"
        if not v.strip():
            return f"field {k!r} is empty"
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"field {k!r} is not valid Unicode (a lone surrogate {v[e.start]!r} at character {e.start})"
    return None
