"""
Benchmarks, each printing ratios against a reference measured in the same run.

python bench.py encoders   # our BERT-base and HuBERT-base vs transformers': forward time and peak memory
python bench.py stream     # sample.py's per-turn latency vs re-encoding the whole context every turn
python bench.py train      # training steps: tiny and base, with and without length buckets and the feature cache
"""
import argparse
import functools
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from nanotcmp.audio import SAMPLE_RATE, save_wav
from nanotcmp.cuda_graphs import CudaGraphs
from nanotcmp.data import Split, buckets, encoder_inputs, load_meta, to_device, windows
from nanotcmp.features import attach_features
from nanotcmp.files import one_line_errors
from nanotcmp.loader import ahead, step_batches, steps_per_epoch
from nanotcmp.model import Bert, BertConfig, Hubert, HubertConfig, TCMP, TCMPConfig
from nanotcmp.processes import device_from, set_up_device
from nanotcmp.settings import TINY_BERT, TINY_HUBERT, parse_args, plan, ranged
from nanotcmp.stream import Stream
from nanotcmp.tokenizer import WordPiece
from nanotcmp.training import optimizer, train_step

# -----------------------------------------------------------------------------
# encoders: BERT-base on 32 x 24 tokens, HuBERT-base on 4 x 3 s of audio, fp32, random weights


def reference_class(name):
    """-> transformers' model class for the encoder name and the keyword arguments it takes, its logging quiet"""
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if name == "bert":
        return transformers.BertModel, {"add_pooling_layer": False}
    return transformers.HubertModel, {}


def load_encoder(name, which, folder):
    """Our encoder ("ours") or transformers' ("ref") from folder, for inference"""
    if which == "ours":
        return (Bert if name == "bert" else Hubert).from_pretrained(folder).eval()
    cls, kwargs = reference_class(name)
    return cls.from_pretrained(folder, **kwargs).eval()


def bench_inputs(name, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1000, 30000, (32, 24), generator=g) if name == "bert" else torch.randn(4, 3 * 16000, generator=g)
    mask = torch.ones_like(x, dtype=torch.long if name == "bert" else torch.bool)  # no padding
    return x.to(device), mask.to(device)


def run_encoder(model, inputs):
    """-> last hidden state (B, T, D), whichever side the model is"""
    x, mask = inputs
    if isinstance(model, Bert):
        return model(x, mask)
    if isinstance(model, Hubert):
        return model(x, mask)[0]
    return model(x, attention_mask=mask.long()).last_hidden_state  # transformers'


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device, run, *args):
    """-> (the milliseconds run(*args) takes, the device waited for; its result)"""
    sync(device)
    t0 = time.perf_counter()
    out = run(*args)
    sync(device)
    return (time.perf_counter() - t0) * 1000, out


def memory_mark(device):
    """Start a peak-memory measurement -> the bytes in use now: CUDA's allocator on a GPU; on the CPU
    the process's resident size, its high-water mark reset to it (Linux only)"""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
    return memory_peak(device)  # the peak just reset: the bytes in use now


def memory_peak(device):
    """-> the peak bytes in use since memory_mark"""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024  # in KiB there


@torch.inference_mode()
def peak_memory_mib(name, which, folder, device):
    """-> the MiB one forward needs beyond the loaded model (see memory_mark)"""
    model = load_encoder(name, which, folder).to(device)
    inputs = bench_inputs(name, device)
    for t in model.state_dict().values():
        t.sum()  # page in weights that were loaded memory-mapped, so they are not counted as the forward's
    base = memory_mark(device)
    run_encoder(model, inputs)
    return (memory_peak(device) - base) / 2**20


@torch.inference_mode()
def bench_encoders(device, reps, tmp):
    print(f"encoders on {device}, fp32, median of {reps} interleaved repetitions (random weights)")
    print(f"{'model':<12}{'input':<14}{'ours ms':>10}{'ref ms':>10}{'ratio':>8}"
          f"{'ours MiB':>10}{'ref MiB':>10}{'ratio':>8}")
    for name, label in (("bert", "32 x 24 tok"), ("hubert", "4 x 3 s")):
        folder = os.path.join(tmp, name)
        cls, kwargs = reference_class(name)
        torch.manual_seed(0)
        cls(cls.config_class(), **kwargs).save_pretrained(folder)  # random base-size weights, which both sides load
        models = {which: load_encoder(name, which, folder).to(device) for which in ("ours", "ref")}
        inputs = bench_inputs(name, device)
        diff = (run_encoder(models["ours"], inputs) - run_encoder(models["ref"], inputs)).abs().max().item()
        times = {"ours": [], "ref": []}
        for rep in range(reps):
            for which in ("ours", "ref") if rep % 2 else ("ref", "ours"):  # alternate who goes first
                times[which].append(timed(device, run_encoder, models[which], inputs)[0])
        del models
        t_ours, t_ref = statistics.median(times["ours"]), statistics.median(times["ref"])
        mem = {which: float(subprocess.run(
            [sys.executable, __file__, "_memory", name, which, folder, "--device", str(device)],
            check=True, capture_output=True, text=True).stdout) for which in ("ours", "ref")}
        print(f"{name + '-base':<12}{label:<14}{t_ours:>10.1f}{t_ref:>10.1f}{t_ours / t_ref:>8.2f}"
              f"{mem['ours']:>10.0f}{mem['ref']:>10.0f}{mem['ours'] / mem['ref']:>8.2f}   (max |diff| {diff:.1e})")
    print("ratio = ours / reference; target: time ratio <= 1.0")


# -----------------------------------------------------------------------------
# stream: base-size encoders (random weights: the cost is the same), 3-second utterances


@torch.inference_mode()
def bench_stream(device, reps, turns=(2, 6, 11, 30), seconds=3.0, max_context=11):
    torch.manual_seed(0)
    config = TCMPConfig(d=768, bert=asdict(BertConfig()), hubert=asdict(HubertConfig(normalize_wave=True)))
    model = TCMP(config).to(device).eval()
    # a vocabulary of numbered words, so that an utterance of 12 random words is 12 known word pieces
    words = [f"w{i}" for i in range(config.bert["vocab_size"] - 5)]
    tok = WordPiece({t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)})
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(words[i] for i in torch.randint(len(words), (12,), generator=g).tolist())
             for _ in range(max(turns))]
    waves = [(torch.randn(int(seconds * 16000), generator=g) * 3000).short().numpy() for _ in range(max(turns))]
    stream_ms, naive_ms = {n: [] for n in turns}, {n: [] for n in turns}
    for _ in range(reps):
        stream = Stream(model, tok, 60, max_context, device)
        for n in range(1, max(turns) + 1):
            ms, _ = timed(device, lambda *turn: (stream.add(stream.encode(*turn)), stream.next_emotion()),
                          [texts[n - 1]], [waves[n - 1]])
            if n in turns:
                stream_ms[n].append(ms)
        for n in turns:  # naive: the context's utterances all encoded again at this turn
            ctx = list(range(max(0, n - max_context), n))
            batch = encoder_inputs([tok.encode(texts[i], 60) for i in ctx], [waves[i] for i in ctx])
            sync(device)
            t0 = time.perf_counter()
            H = model.encode(to_device(batch, device))
            ctx_ids = torch.arange(len(ctx), device=device)[None]
            model.next_emotion(H, ctx_ids, torch.ones_like(ctx_ids, dtype=torch.bool)).softmax(-1)
            sync(device)
            naive_ms[n].append((time.perf_counter() - t0) * 1000)
    print(f"stream on {device}: BERT-base + HuBERT-base, d 768, {seconds:.0f}-second utterances, "
          f"context {max_context}, median of {reps} runs")
    print(f"{'turn':>6}{'stream ms':>12}{'naive ms':>12}{'speed-up':>10}{'real-time factor':>19}")
    med = {n: (statistics.median(stream_ms[n]), statistics.median(naive_ms[n])) for n in turns}
    for n, (s, nv) in med.items():
        print(f"{n:>6}{s:>12.0f}{nv:>12.0f}{nv / s:>9.1f}x{s / (seconds * 1000):>19.3f}")
    print(f"late/early per-turn ratio (turn {turns[-1]} / turn {turns[0]}): {med[turns[-1]][0] / med[turns[0]][0]:.2f} "
          f"(target <= 1.3); speed-up at turn 11: {med[11][1] / med[11][0]:.1f}x (target >= 5)")


# -----------------------------------------------------------------------------
# train: pre-training steps (the heavier stage), the same windows for every set-up


def meld_like(folder, n_dialogues=12, seed=0):
    """A dataset shaped like MELD for timing: dialogues of 6-20 turns, utterances of 1-15 s (log-normal,
    median 3 s) and 5-25 words; noise and random words, as only the shapes matter -> its folder"""
    rng = np.random.default_rng(seed)
    words = [f"word{i}" for i in range(300)]
    os.makedirs(os.path.join(folder, "clips"))
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    with open(os.path.join(folder, "pretrain.jsonl"), "w") as f:
        for d in range(n_dialogues):
            for t in range(rng.integers(6, 21)):
                seconds = float(np.clip(rng.lognormal(np.log(3), 0.6), 1, 15))
                clip = f"clips/{d}_{t}.wav"
                save_wav(os.path.join(folder, clip), (rng.standard_normal(int(seconds * SAMPLE_RATE)) * 2000)
                         .astype(np.int16))
                text = " ".join(rng.choice(words, rng.integers(5, 26)))
                f.write(json.dumps({"dialogue": f"d{d}", "speaker": "AB"[t % 2], "text": text, "audio": clip}) + "\n")
    run_script("prepare.py", folder, "dialogues", "--from", "pretrain.jsonl", "--vocab", "vocab.txt", "--out", "data")
    return os.path.join(folder, "data")


def train_model(size, data):
    with open(os.path.join(data, load_meta(data)["vocab"]["path"])) as f:
        vocab = sum(1 for _ in f)
    if size == "tiny":
        bert, hubert, d = BertConfig(vocab_size=vocab, **TINY_BERT), HubertConfig(**TINY_HUBERT), 64
    else:
        bert, hubert, d = BertConfig(vocab_size=vocab), HubertConfig(), 768
    torch.manual_seed(0)
    return TCMP(TCMPConfig(d=d, bert=asdict(bert), hubert=asdict(hubert)))


PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10": 125e12, "4090": 165e12}  # dense bf16 FLOP/s; the first name the card's name contains


def mem_limit(device):
    """Bytes a set-up may use: the GPU's memory, or 70% of the machine's"""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return int(0.7 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


# a step's windows: train.py's defaults on CUDA (tiny: 4, base: the authors' 64 in micro-batches of
# 16); on the CPU, base end-to-end steps of 4 windows need more than 24 GiB
WINDOWS = {"cuda": {"tiny": 4, "base": 64}, "cpu": {"tiny": 4, "base": 2}}
MODES = {"whole": "one padded batch", "buckets": "length buckets", "cache": "feature cache"}  # train's set-ups


def epoch_shapes(make, n_steps, max_padding):
    """Distinct encoder-call shapes over an epoch's batches, on the grid and without it (each bucket padded to
    its own longest sequence and rows) -> {modality: (calls on the grid, shapes on the grid, shapes without)}"""
    calls, shapes = {}, {}
    for step in range(n_steps):
        for _, batch, _ in make(step)[1]:
            for key in ("text", "audio"):
                if key in batch:  # the lengths of the batch's sequences, bucketed both ways
                    lengths = torch.cat([m.sum(1) for m in batch[key + "_mask"]])[batch[key + "_index"]].numpy()
                    for grid in (True, False):
                        groups = buckets(lengths, max_padding, grid)
                        shapes.setdefault((key, grid), set()).update((R, T) for _, R, T in groups)
                        calls[key] = calls.get(key, 0) + len(groups) * grid
    return {key: (calls[key], len(shapes[key, True]), len(shapes[key, False])) for key in calls}


def count_flops(step):
    """-> the floating-point operations of one call of step(), on the eager model (a CUDA graph's replay hides them)"""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def count_ops(step):
    """-> the torch operations the host dispatches in one call of step(), backward included"""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.n += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        step()
    return Counter.n


def train_one(data, size, mode, steps, device):
    """One set-up (a mode of MODES) in this process, as train.py runs it; the timed steps follow a warm-up: an epoch
    on CUDA (its new shapes planned or captured once), a step on the CPU
    -> {ms, items_s, mib, padding, shapes, wait, ops, flops, cache_s}"""
    set_up_device(device)
    model = train_model(size, data).to(device)
    model.check_inputs = device.type == "cpu"
    split = Split(os.path.join(data, "pretrain.safetensors"))
    n = WINDOWS[device.type][size]
    # train.py's settings on this device for steps of n windows, but k = 5 candidates a target (the demo preset's)
    args = parse_args(["--stage", "pretrain", "--data", data, "--batch-size", str(n), "--k", "5",
                       "--max-padding", "1.0" if mode == "whole" else "0.1"], __doc__)
    s = plan(args, device)[0]
    cache_s = None
    if mode == "cache":
        model.freeze_encoders()
        cache_s = timed(device, attach_features, model, data, [split], device)[0] / 1000
    opt = optimizer(model, s)
    items = windows(split)
    per_epoch = steps_per_epoch(s, items, split)
    make = functools.partial(step_batches, s, items, split, model.config.modalities, per_epoch)
    shapes = epoch_shapes(make, per_epoch, s.max_padding)
    warm = per_epoch if device.type == "cuda" else 1
    batches = iter(ahead(make, warm + steps + 2, s.workers))
    model.train()

    def step():
        t0 = time.perf_counter()
        _, micro = next(batches)
        waited_ms = (time.perf_counter() - t0) * 1000
        train_step(model, opt, [(share, to_device(batch, device)) for share, batch, _ in micro])
        return micro, waited_ms

    flops = count_flops(step) if device.type == "cuda" else None
    if device.type == "cuda":
        CudaGraphs(model, "context")  # train.py's default
    r = measure_steps(step, warm, steps, device)
    if r is None:
        return {"oom": True, "shapes": shapes}
    return {**r, "oom": False, "items_s": n / r["ms"] * 1000, "shapes": shapes, "flops": flops, "cache_s": cache_s}


def measure_steps(step, warm, steps, device):
    """warm calls of step(), then `steps` timed -> {ms, mib, padding, wait, ops}, or None when out of memory"""
    base = memory_mark(device)  # peak memory: what the steps need beyond the model, the optimiser and the batches
    try:
        for _ in range(warm):
            step()
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if "memory" not in str(e) and not isinstance(e, MemoryError):
            raise
        return None
    times, waits, pads = [], [], []
    for _ in range(steps):
        ms, (micro, waited_ms) = timed(device, step)
        times.append(ms)
        waits.append(waited_ms)
        pads += [counts for _, _, counts in micro]  # the padding counts of each micro-batch
    padding = {k: sum(p[k][0] for p in pads) / sum(p[k][1] for p in pads) for k in pads[0]}
    return {"ms": statistics.median(times), "mib": (memory_peak(device) - base) / 2**20, "padding": padding,
            "wait": sum(waits) / sum(times), "ops": count_ops(step)}


def run_script(script, cwd, *argv):
    """python <this repository's script> argv... in cwd, as a user runs it -> its standard output"""
    run = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), script), *argv],
                         cwd=cwd, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"bench.py: {script} failed:\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
    return run.stdout


def bench_demo(device, run):
    """The README's main job on the demo, as a user runs it: python prepare.py && python train.py;
    on a GPU, sample.py's probabilities there against the CPU's"""
    os.makedirs(run)
    t0 = time.perf_counter()
    run_script("prepare.py", run)
    out = run_script("train.py", run, "--device", str(device))
    print(f"demo on {device}: python prepare.py && python train.py (both stages, evaluation included): "
          f"{time.perf_counter() - t0:.0f} s" + (" (target <= 60 s on one H100)" if device.type == "cuda" else ""))
    for line in out.splitlines():
        if not line.startswith(("step", " ")):  # all but the step and confusion lines
            print("  " + line)
    if device.type != "cpu":
        probs = []  # sample.py --json on the demo's example dialogue, here and on the CPU: (turns, labels) each
        for d in (str(device), "cpu"):
            out = run_script("sample.py", run, "--json", "--device", d)
            probs.append(np.array([list(json.loads(line)["probs"].values()) for line in out.splitlines()]))
        print(f"sample.py --device {device.type} against the CPU, the demo's example dialogue: max |difference| of the "
              f"probabilities {abs(probs[0] - probs[1]).max():.4f} over {len(probs[0])} turns (bf16 rounding: ~0.01)")


def bench_train(device, steps, tmp, timeout):
    bench_demo(device, os.path.join(tmp, "run"))
    demo, meld = os.path.join(tmp, "run", "data", "demo"), meld_like(os.path.join(tmp, "meld-like"))
    cuda, w = device.type == "cuda", WINDOWS[device.type]
    peak = next((v for k, v in PEAK_BF16.items() if cuda and k in torch.cuda.get_device_name()), None)
    print(f"\ntraining steps on {device}: pre-training, {w['tiny']} windows a step (base: {w['base']}), median of "
          f"{steps} steps after a warm-up (random weights){', bf16 autocast' if cuda else ', fp32'}")
    print(f"{'data':<11}{'size':<6}{'encoders':<18}{'ms/step':>10}{'windows/s':>11}" + (f"{'MFU':>7}" if peak else "")
          + f"{'peak MiB':>10}{'padding t/a':>13}{'shapes t/a (no grid)':>22}{'waits':>7}{'ops':>8}")
    results, set_ups = {}, (("demo", demo, "tiny"), ("MELD-like", meld, "tiny"), ("MELD-like", meld, "base"))
    for name, data, size in set_ups:
        for mode, label in MODES.items():
            row = f"{name:<11}{size:<6}{label:<18}"
            try:
                r = json.loads(subprocess.run(
                    [sys.executable, __file__, "_train", data, size, mode, str(steps), "--device", str(device)],
                    check=True, capture_output=True, text=True, timeout=timeout).stdout.splitlines()[-1])
            except subprocess.TimeoutExpired:
                print(f"{row}{'did not finish in':>21} {timeout:.0f} s")
                continue
            results[name, size, mode] = r
            if r["oom"]:
                print(f"{row}{'out of memory':>21}   (limit {mem_limit(device) / 2**30:.0f} GiB)")
                continue
            r["mfu"] = r["flops"] / (r["ms"] / 1000) / peak if peak else None  # model FLOPs utilisation
            pad = "/".join(f"{r['padding'][k]:.0%}" if k in r["padding"] else "-" for k in ("text", "audio"))
            shapes = "/".join(f"{r['shapes'][k][1]} ({r['shapes'][k][2]})" if k in r["shapes"] else "-"
                              for k in ("text", "audio"))
            cache = f"   (cache built in {r['cache_s']:.1f} s)" if r["cache_s"] is not None else ""
            print(f"{row}{r['ms']:>10.1f}{r['items_s']:>11.2f}" + (f"{r['mfu']:>7.1%}" if peak else "")
                  + f"{r['mib']:>10.0f}{pad:>13}{shapes:>22}{r['wait']:>7.1%}{r['ops']:>8}{cache}")
    print("\nshapes: distinct (rows, length) shapes of the encoder calls over an epoch, text/audio, and in brackets "
          "as many as each bucket padded to its own longest would give; waits: share of a step spent waiting for "
          "its batch; ops: torch operations the host dispatches in a step (a CUDA graph's replay: its input copies)")
    for name, _, size in set_ups:  # one padded batch against length buckets against the feature cache
        whole, bucketed, cache = (results.get((name, size, m), {"oom": True}) for m in MODES)
        if bucketed["oom"] or cache["oom"]:
            continue
        speed = "one padded batch does not fit" if whole["oom"] else f"{whole['ms'] / bucketed['ms']:.2f}x the speed"
        before = f"{whole['padding']['audio']:.1%} -> " if "padding" in whole else ""
        base = size == "base"  # the targets of speed-up and MFU are for base size
        line = f"{name} {size}: audio padding {before}{bucketed['padding']['audio']:.1%} with buckets (target <= 10%), "
        line += f"{speed}; feature cache step {cache['ms']:.1f} ms" + (" (target <= 10 ms on one H100)" if cuda else "")
        line += f", {bucketed['ms'] / cache['ms']:.0f}x faster than end-to-end" + (" (target >= 50x)" if base else "")
        if peak:
            line += f"; MFU with buckets {bucketed['mfu']:.1%}" + (" (target >= 30%)" if base else "")
        print(line)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["encoders", "stream", "train", "_memory", "_train"])
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one) | cpu | cuda")
    parser.add_argument("--reps", type=ranged(int, 1), help="repetitions (default: 15 encoders, 3 stream, 3 train)")
    parser.add_argument("--timeout", type=ranged(float, 0, above=True), default=3600,
                        help="train: seconds a set-up may take")
    a = parser.parse_args(argv)
    inner = {"_memory": 3, "_train": 4}  # the arguments of the processes encoders and train start
    if len(a.args) != inner.get(a.what, 0):
        parser.error(f"{a.what} takes {inner.get(a.what, 'no')} arguments, not {len(a.args)}: {' '.join(a.args)}")
    device = device_from(a.device, "bench.py")
    # Ctrl-C: subprocess.run ends its command, the temporary folder goes
    kept = "interrupted; the measurements printed so far stand, nothing else was kept"
    with one_line_errors("bench.py", lambda: kept):
        try:
            measure(a, device)
        except subprocess.CalledProcessError as e:  # a measurement's own process failed
            last = (e.stderr or "").strip().splitlines() or [f"exit status {e.returncode}"]
            raise SystemExit(f"bench.py: {shlex.join(map(str, e.cmd))} failed (exit {e.returncode}): {last[-1]}") \
                from None


def measure(a, device):
    if a.what == "_memory":  # one measurement in a fresh process, so earlier runs' memory does not hide it
        print(peak_memory_mib(*a.args, device))
    elif a.what == "_train":
        data, size, mode, steps = a.args
        if device.type == "cpu":  # fail with an error, not the system's OOM killer, when memory runs out
            resource.setrlimit(resource.RLIMIT_AS, (mem_limit(device),) * 2)
        print(json.dumps(train_one(data, size, mode, int(steps), device)))
    elif a.what == "stream":
        bench_stream(device, a.reps or 3)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            if a.what == "encoders":
                bench_encoders(device, a.reps or 15, tmp)
            else:
                bench_train(device, a.reps or 3, tmp, a.timeout)


if __name__ == "__main__":
    main()
