"""The rare-token identifier [V] of DreamBooth, picked from (or checked against) the model's T5 tokenizer.

The paper (Ruiz et al. 2023, sec. 3.2) samples token ids uniformly from 5000-10000 of T5's 32k SentencePiece
vocabulary and keeps tokens of at most 3 characters with no spaces. SentencePiece unigram vocabularies are
sorted by score, so later ids are rarer: for a vocabulary of V pieces (sentinel <extra_id_N> tokens not
counted) we use the same fraction, ids in [round(5/32 V), round(10/32 V)) - exactly 5000-10000 for T5.

A token is kept when it decodes to 1-3 lowercase letters a-z (digits carry meaning - "3 dogs" - and
punctuation, capitals and other scripts tokenise inconsistently or are awkward to type in a prompt), encodes
back to that same single token where prompts put it (after "a ", i.e. as a word-initial piece), and is not
a known English word (english_words.txt; "sks" is a rifle). k = 1-3 kept tokens concatenated form [V].

CLIP's byte-level BPE (Stable Diffusion) is ordered differently: 512 byte characters (alone and with the
end-of-word mark `</w>`), then one id per merge in the order the merges were learnt (frequent pairs first, so
later ids are rarer), then <|startoftext|> and <|endoftext|>. There the rare range is the same fraction of the
merges, ids 512 + [round(5/32 M), round(10/32 M)) for M merges (8152-15790 of CLIP's 49408), and a kept token
is a word-final piece ('xy</w>': the rules above, unchanged, keep exactly those).

Works on any SentencePiece-based T5 tokenizer and on CLIP's tokenizer through transformers' public API (encode,
decode, convert_ids_to_tokens), whatever its backend.
"""

from __future__ import annotations

import functools
import random
import re
from collections import Counter
from dataclasses import dataclass
from importlib import resources

from .errors import UserError
from .text import is_clip_tokenizer

PAPER_VOCAB_SIZE = 32000
PAPER_RARE_IDS = (5000, 10000)
MAX_CHARS = 3
MAX_TOKENS = 3  # the paper concatenates k = 1-3 rare tokens
BPE_BYTE_PIECES = 2 * 256  # CLIP's vocabulary starts with the 256 byte characters, alone and with </w>
_LETTERS = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class Candidate:
    """One sampled token id: its piece (e.g. '▁xy'), the text it decodes to, and why it was kept or rejected."""

    id: int
    piece: str
    text: str
    kept: bool
    reason: str


@functools.cache
def known_words() -> frozenset[str]:
    """Common English words (and known offenders like 'sks') from the packaged english_words.txt."""
    text = resources.files(__package__).joinpath("english_words.txt").read_text(encoding="utf-8")
    return frozenset(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def base_vocab_size(tokenizer) -> int:
    """The SentencePiece model's own piece count: the vocabulary less T5's appended <extra_id_N> sentinels; for
    CLIP's BPE, the number of merges."""
    if is_clip_tokenizer(tokenizer):
        return tokenizer.vocab_size - BPE_BYTE_PIECES - len(set(tokenizer.all_special_ids))
    sentinels = [t for t in tokenizer.added_tokens_decoder.values() if str(t).startswith("<extra_id_")]
    return tokenizer.vocab_size - len(sentinels)


def rare_id_range(tokenizer) -> range:
    """The paper's 5000-10000 of 32000, scaled to this vocabulary's size (for CLIP's BPE: to its merges, after
    the byte characters)."""
    size = base_vocab_size(tokenizer)
    first = BPE_BYTE_PIECES if is_clip_tokenizer(tokenizer) else 0
    low, high = (first + round(bound * size / PAPER_VOCAB_SIZE) for bound in PAPER_RARE_IDS)
    return range(low, high)


def find_candidates(tokenizer, *, seed: int = 0, include_rejected: bool = False) -> list[Candidate]:
    """Every id of the rare range in a uniformly random order fixed by `seed`, judged by the rules above;
    the kept ones only unless `include_rejected`."""
    ids = list(rare_id_range(tokenizer))
    random.Random(seed).shuffle(ids)
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    words = known_words()
    candidates = []
    for token_id in ids:
        piece = tokenizer.convert_ids_to_tokens(token_id)
        text = tokenizer.decode([token_id])
        if token_id in special:
            reason = "special token"
        elif not text or text != text.strip() or " " in text:
            reason = "empty or has spaces"
        elif len(text) > MAX_CHARS:
            reason = f"longer than {MAX_CHARS} characters"
        elif not _LETTERS.fullmatch(text):
            reason = "not lowercase letters a-z"
        elif _word_ids(tokenizer, text) != [token_id]:
            reason = "not this one token in a prompt"
        elif text in words:
            reason = "an English word"
        else:
            reason = f"{len(text)} letters a-z, this one token in 'a {text} ...', not an English word"
            candidates.append(Candidate(token_id, piece, text, True, reason))
            continue
        if include_rejected:
            candidates.append(Candidate(token_id, piece, text, False, reason))
    return candidates


def choose_identifier(tokenizer, *, n_tokens: int = 1, seed: int = 0) -> str:
    """[V]: `n_tokens` kept candidates concatenated, the first group in `seed`'s order whose concatenation
    passes `check_identifier` without a warning (at most `n_tokens` pieces, every piece rare, not a word)."""
    if not 1 <= n_tokens <= MAX_TOKENS:
        raise UserError(f"an identifier is 1 to {MAX_TOKENS} rare tokens, not {n_tokens}")
    texts = [c.text for c in find_candidates(tokenizer, seed=seed)]
    for start in range(0, len(texts) - n_tokens + 1, n_tokens):
        word = "".join(texts[start:start + n_tokens])
        if len(_word_ids(tokenizer, word)) > n_tokens:
            continue
        try:
            if not check_identifier(tokenizer, word):
                return word
        except UserError:
            continue
    rare = rare_id_range(tokenizer)
    raise UserError(f"the tokenizer has no {n_tokens} usable rare tokens in ids {rare.start}-{rare.stop - 1} "
                    f"({len(texts)} kept); pass an identifier of your own, or use fewer tokens")


def check_identifier(tokenizer, identifier: str) -> list[str]:
    """Check a user-given [V]: raise UserError when the tokenizer cannot encode it as intended (empty, spaces,
    unknown characters, more than 3 pieces, changed by normalisation); return warnings when it is a common
    word, has characters other than a-z, or has frequent pieces."""
    word = identifier.strip()
    if not word:
        raise UserError("--identifier is empty; leave it out to pick a rare token automatically")
    if any(c.isspace() for c in word):
        raise UserError(f"--identifier {identifier!r} has a space; use one word of 1-3 rare tokens "
                        "(`dbfast identifier --model DIR` suggests some)")
    ids = _word_ids(tokenizer, word)
    shown = _pieces(tokenizer, ids)
    if tokenizer.unk_token_id in ids:
        raise UserError(f"--identifier {word!r}: the tokenizer does not know some of its characters (it becomes "
                        f"{shown}); use letters a-z")
    if len(ids) > MAX_TOKENS:
        raise UserError(f"--identifier {word!r} splits into {len(ids)} pieces {shown}; use 1-{MAX_TOKENS} rare "
                        "tokens (`dbfast identifier --model DIR` suggests some)")
    decoded = tokenizer.decode(ids).strip()
    if decoded != word:
        raise UserError(f"--identifier {word!r} comes back as {decoded!r} after tokenizing {shown}; use letters a-z")
    warnings = []
    if word.lower() in known_words():
        warnings.append(f"--identifier {word!r} is a known word: the model already has a meaning for it "
                        "that training must overwrite (language drift); a rare token is safer")
    if not _LETTERS.fullmatch(word):
        warnings.append(f"--identifier {word!r} has characters other than lowercase a-z, which tokenise less "
                        "predictably in prompts")
    rare = rare_id_range(tokenizer)
    frequent = [f"{tokenizer.convert_ids_to_tokens(i)} (id {i})" for i in ids if i < rare.start]
    if frequent:
        warnings.append(f"--identifier {word!r} has frequent pieces {', '.join(frequent)}: the model has a strong "
                        f"prior for them; rare ones (ids {rare.start}-{rare.stop - 1}) bind the subject better")
    return warnings


def check_class_noun(tokenizer, noun: str) -> list[str]:
    """Raise UserError when the class noun is empty or has pieces the tokenizer does not know; return warnings
    when a word splits into many pieces (the model likely knows it poorly) or tokenizing changes it."""
    noun = noun.strip()
    if not noun:
        raise UserError("--class is empty; give the subject's class noun, e.g. --class dog")
    ids = _word_ids(tokenizer, noun)
    if tokenizer.unk_token_id in ids:
        raise UserError(f"--class {noun!r}: the tokenizer does not know some of its characters (it becomes "
                        f"{_pieces(tokenizer, ids)}); check the spelling")
    warnings = []
    for word in noun.split():
        word_ids = _word_ids(tokenizer, word)
        if len(word_ids) > MAX_TOKENS:
            warnings.append(f"--class {noun!r}: {word!r} splits into {len(word_ids)} pieces "
                            f"{_pieces(tokenizer, word_ids)}, so the model may know it poorly; a common noun "
                            "(e.g. 'dog' for a corgi) gives a stronger class prior")
    decoded = tokenizer.decode(ids).strip()
    if decoded != " ".join(noun.split()):
        warnings.append(f"--class {noun!r} comes back as {decoded!r} after tokenizing")
    return warnings


PLACEHOLDER = "[V]"  # where prompts and captions put the identifier


def instance_prompt(identifier: str, noun: str) -> str:
    """The caption of every subject image: 'a [V] [class noun]'."""
    return f"a {identifier} {noun}"


def fill_placeholder(text: str, identifier: str) -> str:
    """`text` (a caption, a validation or generation prompt) with its [V] replaced by the identifier."""
    return text.replace(PLACEHOLDER, identifier)


def class_prompt(noun: str) -> str:
    """The caption of every prior (class) image: 'a [class noun]'."""
    return f"a {noun}"


def describe(tokenizer, word: str) -> str:
    """How `word` tokenises in a prompt, e.g. "xy: [▁xy] ids [366]"."""
    ids = _word_ids(tokenizer, word.strip())
    return f"{word.strip()}: {_pieces(tokenizer, ids)} ids {ids}"


def candidates_report(tokenizer, *, seed: int = 0, limit: int = 20) -> str:
    """A table of the kept candidates in `seed`'s order (the first `limit`, 0 = all) and why, plus counts of
    the rejected ones by reason."""
    rare = rare_id_range(tokenizer)
    judged = find_candidates(tokenizer, seed=seed, include_rejected=True)
    kept = [c for c in judged if c.kept]
    size = base_vocab_size(tokenizer)
    of = f"of {size}"
    if is_clip_tokenizer(tokenizer):
        first = BPE_BYTE_PIECES
        of = f"of {tokenizer.vocab_size}, merges {rare.start - first}-{rare.stop - 1 - first} of this BPE's {size}"
    header = (f"rare range: ids {rare.start}-{rare.stop - 1} {of} (the paper's "
              f"{PAPER_RARE_IDS[0]}-{PAPER_RARE_IDS[1] - 1} of {PAPER_VOCAB_SIZE}, scaled), order of seed {seed}")
    lines = [header,
             f"kept {len(kept)} of {len(judged)}:",
             f"{'id':>7}  {'piece':<8} {'text':<5} why kept"]
    shown = kept if limit <= 0 else kept[:limit]
    lines += [f"{c.id:>7}  {c.piece:<8} {c.text:<5} {c.reason}" for c in shown]
    if len(shown) < len(kept):
        lines.append(f"  ... {len(kept) - len(shown)} more (--limit 0 lists all)")
    rejected = Counter(c.reason for c in judged if not c.kept)
    if rejected:
        lines.append("rejected: " + ", ".join(f"{n} {reason}" for reason, n in rejected.most_common()))
    return "\n".join(lines)


def _word_ids(tokenizer, word: str) -> list[int]:
    # The ids `word` gets where prompts put it, after "a " (so with SentencePiece's word-boundary piece).
    prefix = tokenizer.encode("a", add_special_tokens=False)
    return tokenizer.encode(f"a {word}", add_special_tokens=False)[len(prefix):]


def _pieces(tokenizer, ids: list[int]) -> str:
    return "[" + " ".join(tokenizer.convert_ids_to_tokens(ids)) + "]"
