"""
Real-time emotion pre-recognition: after every turn of a conversation, how will the target
speaker (the speaker of the turn before last) feel when they next speak?

python sample.py                               # the demo's example dialogue, the demo's fine-tuned model
python sample.py DIALOGUE.jsonl --ckpt DIR     # one dialogue in the generic JSONL format
python sample.py - --ckpt DIR [--keep-going]   # turns on standard input, each answered as soon as it is read
python sample.py --ckpt DIR --score DATA       # the model's scores on a prepared dataset's dev and test splits

A turn is one JSON line: {"speaker": "Ross", "text": "Hi.", "audio": "clips/d1_0.wav"}, the audio
path relative to the file (to the working directory on standard input), needed only by a model
that uses audio, and cut at the run's max_seconds as prepare.py cut the clips it learnt from (a
note on standard error says so). Each utterance is encoded once; a turn costs its own encoding
plus the GRUs and the attention over the cached vectors of at most max_context utterances (the
"answered in" time). A turn whose words are mostly unknown to the model's vocabulary gets a note.
"""
import argparse
import contextlib
import glob
import json
import os
import sys
import time

from nanotcmp import settings
from nanotcmp.audio import MIN_SAMPLES, SAMPLE_RATE, AudioError, NoFFmpeg, load_audio
from nanotcmp.checkpoint import load_model
from nanotcmp.data import line_problem, load_meta, positions
from nanotcmp.evaluate import score_run
from nanotcmp.features import attach_features
from nanotcmp.files import DataError, given_path, one_line_errors
from nanotcmp.processes import device_from
from nanotcmp.stream import Stream
from nanotcmp.tokenizer import WordPiece
from nanotcmp.training import class_weights, open_splits


ENGLISH = "checkpoints/p-meld-minilm"  # the model that knows English, shipped with the repository


class BadTurn(DataError):
    """A turn that cannot be read: with --keep-going on standard input, skipped"""


def load_checkpoint(folder, device):
    """-> (model, tokenizer, checkpoint config) of a fine-tuning run made by train.py"""
    if os.path.isfile(folder):
        raise DataError(f"--ckpt {folder} is a file; give a run's folder (config.json, model.safetensors)")
    if not os.path.isdir(folder):
        runs = ", ".join(runs_near(folder)) or "none"
        raise DataError(f"no run at {folder} (fine-tuned runs near it: {runs}); the demo's is made by "
                        f"python prepare.py && python train.py")
    model, config = load_model(folder, "finetune")
    if config["stage"] != "finetune":
        raise DataError(f"{folder} is a {config['stage']} run; give a fine-tuning run (--ckpt)")
    labels = config["labels"]  # a list (load_run)
    if len(labels) != model.config.n_labels or not all(isinstance(name, str) for name in labels):
        raise DataError(f"{os.path.join(folder, 'config.json')}: labels must be a list of "
                        f"{model.config.n_labels} names, not {json.dumps(labels)}")
    longest = positions(model.bert.config.max_positions) if model.text else float("inf")
    for key, low, high in (("max_tokens", 3, longest), ("max_context", 2, float("inf"))):  # prepare.py's ranges
        if not low <= config[key] <= high:
            raise DataError(f"{os.path.join(folder, 'config.json')}: {key} {config[key]} is outside [{low}, {high}] "
                            f"(prepare.py's, and the run's text encoder's); put back the run's own config.json")
    tok = WordPiece.from_file(config["vocab"]["path"])
    return model.to(device), tok, config


def runs_near(folder):
    """The fine-tuning runs in the nearest folder above folder that exists, one or two levels down"""
    near = os.path.dirname(os.path.normpath(folder))
    while near and not os.path.isdir(near):
        near = os.path.dirname(near)
    runs = []
    for path in sorted(glob.glob(os.path.join(near, "*", "config.json")) +
                       glob.glob(os.path.join(near, "*", "*", "config.json"))):
        try:
            with open(path) as f:
                if json.load(f).get("stage") == "finetune":
                    runs.append(os.path.dirname(path))
        except (OSError, ValueError, AttributeError):  # not a run's config.json
            continue
    return runs


def audio_cut(config, folder):
    """The seconds of audio a turn keeps: the run's max_seconds, the cut prepare.py made of the clips
    it learnt from"""
    seconds = config["max_seconds"]  # a number (load_run)
    if not seconds >= MIN_SAMPLES / SAMPLE_RATE:
        raise DataError(f"{os.path.join(folder, 'config.json')}: max_seconds must be at least "
                        f"{MIN_SAMPLES / SAMPLE_RATE} seconds, not {seconds}")
    return seconds


def parse_turn(line, where, base, max_seconds, dialogue):
    """A JSON line (bytes, or text) -> (speaker, text, int16 samples or None, whether they were cut,
    its dialogue id or None); max_seconds: where the audio is cut, None for a model without audio;
    dialogue: the id the conversation's first turn gave, if any"""
    try:
        turn = json.loads(line.decode("utf-8") if isinstance(line, bytes) else line)
    except UnicodeDecodeError as e:
        raise BadTurn(f"{where}: text is not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise BadTurn(f"{where}: not valid JSON ({e.msg})") from None
    if bad := line_problem(turn, ("speaker", "text"), ("dialogue", "audio", "label")):
        raise BadTurn(f"{where}: {bad}")
    if dialogue is not None and turn.get("dialogue", dialogue) != dialogue:
        raise BadTurn(f"{where}: dialogue {turn['dialogue']!r}, while this conversation is {dialogue!r}")
    wave, cut = None, False
    if max_seconds is not None:
        if not turn.get("audio"):
            raise BadTurn(f"{where}: this turn has no audio, and the model uses audio: give each turn an \"audio\" "
                          f"file, or answer text with a text-only run (--ckpt {ENGLISH}: English, no training)")
        path = os.path.join(base, turn["audio"])
        if os.path.isdir(path):
            raise BadTurn(f"{where}: {path} is a folder, not an audio file")
        try:
            wave, cut = load_audio(path, max_seconds)  # cut as prepare.py cuts: the same samples kept
        except AudioError as e:
            raise BadTurn(f"{where}: {e}") from None
        if len(wave) < MIN_SAMPLES:
            raise BadTurn(f"{where}: audio of {len(wave)} samples, fewer than {MIN_SAMPLES} (25 ms)")
    return turn["speaker"], turn["text"], wave, cut, turn.get("dialogue")


def report(turn, speaker, text, target, probs, labels, ms, as_json):
    if as_json:
        if probs is not None:
            print(json.dumps({"turn": turn, "target_speaker": target, "ms": round(ms, 2),
                              "probs": {name: round(float(p), 6) for name, p in zip(labels, probs)}}))
        return
    print(f"turn {turn} | {speaker}: {text}")
    if probs is not None:
        width = max(len(name) for name in labels)
        for i, (name, p) in enumerate(zip(labels, probs)):
            lead = f"  {target} next:" if i == 0 else ""
            print(f"{lead:<{len(target) + 9}} {name:<{width}} {p:5.2f} {'█' * round(float(p) * 30)}")
        print(f"  (answered in {ms:.0f} ms)")


def open_turns(dialogue):
    """-> (the lines of the turns, as bytes where it can, the folder audio paths are relative to, the
    name that errors give)"""
    if dialogue == "-":
        if sys.stdin is None:  # started with standard input closed (sample.py - <&-)
            raise DataError("standard input is closed; give the turns on it, or a file")
        return getattr(sys.stdin, "buffer", sys.stdin), os.getcwd(), "stdin"
    if os.path.isdir(dialogue):
        raise DataError(f"{dialogue} is a folder; give a JSONL file of turns, or - for standard input")
    if not os.path.isfile(dialogue):
        raise DataError(f"{dialogue} not found")
    try:
        return open(dialogue, "rb"), os.path.dirname(dialogue), dialogue
    except OSError as e:
        raise DataError(f"cannot read {dialogue} ({e.strerror})") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dialogue", nargs="?", type=given_path, default="data/demo/example_dialogue.jsonl",
                   help="a JSONL dialogue, or - for standard input")
    p.add_argument("--ckpt", type=given_path, default="out/demo-finetune", help="a fine-tuning run's folder")
    p.add_argument("--json", action="store_true", help="one JSON object a line instead of the bar charts")
    p.add_argument("--keep-going", action="store_true", help="on standard input: report a bad turn, then go on")
    p.add_argument("--score", type=given_path, metavar="DATA", help="instead of answering a dialogue, score the "
                   "model on the dev and test splits of DATA, a dataset prepare.py made with the run's vocabulary and "
                   "labels: WA, AA, macro-F1, weighted-F1, each class's precision, recall and F1 and the confusion "
                   "matrices, beside the references (with --json: as one JSON object, the tables on standard error)")
    p.add_argument("--device", default="auto", help="auto (cuda when there is one) | cpu | cuda")
    args = p.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # what the terminal cannot show is written \x.. escaped, not a crash
        sys.stdout.reconfigure(errors="backslashreplace")
    if args.score:
        with one_line_errors("sample.py", lambda: "interrupted"):
            return score(args)
    answered = []  # the speaker of each turn answered
    with one_line_errors("sample.py", lambda: f"interrupted; the turns answered so far ({len(answered)}) were "
                                              f"printed", (NoFFmpeg,)):  # (the machine's problem, not the turn's)
        converse(args, answered)


def score(args):
    """--score: the model's dev and test scores on a prepared dataset, beside the references"""
    device = device_from(args.device, "sample.py")
    model, _, config = load_checkpoint(args.ckpt, device)
    meta = load_meta(args.score)
    if meta["vocab"]["sha256"] != config["vocab"]["sha256"]:
        raise DataError(f"{args.score} is prepared with another vocabulary than {args.ckpt} learnt with "
                        f"({config['vocab']['path']}): their ids differ; prepare it with that one")
    if meta["labels"] != config["labels"]:
        raise DataError(f"{args.score} has the labels {', '.join(meta['labels'])}, {args.ckpt} answers "
                        f"{', '.join(config['labels'])}: score it on a dataset of its own labels")
    s = settings.for_scoring(args.score, model.config.modalities, device)
    train, _, dev, test = open_splits(s, meta)
    model.class_weights.copy_(class_weights(train, model.config.n_labels))  # (the linear reference's)
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        if model.frozen:  # the cached features the run learnt from (computed now if not there)
            attach_features(model, args.score, (train, dev, test), device)
        print(f"{args.ckpt} on {args.score}:")
        report = score_run(model, s, (train, dev, test), config["labels"], device)
    if args.json:
        print(json.dumps(report))
    return report


def converse(args, speakers):
    """Answer each turn of args.dialogue as it is read; speakers: the speaker of each turn answered"""
    device = device_from(args.device, "sample.py")
    model, tok, config = load_checkpoint(args.ckpt, device)
    max_seconds = audio_cut(config, args.ckpt) if model.audio else None
    stream = Stream(model, tok, config["max_tokens"], config["max_context"], device)
    lines, base, name = open_turns(args.dialogue)
    if not args.json:
        print(f"{args.ckpt} ({' and '.join(model.config.modalities)}) on {name}: after each turn N, the chances of "
              f"each emotion\nin the next utterance of the speaker of turn N-1 (so from turn 2 on), and the time to "
              f"answer\n")
    dialogue = None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        t0 = time.perf_counter()
        try:
            speaker, text, wave, cut, this_dialogue = parse_turn(line, f"{name}:{i}", base, max_seconds, dialogue)
        except BadTurn as e:
            if not (args.dialogue == "-" and args.keep_going):
                raise
            print(f"sample.py: {e} (skipped)", file=sys.stderr, flush=True)
            continue
        if cut:
            print(f"sample.py: {name}:{i}: audio longer than {max_seconds:g} s, cut to its first {max_seconds:g} s "
                  f"(the run's max_seconds, as prepare.py cut the clips it learnt from)", file=sys.stderr, flush=True)
        words, unknown = tok.unknown_words(text) if model.text else ([], [])
        if 2 * len(unknown) > len(words):
            print(f"sample.py: {name}:{i}: {len(unknown)} of {len(words)} words are not in the model's vocabulary "
                  f"({tok.vocab_size} word pieces), {', '.join(unknown[:4])}{', ...' * (len(unknown) > 4)}: to it "
                  f"each is [UNK], and its answer means little; a model that knows English: --ckpt {ENGLISH}",
                  file=sys.stderr, flush=True)
        dialogue = dialogue or this_dialogue
        probs = stream.add(text, wave)
        target = speakers[-1] if speakers else None  # the source: the speaker of turn N-1
        report(len(speakers) + 1, speaker, text, target, probs, config["labels"],
               (time.perf_counter() - t0) * 1000, args.json)
        sys.stdout.flush()
        speakers.append(speaker)
    if not speakers and args.dialogue != "-":
        raise DataError(f"{name} has no turns")


if __name__ == "__main__":
    main()
