"""BERT pretraining: masked LM (15%, 80/10/10) + next-sentence prediction (Devlin et al. 2018).

Data: plain-text files under ``data.path`` (documents separated by blank lines), or, when
none is given, the docstrings of the installed Python packages: a real English corpus
that every machine running this launcher already has, read as a stream up to
``recipe.corpus_max_mb``. A WordPiece vocabulary is trained on it with ``tokenizers``;
sentence pairs are built once, in time linear in the corpus, and cached (file-locked, so
workers on one node build it once). Masks are drawn per sample from a seed of (run seed,
epoch, index), so a sample is masked the same way whatever the world size or micro-batch.

The model returns *sums* of per-unit losses; the loop divides by the global unit counts
from ``count()``, which makes gradient accumulation exact with uneven token counts.
"""

from __future__ import annotations

import random
import re
import sysconfig
import time
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

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


trace_model = build_model  # the masked positions come from the batch: a fake trace reads them


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
    version = 3  # of the preparation: 3 streams the corpus (the cap cuts inside a file) and sorts the vocabulary
    key = [cfg.data.path, r.model.vocab_size, r.seq_len, r.corpus_max_mb, r.eval_fraction, cfg.run.seed, version]
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
#
# Linear in the corpus, which is never held as text: the documents stream into the tokenizer's
# word counts and, split into sentences, into a spool file; the spool is then encoded into one
# flat array of ids. Each pair costs O(seq_len): its "not next" B is a random other document
# picked by index.


def _prepare(cfg: Config, where: Path) -> None:
    r = spec(cfg)
    max_bytes = int(r.corpus_max_mb * 2**20)
    print(f"bert data: building the tokenizer and sentence pairs in {where}", flush=True)
    reading, spool = Progress("reading (the tokenizer counts words)"), where / "sentences.txt"
    with spool.open("w", encoding="utf-8") as out:
        tokenizer = train_wordpiece(spooled(documents(cfg.data.path, max_bytes, reading), out), r.model.vocab_size)
    Progress("tokenizer (its vocabulary from the counts)", start=reading.ended).done(size=tokenizer.get_vocab_size())
    tokenizer.save(str(where / "tokenizer.json"))
    corpus = encode(unspooled(spool), tokenizer, Progress("encoding"))
    spool.unlink()
    pairs = make_pairs(corpus, r.seq_len, cfg.run.seed, Progress("pairs"))
    n = len(pairs["label"])
    pairs["n_eval"] = max(1, int(n * r.eval_fraction))
    if n < 2 * pairs["n_eval"] or n < 16:
        raise ValueError(f"data.path: only {n} sentence pairs could be made from the corpus; give more text")
    torch.save(pairs, where / "pairs.pt")


class Progress:
    """One phase of the data preparation as plain console lines: its counts, each with its rate,
    at most every ``every_s`` seconds, then a last line with the totals when it is ``done``."""

    def __init__(self, phase: str, every_s: float = 5.0, start: float | None = None) -> None:
        self.phase, self.every_s = phase, every_s
        self.start = self.last = self.ended = time.monotonic() if start is None else start
        self.counts: dict[str, float] = {}
        self.totals: dict[str, float] = {}  # shown without a rate

    def add(self, **counts: float) -> None:
        for unit, n in counts.items():
            self.counts[unit] = self.counts.get(unit, 0) + n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            print(self.line(now), flush=True)

    def done(self, **totals: float) -> None:
        self.ended = time.monotonic()
        self.totals.update(totals)
        print(self.line(self.ended, " done"), flush=True)

    def line(self, now: float, state: str = "") -> str:
        took = max(now - self.start, 1e-9)
        parts = [f"{_count(n)} {unit} ({_count(n / took)}/s)" for unit, n in self.counts.items()]
        parts += [f"{unit} {_count(n)}" for unit, n in self.totals.items()]
        return f"bert data: {self.phase}{state}: {', '.join(parts)} in {took:.1f} s"


def _count(n: float) -> str:
    return f"{n:,.0f}" if n >= 100 or n == int(n) else f"{n:.2f}"


def documents(path: str | None, max_bytes: int, progress: Progress | None = None) -> Iterator[list[str]]:
    """Documents as lists of sentences (two or more), read incrementally until ``max_bytes`` of
    text: paragraphs of the ``.txt`` files at ``path``, else the installed packages' docstrings."""
    texts = _paragraphs(_text_files(path)) if path else _docstrings()
    size = found = 0
    for text in texts:
        size += len(text)
        sentences = _sentences(text)
        if len(sentences) >= 2:
            found += 1
            yield sentences
        if progress is not None:
            progress.add(MB=len(text) / 2**20, documents=int(len(sentences) >= 2))
        if size >= max_bytes:
            break
    if not found:
        raise ValueError("data.path: the corpus has no document of two or more sentences")
    if progress is not None:
        progress.done()


def _text_files(path: str) -> list[Path]:
    root = Path(path).expanduser()
    files = sorted(root.rglob("*.txt")) if root.is_dir() else [root]
    if not files or not all(f.is_file() for f in files):
        raise ValueError(f"data.path: no text files at {root} (expected a .txt file or a folder of them)")
    return files


def _paragraphs(files: list[Path]) -> Iterator[str]:
    """The documents of the files, line by line: paragraphs separated by blank lines."""
    for f in files:
        lines: list[str] = []
        with f.open(encoding="utf-8", errors="replace") as text:
            for line in text:
                if line.strip():
                    lines.append(line)
                elif lines:
                    yield "".join(lines)
                    lines = []
        if lines:
            yield "".join(lines)


TRIPLE = re.compile(r'"""(.*?)"""', re.DOTALL)  # consumes strings pairwise, left to right


def _docstrings() -> Iterator[str]:
    """Docstrings of installed Python packages, in a fixed order (the fallback corpus)."""
    root = Path(sysconfig.get_paths()["purelib"])
    for f in sorted(root.glob("*/**/*.py")):
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        for m in TRIPLE.finditer(text):
            line_start = text.rfind("\n", 0, m.start()) + 1
            doc = m.group(1)
            if len(doc) > 200 and text[line_start : m.start()].strip() in ("", "r", "u"):
                yield doc


def _sentences(text: str) -> list[str]:
    flat = re.sub(r"\s+", " ", text).strip()
    return [s for s in re.split(r"(?<=[.!?:])\s+", flat) if len(s) > 8]


def spooled(docs: Iterable[list[str]], out: TextIO) -> Iterator[list[str]]:
    """``docs``, each also written to ``out``: a sentence a line, a blank line after each document."""
    for d in docs:
        out.write("\n".join(d) + "\n\n")
        yield d


def unspooled(path: Path) -> Iterator[list[str]]:
    """The documents ``spooled`` wrote to ``path``, one at a time."""
    with path.open(encoding="utf-8", newline="\n") as lines:
        doc: list[str] = []
        for line in lines:
            if line == "\n":
                yield doc
                doc = []
            else:
                doc.append(line[:-1])


def train_wordpiece(docs: Iterable[list[str]], vocab_size: int) -> Any:
    """A WordPiece vocabulary trained on ``docs`` as they stream in (each document one batch).

    The trainer numbers the tokens in the order of its hash maps, which differs from run to run
    (huggingface/tokenizers#1794), so the ids are renumbered: the specials first, then the tokens
    sorted. Where merge counts tie at the end of the vocabulary, the trainer can still keep other
    tokens from one run to the next; renumbering cannot fix that.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    order = SPECIALS + sorted(set(tok.get_vocab()) - set(SPECIALS))
    tok.model = models.WordPiece({t: i for i, t in enumerate(order)}, unk_token="[UNK]")
    return tok


@dataclass
class Encoded:
    """The corpus as token ids: sentence ``s`` is ``ids[ends[s]:ends[s + 1]]``; document ``d`` is
    sentences ``firsts[d]`` to ``firsts[d + 1]``."""

    ids: array = field(default_factory=lambda: array("i"))
    ends: array = field(default_factory=lambda: array("q", [0]))
    firsts: array = field(default_factory=lambda: array("q", [0]))


def encode(docs: Iterable[list[str]], tokenizer: Any, progress: Progress, batch: int = 20_000) -> Encoded:
    """``docs`` encoded about ``batch`` sentences at a time (the tokenizer uses every core)."""
    out = Encoded()
    pending: list[str] = []

    def flush() -> None:
        before = len(out.ids)
        for e in tokenizer.encode_batch_fast(pending):
            out.ids.extend(e.ids)
            out.ends.append(len(out.ids))
        progress.add(tokens=len(out.ids) - before)
        pending.clear()

    for d in docs:
        pending += d
        out.firsts.append(out.firsts[-1] + len(d))
        progress.add(documents=1)
        if len(pending) >= batch:
            flush()
    flush()
    progress.done()
    return out


def make_pairs(
    corpus: Encoded, seq_len: int, seed: int, progress: Progress | None = None, work: Counter[str] | None = None
) -> dict[str, Any]:
    """NSP pairs (Devlin et al. sec. A.1): each document cut into chunks of about ``seq_len``
    tokens, a chunk split into A and B, B following A half the time, else (and for one-sentence
    chunks) text from a random sentence of a random other document on. O(``seq_len``) per pair.

    ``work`` counts what the pairs looked at: ``documents`` (the pair's own and each candidate
    for its random B) and ``tokens`` copied (the test of linear time reads it).
    """
    rng, work = random.Random(seed), Counter() if work is None else work
    budget = seq_len - 3  # [CLS] A [SEP] B [SEP]
    ends, firsts = corpus.ends, corpus.firsts
    tokens, offsets, len_a, labels = array("i"), [0], array("i"), array("q")
    for d in range(len(firsts) - 1):
        start, end = firsts[d], firsts[d + 1]
        for s in range(start, end):  # the chunk is sentences start..s
            if ends[s + 1] - ends[start] < budget and s < end - 1:
                continue
            if s > start or len(firsts) > 2:
                a, b, label = _pair(corpus, d, range(start, s + 1), budget, rng, work)
                if a and b:
                    tokens += corpus.ids[a.start : a.stop] + corpus.ids[b.start : b.stop]
                    offsets.append(len(tokens))
                    len_a.append(len(a))
                    labels.append(label)
            start = s + 1
        if progress is not None:
            progress.add(documents=1)
    if progress is not None:
        progress.done(pairs=len(labels))
    return {"tokens": _tensor(tokens, torch.int32), "offsets": torch.tensor(offsets, dtype=torch.long),
            "len_a": _tensor(len_a, torch.int32), "label": _tensor(labels, torch.long)}  # fmt: skip


def _pair(
    corpus: Encoded, d: int, chunk: range, budget: int, rng: random.Random, work: Counter[str]
) -> tuple[range, range, int]:
    """Token spans: A, sentences from ``chunk`` (of document ``d``), and B its continuation
    (label 0) or the text from a random sentence of a random other document on (label 1), cut to
    ``budget`` tokens by trimming the longer side (Devlin et al.)."""
    ends, firsts = corpus.ends, corpus.firsts
    cut = chunk.start + (rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1)
    a = range(ends[chunk.start], ends[cut])
    if len(chunk) >= 2 and rng.random() < 0.5:
        b, label = range(ends[cut], ends[chunk.stop]), 0
        work["documents"] += 1
    else:
        other = rng.randrange(max(1, len(firsts) - 2))  # uniform over the documents but d
        other += 0 if len(firsts) == 2 or other < d else 1
        first = firsts[other] + rng.randrange(firsts[other + 1] - firsts[other])
        b, label = range(ends[first], min(ends[firsts[other + 1]], ends[first] + budget)), 1
        work["documents"] += 2
    la, lb = trim(len(a), len(b), budget)
    work["tokens"] += la + lb
    return a[:la], b[:lb], label


def trim(la: int, lb: int, budget: int) -> tuple[int, int]:
    """Lengths of A and B after removing their last tokens, one at a time from the longer (B on a
    tie), until both fit in ``budget``."""
    if la + lb <= budget:
        return la, lb
    short = min(la, lb)
    if short <= budget // 2:  # only the longer side is cut
        return (budget - lb, lb) if la > lb else (la, budget - la)
    return (budget + 1) // 2, budget // 2


def _tensor(values: array, dtype: torch.dtype) -> torch.Tensor:
    return torch.frombuffer(values, dtype=dtype).clone() if values else torch.zeros(0, dtype=dtype)
