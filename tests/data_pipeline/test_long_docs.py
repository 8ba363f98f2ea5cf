"""A long document encoded in pieces (data_pipeline/long_docs.py) gives exactly the ids of the
tokenizer's own one-call encode, for the tokenizer kinds corpora are prepared with."""
from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from data_pipeline import long_docs
from data_pipeline.embedded_corpus import locate_corpus, read_articles
from data_pipeline.readers import content_hash

# Qwen2/Qwen3's pre-tokenizer split (tokenizer.json of Qwen3-*-Base)
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PIECE = 3000  # characters a piece: ~60 cuts in the test text


@pytest.fixture(scope="module")
def articles() -> list[str]:
    return [text for _, text in itertools.islice(read_articles(locate_corpus()), 300)]


@pytest.fixture(scope="module")
def text(articles) -> str:
    """Articles joined with the whitespace real documents have: blank lines, tabs, runs of spaces."""
    seps = ["\n\n", "\n", "  ", "\t", " \n", ".\n", "\r\n"]
    return "".join(a + seps[i % len(seps)] for i, a in enumerate(articles))[:150_000]


def _bpe(articles, pre, normalizer=None, post=None):
    tok = Tokenizer(models.BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    if pre is not None:
        tok.pre_tokenizer = pre
    tok.train_from_iterator(articles, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if post is not None:
        tok.post_processor = post
    return tok


def _wordpiece(articles):
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(articles, trainers.WordPieceTrainer(
        vocab_size=1000, special_tokens=["[UNK]", "[CLS]", "[SEP]"], show_progress=False))
    tok.post_processor = processors.BertProcessing(("[SEP]", 2), ("[CLS]", 1))
    return tok


def _unigram(articles):
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    tok.train_from_iterator(articles, trainers.UnigramTrainer(
        vocab_size=1000, special_tokens=["<unk>"], unk_token="<unk>", show_progress=False))
    return tok


KINDS = {
    "byte-level BPE, BOS/EOS template": lambda a: _bpe(
        a, pre_tokenizers.ByteLevel(add_prefix_space=False),
        post=processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])),
    "Qwen-style regex split + byte level, NFC": lambda a: _bpe(
        a, pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), "isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
        normalizer=normalizers.NFC()),
    "WordPiece, BERT pre-tokenizer, [CLS]/[SEP]": _wordpiece,
    "Unigram behind Metaspace, NFKC": _unigram,
    "BPE with no pre-tokenizer": lambda a: _bpe(a, None),
}


@pytest.fixture(scope="module")
def tokenizers(articles) -> dict[str, Tokenizer]:
    return {name: make(articles) for name, make in KINDS.items()}


@pytest.mark.parametrize("special", [True, False], ids=["with-specials", "plain"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_pieces_give_the_tokenizers_own_ids(tokenizers, text, kind, special):
    tok = tokenizers[kind]
    cuts = list(long_docs.cuts(tok, text, PIECE))
    assert len(cuts) >= 40 and all(b - a >= PIECE for a, b in zip([0, *cuts], cuts))  # really in pieces
    got = long_docs.encode_long(tok, text, special, piece_chars=PIECE)
    assert got.dtype == np.int32
    assert got.tolist() == tok.encode(text, add_special_tokens=special).ids


def test_the_cut_check_is_what_keeps_it_exact(tokenizers, text, monkeypatch):
    """Without the check a tokenizer that merges across spaces gets other ids at the cuts."""
    tok = tokenizers["BPE with no pre-tokenizer"]
    monkeypatch.setattr(long_docs, "_clean_cut", lambda tok, text, at: True)
    assert (long_docs.encode_long(tok, text, False, piece_chars=PIECE).tolist()
            != tok.encode(text, add_special_tokens=False).ids)


def test_no_clean_cut_encodes_whole(tokenizers):
    """A document without whitespace has no cut: one encode, the same ids."""
    tok = tokenizers["byte-level BPE, BOS/EOS template"]
    text = "x" * (3 * PIECE)
    assert list(long_docs.cuts(tok, text, PIECE)) == []
    assert long_docs.encode_long(tok, text, True, piece_chars=PIECE).tolist() == tok.encode(text).ids


def test_truncating_tokenizer_is_encoded_whole(tokenizers, text):
    tok = Tokenizer.from_str(tokenizers["byte-level BPE, BOS/EOS template"].to_str())
    tok.enable_truncation(100)
    assert long_docs.encode_long(tok, text, True, piece_chars=PIECE).tolist() == tok.encode(text).ids


def test_content_hash_of_a_long_text_is_blake2b_of_its_utf8(text):
    long = (text + "é€😀") * 20  # > PIECE_CHARS characters, with 2-, 3- and 4-byte UTF-8
    assert len(long) > long_docs.PIECE_CHARS
    expected = hashlib.blake2b(long.encode("utf-8"), digest_size=8).digest()
    assert content_hash(long) == int.from_bytes(expected, "little")


def test_streamed_token_file_is_what_np_save_writes(tmp_path):
    from data_pipeline.shard_writer import write_int32_npy

    rng = np.random.default_rng(0)
    docs = [[rng.integers(0, 2**31 - 1, n, dtype=np.int32) for n in sizes] for sizes in ([3, 0, 5], [], [7], [0])]
    lengths = write_int32_npy(tmp_path / "streamed.npy", docs)
    np.save(tmp_path / "saved.npy", np.concatenate([p for d in docs for p in d]))
    assert lengths == [8, 0, 7, 0]
    assert (tmp_path / "streamed.npy").read_bytes() == (tmp_path / "saved.npy").read_bytes()
