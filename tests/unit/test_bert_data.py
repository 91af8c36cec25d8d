"""BERT data preparation is linear: the corpus is streamed, and each sentence pair costs the same
whatever the corpus size; the pairs are the ones the per-document original made, the same for a seed."""

from __future__ import annotations

import random
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest
import torch

from launcher.cli import load
from recipes import bert
from tests.conftest import write_corpus


def fake_corpus(docs: int, seed: int = 0) -> bert.Encoded:
    """``docs`` documents of 2 to 20 sentences of 3 to 40 token ids, as the encoder lays them out."""
    rng, out = random.Random(seed), bert.Encoded()
    for _ in range(docs):
        for _ in range(rng.randint(2, 20)):
            out.ids.extend(rng.randrange(5, 1000) for _ in range(rng.randint(3, 40)))
            out.ends.append(len(out.ids))
        out.firsts.append(len(out.ends) - 1)
    return out


def work_per_pair(docs: int) -> dict[str, float]:
    work: Counter[str] = Counter()
    pairs = bert.make_pairs(fake_corpus(docs), seq_len=64, seed=0, work=work)
    n = len(pairs["label"])
    assert n > docs  # 64-token pairs: several per document
    return {k: v / n for k, v in work.items()}


def test_the_work_per_pair_stays_the_same_when_the_corpus_doubles() -> None:
    small, large = work_per_pair(1000), work_per_pair(2000)
    assert set(small) == set(large) == {"documents", "tokens"}
    for unit in small:  # the documents looked at and tokens copied per pair, not per pair and document
        assert large[unit] == pytest.approx(small[unit], rel=0.05), (unit, small, large)
    assert 1 <= small["documents"] <= 2 and small["tokens"] <= 61


def original_pairs(corpus: bert.Encoded, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    """The per-document original (quadratic: a list of every other document for each random B)."""
    rng, budget = random.Random(seed), seq_len - 3
    encoded = [[corpus.ids[corpus.ends[s] : corpus.ends[s + 1]].tolist() for s in range(corpus.firsts[d],
               corpus.firsts[d + 1])] for d in range(len(corpus.firsts) - 1)]  # fmt: skip
    tokens: list[int] = []
    offsets, len_a, labels = [0], [], []
    for d, sents in enumerate(encoded):
        chunk: list[list[int]] = []
        for i, s in enumerate(sents):
            chunk.append(s)
            if sum(map(len, chunk)) < budget and i < len(sents) - 1:
                continue
            if len(chunk) >= 2 or len(encoded) > 1:
                cut = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
                a = [t for s2 in chunk[:cut] for t in s2]
                if len(chunk) >= 2 and rng.random() < 0.5:
                    b, label = [t for s2 in chunk[cut:] for t in s2], 0
                else:
                    other = rng.choice([j for j in range(len(encoded)) if j != d] or [d])
                    start = rng.randrange(len(encoded[other]))
                    b, label = [t for s2 in encoded[other][start:] for t in s2], 1
                while len(a) + len(b) > budget:
                    (a if len(a) > len(b) else b).pop()
                if a and b:
                    tokens += a + b
                    offsets.append(len(tokens))
                    len_a.append(len(a))
                    labels.append(label)
            chunk = []
    return {"tokens": torch.tensor(tokens, dtype=torch.int32), "offsets": torch.tensor(offsets),
            "len_a": torch.tensor(len_a, dtype=torch.int32), "label": torch.tensor(labels)}  # fmt: skip


@pytest.mark.parametrize("seq_len", [16, 64, 512])
def test_the_pairs_are_the_originals(seq_len: int) -> None:
    corpus = fake_corpus(300, seed=seq_len)
    new, old = bert.make_pairs(corpus, seq_len, seed=3), original_pairs(corpus, seq_len, seed=3)
    assert new.keys() == old.keys()
    for k in old:
        assert new[k].dtype == old[k].dtype and torch.equal(new[k], old[k]), k
    assert set(new["label"].tolist()) == {0, 1}  # both "next" and "not next" pairs


def test_trim_takes_tokens_off_the_longer_side_one_at_a_time() -> None:
    for budget in range(1, 30):
        for la in range(0, 40):
            for lb in range(0, 40):
                a, b = la, lb
                while a + b > budget:
                    a, b = (a - 1, b) if a > b else (a, b - 1)
                assert bert.trim(la, lb, budget) == (a, b), (la, lb, budget)


def test_a_single_document_corpus_pairs_within_itself() -> None:
    corpus = fake_corpus(1, seed=1)
    pairs = bert.make_pairs(corpus, 16, seed=0)
    assert torch.equal(pairs["tokens"], original_pairs(corpus, 16, seed=0)["tokens"])


def prepare(tmp_path: Path, corpus: Path, *overrides: str) -> Path:
    cfg = load(["scale=smoke", f"data.path={corpus}", "recipe.model.vocab_size=600", *overrides])
    where = tmp_path / f"built-{len(list(tmp_path.glob('built-*')))}"
    where.mkdir()
    bert._prepare(cfg, where)
    return where


def test_the_prepared_data_is_the_same_for_a_seed_and_each_phase_reports_progress(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = write_corpus(tmp_path / "texts" / "a.txt", 0.3)
    first, again, other = prepare(tmp_path, corpus), prepare(tmp_path, corpus), prepare(tmp_path, corpus, "run.seed=1")
    a, b, c = (torch.load(d / "pairs.pt", weights_only=True) for d in (first, again, other))
    assert all(torch.equal(a[k], b[k]) for k in ("tokens", "offsets", "len_a", "label")) and a["n_eval"] == b["n_eval"]
    assert not torch.equal(a["label"], c["label"])
    assert (first / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()
    assert sorted(p.name for p in first.iterdir()) == ["pairs.pt", "tokenizer.json"]  # the spool removed
    out = capsys.readouterr().out
    for phase in ("reading (the tokenizer counts words) done: ", "tokenizer (its vocabulary from the counts) done:",
                  "encoding done: ", "pairs done: "):  # fmt: skip
        assert out.count(f"bert data: {phase}") == 3, out
    reading = next(ln for ln in out.splitlines() if "reading" in ln)
    assert " MB (" in reading and "/s), " in reading and " documents (" in reading and reading.endswith(" s")
    assert "size 600" in out and f"pairs {len(a['label']):,} in " in out


def test_progress_lines_come_at_most_every_few_seconds(capsys: pytest.CaptureFixture[str]) -> None:
    quiet = bert.Progress("phase", every_s=3600)
    for _ in range(1000):
        quiet.add(things=1)
    assert capsys.readouterr().out == ""
    quiet.done(size=7)
    assert capsys.readouterr().out.startswith("bert data: phase done: 1,000 things (")
    loud = bert.Progress("phase", every_s=0)
    loud.add(MB=1.5)
    assert "bert data: phase: 1.50 MB (" in capsys.readouterr().out


def test_the_corpus_is_streamed_never_held(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "texts" / "a.txt", 4)
    tracemalloc.start()
    try:
        tokenizer = bert.train_wordpiece(bert.documents(str(corpus), 2**30), 600)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tokenizer.get_vocab_size() == 600
    assert peak < 2**20, f"{peak / 2**20:.1f} MiB held while training on a 4 MiB corpus"


def test_reading_stops_at_corpus_max_mb(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "texts" / "a.txt", 1)
    whole = list(bert.documents(str(corpus.parent), 2**30))
    capped = list(bert.documents(str(corpus.parent), 2**18))
    assert capped == whole[: len(capped)] and len(whole) > 3 * len(capped)
    text = sum(len(" ".join(d)) for d in capped)
    assert 2**18 - 5000 < text < 2**18 + 5000  # up to the document that crosses the cap


def test_bad_corpora_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data.path: no text files at"):
        list(bert.documents(str(tmp_path), 100))
    (tmp_path / "a.txt").write_text("One line only.\n\nAnother paragraph without a second sentence\n")
    with pytest.raises(ValueError, match="data.path: the corpus has no document of two or more sentences"):
        bert.train_wordpiece(bert.documents(str(tmp_path), 2**20), 100)


def test_the_spool_gives_back_the_documents_read(tmp_path: Path) -> None:
    text = "Ünïcode sentence one.\r\nIt goes on here.\x0cAnd a form feed?\n\n\u2028Second doc: yes. Two sentences!\n"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    docs = list(bert.documents(str(tmp_path), 2**20))
    assert len(docs) == 2 and docs[0][0] == "Ünïcode sentence one."
    with (tmp_path / "spool").open("w", encoding="utf-8") as out:
        assert list(bert.spooled(iter(docs), out)) == docs
    assert list(bert.unspooled(tmp_path / "spool")) == docs
