"""
Real-time emotion pre-recognition: after every turn of a conversation, how will the target
speaker (the speaker of the turn before last) feel when they next speak?

python sample.py                               # the demo's example dialogue, the demo's fine-tuned model
python sample.py DIALOGUE.jsonl --ckpt DIR     # one dialogue in the generic JSONL format
python sample.py - --ckpt DIR [--keep-going]   # turns on standard input, each answered as soon as it is read
python sample.py --ckpt DIR --score DATA       # the model's scores on a prepared dataset's dev and test splits
python sample.py --explain --svg dialogue.svg  # also Eq. 10's attention on the distant turns, and a picture
python sample.py --ckpt PRETRAIN_RUN --expect data/demo/dev.safetensors   # what pre-training expects next

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
from types import SimpleNamespace
from xml.sax.saxutils import escape

import torch

from nanotcmp import settings
from nanotcmp.audio import MIN_SAMPLES, SAMPLE_RATE, AudioError, NoFFmpeg, load_audio
from nanotcmp.checkpoint import load_model
from nanotcmp.data import Split, line_problem, load_meta, positions
from nanotcmp.evaluate import TUS_NAMES, score_run
from nanotcmp.features import attach_features
from nanotcmp.files import DataError, given_path, one_line_errors, write_text
from nanotcmp.processes import device_from
from nanotcmp.stream import Stream
from nanotcmp.tokenizer import WordPiece
from nanotcmp.training import class_weights, open_splits


ENGLISH = "checkpoints/p-meld-minilm"  # the model that knows English, shipped with the repository
STAGE_RUNS = {"finetune": "fine-tuning", "pretrain": "pre-training"}


class BadTurn(DataError):
    """A turn that cannot be read: with --keep-going on standard input, skipped"""


def load_checkpoint(folder, device, stage="finetune"):
    """-> (model, tokenizer, checkpoint config) of a run of train.py's stage"""
    if os.path.isfile(folder):
        raise DataError(f"--ckpt {folder} is a file; give a run's folder (config.json, model.safetensors)")
    if not os.path.isdir(folder):
        runs = ", ".join(runs_near(folder, stage)) or "none"
        raise DataError(f"no run at {folder} ({STAGE_RUNS[stage]} runs near it: {runs}); the demo's is made by "
                        f"python prepare.py && python train.py")
    model, config = load_model(folder, stage)
    if config["stage"] != stage:
        raise DataError(f"{folder} is a {config['stage']} run; " + ("give a fine-tuning run (--ckpt), or a pre-"
                        "training run with --expect" if stage == "finetune" else "--expect takes a pre-training run"))
    labels = config["labels"]  # a list (load_run)
    if stage == "finetune" and (len(labels) != model.config.n_labels or not all(isinstance(l, str) for l in labels)):
        raise DataError(f"{os.path.join(folder, 'config.json')}: labels must be a list of "
                        f"{model.config.n_labels} names, not {json.dumps(labels)}")
    longest = positions(model.bert.config.max_positions) if model.text else float("inf")
    for key, low, high in (("max_tokens", 3, longest), ("max_context", 2, float("inf"))):  # prepare.py's ranges
        if not low <= config[key] <= high:
            raise DataError(f"{os.path.join(folder, 'config.json')}: {key} {config[key]} is outside [{low}, {high}] "
                            f"(prepare.py's, and the run's text encoder's); put back the run's own config.json")
    tok = WordPiece.from_file(config["vocab"]["path"])
    return model.to(device), tok, config


def runs_near(folder, stage):
    """The runs of the stage in the nearest folder above folder that exists, one or two levels down"""
    near = os.path.dirname(os.path.normpath(folder))
    while near and not os.path.isdir(near):
        near = os.path.dirname(near)
    runs = []
    for path in sorted(glob.glob(os.path.join(near, "*", "config.json")) +
                       glob.glob(os.path.join(near, "*", "*", "config.json"))):
        try:
            with open(path) as f:
                if json.load(f).get("stage") == stage:
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


def first_words(text, n=5):
    words = text.split()
    return " ".join(words[:n]) + (" ..." if len(words) > n else "")


def report(said, answer, labels, pool, as_json):
    """Print the last turn of said [(speaker, text)] and answer: its turn, target speaker, time and,
    where they were asked for, the next emotion's chances, the attention, the expected utterances"""
    if as_json:
        if len(answer) > 2:  # more than the turn and the time: from turn 2 on
            print(json.dumps(answer))
        return
    n, (speaker, text) = answer["turn"], said[-1]
    print(f"turn {n} | {speaker}: {text}")
    if "rank" in answer:
        print(f"  before it was said, pre-training ranked it {answer['rank']} of {len(pool.texts) + 1} "
              f"(the pool and it)")
    lead, width = f"  {answer.get('target_speaker')} next:", max(map(len, labels), default=0)
    for i, (name, p) in enumerate(answer.get("probs", {}).items()):
        print(f"{lead if i == 0 else '':<{len(lead) + 1}} {name:<{width}} {p:5.2f} {'█' * round(p * 30)}")
    if "expected" in answer:
        print(f"  next, as pre-training expects it, the best of {len(pool.texts)} by {TUS_NAMES[pool.stream]}:")
        for u, score in answer["expected"][TUS_NAMES[pool.stream]][:3]:
            print(f"    {score:6.2f}  {pool.texts[u]}")
    if "attention" in answer:  # the turns among each stream's 3 largest weights
        weights = {beta: dict(pairs) for beta, pairs in answer["attention"].items()}  # β -> {turn: weight}
        print(f"  Eq. 10's attention on the distant turns (nearby: turns {n - 1}, {n}):")
        for t in sorted({t for w in weights.values() for t in sorted(w, key=w.get)[-3:]}):
            print(f"    turn {t:<3} {said[t - 1][0] + ': ' + first_words(said[t - 1][1]):<40.40} "
                  + "  ".join(f"{beta} {w[t]:.2f}" for beta, w in weights.items()))
    if len(answer) > 2:
        print(f"  (answered in {answer['ms']:.0f} ms)")


def xml_text(text):
    return escape("".join(c for c in text if c >= " "))  # control characters are not allowed in XML


def svg(said, answers, labels):
    """The dialogue as an SVG picture: each emotion's chance after each turn, one point a turn; below,
    with --explain, each answer's attention (Eq. 10, the fused stream where there is one) on the turns"""
    n, step, colours = len(said), 56, ("#c0392b", "#7f8c8d", "#27ae60", "#2980b9", "#8e44ad", "#d35400", "#16a085")
    x = lambda turn: 70 + step * (turn - 1)
    y = lambda p: round(30 + 160 * (1 - p), 1)
    rows = [a for a in answers if "attention" in a]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{x(n) + 120}" height="{250 + 16 * len(rows)}" '
           f'font-family="sans-serif" font-size="11">', '<text x="10" y="14">the next emotion\'s chances after '
           'each turn</text>', f'<line x1="50" y1="{y(0)}" x2="{x(n) + 10}" y2="{y(0)}" stroke="black"/>',
           f'<text x="36" y="{y(1)}">1</text><text x="36" y="{y(0)}">0</text>']
    for turn, (speaker, _) in enumerate(said, 1):
        out.append(f'<text x="{x(turn)}" y="{y(0) + 16}" text-anchor="middle">{turn} {xml_text(speaker[:8])}</text>')
    for k, (label, colour) in enumerate(zip(labels, colours * len(labels))):
        points = [(x(a["turn"]), y(a["probs"][label])) for a in answers if "probs" in a]
        out.append(f'<polyline fill="none" stroke="{colour}" points="{" ".join(f"{px},{py}" for px, py in points)}"/>')
        out += [f'<circle cx="{px}" cy="{py}" r="3" fill="{colour}"/>' for px, py in points]
        out.append(f'<text x="{x(n) + 20}" y="{y(1) + 14 * k}" fill="{colour}">{xml_text(label)}</text>')
    for r, a in enumerate(rows):
        beta, weights = list(a["attention"].items())[-1]
        if r == 0:
            out.append(f'<text x="10" y="230">Eq. 10\'s attention ({beta}) on the distant turns, after turn:</text>')
        out.append(f'<text x="10" y="{249 + 16 * r}">{a["turn"]}</text>')
        out += [f'<rect x="{x(t) - step / 2}" y="{238 + 16 * r}" width="{step - 2}" height="14" fill="#2c3e50" '
                f'fill-opacity="{w:.3f}"/>' for t, w in weights]
    return "\n".join(out + ["</svg>", ""])


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
    p.add_argument("--ckpt", type=given_path, default="out/demo-finetune",
                   help="a fine-tuning run's folder (with --expect, a pre-training run's)")
    p.add_argument("--json", action="store_true", help="one JSON object a line instead of the bar charts")
    p.add_argument("--keep-going", action="store_true", help="on standard input: report a bad turn, then go on")
    p.add_argument("--score", type=given_path, metavar="DATA", help="instead of answering a dialogue, score the "
                   "model on the dev and test splits of DATA, a dataset prepare.py made with the run's vocabulary and "
                   "labels: WA, AA, macro-F1, weighted-F1, each class's precision, recall and F1 and the confusion "
                   "matrices, beside the references (with --json: as one JSON object, the tables on standard error)")
    p.add_argument("--explain", action="store_true", help="after each answer, the weights of Eq. 10's attention "
                   "over the distant turns, for each stream (t, a, m)")
    p.add_argument("--expect", type=given_path, metavar="POOL", help="with a pre-training run as --ckpt: after each "
                   "turn, the utterances of POOL (a prepared split, such as data/demo/dev.safetensors) it scores "
                   "highest as the next one (Eq. 11-13), and where it ranked each turn before it was said")
    p.add_argument("--svg", type=given_path, metavar="FILE", help="also draw the dialogue into FILE, an SVG picture: "
                   "the chances after each turn, and with --explain the attention")
    p.add_argument("--device", default="auto", help="auto (cuda when there is one) | cpu | cuda")
    args = p.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # what the terminal cannot show is written \x.. escaped, not a crash
        sys.stdout.reconfigure(errors="backslashreplace")
    if args.score:
        with one_line_errors("sample.py", lambda: "interrupted"):
            return score(args)
    said = []  # (speaker, text) of each turn read
    with one_line_errors("sample.py", lambda: f"interrupted; the turns answered so far ({len(said)}) were "
                                              f"printed", (NoFFmpeg,)):  # (the machine's problem, not the turn's)
        converse(args, said)


def score(args):
    """--score: the model's dev and test scores on a prepared dataset, beside the references"""
    device = device_from(args.device, "sample.py")
    model, _, config = load_checkpoint(args.ckpt, device)
    meta = load_meta(args.score)
    check_vocabulary(args.score, meta, args.ckpt, config)
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


def check_vocabulary(data, meta, ckpt, config):
    """A dataset's word-piece ids are the run's words only if prepare.py made it with the run's vocabulary"""
    if meta["vocab"]["sha256"] != config["vocab"]["sha256"]:
        raise DataError(f"{data} is prepared with another vocabulary than {ckpt} learnt with "
                        f"({config['vocab']['path']}): their ids differ; prepare it with that one")


def load_pool(path, stream, ckpt, config):
    """--expect: the utterances of a prepared split, each encoded once -> the pool: their texts, their
    vectors {β: (n, d)}, and the stream that ranks them (the fused one, where there is one)"""
    meta = load_meta(os.path.dirname(path) or ".")
    check_vocabulary(path, meta, ckpt, config)
    if missing := set(stream.model.config.modalities) - set(meta["modalities"]):
        raise DataError(f"{path} has no {', '.join(missing)}, which the run uses")
    split = Split(path)
    parts = [stream.encode([split.tokens_of(u) for u in ids], [split.audio_of(u) for u in ids] if stream.model.audio
                           else None)
             for ids in (range(i, min(i + 64, len(split))) for i in range(0, len(split), 64))]
    return SimpleNamespace(texts=[bytes(split.text[a:a + n]).decode("utf-8") for a, n in split.utt_text],
                           H={beta: torch.cat([H[beta] for H in parts]) for beta in stream.model.streams},
                           stream="m" if "m" in stream.model.streams else stream.model.streams[0])


def notes(where, text, cut, max_seconds, tok):
    """A turn's notes on standard error: its audio was cut at max_seconds; most of its words are not
    in the model's vocabulary (tok: None for a model without text)"""
    if cut:
        print(f"sample.py: {where}: audio longer than {max_seconds:g} s, cut to its first {max_seconds:g} s "
              f"(the run's max_seconds, as prepare.py cut the clips it learnt from)", file=sys.stderr, flush=True)
    words, unknown = tok.unknown_words(text) if tok else ([], [])
    if 2 * len(unknown) > len(words):
        print(f"sample.py: {where}: {len(unknown)} of {len(words)} words are not in the model's vocabulary "
              f"({tok.vocab_size} word pieces), {', '.join(unknown[:4])}{', ...' * (len(unknown) > 4)}: to it "
              f"each is [UNK], and its answer means little; a model that knows English: --ckpt {ENGLISH}",
              file=sys.stderr, flush=True)


def introduce(args, model, name):
    """What sample.py answers, before the first turn (not with --json)"""
    if not args.json:
        what = f"the utterances of {args.expect} it expects most as the next one" if args.expect else \
            "the chances of each emotion in the next utterance of the speaker of turn N-1"
        print(f"{args.ckpt} ({' and '.join(model.config.modalities)}) on {name}: after each turn N,\n{what} "
              f"(so from turn 2 on)\n")
    if args.explain and not model.config.distant:
        print("sample.py: a model without the distant context (--no-distant) has no attention to explain",
              file=sys.stderr)


def converse(args, said):
    """Answer each turn of args.dialogue as it is read; said: (speaker, text) of each turn read"""
    device = device_from(args.device, "sample.py")
    model, tok, config = load_checkpoint(args.ckpt, device, "pretrain" if args.expect else "finetune")
    max_seconds = audio_cut(config, args.ckpt) if model.audio else None
    stream = Stream(model, tok, config["max_tokens"], config["max_context"], device)
    pool = load_pool(args.expect, stream, args.ckpt, config) if args.expect else None
    lines, base, name = open_turns(args.dialogue)
    introduce(args, model, name)
    dialogue, answers, expected = None, [], None
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
        notes(f"{name}:{i}", text, cut, max_seconds, tok if model.text else None)
        dialogue = dialogue or this_dialogue
        H, answer = stream.encode([text], [wave]), {"turn": len(said) + 1}
        if expected is not None:  # where pre-training put this turn among the pool, before it was said
            answer["rank"] = 1 + int((expected[pool.stream] >= stream.expected(H)[pool.stream][0]).sum())
        stream.add(H)
        said.append((speaker, text))
        if len(said) >= 2:
            answer["target_speaker"] = said[-2][0]  # the source: the speaker of turn N-1
        if not pool and (probs := stream.next_emotion()) is not None:
            answer["probs"] = {label: round(float(p), 6) for label, p in zip(config["labels"], probs)}
        if pool and (expected := stream.expected(pool.H)) is not None:  # the 5 best of the pool by each stream
            answer["expected"] = {TUS_NAMES[beta]: [[int(u), round(float(scores[u]), 4)]
                                                    for u in scores.argsort(descending=True)[:5]]
                                  for beta, scores in expected.items()}
        if args.explain and (weights := stream.attention()) is not None:  # the distant turns: all but the last 2
            first = len(said) - len(next(iter(weights.values()))) + 1  # the turn of the first cached utterance
            answer["attention"] = {beta: [[first + k, round(float(w), 6)] for k, w in enumerate(att[:-2])]
                                   for beta, att in weights.items()}
        answer["ms"] = round((time.perf_counter() - t0) * 1000, 2)
        report(said, answer, config["labels"], pool, args.json)
        answers.append(answer)
        sys.stdout.flush()
    if not said and args.dialogue != "-":
        raise DataError(f"{name} has no turns")
    if args.svg:
        write_text(args.svg, svg(said, answers, config["labels"]))
        print(f"sample.py: the picture is in {args.svg}", file=sys.stderr)


if __name__ == "__main__":
    main()
