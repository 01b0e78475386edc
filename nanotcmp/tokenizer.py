"""
BERT WordPiece tokenizer, from scratch, standard library only.

The target is transformers' BertTokenizer, which since transformers 5 is the Rust `tokenizers`
pipeline (BertNormalizer, BertPreTokenizer, WordPiece, special tokens matched in the raw text).
Where that departs from Google's original BERT we follow it, as that is what checkpoints now see:
no NFC; unassigned code points (Cn) are kept; accents are stripped before lowercasing, which is
per character (Σ -> σ, never ς); the CJK ranges skip U+2B820..U+2B91F. One gap is left: the Rust
categories come from Unicode 8-era tables, so ~500 marks and punctuation added or recategorised
since (none of them English) follow Python's newer unicodedata instead.
"""

import re
import string
import unicodedata

REQUIRED = ("[CLS]", "[SEP]", "[PAD]", "[UNK]")
SPECIALS = REQUIRED + ("[MASK]",)  # matched verbatim in the input, before any normalisation
MAX_WORD_CHARS = 100  # longer words become a single [UNK] instead of being split
CONTROL = {"Cc", "Cf", "Co", "Cs"}  # the Rust "is_other"; Cn is not in it
CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B81F),
       (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def is_cjk(c):
    cp = ord(c)
    return any(lo <= cp <= hi for lo, hi in CJK)


def is_punctuation(c):
    # ASCII symbols like $ + < ^ ` | ~ are not Unicode punctuation, but BERT splits on them too
    return c in string.punctuation or unicodedata.category(c).startswith("P")


def normalize(text, lowercase):
    out = []
    for c in text:
        # \t \n \r are whitespace, left for str.split() with the rest; \x0b \x0c \x1c-\x1f \x85 are
        # whitespace to Python too, but control characters to BERT, so they go
        if c not in "\t\n\r" and (c == "\ufffd" or unicodedata.category(c) in CONTROL):
            continue
        out.append(f" {c} " if is_cjk(c) else c)  # every ideograph becomes its own word
    text = "".join(out)
    if lowercase:
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
        text = "".join(c.lower() for c in text)  # per char: str.lower() would make a final Σ into ς
    return text


def pre_tokenize(text, lowercase):
    """Normalise, then split into words on whitespace and around every punctuation character."""
    text = normalize(text, lowercase)
    return "".join(f" {c} " if is_punctuation(c) else c for c in text).split()


class WordPiece:

    def __init__(self, vocab, lowercase=True):
        self.vocab = vocab  # token -> id
        self.itos = {i: t for t, i in vocab.items()}
        self.lowercase = lowercase
        self.cls_id, self.sep_id, self.pad_id, self.unk_id = (vocab[t] for t in REQUIRED)
        # the capturing group makes re.split keep the special tokens, at the odd positions
        specials = [re.escape(t) for t in SPECIALS if t in vocab]
        self.special_re = re.compile("(" + "|".join(specials) + ")")

    @classmethod
    def from_file(cls, vocab_path, lowercase=True):
        vocab = {}
        with open(vocab_path, encoding="utf-8") as f:  # a missing file raises FileNotFoundError naming it
            for i, line in enumerate(f):
                token = line.rstrip("\n")
                if token in vocab:
                    raise ValueError(f"{vocab_path}: line {i + 1} repeats the token {token!r} "
                                     f"of line {vocab[token] + 1}")
                vocab[token] = i
        missing = [t for t in REQUIRED if t not in vocab]
        if missing:
            raise ValueError(f"{vocab_path} lacks the special tokens {', '.join(missing)}")
        return cls(vocab, lowercase)

    @property
    def vocab_size(self):
        return len(self.vocab)

    def wordpiece(self, word):
        """Greedy longest-match-first split of one word; [UNK] if any part of it has no match."""
        if len(word) > MAX_WORD_CHARS:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
            else:
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text):
        tokens = []
        for i, chunk in enumerate(self.special_re.split(text)):
            if i % 2:
                tokens.append(chunk)
            else:
                for word in pre_tokenize(chunk, self.lowercase):
                    tokens += self.wordpiece(word)
        return tokens

    def unknown_words(self, text):
        """-> (the words of text, punctuation aside; those of them no word pieces spell, each one [UNK])"""
        words = [w for w in pre_tokenize(text, self.lowercase) if not all(map(is_punctuation, w))]
        return words, [w for w in words if self.wordpiece(w) == ["[UNK]"]]

    def encode(self, text, max_len=None):
        if max_len is not None and max_len < 2:
            raise ValueError(f"max_len must be at least 2, to hold [CLS] and [SEP]; got {max_len}")
        ids = [self.vocab[t] for t in self.tokenize(text)]
        if max_len is not None:
            ids = ids[:max_len - 2]
        return [self.cls_id] + ids + [self.sep_id]

    def decode(self, ids):
        skip = (self.cls_id, self.sep_id, self.pad_id)
        tokens = [self.itos[int(i)] for i in ids if int(i) not in skip]
        return " ".join(tokens).replace(" ##", "")
