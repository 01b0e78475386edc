"""
Real-time emotion pre-recognition: after every turn of a conversation, how will the target
speaker (the speaker of the turn before last) feel when they next speak?

python sample.py                               # the demo's example dialogue, the demo's fine-tuned model
python sample.py DIALOGUE.jsonl --ckpt DIR     # one dialogue in the generic JSONL format
python sample.py - --ckpt DIR [--keep-going]   # turns on standard input, each answered as soon as it is read

A turn is one JSON line: {"speaker": "Ross", "text": "Hi.", "audio": "clips/d1_0.wav"}, the audio
path relative to the file (to the working directory on standard input), needed only by a model
that uses audio. Each utterance is encoded once; a turn costs its own encoding plus the GRUs and
the attention over the cached vectors of at most max_context utterances.
"""
import argparse
import json
import os
import sys
import time

from nanotcmp.audio import MIN_SAMPLES, AudioError, NoFFmpeg, load_audio
from nanotcmp.data import DataError, line_problem, load_run
from nanotcmp.model import TCMP, TCMPConfig
from nanotcmp.processes import device_from
from nanotcmp.stream import Stream
from nanotcmp.tokenizer import WordPiece


class BadTurn(ValueError):
    pass


def load_checkpoint(folder, device):
    """-> (model, tokenizer, checkpoint config) of a fine-tuning run made by train.py"""
    if not os.path.isdir(folder):
        raise SystemExit(f"sample.py: no checkpoint at {folder}; train one with: python train.py")
    try:
        config, tensors = load_run(folder)
    except DataError as e:
        raise SystemExit(f"sample.py: {e}") from None
    if config["stage"] != "finetune":
        raise SystemExit(f"sample.py: {folder} is a {config['stage']} run; give a fine-tuning run (--ckpt)")
    try:
        model = TCMP(TCMPConfig(**{**config["model"], "modalities": tuple(config["model"]["modalities"])}))
        model.load_state_dict(tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0]
        raise SystemExit(f"sample.py: {folder} does not match this code's TCMP ({first})") from None
    tok = WordPiece.from_file(config["vocab"]["path"])
    return model.to(device).eval(), tok, config


def parse_turn(line, where, base, needs_audio, dialogue):
    """A JSON line (bytes, or text) -> (speaker, text, int16 samples or None, its dialogue id or
    None); dialogue: the id the conversation's first turn gave, if any"""
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
    wave = None
    if needs_audio:
        if not turn.get("audio"):
            raise BadTurn(f"{where}: this turn has no audio, and the model uses audio")
        try:
            wave, _ = load_audio(os.path.join(base, turn["audio"]))
        except AudioError as e:
            raise BadTurn(f"{where}: {e}") from None
        if len(wave) < MIN_SAMPLES:
            raise BadTurn(f"{where}: audio of {len(wave)} samples, fewer than {MIN_SAMPLES} (25 ms)")
    return turn["speaker"], turn["text"], wave, turn.get("dialogue")


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
        print(f"  ({ms:.0f} ms)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dialogue", nargs="?", default="data/demo/example_dialogue.jsonl",
                   help="a JSONL dialogue, or - for standard input")
    p.add_argument("--ckpt", default="out/demo-finetune", help="a fine-tuning run's folder")
    p.add_argument("--json", action="store_true", help="one JSON object a line instead of the bar charts")
    p.add_argument("--keep-going", action="store_true", help="on standard input: report a bad turn, then go on")
    p.add_argument("--device", default="auto", help="auto (cuda when there is one) | cpu | cuda")
    args = p.parse_args(argv)
    device = device_from(args.device, "sample.py")
    model, tok, config = load_checkpoint(args.ckpt, device)
    stream = Stream(model, tok, config["max_tokens"], config["max_context"], device)
    if args.dialogue == "-":
        lines, base, name = getattr(sys.stdin, "buffer", sys.stdin), os.getcwd(), "stdin"  # bytes, where it can
    else:
        if not os.path.isfile(args.dialogue):
            raise SystemExit(f"sample.py: {args.dialogue} not found")
        lines, base, name = open(args.dialogue, "rb"), os.path.dirname(args.dialogue), args.dialogue
    speakers, dialogue = [], None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        t0 = time.perf_counter()
        try:
            speaker, text, wave, this_dialogue = parse_turn(line, f"{name}:{i}", base, model.audio, dialogue)
        except NoFFmpeg as e:  # the machine's problem, not the turn's: no use going on
            raise SystemExit(f"sample.py: {e}") from None
        except BadTurn as e:
            if args.dialogue == "-" and args.keep_going:
                print(f"sample.py: {e} (skipped)", file=sys.stderr, flush=True)
                continue
            raise SystemExit(f"sample.py: {e}") from None
        dialogue = dialogue or this_dialogue
        probs = stream.add(text, wave)
        speakers.append(speaker)
        target = speakers[-2] if len(speakers) >= 2 else None  # the source: the speaker of turn N-1
        report(len(speakers), speaker, text, target, probs, config["labels"],
               (time.perf_counter() - t0) * 1000, args.json)
        sys.stdout.flush()


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # the reader went away (sample.py ... | head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
