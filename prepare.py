"""
Turn raw corpora, once, into packed datasets that train.py and sample.py read directly
(the format is described in nanotcmp/data.py).

python prepare.py                 # = python prepare.py demo: the embedded demo, in data/demo
python prepare.py meld [--csv-dir DIR] [--media-dir DIR] --vocab VOCAB [--out data/p-meld] [--unlabelled]
python prepare.py iemocap --root IEMOCAP_full_release --vocab VOCAB [--out data/p-iem]
python prepare.py dialogues --from FILE.jsonl|DIR --vocab VOCAB --out DIR [--labels a,b,c]

Each corpus has a reader that gives its dialogues as records of the generic format's fields
(README, "Data"); one packer turns any of them into the dataset.
"""
import argparse
import csv
import json
import os
import re
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import save_file

from nanotcmp.audio import MIN_SAMPLES, SAMPLE_RATE, AudioError, NoFFmpeg, load_audio, save_wav
from nanotcmp.data import dialogue_ranges, is_dataset, line_problem, make_samples
from nanotcmp.demo import DEMO_LABELS, demo_vocab, generate_dialogues, synthesize_clip
from nanotcmp.files import (DataError, cannot_read, cannot_write, file_in_the_way, file_sha256, given_path,
                            one_line_errors, open_mode, remove_staged, staged_path, staging, worker_pool,
                            writes_out)
from nanotcmp.settings import SEED, ranged
from nanotcmp.tokenizer import WordPiece


@dataclass
class Utt:
    """One utterance, as a line of the generic format: its fields, and where it was read"""
    dialogue: str
    speaker: str
    text: str
    audio: object  # a media file's path, a function making int16 samples (the demo's), or None
    label: str | None  # None: unlabelled
    where: str  # "file:line", for error messages


@dataclass
class Corpus:
    """What a reader gives the packer"""
    splits: dict  # split name -> its dialogues, each a list of Utt in spoken order
    labels: tuple  # the classes, in order
    vocab: str  # the vocabulary's path
    aliases: dict = field(default_factory=dict)  # label -> the class it counts as, None: never a target


class Problems:
    """A bad utterance stops the run, or with --skip-bad is dropped (from contexts too) and counted
    against the split being read (self.split, set by the readers)."""

    def __init__(self, skip):
        self.skip, self.dropped, self.split = skip, [], None

    def __call__(self, message):
        if not self.skip:
            raise DataError(message)
        self.dropped.append((self.split, message))

    def count(self, split):
        return sum(s == split for s, _ in self.dropped)

# -----------------------------------------------------------------------------
# the readers: the options and the folder being built -> a Corpus

def read_lines(path, problems):
    """The file's lines as text; a line that is not UTF-8 is a bad row (with --skip-bad: left
    empty, so that later lines keep their numbers)."""
    with open(path, "rb") as f:
        raw = f.read().split(b"\n")
    lines = []
    for i, line in enumerate(raw, 1):
        try:
            lines.append(line.decode("utf-8-sig" if i == 1 else "utf-8"))
        except UnicodeDecodeError as e:
            problems(f"{path}:{i}: text is not UTF-8 ({e.reason} at byte {e.start})")
            lines.append("")
    return lines


MELD_SPLITS = {"train": ("train_sent_emo.csv", "train_splits"),
               "dev": ("dev_sent_emo.csv", "dev_splits_complete"),
               "test": ("test_sent_emo.csv", "output_repeated_splits_test")}
MELD_COLUMNS = ("Utterance", "Speaker", "Sentiment", "Dialogue_ID", "Utterance_ID")
MELD_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "meld")  # MELD's transcripts, shipped
MELD_LABELS = ("negative", "neutral", "positive")  # MELD's Sentiment column


def read_meld(args, folder, problems):
    splits = {}
    for split, (csv_name, media_folder) in MELD_SPLITS.items():
        problems.split = split
        path = os.path.join(args.csv_dir, csv_name)
        if not os.path.isfile(path):
            raise DataError(f"{path} not found (expected MELD's {', '.join(f for f, _ in MELD_SPLITS.values())})")
        rows = csv.DictReader(read_lines(path, problems))
        missing = [c for c in MELD_COLUMNS if c not in (rows.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: no column {', '.join(missing)} (columns: {rows.fieldnames})")
        dialogues, start = {}, 2  # start: the line the next row starts on
        try:
            for row in rows:
                where, start = f"{path}:{rows.line_num}", rows.line_num + 1
                if any(row[c] is None for c in MELD_COLUMNS):
                    got = sum(row[k] is not None for k in rows.fieldnames)
                    problems(f"{where}: {got} fields, fewer than the header's {len(rows.fieldnames)} "
                             f"(a line cut short?)")
                    continue
                try:
                    d, u = int(row["Dialogue_ID"]), int(row["Utterance_ID"])
                except ValueError:
                    problems(f"{where}: Dialogue_ID/Utterance_ID {row['Dialogue_ID']!r}/{row['Utterance_ID']!r} "
                             f"are not integers")
                    continue
                media = os.path.join(args.media_dir, media_folder, f"dia{d}_utt{u}.mp4") if args.media_dir else None
                label = None if args.unlabelled else row["Sentiment"]
                dialogues.setdefault(d, []).append((u, Utt(f"dia{d}", row["Speaker"], row["Utterance"], media, label,
                                                           where)))
        except csv.Error as e:  # a quote left open makes the rest of the file one field, too long
            raise DataError(f"{path}:{start}: not valid CSV from this line on ({e}): a quote left open?") from None
        splits[split] = [[utt for _, utt in sorted(utts, key=lambda x: x[0])] for _, utts in sorted(dialogues.items())]
    return Corpus(splits, MELD_LABELS, args.vocab)


IEMOCAP_SESSIONS = {"train": (1, 2, 3), "dev": (4,), "test": (5,)}
IEMOCAP_LINE = re.compile(r"^(\S+_([FM])\d+)\s+\[(\d+\.?\d*)-(\d+\.?\d*)\]:\s?(.*)$")
IEMOCAP_LABEL = re.compile(r"^\[[\d.]+ - [\d.]+\]\t(\S+)\t(\S+)\t")
IEMOCAP_LABELS = ("fru", "exc", "neu", "ang", "sad", "hap", "oth")
# rare classes merged as in the paper; xxx (no annotator agreement) stays in contexts, never a target
IEMOCAP_ALIASES = {"sur": "oth", "fea": "oth", "dis": "oth", "xxx": None}


def read_iemocap(args, folder, problems):
    splits = {}
    for split, sessions in IEMOCAP_SESSIONS.items():
        problems.split = split
        splits[split] = []
        for s in sessions:
            session = os.path.join(args.root, f"Session{s}")
            transcripts = os.path.join(session, "dialog", "transcriptions")
            if not os.path.isdir(transcripts):
                raise DataError(f"{transcripts} not found: is {args.root} the IEMOCAP_full_release folder, "
                                f"with Session1 .. Session5?")
            for name in sorted(f[:-4] for f in os.listdir(transcripts) if f.endswith(".txt")):
                labels = {}
                label_path = os.path.join(session, "dialog", "EmoEvaluation", name + ".txt")
                if not os.path.isfile(label_path):
                    raise DataError(f"{label_path} not found (labels of {transcripts}/{name}.txt)")
                for line in read_lines(label_path, problems):
                    if m := IEMOCAP_LABEL.match(line):
                        labels[m.group(1)] = m.group(2)
                utts = []
                path = os.path.join(transcripts, name + ".txt")
                for i, line in enumerate(read_lines(path, problems), 1):
                    m = IEMOCAP_LINE.match(line.strip())
                    if not m:
                        continue  # speaker notes and other non-utterance lines
                    utt_id, speaker, start, _, text = m.groups()
                    if utt_id not in labels:
                        problems(f"{path}:{i}: utterance {utt_id} has no label in {label_path}")
                        continue
                    wav = None if args.text_only else os.path.join(session, "sentences", "wav", name, utt_id + ".wav")
                    utts.append((float(start), Utt(name, speaker, text, wav, labels[utt_id], f"{path}:{i}")))
                utts.sort(key=lambda x: x[0])  # spoken order is start time, not file order
                splits[split].append([u for _, u in utts])
    return Corpus(splits, IEMOCAP_LABELS, args.vocab, IEMOCAP_ALIASES)


def read_dialogues(args, folder, problems):
    """nanotcmp's generic dialogue format: one utterance a line, in spoken order,
    {"dialogue": "d1", "speaker": "Ross", "text": "Hi.", "audio": "clips/d1_0.wav", "label": "neutral"}
    with audio (relative to the file) and label optional; a file, or a folder of them, one a split"""
    src = args.src
    if os.path.isdir(src):
        files = sorted(os.path.join(src, f) for f in os.listdir(src) if f.endswith(".jsonl"))
        if not files:
            raise DataError(f"{src} holds no .jsonl file")
    elif os.path.isfile(src):
        files = [src]
    elif os.path.isfile(src.rstrip(os.sep)):
        raise DataError(f"--from {src}: {src.rstrip(os.sep)} is a file, not a folder")
    else:
        raise DataError(f"{src} not found")
    splits, seen = {}, {}  # seen: dialogue id -> the file it is in
    for path in files:
        problems.split = os.path.basename(path)[:-len(".jsonl")]
        dialogues = {}
        for i, line in enumerate(read_lines(path, problems), 1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems(f"{where}: not valid JSON ({e.msg})")
                continue
            if bad := line_problem(obj, ("dialogue", "speaker", "text"), ("audio", "label")):
                problems(f"{where}: {bad}")
                continue
            media = os.path.join(os.path.dirname(path), obj["audio"]) if obj.get("audio") else None
            dialogues.setdefault(obj["dialogue"], []).append(Utt(obj["dialogue"], obj["speaker"], obj["text"], media,
                                                                 obj.get("label"), where))
        for d, us in dialogues.items():
            if d in seen:  # the same dialogue in two splits would leak between training and testing
                raise DataError(f"{us[0].where}: dialogue {d!r} is also in {seen[d]}")
            seen[d] = path
        splits[problems.split] = list(dialogues.values())
    utts = [u for dialogues in splits.values() for d in dialogues for u in d]
    with_audio = [u.audio is not None for u in utts]
    if any(with_audio) and not all(with_audio):
        raise DataError(f"{utts[with_audio.index(False)].where}: no audio, while other utterances have some "
                        f"(a dataset is text-only or has audio for every utterance)")
    return Corpus(splits, class_names(utts, args.labels), args.vocab)


def class_names(utts, given):
    """The classes: given (--labels, comma-separated) or the labels found, sorted. Two names of one
    class spelled two ways are refused: "neutral " beside "neutral" would be a class of its own."""
    def folded(name):
        return name.strip().casefold()
    first = {}  # each spelling of a label -> the first line with it
    for u in utts:
        if u.label is not None:
            first.setdefault(u.label, u.where)
    for name in first:
        if (other := next(n for n in first if folded(n) == folded(name))) != name:
            raise DataError(f"{first[name]}: label {name!r} differs from {other!r} ({first[other]}) only by spaces "
                            f"or case: spell each class one way")
    if given is None:
        return tuple(sorted(first))
    labels = given.split(",")
    if bad := [name for name in labels if not folded(name) or list(map(folded, labels)).count(folded(name)) > 1]:
        raise DataError(f"--labels {given}: " + (f"{bad[0]!r} is there twice (spaces and case aside)"
                                                 if bad[0].strip() else "an empty class name (a comma too many?)"))
    return tuple(labels)


DEMO_DIALOGUES = {"pretrain": 200, "train": 20, "dev": 52, "test": 52}  # pretrain: unlabelled


def read_demo(args, folder, problems):
    """The embedded demo (nanotcmp/demo.py): its dialogues, its vocabulary written into folder, and one
    test dialogue in the generic format, clips beside it, for sample.py"""
    rng = np.random.default_rng(args.seed)
    generated = {split: generate_dialogues(n, rng) for split, n in DEMO_DIALOGUES.items()}
    splits = {}
    for split, dialogues in generated.items():
        # each clip from its own seed, so the clips can be synthesised in any order, in parallel
        splits[split] = [[Utt(f"{split}-{i}", u["speaker"], u["text"],
                              partial(synthesize_clip, u["prosody"], u["timbre"], int(seed)),
                              u["label"] if split != "pretrain" else None, f"demo {split} dialogue {i} turn {j}")
                          for j, (u, seed) in enumerate(zip(dialogue, rng.integers(2**63, size=len(dialogue))))]
                         for i, dialogue in enumerate(dialogues)]
    vocab = os.path.join(folder, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(demo_vocab(generated.values())) + "\n")
    os.makedirs(os.path.join(folder, "clips"))
    lines = []
    for j, u in enumerate(splits["test"][0]):
        clip = f"clips/{u.dialogue}_{j}.wav"
        save_wav(os.path.join(folder, clip), u.audio())
        lines.append(json.dumps({"dialogue": u.dialogue, "speaker": u.speaker, "text": u.text, "audio": clip,
                                 "label": u.label}))
    with open(os.path.join(folder, "example_dialogue.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return Corpus(splits, DEMO_LABELS, vocab)


READERS = {"demo": read_demo, "meld": read_meld, "iemocap": read_iemocap, "dialogues": read_dialogues}

# -----------------------------------------------------------------------------
# the packer: any Corpus -> the dataset's split files, and meta.json's content

def decode(u, max_seconds):
    """-> (int16 samples, cut to max_seconds?) of one utterance, or (an error message, False)"""
    try:
        if callable(u.audio):  # the demo's synthesiser
            wave = u.audio()
            n = int(max_seconds * SAMPLE_RATE) if max_seconds else len(wave)
            wave, cut = wave[:n], len(wave) > n
        else:
            wave, cut = load_audio(u.audio, max_seconds)
    except AudioError as e:
        return f"{u.where}: {e}", False
    if len(wave) < MIN_SAMPLES:
        return (f"{u.where}: audio has {len(wave)} samples, fewer than the {MIN_SAMPLES} (25 ms) "
                f"an utterance needs"), False
    return wave, cut


def spans(rows, dtype):
    """Concatenate variable-length arrays, one per utterance -> (data, (start, length) of each)"""
    lengths = np.array([len(r) for r in rows], np.int64)
    data = np.concatenate(rows).astype(dtype) if rows else np.zeros(0, dtype)
    return data, np.stack([np.cumsum(lengths) - lengths, lengths], axis=1).reshape(len(rows), 2)


def pack_split(name, dialogues, label_index, tok, with_audio, args, problems, decoders):
    """-> (arrays, metadata, clips cut, dialogues, utterances dropped) of split name; bad utterances
    go through problems; decoders (a worker pool) decode the audio"""
    problems.split = name
    flat = [(d, u) for d, utts in enumerate(dialogues) for u in utts]
    no_audio = (np.zeros(0, np.int16), False)
    waves = (list(decoders.map(decode, [u for _, u in flat], [args.max_seconds] * len(flat), chunksize=16))
             if with_audio else [no_audio] * len(flat))
    kept, cut = [], 0
    for (d, u), (wave, was_cut) in zip(flat, waves):
        if isinstance(wave, str):
            problems(wave)
        elif u.label is not None and u.label not in label_index:
            problems(f"{u.where}: unknown label {u.label!r} (known: {', '.join(label_index)})")
        else:
            kept.append((d, u, wave))
            cut += was_cut
    names = sorted({d for d, _, _ in kept})
    d_index, speakers = {d: i for i, d in enumerate(names)}, {}
    arrays = {
        "utt_dialogue": np.array([d_index[d] for d, _, _ in kept], np.int32),
        "utt_speaker": np.array([speakers.setdefault(u.speaker, len(speakers)) for _, u, _ in kept], np.int32),
        "utt_label": np.array([-1 if u.label is None else label_index[u.label] for _, u, _ in kept], np.int32)}
    for key, rows, dtype in (
            ("tokens", [tok.encode(u.text, args.max_tokens) for _, u, _ in kept], np.int32),
            ("audio", [w for _, _, w in kept], np.int16),
            ("text", [np.frombuffer(u.text.encode("utf-8"), np.uint8) for _, u, _ in kept], np.uint8)):
        arrays[key], arrays[f"utt_{key}"] = spans(rows, dtype)
    samples = []  # dialogue by dialogue, after the bad utterances are gone
    for s, e in dialogue_ranges(arrays["utt_dialogue"]):
        samples += [(s + a, s + t, y) for a, t, y in make_samples(
            arrays["utt_speaker"][s:e].tolist(), arrays["utt_label"][s:e].tolist(), args.max_context)]
    arrays["samples"] = np.array(samples, np.int64).reshape(len(samples), 3)
    # one metadata key: safetensors writes several in no fixed order, and reruns must give identical files
    named = {"dialogues": [dialogues[d][0].dialogue for d in names], "speakers": list(speakers)}
    return arrays, {"names": json.dumps(named)}, cut, len(names), problems.count(name)


def pack(corpus, folder, args, problems):
    """Tokenise, decode and write every split of corpus into folder -> meta.json's content"""
    try:
        tok = WordPiece.from_file(corpus.vocab)
    except OSError as e:  # missing, a folder...
        raise DataError(f"--vocab: {cannot_read(e)}") from None
    except ValueError as e:  # not UTF-8, a token twice, no [CLS]...
        raise DataError(f"--vocab: {e}") from None
    # label name -> class index, or -1 for a label that is never a target
    label_index = {name: i for i, name in enumerate(corpus.labels)}
    label_index |= {name: corpus.labels.index(c) if c else -1 for name, c in corpus.aliases.items()}
    text_only = all(u.audio is None for dialogues in corpus.splits.values() for d in dialogues for u in d)
    with worker_pool(args.workers if not text_only else 1) as decoders:
        packed = {split: pack_split(split, dialogues, label_index, tok, not text_only, args, problems, decoders)
                  for split, dialogues in corpus.splits.items()}
    check_packed(packed, corpus.labels)
    splits = {}
    for split, (arrays, metadata, cut, names, dropped) in packed.items():
        path = os.path.join(folder, f"{split}.safetensors")
        write_split(path, arrays, metadata)
        u, samples = len(arrays["utt_label"]), arrays["samples"]
        words = sum(len(bytes(arrays["text"][a:a + n]).split()) for a, n in arrays["utt_text"])
        splits[split] = {
            "utterances": u, "dialogues": names, "samples": len(samples),
            "labelled": bool((arrays["utt_label"] >= 0).any()),
            "class_counts": {name: int((samples[:, 2] == i).sum()) for i, name in enumerate(corpus.labels)},
            "avg_context": round(float((samples[:, 1] - samples[:, 0]).mean()), 3) if len(samples) else 0.0,
            "avg_words": round(words / max(u, 1), 3),
            "audio_seconds": round(len(arrays["audio"]) / SAMPLE_RATE, 1),
            "audio_cut": cut, "dropped": dropped,
            "sha256": file_sha256(path)}  # so meta.json's own sha256 tells one dataset from another
    vocab_rel = os.path.relpath(corpus.vocab, folder)
    return {"labels": list(corpus.labels), "modalities": ["text"] if text_only else ["text", "audio"],
            "sample_rate": SAMPLE_RATE,
            # a vocabulary inside the dataset folder is stored relative to it, so the folder can move
            "vocab": {"path": os.path.abspath(corpus.vocab) if vocab_rel.startswith("..") else vocab_rel,
                      "sha256": file_sha256(corpus.vocab)},
            "settings": {k: getattr(args, k) for k in ("max_tokens", "max_context", "max_seconds")},
            "splits": splits}


def write_split(path, arrays, metadata):
    try:
        save_file(arrays, path, metadata=metadata)
    except SafetensorError as e:  # an I/O error ("No space left on device (os error 28)") is an OSError
        if not (code := re.search(r"\(os error (\d+)\)", str(e))):
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), path) from None
    open_mode(path)


def check_packed(packed, labels):
    """Refuse, before anything is written, a dataset nothing can be trained on: no utterances at
    all, or a labelled split without one sample"""
    if not any(len(arrays["utt_label"]) for arrays, *_ in packed.values()):
        raise DataError("no utterances to write (every input is empty, or --skip-bad dropped them all)")
    for split, (arrays, *_) in packed.items():
        if labels and (arrays["utt_label"] >= 0).any() and not len(arrays["samples"]):
            raise DataError(f"split {split} has labels but no sample: a sample needs a labelled utterance whose "
                            f"speaker also spoke two turns before it")


# -----------------------------------------------------------------------------
# the command

LEFTOVER_FILES = re.compile(r".*\.safetensors|\.tmp\w*|meta\.json|vocab\.txt|example_dialogue\.jsonl|clips")


VOCAB = ("the vocab.txt of the text encoder that train.py's --text-encoder will load (e.g. "
         "weights/bert-base-uncased/vocab.txt; the demo's: data/demo/vocab.txt)")


def parse_args(argv):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--max-tokens", type=ranged(int, 3), default=60,
                        help="word pieces an utterance, [CLS] and [SEP] included (3 or more)")
    common.add_argument("--max-context", type=ranged(int, 2), default=11,
                        help="utterances of context a sample (2 or more: the nearby context)")
    common.add_argument("--max-seconds", type=ranged(float, MIN_SAMPLES / SAMPLE_RATE), default=15.0,
                        help="longer audio is cut (and counted); at least 0.025, HuBERT's receptive field")
    common.add_argument("--skip-bad", action="store_true", help="drop bad utterances (counted) instead of stopping")
    common.add_argument("--workers", type=ranged(int, 1), default=os.cpu_count(), help="processes decoding audio")
    text = argparse.ArgumentParser(add_help=False)  # the corpora of real text
    text.add_argument("--vocab", type=given_path, help=VOCAB)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", parents=[common], help="the embedded synthetic demo")
    p.add_argument("--out", type=given_path, default="data/demo")
    p.add_argument("--seed", type=SEED, default=0)
    p = sub.add_parser("meld", parents=[common, text], help="P-MELD (or, with --unlabelled, a pre-training corpus)")
    p.add_argument("--csv-dir", type=given_path, default=MELD_DIR,
                   help="folder of {train,dev,test}_sent_emo.csv (default: the transcripts this repository carries, "
                        "meld/)")
    p.add_argument("--media-dir", type=given_path, help="folder of train_splits/, dev_splits_complete/, "
                                       "output_repeated_splits_test/; without it the dataset is text-only")
    p.add_argument("--unlabelled", action="store_true", help="drop the labels: a pre-training corpus")
    p.add_argument("--out", type=given_path)
    p = sub.add_parser("iemocap", parents=[common, text], help="P-IEM")
    p.add_argument("--root", type=given_path, required=True, help="the IEMOCAP_full_release folder")
    p.add_argument("--text-only", action="store_true")
    p.add_argument("--out", type=given_path, default="data/p-iem")
    p = sub.add_parser("dialogues", parents=[common, text], help="dialogues in nanotcmp's JSONL format")
    p.add_argument("--from", dest="src", type=given_path, required=True,
                   help="a .jsonl file, or a folder of them (one split each)")
    p.add_argument("--labels", help="comma-separated class names, in order (default: the labels found, sorted)")
    p.add_argument("--out", type=given_path, required=True)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["demo"] + list(argv)  # the demo is the default command
    args = parser.parse_args(argv)
    if args.command != "demo" and args.vocab is None:
        parser.error(f"{args.command} needs --vocab: {VOCAB}")
    if args.command == "meld" and args.out is None:
        args.out = "data/meld-unlabelled" if args.unlabelled else "data/p-meld"
    return args


def check_out(args, out):
    """--out (out: its real path) is replaced as a whole: refuse a folder that is not a dataset of
    ours, or that holds the inputs or the vocabulary (they would be deleted with it)"""
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"--out {args.out} exists and is not a folder")
    if blocker := file_in_the_way(out):  # a folder above it is a file
        raise DataError(f"--out {args.out}: {blocker} is a file, not a folder; choose another --out")
    if os.path.isdir(out) and os.listdir(out) and not is_dataset(out):
        raise DataError(f"--out {args.out} exists and is not a dataset made by prepare.py (no meta.json of one): "
                        f"it would be replaced; choose another folder, or empty it yourself")
    for option in ("src", "csv_dir", "media_dir", "root", "vocab"):
        path = getattr(args, option, None)
        if path and (os.path.realpath(path) + os.sep).startswith(out + os.sep):
            name = "--from" if option == "src" else "--" + option.replace("_", "-")
            raise DataError(f"--out {args.out} holds {name} {path}, which replacing it would delete")


def check_folders(args):
    """The options that name a folder: each one is"""
    for option in ("csv_dir", "media_dir", "root"):
        path = getattr(args, option, None)
        if path is not None and not os.path.isdir(path):
            raise DataError(f"--{option.replace('_', '-')} {path} "
                            f"{'is a file, not a folder' if os.path.exists(path) else 'not found'}")


def print_stats(meta):
    labels = meta["labels"]
    print(f"{'split':<10}{'dialogues':>10}{'utts':>8}{'samples':>9}{'ctx len':>9}{'words/utt':>10}"
          + "".join(f"{name[:9]:>10}" for name in labels) + f"{'cut':>6}{'dropped':>9}")
    for name, s in meta["splits"].items():
        print(f"{name:<10}{s['dialogues']:>10}{s['utterances']:>8}{s['samples']:>9}{s['avg_context']:>9.2f}"
              f"{s['avg_words']:>10.2f}" + "".join(f"{s['class_counts'][c]:>10}" for c in labels)
              + f"{s['audio_cut']:>6}{s['dropped']:>9}")


def main(argv):
    args = parse_args(argv)
    t0, problems = time.time(), Problems(args.skip_bad)
    out = os.path.realpath(args.out)  # data/x/, ./x, x/. name one folder; a link, the folder it points to
    kept = (f"the dataset already at {args.out} is untouched, " if is_dataset(out) else "") + \
        "nothing half-written is left"
    with one_line_errors("prepare.py", lambda: f"interrupted; {kept}", (AudioError, NoFFmpeg)):
        try:
            check_out(args, out)
            check_folders(args)
            remove_staged(out, LEFTOVER_FILES, "prepare.py")  # what runs killed outright left beside out
            with staging(out) as folder:  # built aside, then swapped in whole
                meta = pack(READERS[args.command](args, folder, problems), folder, args, problems)
                meta["source"] = args.command + (" (unlabelled)" if getattr(args, "unlabelled", False) else "")
                with open(os.path.join(folder, "meta.json"), "w") as f:
                    f.write(json.dumps(meta, indent=1) + "\n")
        except OSError as e:  # a full disk, a read-only one, an input that cannot be read...
            raise DataError(f"{cannot_write(staged_path(e.filename, out, args.out), e)} ({kept})"
                            if writes_out(e, out) else cannot_read(e)) from None
        except BrokenProcessPool:
            raise DataError(f"a process decoding audio died (out of memory?): try fewer --workers ({kept})") from None
        print_stats(meta)
        if problems.dropped:
            print(f"--skip-bad dropped {len(problems.dropped)} utterances, e.g.:")
            print("\n".join("  " + m for _, m in problems.dropped[:10]))
        link = os.path.islink(os.path.normpath(args.out))
        print(f"wrote {args.out}{f' (a link: the dataset is in {out})' if link else ''} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
