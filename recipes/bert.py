"""BERT pretraining: masked LM (15%, 80/10/10) + next-sentence prediction (Devlin et al. 2018).

Data: plain-text files under ``data.path`` (documents separated by blank lines), or, when
none is given, the docstrings of the installed Python packages: a real English corpus
that every machine running this launcher already has. A WordPiece vocabulary is trained
on it with ``tokenizers``; sentence pairs are built once and cached (file-locked, so
workers on one node build it once). Masks are drawn per sample from a seed of (run seed,
epoch, index), so a sample is masked the same way whatever the world size or micro-batch.

The model returns *sums* of per-unit losses; the loop divides by the global unit counts
from ``count()``, which makes gradient accumulation exact with uneven token counts.
"""

from __future__ import annotations

import random
import re
import sysconfig
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from launcher.config import BertRecipe, Config
from launcher.data import Data, built_once
from recipes.protocol import Evaluate

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD, UNK, CLS, SEP, MASK = range(len(SPECIALS))
METRICS = ["mlm", "nsp", "mlm_acc", "nsp_acc"]  # what evaluation reports
evaluate: Evaluate | None = None  # evaluation: the mean of the per-sample METRICS sums


def spec(cfg: Config) -> BertRecipe:
    """``cfg.recipe``, typed as this recipe's section."""
    assert isinstance(cfg.recipe, BertRecipe), cfg.recipe
    return cfg.recipe


# --- model -------------------------------------------------------------------------------


class BertPretraining(nn.Module):
    """``BertForPreTraining`` whose forward takes a batch and returns summed losses.

    Only masked positions go through the MLM head (the vocabulary projection is the
    largest activation otherwise). In eval mode it also returns correct-prediction counts.
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        from transformers import BertConfig, BertForPreTraining

        m = spec(cfg).model
        config = BertConfig(
            vocab_size=m.vocab_size,
            hidden_size=m.hidden_size,
            num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_heads,
            intermediate_size=m.intermediate_size,
            hidden_dropout_prob=m.dropout,
            attention_probs_dropout_prob=m.dropout,
            max_position_embeddings=max(512, spec(cfg).seq_len),
            pad_token_id=PAD,
        )
        self.net = BertForPreTraining(config)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.net.bert(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
        )
        sequence, pooled = out[0], out[1]
        labels = batch["labels"]
        masked = labels != -100
        mlm_logits, nsp_logits = self.net.cls(sequence[masked], pooled)
        targets = labels[masked]
        result = {
            "mlm": F.cross_entropy(mlm_logits.float(), targets, reduction="sum"),
            "nsp": F.cross_entropy(nsp_logits.float(), batch["next_sentence_label"], reduction="sum"),
        }
        if not self.training:
            result["mlm_acc"] = (mlm_logits.argmax(-1) == targets).sum().float()
            result["nsp_acc"] = (nsp_logits.argmax(-1) == batch["next_sentence_label"]).sum().float()
        return result


def build_model(cfg: Config) -> nn.Module:
    return BertPretraining(cfg)


def count(batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Units each loss (and eval metric) averages over: masked tokens, sentence pairs."""
    masked = int((batch["labels"] != -100).sum())
    pairs = int(batch["next_sentence_label"].numel())
    return {"mlm": masked, "nsp": pairs, "mlm_acc": masked, "nsp_acc": pairs}


def example_batch(cfg: Config, n: int) -> dict[str, torch.Tensor]:
    """A synthetic full-length batch of ``n`` pairs, 15% masked (for the memory estimate)."""
    t = spec(cfg).seq_len
    labels = torch.full((n, t), -100, dtype=torch.long)
    labels[:, 1 : 1 + max(1, round(spec(cfg).mask_prob * t))] = UNK
    return {
        "input_ids": torch.full((n, t), UNK, dtype=torch.long),
        "token_type_ids": torch.zeros((n, t), dtype=torch.long),
        "attention_mask": torch.ones((n, t), dtype=torch.long),
        "labels": labels,
        "next_sentence_label": torch.zeros(n, dtype=torch.long),
    }


# --- data --------------------------------------------------------------------------------


def build_data(cfg: Config, cache_dir: Path) -> Data:
    """Tokenizer + sentence pairs, built once per cache key (file-locked), then loaded."""
    r = spec(cfg)
    key = [cfg.data.path, r.model.vocab_size, r.seq_len, r.corpus_max_mb, r.eval_fraction, cfg.run.seed, 2]
    where = built_once(cache_dir, "bert", key, lambda root: _prepare(cfg, root))
    pairs = torch.load(where / "pairs.pt", weights_only=True)
    n_eval = pairs["n_eval"]

    def pairs_of(rows: range, fixed_masks: bool) -> Pairs:
        return Pairs(
            pairs,
            rows,
            seq_len=r.seq_len,
            mask_prob=r.mask_prob,
            vocab=r.model.vocab_size,
            seed=cfg.run.seed,
            fixed_masks=fixed_masks,
        )

    return Data(
        train=pairs_of(range(n_eval, len(pairs["label"])), fixed_masks=False),
        eval=pairs_of(range(n_eval), fixed_masks=True),
        collate=collate,
    )


class Pairs(Dataset):
    """Sentence pairs, masked on access. Index ``i`` is ``epoch * len + position``."""

    def __init__(
        self,
        pairs: dict[str, Any],
        rows: range,
        *,
        seq_len: int,
        mask_prob: float,
        vocab: int,
        seed: int,
        fixed_masks: bool = False,
    ) -> None:
        self.tokens, self.offsets = pairs["tokens"], pairs["offsets"]
        self.len_a, self.labels = pairs["len_a"], pairs["label"]
        self.rows, self.seq_len, self.mask_prob, self.vocab = rows, seq_len, mask_prob, vocab
        self.seed, self.fixed = seed, fixed_masks

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        epoch, pos = divmod(i, len(self.rows))
        row = self.rows[pos]
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        la = int(self.len_a[row])
        body = self.tokens[start:end].long()
        a, b = body[:la], body[la:]
        ids = torch.cat([torch.tensor([CLS]), a, torch.tensor([SEP]), b, torch.tensor([SEP])])
        types = torch.cat([torch.zeros(la + 2, dtype=torch.long), torch.ones(len(b) + 1, dtype=torch.long)])
        g = torch.Generator().manual_seed(hash((self.seed, 0 if self.fixed else epoch, row)) & 0x7FFFFFFF)
        ids, labels = mask_tokens(ids, self.mask_prob, self.vocab, g)
        return {
            "input_ids": ids,
            "token_type_ids": types,
            "labels": labels,
            "next_sentence_label": torch.tensor(int(self.labels[row])),
        }


def mask_tokens(ids: torch.Tensor, prob: float, vocab: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Devlin et al. 2018 sec. 3.1: pick 15% of tokens; 80% -> [MASK], 10% random, 10% kept."""
    candidates = (ids != CLS) & (ids != SEP)
    pick = (torch.rand(ids.shape, generator=g) < prob) & candidates
    if not pick.any():  # every pair teaches the MLM at least one token
        idx = candidates.nonzero().flatten()
        pick[idx[torch.randint(len(idx), (1,), generator=g)]] = True
    labels = torch.where(pick, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=g)
    out = ids.clone()
    out[pick & (roll < 0.8)] = MASK
    random_ids = torch.randint(len(SPECIALS), vocab, ids.shape, generator=g)
    swap = pick & (roll >= 0.8) & (roll < 0.9)
    out[swap] = random_ids[swap]
    return out, labels


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pad to the longest pair in the micro-batch (so token counts differ between batches)."""
    longest = max(len(x["input_ids"]) for x in items)

    def pad(name: str, value: int) -> torch.Tensor:
        return torch.stack([F.pad(x[name], (0, longest - len(x[name])), value=value) for x in items])

    ids = pad("input_ids", PAD)
    return {
        "input_ids": ids,
        "token_type_ids": pad("token_type_ids", 0),
        "attention_mask": (ids != PAD).long(),
        "labels": pad("labels", -100),
        "next_sentence_label": torch.stack([x["next_sentence_label"] for x in items]),
    }


# --- corpus, tokenizer, pairs (built once) -----------------------------------------------


def _prepare(cfg: Config, where: Path) -> None:
    r = spec(cfg)
    docs = read_corpus(cfg.data.path, int(r.corpus_max_mb * 2**20))
    tokenizer = train_wordpiece(docs, r.model.vocab_size)
    tokenizer.save(str(where / "tokenizer.json"))
    pairs = make_pairs(docs, tokenizer, r.seq_len, cfg.run.seed)
    n = len(pairs["label"])
    pairs["n_eval"] = max(1, int(n * r.eval_fraction))
    if n < 2 * pairs["n_eval"] or n < 16:
        raise ValueError(f"data.path: only {n} sentence pairs could be made from the corpus; give more text")
    torch.save(pairs, where / "pairs.pt")


def read_corpus(path: str | None, max_bytes: int) -> list[list[str]]:
    """Documents as lists of sentences, from text files or the installed packages' docstrings."""
    texts: list[str] = []
    if path:
        root = Path(path).expanduser()
        files = sorted(root.rglob("*.txt")) if root.is_dir() else [root]
        if not files or not all(f.is_file() for f in files):
            raise ValueError(f"data.path: no text files at {root} (expected a .txt file or a folder of them)")
        size = 0
        for f in files:
            for doc in re.split(r"\n\s*\n", f.read_text(errors="replace")):
                texts.append(doc)
                size += len(doc)
            if size >= max_bytes:
                break
    else:
        texts = _docstrings(max_bytes)
    docs = [s for s in (_sentences(t) for t in texts) if len(s) >= 2]
    if not docs:
        raise ValueError("data.path: the corpus has no document of two or more sentences")
    return docs


TRIPLE = re.compile(r'"""(.*?)"""', re.DOTALL)  # consumes strings pairwise, left to right


def _docstrings(max_bytes: int) -> list[str]:
    """Docstrings of installed Python packages, in a fixed order (the fallback corpus)."""
    root = Path(sysconfig.get_paths()["purelib"])
    out: list[str] = []
    size = 0
    for f in sorted(root.glob("*/**/*.py")):
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        for m in TRIPLE.finditer(text):
            line_start = text.rfind("\n", 0, m.start()) + 1
            doc = m.group(1)
            if len(doc) > 200 and text[line_start : m.start()].strip() in ("", "r", "u"):
                out.append(doc)
                size += len(doc)
        if size >= max_bytes:
            break
    return out


def _sentences(text: str) -> list[str]:
    flat = re.sub(r"\s+", " ", text).strip()
    return [s for s in re.split(r"(?<=[.!?:])\s+", flat) if len(s) > 8]


def train_wordpiece(docs: list[list[str]], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator((s for d in docs for s in d), trainer=trainer)
    return tok


def make_pairs(docs: list[list[str]], tokenizer: Any, seq_len: int, seed: int) -> dict[str, Any]:
    """NSP pairs (Devlin et al. sec. A.1): B follows A half the time, else a random document."""
    rng = random.Random(seed)
    encoded = [[e.ids for e in tokenizer.encode_batch(d)] for d in docs]
    budget = seq_len - 3  # [CLS] A [SEP] B [SEP]
    tokens: list[int] = []
    offsets, len_a, labels = [0], [], []
    for d, sents in enumerate(encoded):
        chunk: list[list[int]] = []
        for i, s in enumerate(sents):
            chunk.append(s)
            if sum(map(len, chunk)) < budget and i < len(sents) - 1:
                continue
            if len(chunk) >= 2 or len(encoded) > 1:
                a, b, label = _pair(chunk, d, encoded, budget, rng)
                if a and b:
                    tokens += a + b
                    offsets.append(len(tokens))
                    len_a.append(len(a))
                    labels.append(label)
            chunk = []
    return {
        "tokens": torch.tensor(tokens, dtype=torch.int32),
        "offsets": torch.tensor(offsets, dtype=torch.long),
        "len_a": torch.tensor(len_a, dtype=torch.int32),
        "label": torch.tensor(labels, dtype=torch.long),
    }


def _pair(
    chunk: list[list[int]], d: int, encoded: list[list[list[int]]], budget: int, rng: random.Random
) -> tuple[list[int], list[int], int]:
    """Sentences A from ``chunk`` (of document ``d``), B its continuation (label 0) or the text
    from a random sentence of another document on (label 1), cut to ``budget`` tokens."""
    cut = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
    a = [t for s2 in chunk[:cut] for t in s2]
    if len(chunk) >= 2 and rng.random() < 0.5:
        b, label = [t for s2 in chunk[cut:] for t in s2], 0
    else:
        other = rng.choice([j for j in range(len(encoded)) if j != d] or [d])
        start = rng.randrange(len(encoded[other]))
        b, label = [t for s2 in encoded[other][start:] for t in s2], 1
    while len(a) + len(b) > budget:  # truncate the longer side (Devlin et al.)
        (a if len(a) > len(b) else b).pop()
    return a, b, label
