"""
Evaluation on dev and test, and the references that need no model. Pre-training is scored by
target utterance searching (R5@1, R5@2, R11@1, R11@2 of T2T, A2A and M2M) beside a word-overlap
reference; fine-tuning by WA, AA, macro-F1 and weighted-F1 beside the majority class and the last
emotion of the target speaker (docs/results.md, "Training").
"""
import math

import numpy as np
import torch

from nanotcmp.data import last_own_labels, to_device, windows
from nanotcmp.loader import EVAL_BATCH, eval_batches, eval_targets
from nanotcmp.metrics import class_scores, emotion_scores, last_emotion_scores, majority_scores, recall_at
from nanotcmp.model import weighted_cross_entropy
from nanotcmp.processes import autocast


def evaluate(model, split, s, device):
    """Dev or test scores of stage s.stage: retrieval (pre-training) or WA, AA, macro-F1,
    weighted-F1 and the confusion matrix"""
    if s.stage == "pretrain":
        return retrieval_scores(model, split, s, device)
    y, p = predict(model, split, s, device)
    return emotion_scores(y, p, model.config.n_labels)


@torch.no_grad()
def predict(model, split, s, device):
    """-> (true labels, predicted labels) of every sample of a labelled split"""
    model.eval()
    preds = []
    for batch in eval_batches(s, split, "finetune", split.samples, model.config.modalities):
        batch = to_device(batch, device)
        logits = model.next_emotion(encoded(model, batch, device), batch["ctx"], batch["ctx_mask"])
        preds.append(logits.argmax(-1).cpu())
    return split.samples[:, 2], torch.cat(preds).numpy()


def encoded(model, batch, device):
    """A batch's utterances encoded (Eq. 2-6) in the device's precision, then in float32: the TCMP
    layers after them run in float32 in evaluation, so that scores never tie where bf16 rounds two
    candidates or classes to one value (a tie counts as a miss), and do not depend on the card"""
    with autocast(device):
        H = model.encode(batch)
    return {beta: h.float() for beta, h in H.items()}


TUS_NAMES = {"t": "T2T", "a": "A2A", "m": "M2M"}  # target utterance searching by text, audio, the fused stream


@torch.no_grad()
def retrieval_scores(model, split, s, device):
    """TUS on a split's windows with candidate sets fixed by the seed: R5@1, R5@2, R11@1, R11@2
    (percent) for T2T, A2A and M2M. The 5 candidates are the true one and the first 4 of 10 noise."""
    model.eval()
    scores = {beta: [] for beta in model.streams}
    for batch in eval_batches(s, split, "pretrain", windows(split), model.config.modalities):
        batch = to_device(batch, device)
        H = encoded(model, batch, device)
        logits = model.tus_scores(H, model.interact(H, batch["ctx"], batch["ctx_mask"]), batch)
        for beta in model.streams:
            scores[beta].append(logits[beta].cpu())
    return {TUS_NAMES[beta]: recalls(torch.cat(batches).numpy()) for beta, batches in scores.items()}


def recalls(scores):
    """(N, 11) scores of each target's candidates, the true one first -> R5@1, R5@2, R11@1, R11@2"""
    true = np.zeros(len(scores), dtype=np.int64)
    return {f"R{k}@{m}": recall_at(scores[:, :k], true, m) for k in (5, 11) for m in (1, 2)}


def word_overlap_scores(split, seed):
    """Target utterance searching without a model, on retrieval_scores' candidate sets (fixed by
    the seed): each candidate scored by the share of its word pieces that occur in the target's
    context. What words shared within a dialogue (names, topics) give away -> R5@1, R5@2, R11@1, R11@2"""
    wins, scores = windows(split), []
    for i in range(math.ceil(len(wins) / EVAL_BATCH)):
        rows, targets, noise = eval_targets(split, wins, seed, i)
        for (win, j), others in zip(targets, noise):
            context = set(np.concatenate([split.tokens_of(u)[1:-1] for u in rows[win][:j]]).tolist())
            words = [set(split.tokens_of(u)[1:-1].tolist()) for u in [rows[win][j], *others]]  # without [CLS], [SEP]
            scores.append([len(w & context) / max(len(w), 1) for w in words])
    return recalls(np.array(scores))


LINEAR_L2 = (0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)  # the linear reference's penalties, one chosen on dev


def nearby_vectors(split, modalities):
    """Each sample's nearby context as the frozen encoders see it: [source ; response], the cached
    pooled outputs (Eq. 4) of its last two utterances u_{N-1}, u_N, every modality -> (S, 2 * D) float64"""
    f = torch.from_numpy(np.concatenate([split.features[key] for key in modalities], 1)).double()
    t = torch.from_numpy(split.samples[:, 1].astype(np.int64))  # the next utterance: the context ends at t - 1
    return torch.cat([f[t - 2], f[t - 1]], 1)


def logistic_regression(x, y, weights, l2):
    """Multinomial logistic regression with Eq. 23's class weights and the penalty l2 * |W|^2 (not on
    the bias), fit to convergence by L-BFGS: x (S, D), y (S,) -> (W (D, n), b (n,)), float64"""
    W = torch.zeros(x.shape[1], len(weights), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(weights), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=1000, tolerance_grad=1e-9, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        loss = weighted_cross_entropy(x @ W + b, y, weights) + l2 * W.square().sum()
        loss.backward()
        return loss
    opt.step(objective)
    return W.detach(), b.detach()


def linear_reference(train, dev, test, modalities, weights, n_labels):
    """The floor a context model must clear: class-weighted logistic regression on the frozen features
    of the nearby context (nearby_vectors, standardised by the training split's mean and deviation),
    its penalty the one of LINEAR_L2 with the best dev WA -> test scores, with "l2" and "dev_wa" """
    x = {split.name: nearby_vectors(split, modalities) for split in (train, dev, test)}
    mean, std = x[train.name].mean(0), x[train.name].std(0).clamp(min=1e-12)
    x = {name: (v - mean) / std for name, v in x.items()}
    y = torch.from_numpy(train.samples[:, 2].astype(np.int64))

    def scores(W, b, split):
        return emotion_scores(split.samples[:, 2], (x[split.name] @ W + b).argmax(1).numpy(), n_labels)
    fits = {l2: logistic_regression(x[train.name], y, weights.double(), l2) for l2 in LINEAR_L2}
    dev_wa = {l2: scores(*fit, dev)["wa"] for l2, fit in fits.items()}
    best = max(LINEAR_L2, key=lambda l2: dev_wa[l2])  # the first of the best: the least penalty
    report = scores(*fits[best], test)
    del report["confusion"]
    return {**report, "l2": best, "dev_wa": dev_wa[best]}


TRAINED_BY = {"intra": ("T2T", "A2A"), "inter": ("M2M",), "both": ("T2T", "A2A", "M2M")}  # --tus -> retrievals


def selection_score(scores, tus):
    """What keeps a model. In fine-tuning dev macro-F1, where the paper keeps the best dev WA: a dev
    split's balance of classes may differ from the training split's and test's (P-MELD's dev has 40%
    negative samples, train and test 32% and 34%), and WA then rewards the epoch that over-predicts
    dev's larger classes; macro-F1 weighs each class alike, as Eq. 23's loss does. Never an epoch that
    answers one class for every sample (-inf): that is the majority class, not a model. In
    pre-training the mean of the dev recalls (R5@1, R5@2, R11@1, R11@2) of the retrievals --tus
    trains (M2M under intra, say, comes from an untrained fusion layer)"""
    if "wa" in scores:
        answered = sum(1 for column in zip(*scores["confusion"]) if any(column))
        return scores["f1"] if answered > 1 else -math.inf
    return float(np.mean([v for beta in TRAINED_BY[tus] if beta in scores for v in scores[beta].values()]))


def describe(scores):
    """Scores as a log line: emotion scores, recalls, or recalls by retrieval (T2T, A2A, M2M)"""
    if "wa" in scores:
        return (f"WA {scores['wa']:.2f} AA {scores['aa']:.2f} macro-F1 {scores['f1']:.2f} "
                f"weighted-F1 {scores['wf1']:.2f}")
    if all(isinstance(v, float) for v in scores.values()):
        return " ".join(f"{k} {v:.1f}" for k, v in scores.items())
    return " | ".join(f"{b} {describe(s)}" for b, s in scores.items())


def final_scores(model, s, progress, splits, n_items, labels, device):
    """The kept model's scores on test (of the best dev epoch by selection_score) and the references
    beside them, printed -> metrics.json's content: the run's dev and test scores, and
    "test_word_overlap" | the references' (see references)"""
    train_split, dev, test = splits
    scores, best = evaluate(model, test, s, device), progress.best
    report = {"stage": s.stage, "train_items": n_items, "best_epoch": best["epoch"], "dev": best["dev"],
              "test": scores, "dev_by_epoch": progress.dev_by_epoch}
    print(f"test (best dev epoch {best['epoch']}): {describe(scores)}")
    if s.stage == "pretrain":
        report["test_word_overlap"] = word_overlap_scores(test, s.seed)
        print(f"  word overlap (no model): {describe(report['test_word_overlap'])}")
        return report
    report |= references(model, splits)
    show_classes("test", scores, labels)
    return report


def score_run(model, s, splits, labels, device):
    """A fine-tuned model's dev and test scores and the references, printed with each class's
    scores and the confusion matrices -> {"dev": scores, "test": scores, references}"""
    report = {}
    for split in splits[1:]:
        report[split.name] = evaluate(model, split, s, device)
        print(f"{split.name} ({len(split.samples)} samples): {describe(report[split.name])}")
    report |= references(model, splits)
    for split in splits[1:]:
        show_classes(split.name, report[split.name], labels)
    return report


def references(model, splits):
    """The scores beside a model's on test, printed: "test_majority", "test_last_emotion" and, with
    a feature cache (frozen encoders), "test_linear" (without their confusion matrices)"""
    train_split, dev, test = splits
    n, y_train, y_test = model.config.n_labels, train_split.samples[:, 2], test.samples[:, 2]
    report = {"test_majority": majority_scores(y_train, y_test, n),
              "test_last_emotion": last_emotion_scores(y_train, y_test, last_own_labels(test), n)}
    for key in ("test_majority", "test_last_emotion"):
        del report[key]["confusion"]
    if train_split.features:  # frozen encoders: the linear reference on their cached features
        report["test_linear"] = linear_reference(train_split, dev, test, model.config.modalities,
                                                 model.class_weights.cpu(), n)
    for name, key in (("majority class", "test_majority"), ("last emotion", "test_last_emotion"),
                      ("logistic regression on [source ; response]", "test_linear")):
        if key in report:
            print(f"  {name}: {describe(report[key])}")
    return report


def show_classes(name, scores, labels):
    """Each class's precision, recall and F1 on a split, and its confusion matrix, as a table"""
    width = max(8, *map(len, labels))
    per = class_scores(scores["confusion"])
    print(f"{name}, each class (percent):\n  {'':<{width}} precision  recall     F1  samples")
    for i, label in enumerate(labels):
        cells = " ".join(f"{'-' if v is None else f'{v:.1f}':>{w}}" for v, w in
                         zip((per["precision"][i], per["recall"][i], per["f1"][i]), (9, 7, 6)))
        print(f"  {label:<{width}} {cells} {per['support'][i]:8d}")
    print(f"{name}, confusion (rows true, columns predicted):\n  {'':<{width}}" +
          "".join(f" {label:>{width}}" for label in labels))
    for label, row in zip(labels, scores["confusion"]):
        print(f"  {label:<{width}}" + "".join(f" {v:{width}d}" for v in row))
