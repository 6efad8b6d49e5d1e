"""Shortcut benchmark on rows: does the default SpRAy flag and gate catch shortcuts in real tables and real text?

Scenarios (``xai_callbacks.data.rows.make_shortcut_rows``): scikit-learn's breast-cancer table and
its digits as rows of 64 features (a leak column, a sentinel value) and windows of 32 words of
NumPy's docstrings (a tag word first, a trigger word anywhere), the shortcut on ``--prevalence`` of
class 0, each with its clean control. Models trained from scratch: an MLP on the tables (two
hidden layers of 64 ReLU units); on the text a bag of embeddings (their mean, then an MLP) and a
small transformer (2 layers, learnt positions; SpRAy explains it with AttnLRP); with ``--text-models``
also ``embeddingbag``, the model of PyTorch's text classification tutorial (an ``nn.EmbeddingBag``
mean of 64 dimensions, then one linear layer), and ``bert``, a HuggingFace
``BertForSequenceClassification`` (2 layers of width 32, untrained weights; ``transformers`` of the
``reference`` extra), whose rows begin with a ``[CLS]`` id as its tokenizer's would (its classifier
reads the first position). Per scenario and
model, as ``benchmarks/shortcuts.py`` does for images: the intervention (paste the shortcut into
other classes' validation rows; remove it from the shortcut rows; void below 0.2 both), then
``SpRAyCallback`` and ``ExplanationGate`` at their defaults in ``Trainer.validate`` and
``xai-callbacks gate RUN``, scored against the truth (recall, purity, flags, false flags, AUC,
forward passes per sample, separation ratios).

    nice -n 10 python benchmarks/row_shortcuts.py                      # every base, seed 0 (~1.5 min on 2 cores)
    nice -n 10 python benchmarks/row_shortcuts.py --seeds 0 1 2        # the README's table (~5 min)
    nice -n 10 python benchmarks/row_shortcuts.py --bases text --text-models bert --seeds 0 1 2 3 4 5
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from shortcuts import SHORTCUT_CLASS, analyse, predict, score, summary, train  # noqa: E402

from xai_callbacks.data.rows import (ROW_BASES, ROW_KINDS, ShortcutRows, make_shortcut_rows,  # noqa: E402
                                     plant_row_shortcut)

MODELS = {"breast_cancer": ("mlp",), "digits": ("mlp",), "text": ("bag", "transformer")}


class Bag(torch.nn.Module):
    """The mean of the tokens' embeddings (padding left out), then an MLP."""

    def __init__(self, vocabulary: int, classes: int, dim: int = 32):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocabulary, dim, padding_idx=0)
        self.head = torch.nn.Sequential(torch.nn.Linear(dim, 64), torch.nn.ReLU(), torch.nn.Linear(64, classes))

    def forward(self, tokens):
        return self.head(self.embedding(tokens).mean(1))


class EmbeddingBagLinear(torch.nn.Module):
    """PyTorch's text classification tutorial's model: an ``nn.EmbeddingBag`` mean (padding left
    out), then one linear layer."""

    def __init__(self, vocabulary: int, classes: int, dim: int = 64):
        super().__init__()
        self.embedding = torch.nn.EmbeddingBag(vocabulary, dim, mode="mean", padding_idx=0)
        self.fc = torch.nn.Linear(dim, classes)

    def forward(self, tokens):
        return self.fc(self.embedding(tokens))


class Transformer(torch.nn.Module):
    """Token and learnt position embeddings, two encoder layers, the mean over tokens, a linear head."""

    def __init__(self, vocabulary: int, classes: int, length: int, dim: int = 32):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocabulary, dim, padding_idx=0)
        self.position = torch.nn.Parameter(torch.randn(length, dim) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(dim, 2, 64, dropout=0.0, batch_first=True, activation="gelu")
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(dim, classes)

    def forward(self, tokens):
        return self.head(self.encoder(self.embedding(tokens) + self.position).mean(1))


class Bert(torch.nn.Module):
    """transformers' ``BertForSequenceClassification`` on rows that begin with a ``[CLS]`` id (the
    last of the vocabulary, :func:`with_cls`), padding (id 0) masked; returns the logits."""

    def __init__(self, vocabulary: int, classes: int, length: int, dim: int = 32):
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(vocab_size=vocabulary + 1, hidden_size=dim, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=2 * dim, max_position_embeddings=length + 1, num_labels=classes,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
        self.bert = BertForSequenceClassification(config)

    def forward(self, tokens):
        return self.bert(input_ids=tokens, attention_mask=(tokens != 0).long()).logits


def first(t: torch.Tensor, value) -> torch.Tensor:
    """``t`` (N, L) with a column of ``value`` before its first."""
    return torch.cat([torch.full_like(t[:, :1], value), t], 1)


class WithoutCls(torch.nn.Module):
    """``model`` on rows without the ``[CLS]`` id: puts it first (to train and intervene on the
    scenario's own rows; SpRAy gets the rows of :func:`with_cls`, whose ids the model embeds)."""

    def __init__(self, model: torch.nn.Module, cls: int):
        super().__init__()
        self.model, self.cls = model, cls

    def forward(self, tokens):
        return self.model(first(tokens, self.cls))


def with_cls(split: ShortcutRows) -> ShortcutRows:
    """``split`` with a ``[CLS]`` id (one past its vocabulary) before each row."""
    cls = len(split.vocabulary)
    return ShortcutRows(first(split.x, cls), split.targets, first(split.artifact_mask, False),
                        first(split.clean_x, cls), split.kind, split.shortcut_class, [*split.vocabulary, "[CLS]"])


def build(arch: str, data, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    classes = int(data.targets.max()) + 1
    if arch == "bert":
        return WithoutCls(Bert(len(data.vocabulary), classes, data.x.shape[1]), len(data.vocabulary))
    if arch == "mlp":
        return torch.nn.Sequential(torch.nn.Linear(data.x.shape[1], 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                   torch.nn.ReLU(), torch.nn.Linear(64, classes))
    if arch == "bag":
        return Bag(len(data.vocabulary), classes)
    if arch == "embeddingbag":
        return EmbeddingBagLinear(len(data.vocabulary), classes)
    return Transformer(len(data.vocabulary), classes, data.x.shape[1])


def intervention(model, val, seed: int) -> tuple[float, float]:
    """(paste rate, removal rate) of the planted shortcut on the validation split."""
    c = SHORTCUT_CLASS
    x = val.clean_x[val.targets != c]
    before = predict(model, x)
    after = predict(model, plant_row_shortcut(x, val.kind, np.random.default_rng(seed + 99))[0])
    paste = float(((before != c) & (after == c)).sum() / max(int((before != c).sum()), 1))
    with_it, without = predict(model, val.x[val.has_artifact]), predict(model, val.clean_x[val.has_artifact])
    removal = float(((with_it == c) & (without != c)).sum() / max(int((with_it == c).sum()), 1))
    return paste, removal


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bases", nargs="+", default=list(ROW_BASES), choices=ROW_BASES)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--prevalence", type=float, default=0.3)
    ap.add_argument("--ambiguity", type=float, default=0.4)
    ap.add_argument("--epochs", type=int, default=None, help="default: 60 on the tables, 20 on the text")
    ap.add_argument("--text-models", nargs="+", default=list(MODELS["text"]),
                    choices=("bag", "embeddingbag", "transformer", "bert"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    for name in ("lightning.pytorch", "xai_callbacks"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    print(f"{'base':<13} {'scenario':<9} {'model':<11} {'seed':>4} {'acc':>5} {'paste':>5} {'remov':>5} {'used':>5} "
          f"{'recall':>6} {'purity':>6} {'flag':>4} {'false':>5} {'auc':>5} {'gate':>4} {'fwd/smp':>7} {'s':>4} "
          f"{'sep0':>5} {'sep_rest':>8}", flush=True)
    rows, t0 = [], time.perf_counter()
    for base in args.bases:
        for seed in args.seeds:
            for kind, prev in [(k, args.prevalence) for k in ROW_KINDS[base]] + [(ROW_KINDS[base][0], 0.0)]:
                train_set, val = make_shortcut_rows(base, kind, prevalence=prev, ambiguity=args.ambiguity, seed=seed)
                for arch in args.text_models if base == "text" else MODELS[base]:
                    start = time.perf_counter()
                    model = build(arch, train_set, seed)
                    train(model, train_set, args.epochs or (20 if base == "text" else 60), 2e-3, seed)
                    acc = float((predict(model, val.x) == val.targets).float().mean())
                    shortcut = prev > 0
                    paste, removal = intervention(model, val, seed) if shortcut else (np.nan, np.nan)
                    with tempfile.TemporaryDirectory() as folder:
                        res = analyse(model.model, with_cls(val), folder) if arch == "bert" else \
                            analyse(model, val, folder)
                    s = score(res["cb"], val, shortcut)
                    used = ("yes" if max(paste, removal) >= 0.2 else "VOID") if shortcut else "-"
                    row = dict(used=used, gate=res["gate"], **s)
                    rows.append(row)
                    name = kind if shortcut else "clean"
                    print(f"{base:<13} {name:<9} {arch:<11} {seed:4d} {acc:5.2f} {paste:5.2f} {removal:5.2f} {used:>5} "
                          f"{s['recall']:6.2f} {s['purity']:6.2f} {s['flagged']:4d} {s['false']:5d} {s['auc']:5.2f} "
                          f"{res['gate']:4d} {s['passes'] / s['n']:7.1f} {time.perf_counter() - start:4.0f} "
                          f"{s.get('sep0', np.nan):5.2f} {s.get('sep_rest', np.nan):8.2f}", flush=True)
    print(summary(rows))
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
