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
                             utterances first .. target-1, all of one dialogue (TCMP.md §8)

Utterances are stored dialogue by dialogue, in spoken order.
"""
import json
import os
import struct

import numpy as np

DTYPES = {"I16": np.int16, "I32": np.int32, "I64": np.int64, "U8": np.uint8}


def make_samples(speakers, labels, max_context):
    """TCMP.md §8 for one dialogue: a sample for every position t >= 2 whose speaker is the speaker
    at t-2 (the source), labelled with the label at t; the context is the up to max_context
    utterances before t, never t itself. -> list of (first, t, label), positions in the dialogue"""
    return [(max(0, t - max_context), t, labels[t]) for t in range(2, len(labels))
            if speakers[t] == speakers[t - 2] and labels[t] >= 0]


class Split:
    """One split of a packed dataset, memory-mapped."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
        except (OSError, struct.error, ValueError) as e:
            raise ValueError(f"{self.path}: not a packed nanotcmp split ({e})") from None
        meta = header.pop("__metadata__", {})
        names = json.loads(meta["names"])
        self.dialogues, self.speakers = names["dialogues"], names["speakers"]
        for name, info in header.items():
            start, end = info["data_offsets"]
            dtype = DTYPES[info["dtype"]]
            count = (end - start) // np.dtype(dtype).itemsize
            arr = (np.memmap(self.path, dtype=dtype, mode="r", offset=8 + n + start, shape=(count,))
                   if count else np.zeros(0, dtype))
            setattr(self, name, arr.reshape(info["shape"]))

    def __len__(self):
        return len(self.utt_label)

    def text_of(self, i):
        start, length = self.utt_text[i]
        return bytes(self.text[start:start + length]).decode("utf-8")

    def tokens_of(self, i):
        start, length = self.utt_tokens[i]
        return self.tokens[start:start + length]

    def audio_of(self, i):
        start, length = self.utt_audio[i]
        return self.audio[start:start + length]

    def speaker_of(self, i):
        return self.speakers[self.utt_speaker[i]]

    def dialogue_of(self, i):
        return self.dialogues[self.utt_dialogue[i]]


def load_meta(folder):
    path = os.path.join(folder, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is {folder} a dataset made by prepare.py?")
    with open(path) as f:
        return json.load(f)
