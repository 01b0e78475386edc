"""
Benchmarks, each printing ratios against a reference measured in the same run.

python bench.py encoders   # our BERT-base and HuBERT-base vs transformers': forward time and peak memory
python bench.py stream     # sample.py's per-turn latency vs re-encoding the whole context every turn
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from nanotcmp.data import encoder_inputs, to_device
from nanotcmp.model import Bert, BertConfig, Hubert, HubertConfig, TCMP, TCMPConfig
from nanotcmp.tokenizer import WordPiece
from sample import Stream

# -----------------------------------------------------------------------------
# encoders: BERT-base on 32 x 24 tokens, HuBERT-base on 4 x 3 s of audio, fp32, random weights


def transformers_quiet():
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def save_reference(name, folder):
    """Save a randomly initialised base-size reference encoder, as a checkpoint both sides load."""
    transformers = transformers_quiet()
    torch.manual_seed(0)
    if name == "bert":
        ref = transformers.BertModel(transformers.BertConfig(), add_pooling_layer=False)
    else:
        ref = transformers.HubertModel(transformers.HubertConfig())
    ref.save_pretrained(folder)


def load_encoder(name, which, folder):
    if which == "ref":
        transformers = transformers_quiet()
        if name == "bert":
            return transformers.BertModel.from_pretrained(folder, add_pooling_layer=False).eval()
        return transformers.HubertModel.from_pretrained(folder).eval()
    return (Bert if name == "bert" else Hubert).from_pretrained(folder).eval()


def encoder_inputs(name, device):
    g = torch.Generator().manual_seed(0)
    if name == "bert":
        ids = torch.randint(1000, 30000, (32, 24), generator=g)
        return ids.to(device), torch.ones_like(ids).to(device)
    wave = torch.randn(4, 3 * 16000, generator=g)
    return wave.to(device), torch.ones_like(wave, dtype=torch.bool).to(device)


def run_encoder(model, inputs):
    """-> last hidden state (B, T, D), whichever side the model is"""
    x, mask = inputs
    if isinstance(model, Bert):
        return model(x, mask)
    if isinstance(model, Hubert):
        return model(x, mask)[0]
    if x.dtype == torch.long:
        return model(input_ids=x, attention_mask=mask).last_hidden_state
    return model(x, attention_mask=mask.long()).last_hidden_state


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def rss_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


@torch.inference_mode()
def peak_memory_mib(name, which, folder, device):
    """Extra memory one forward needs beyond the loaded model: CUDA's allocator peak on a GPU;
    on the CPU the process's resident high-water mark, reset after loading (Linux only)."""
    model = load_encoder(name, which, folder).to(device)
    inputs = encoder_inputs(name, device)
    for t in model.state_dict().values():
        t.sum()  # page in weights that were loaded memory-mapped, so they are not counted as the forward's
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_encoder(model, inputs)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    base = rss_kib("VmRSS")
    run_encoder(model, inputs)
    return (rss_kib("VmHWM") - base) / 1024


@torch.inference_mode()
def bench_encoders(device, reps, tmp):
    print(f"encoders on {device}, fp32, median of {reps} interleaved repetitions (random weights)")
    print(f"{'model':<12}{'input':<14}{'ours ms':>10}{'ref ms':>10}{'ratio':>8}{'ours MiB':>10}{'ref MiB':>10}{'ratio':>8}")
    for name, label in (("bert", "32 x 24 tok"), ("hubert", "4 x 3 s")):
        folder = os.path.join(tmp, name)
        save_reference(name, folder)
        ours, ref = (load_encoder(name, which, folder).to(device) for which in ("ours", "ref"))
        inputs = encoder_inputs(name, device)
        diff = (run_encoder(ours, inputs) - run_encoder(ref, inputs)).abs().max().item()
        times = {"ours": [], "ref": []}
        for rep in range(reps):
            pair = (("ours", ours), ("ref", ref))
            for which, model in pair if rep % 2 else pair[::-1]:  # alternate who goes first
                sync(device)
                t0 = time.perf_counter()
                run_encoder(model, inputs)
                sync(device)
                times[which].append((time.perf_counter() - t0) * 1000)
        del ours, ref
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
            sync(device)
            t0 = time.perf_counter()
            stream.add(texts[n - 1], waves[n - 1])
            sync(device)
            if n in turns:
                stream_ms[n].append((time.perf_counter() - t0) * 1000)
        for n in turns:  # naive: the context's utterances all encoded again at this turn
            ctx = list(range(max(0, n - max_context), n))
            batch = encoder_inputs([tok.encode(texts[i], 60) for i in ctx], [waves[i] for i in ctx])
            sync(device)
            t0 = time.perf_counter()
            H = model.encode(to_device(batch, device))
            ctx_ids = torch.arange(len(ctx), device=device)[None]
            model.head(H, ctx_ids, torch.ones_like(ctx_ids, dtype=torch.bool)).softmax(-1)
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["encoders", "stream", "_memory"])
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, help="repetitions (default: 15 encoders, 3 stream)")
    a = parser.parse_args()
    device = torch.device(a.device)
    if a.what == "_memory":  # one measurement in a fresh process, so earlier runs' memory does not hide it
        print(peak_memory_mib(*a.args, device))
    elif a.what == "stream":
        bench_stream(device, a.reps or 3)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            bench_encoders(device, a.reps or 15, tmp)
