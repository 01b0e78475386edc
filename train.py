"""
Train TCMP: contrastive pre-training on dialogues (target utterance searching + text-audio
consistency), then fine-tuning to pre-recognise the next emotion.

python train.py                      # both stages on the demo with tiny encoders: a few minutes on a CPU
python train.py --stage pretrain --data data/meld-unlabelled \\
    --text-encoder weights/bert-base-uncased --audio-encoder weights/hubert-base-ls960
python train.py --stage finetune --data data/p-meld --init out/meld-unlabelled-pretrain \\
    --text-encoder weights/bert-base-uncased --audio-encoder weights/hubert-base-ls960
"""
import argparse
import json
import math
import os
import time
from dataclasses import asdict

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from nanotcmp.data import Split, dialogue_batches, finetune_batch, load_meta, pretrain_batch, windows
from nanotcmp.metrics import emotion_scores, majority_scores, recall_at
from nanotcmp.model import Bert, Hubert, TCMP, TCMPConfig, tiny_bert_config, tiny_hubert_config

PAPER_LR = {"pretrain": 2e-4, "finetune": 2e-5}  # everything but the encoders (paper §4.2)
PAPER_LR_ENCODER = 2e-6
TINY_LR = 1e-3  # everything, with tiny randomly initialised encoders


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["pretrain", "finetune", "all"], default="all")
    p.add_argument("--data", default="data/demo", help="a dataset made by prepare.py")
    p.add_argument("--text-encoder", default="tiny", help="a BERT checkpoint folder, or 'tiny' (random, small)")
    p.add_argument("--audio-encoder", default="tiny", help="a HuBERT checkpoint folder, or 'tiny'")
    p.add_argument("--modalities", choices=["text", "audio", "all"], default="all")
    p.add_argument("--init", help="fine-tune from this pre-training run's folder")
    p.add_argument("--out", help="default: out/<data>-<stage>")
    p.add_argument("--epochs", type=int, help="default: 8 pre-training, 12 fine-tuning")
    p.add_argument("--max-steps", type=int, help="stop (with a resumable state) after this many steps")
    p.add_argument("--batch-size", type=int, help="windows (pre-training, default 4) or samples (fine-tuning, 16)")
    p.add_argument("--k", type=int, default=5, help="candidates per target in pre-training: 1 true + k-1 noise")
    p.add_argument("--lr", type=float, help="default: the paper's, 2e-4 pre-training, 2e-5 fine-tuning; 1e-3 with "
                                            "tiny encoders")
    p.add_argument("--lr-encoder", type=float, help="default: the paper's 2e-6 with checkpoints, --lr with tiny ones")
    p.add_argument("--d", type=int, help="model width (default: 768, or 64 with tiny encoders)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--no-distant", action="store_true", help="see only the nearby context (w/o Dist)")
    p.add_argument("--tus", choices=["intra", "inter", "both"], default="both")
    p.add_argument("--tus-loss", choices=["bce", "softmax"], default="bce")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last state")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=50, help="steps between resumable states")
    return p.parse_args(argv)

# -----------------------------------------------------------------------------
# building the model


def encoder_config(path, cls, tiny):
    """-> (config dict, pretrained weights or None) of an encoder: a checkpoint folder or 'tiny'"""
    if path == "tiny":
        return asdict(tiny), None
    enc = cls.from_pretrained(path)
    return asdict(enc.config), enc.state_dict()


def build_model(args, meta, stage):
    modalities = ("text", "audio") if args.modalities == "all" else (args.modalities,)
    missing = [m for m in modalities if m not in meta["modalities"]]
    if missing:
        raise SystemExit(f"train.py: {args.data} has no {', '.join(missing)} (its modalities: "
                         f"{', '.join(meta['modalities'])}); use --modalities {meta['modalities'][0]}")
    vocab_size = sum(1 for _ in open(os.path.join(args.data, meta["vocab"]["path"]), encoding="utf-8"))
    bert, bert_w, hubert, hubert_w = None, None, None, None  # an unused modality's encoder is never built
    if "text" in modalities:
        bert, bert_w = encoder_config(args.text_encoder, Bert, tiny_bert_config(vocab_size))
    if "audio" in modalities:
        hubert, hubert_w = encoder_config(args.audio_encoder, Hubert, tiny_hubert_config())
    if bert and bert["vocab_size"] != vocab_size:
        raise SystemExit(f"train.py: {args.text_encoder} has {bert['vocab_size']} word pieces, the dataset's "
                         f"vocabulary {vocab_size}: prepare the dataset with this encoder's vocab.txt")
    tiny = args.text_encoder == "tiny" and args.audio_encoder == "tiny"
    config = TCMPConfig(d=args.d or (64 if tiny else 768), n_labels=max(len(meta["labels"]), 1),
                        modalities=modalities, distant=not args.no_distant, tus=args.tus, tus_loss=args.tus_loss,
                        dropout=args.dropout, bert=bert, hubert=hubert)
    model = TCMP(config)
    if bert_w:
        model.bert.load_state_dict(bert_w)
    if hubert_w:
        model.hubert.load_state_dict(hubert_w)
    if stage == "finetune" and args.init:
        load_init(model, args.init)
    return model


def load_init(model, folder):
    """Start fine-tuning from a pre-training run: every tensor but the emotion head must fit."""
    path = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(path):
        raise SystemExit(f"train.py: --init {folder}: no model.safetensors there")
    ckpt, state = load_file(path), model.state_dict()
    wanted = [n for n in state if not n.startswith(("head1.", "head2."))]
    bad = [f"{n}: model {tuple(state[n].shape)}, checkpoint "
           f"{tuple(ckpt[n].shape) if n in ckpt else 'missing'}" for n in wanted
           if n not in ckpt or ckpt[n].shape != state[n].shape]
    if bad:
        raise SystemExit(f"train.py: --init {path} does not fit this model:\n  " + "\n  ".join(bad))
    model.load_state_dict({n: ckpt[n] for n in wanted}, strict=False)

# -----------------------------------------------------------------------------
# evaluation


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def predict(model, split, args, device):
    """-> (true labels, predicted labels) of every sample of a labelled split"""
    model.eval()
    preds = []
    for i in range(0, len(split.samples), args.batch_size):
        batch = to_device(finetune_batch(split, split.samples[i:i + args.batch_size], model.config.modalities), device)
        with autocast(device):
            preds.append(model.classify(batch).argmax(-1).cpu())
    return split.samples[:, 2], torch.cat(preds).numpy()


@torch.no_grad()
def retrieval_scores(model, split, args, device):
    """TUS on a split's windows with candidate sets fixed by the seed: R5@1, R5@2, R11@1, R11@2
    (percent) for T2T, A2A and M2M. The 5 candidates are the true one and the first 4 of 10 noise."""
    model.eval()
    wins = windows(split)
    rng = np.random.default_rng(args.seed)
    scores = {b: [] for b in model.betas}
    for i in range(0, len(wins), args.batch_size):
        batch = to_device(pretrain_batch(split, wins[i:i + args.batch_size], 11, rng, model.config.modalities,
                                         in_batch=False), device)
        with autocast(device):
            H = model.encode(batch)
            s = model.tus_scores(H, model.interact(H, batch["ctx"], batch["ctx_mask"]), batch)
        for b in model.betas:
            scores[b].append(s[b].float().cpu())
    names = {"t": "T2T", "a": "A2A", "m": "M2M"}
    out = {}
    for b, parts in scores.items():
        s = torch.cat(parts).numpy()
        true = np.zeros(len(s), dtype=np.int64)
        out[names[b]] = {f"R{k}@{m}": recall_at(s[:, :k], true, m) for k in (5, 11) for m in (1, 2)}
    return out

# -----------------------------------------------------------------------------
# training


def write_atomic(path, write):
    """write(tmp_path), then rename: a killed run never leaves a half-written file"""
    tmp = f"{path}.tmp"
    write(tmp)
    os.replace(tmp, path)


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    write_atomic(path, write)


def save_model(model, out, args, meta, stage):
    write_atomic(os.path.join(out, "model.safetensors"),
                 lambda p: save_file({k: v.contiguous() for k, v in model.state_dict().items()}, p))
    config = {"stage": stage, "model": asdict(model.config), "labels": meta["labels"],
              "vocab": {**meta["vocab"], "path": os.path.abspath(os.path.join(args.data, meta["vocab"]["path"]))},
              "max_tokens": meta["settings"]["max_tokens"], "max_context": meta["settings"]["max_context"],
              "data": os.path.abspath(args.data)}
    write_json(os.path.join(out, "config.json"), config)


def class_weights(train, n_labels):
    """Eq. 23: inversely proportional to each class's share of the training samples (mean weight 1)"""
    counts = np.bincount(train.samples[:, 2], minlength=n_labels).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / (n_labels * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def train_stage(stage, args, device):
    meta = load_meta(args.data)
    out = args.out or os.path.join("out", f"{os.path.basename(os.path.normpath(args.data))}-{stage}")
    torch.manual_seed(args.seed)
    model = build_model(args, meta, stage).to(device)
    os.makedirs(out, exist_ok=True)
    tiny = args.text_encoder == "tiny" and args.audio_encoder == "tiny"
    # the paper's rates fine-tune pretrained encoders; tiny ones learn from scratch and need larger steps
    lr = args.lr or (TINY_LR if tiny else PAPER_LR[stage])
    lr_enc = args.lr_encoder or (lr if tiny else PAPER_LR_ENCODER)
    enc = [p for n, p in model.named_parameters() if n.startswith(("bert.", "hubert."))]
    rest = [p for n, p in model.named_parameters() if not n.startswith(("bert.", "hubert."))]
    opt = torch.optim.Adam([{"params": enc, "lr": lr_enc}, {"params": rest, "lr": lr}], betas=(0.9, 0.999))

    if stage == "pretrain":
        train_split = Split(os.path.join(args.data, "pretrain.safetensors" if "pretrain" in meta["splits"]
                                         else "train.safetensors"))
        items = windows(train_split)
        batch_size = args.batch_size or 4
    else:
        if not meta["splits"].get("train", {}).get("labelled"):
            raise SystemExit(f"train.py: {args.data} has no labelled train split to fine-tune on")
        train_split = Split(os.path.join(args.data, "train.safetensors"))
        items = train_split.samples
        batch_size = args.batch_size or 16
        weights = class_weights(train_split, model.config.n_labels).to(device)
    args.batch_size = batch_size
    dev, test = (Split(os.path.join(args.data, f"{s}.safetensors")) for s in ("dev", "test"))
    epochs = args.epochs or (8 if stage == "pretrain" else 12)
    steps_per_epoch = math.ceil(len(items) / batch_size)
    total = epochs * steps_per_epoch
    print(f"{stage}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{len(items)} {'windows' if stage == 'pretrain' else 'samples'}, {epochs} epochs of {steps_per_epoch} "
          f"steps, lr {lr:g} (encoders {lr_enc:g}), {device}")

    state_path = os.path.join(out, "state.pt")
    step, best = 0, None
    if args.resume:
        if not os.path.isfile(state_path):
            raise SystemExit(f"train.py: --resume: no {state_path}")
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, best = state["step"], state["best"]
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed at step {step}")

    def save_state():
        write_atomic(state_path, lambda p: torch.save({
            "model": model.state_dict(), "opt": opt.state_dict(), "step": step, "best": best,
            "torch_rng": torch.get_rng_state()}, p))

    t0, busy, seen, first_step, last_log = time.time(), 0.0, 0, step, step  # busy: seconds in steps since the last log
    t_epoch = t0
    while step < total:
        t_step = time.time()
        epoch, i = divmod(step, steps_per_epoch)
        epoch_rng = np.random.default_rng((args.seed, epoch))  # the epoch's order: the same after a resume
        rng = np.random.default_rng((args.seed, epoch, i))  # this step's noise candidates
        model.train()
        if stage == "pretrain":
            chunk = [items[j] for j in epoch_rng.permutation(len(items))[i * batch_size:(i + 1) * batch_size]]
            batch = to_device(pretrain_batch(train_split, chunk, args.k, rng, model.config.modalities), device)
            with autocast(device):
                loss, parts, _ = model.pretrain_loss(batch)
        else:
            chunk = dialogue_batches(train_split, batch_size, epoch_rng)[i]
            batch = to_device(finetune_batch(train_split, chunk, model.config.modalities), device)
            with autocast(device):
                logits = model.classify(batch).float()
            nll = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
            loss = (weights[batch["labels"]] * nll).mean()  # Eq. 23
            parts = {"wce": loss}
        if not torch.isfinite(loss):
            raise SystemExit(f"train.py: non-finite loss at step {step + 1}: "
                             + ", ".join(f"{k} {v.item():.4g}" for k, v in parts.items())
                             + f"; the last good state is {state_path}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        step += 1
        seen += len(chunk)
        busy += time.time() - t_step
        if step % args.log_every == 0 or step == total:
            dt = busy / (step - last_log)  # training only: evaluations are not in it
            unit = "windows" if stage == "pretrain" else "samples"
            print(f"step {step}/{total} | loss {loss.item():.4f} ("
                  + ", ".join(f"{k} {v.item():.4f}" for k, v in parts.items())
                  + f") | {dt * 1000:.0f} ms/step | {seen / busy:.1f} {unit}/s"
                  + f" | ETA {(total - step) * (time.time() - t0) / (step - first_step) / 60:.1f} min")
            busy, seen, last_log = 0.0, 0, step
        if step % steps_per_epoch == 0:  # end of an epoch: evaluate on dev
            if stage == "pretrain":
                scores = retrieval_scores(model, dev, args, device)
                print(f"epoch {epoch + 1} ({time.time() - t_epoch:.0f} s) dev: " + " | ".join(
                    f"{b} " + " ".join(f"{k} {v:.1f}" for k, v in s.items()) for b, s in scores.items()))
                save_model(model, out, args, meta, stage)
            else:
                y, p = predict(model, dev, args, device)
                scores = emotion_scores(y, p, model.config.n_labels)
                print(f"epoch {epoch + 1} ({time.time() - t_epoch:.0f} s) dev: WA {scores['wa']:.2f} "
                      f"AA {scores['aa']:.2f} F1 {scores['f1']:.2f}")
                if best is None or scores["wa"] > best["dev"]["wa"]:
                    best = {"epoch": epoch + 1, "dev": {k: scores[k] for k in ("wa", "aa", "f1")}}
                    save_model(model, out, args, meta, stage)
            save_state()
            t_epoch = time.time()
        elif step % args.save_every == 0:
            save_state()
        if args.max_steps and step >= args.max_steps and step < total:
            save_state()
            print(f"stopped at step {step} (--max-steps); continue with --resume")
            return None

    # the end: test scores of the kept model
    model.load_state_dict(load_file(os.path.join(out, "model.safetensors")))
    if stage == "pretrain":
        metrics = {"stage": "pretrain", "dev": retrieval_scores(model, dev, args, device),
                   "test": retrieval_scores(model, test, args, device)}
        for b, s in metrics["test"].items():
            print(f"test {b}: " + " ".join(f"{k} {v:.1f}" for k, v in s.items()))
    else:
        y, p = predict(model, test, args, device)
        scores = emotion_scores(y, p, model.config.n_labels)
        majority = majority_scores(train_split.samples[:, 2], y, model.config.n_labels)
        metrics = {"stage": "finetune", "best_epoch": best["epoch"], "dev": best["dev"], "test": scores,
                   "test_majority": {k: majority[k] for k in ("wa", "aa", "f1")}}
        print(f"test (best dev epoch {best['epoch']}): WA {scores['wa']:.2f} AA {scores['aa']:.2f} "
              f"F1 {scores['f1']:.2f}   majority class: WA {majority['wa']:.2f} AA {majority['aa']:.2f} "
              f"F1 {majority['f1']:.2f}")
        print("confusion (rows true, columns predicted; " + ", ".join(meta["labels"]) + "):")
        for row in scores["confusion"]:
            print("  " + " ".join(f"{v:6d}" for v in row))
    write_json(os.path.join(out, "metrics.json"), metrics)
    print(f"{stage} done in {time.time() - t0:.0f} s: {out}")
    return out


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.stage != "all":
        return train_stage(args.stage, args, device)
    out = args.out
    args.out = out and os.path.join(out, "pretrain")
    pretrained = train_stage("pretrain", args, device)
    if pretrained is None:
        return None
    args.out, args.init, args.batch_size = out and os.path.join(out, "finetune"), pretrained, None
    return train_stage("finetune", args, device)


if __name__ == "__main__":
    main()
