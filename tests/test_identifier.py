"""The rare-token identifier of DESIGN.md on the tiny cascade's SentencePiece tokenizer (vocab 1000)."""

import re

import pytest
from click.testing import CliRunner

from dreambooth_fast.cli import main
from dreambooth_fast.errors import UserError
from dreambooth_fast.identifier import (
    check_class_noun,
    check_identifier,
    choose_identifier,
    class_prompt,
    find_candidates,
    instance_prompt,
    known_words,
    rare_id_range,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_cascade):
    from transformers import T5Tokenizer

    return T5Tokenizer.from_pretrained(tiny_cascade / "tokenizer", local_files_only=True)


def word_ids(tokenizer, word):
    return tokenizer.encode(f"a {word} dog", add_special_tokens=False)[1:-1]


def test_rare_range_is_the_papers_fraction_of_the_vocabulary(tokenizer):
    assert len(tokenizer) == 1000
    assert rare_id_range(tokenizer) == range(156, 312)  # 5000-10000 of 32000, scaled to 1000


def test_candidates_satisfy_every_rule(tokenizer):
    candidates = find_candidates(tokenizer)
    assert len(candidates) >= 20
    words = known_words()
    for c in candidates:
        assert c.kept and c.id in rare_id_range(tokenizer)
        assert re.fullmatch("[a-z]{1,3}", c.text), c
        assert tokenizer.decode([c.id]) == c.text
        assert word_ids(tokenizer, c.text) == [c.id]  # "a xy dog" has xy as this one piece
        assert c.text not in words


def test_rejected_ones_say_why(tokenizer):
    judged = find_candidates(tokenizer, include_rejected=True)
    assert len(judged) == len(rare_id_range(tokenizer))
    rejected = [c for c in judged if not c.kept]
    reasons = {c.reason for c in rejected}
    # The tiny vocabulary's rare range holds words ("to") and mid-word pieces ("ge", not "▁ge").
    assert reasons == {"an English word", "not this one token in a prompt"}
    for c in rejected:
        assert re.fullmatch("[a-z]{1,3}", c.text)
        one_token = word_ids(tokenizer, c.text) == [c.id]
        assert c.reason == ("an English word" if one_token else "not this one token in a prompt")
        assert c.text in known_words() or not one_token


def test_sampling_order_follows_the_seed(tokenizer):
    first = [c.id for c in find_candidates(tokenizer, seed=0)]
    assert [c.id for c in find_candidates(tokenizer, seed=0)] == first
    other = [c.id for c in find_candidates(tokenizer, seed=1)]
    assert other != first and sorted(other) == sorted(first)


@pytest.mark.parametrize("n_tokens", [1, 2, 3])
def test_choose_is_deterministic_and_valid(tokenizer, n_tokens):
    chosen = choose_identifier(tokenizer, n_tokens=n_tokens, seed=3)
    assert choose_identifier(tokenizer, n_tokens=n_tokens, seed=3) == chosen
    assert re.fullmatch("[a-z]+", chosen) and 1 <= len(word_ids(tokenizer, chosen)) <= n_tokens
    assert check_identifier(tokenizer, chosen) == []
    if n_tokens == 1:
        assert chosen == find_candidates(tokenizer, seed=3)[0].text


def test_choose_rejects_a_bad_token_count(tokenizer):
    with pytest.raises(UserError, match="1 to 3 rare tokens, not 4"):
        choose_identifier(tokenizer, n_tokens=4)


def test_check_accepts_a_candidate_silently(tokenizer):
    assert check_identifier(tokenizer, find_candidates(tokenizer)[0].text) == []


def test_check_warns_on_known_words(tokenizer):
    warnings = check_identifier(tokenizer, "dog")
    assert any("known word" in w for w in warnings)
    assert any("frequent pieces" in w for w in warnings)
    assert any("known word" in w for w in check_identifier(tokenizer, "sks"))  # the rifle


@pytest.mark.parametrize("identifier, message", [
    ("", "empty"),
    ("xy zq", "has a space"),
    ("Xy", r"does not know some of its characters \(it becomes \[.*<unk>"),  # the tiny vocab has no capitals
    ("xy7", "does not know some of its characters"),
    ("qwertyzxcvb", r"splits into \d+ pieces \[▁"),
])
def test_check_rejects_what_cannot_be_encoded_as_intended(tokenizer, identifier, message):
    with pytest.raises(UserError, match=message):
        check_identifier(tokenizer, identifier)


def test_class_noun(tokenizer):
    assert check_class_noun(tokenizer, "dog") == []
    assert check_class_noun(tokenizer, "brown dog") == []  # several words, each in the vocabulary: fine
    assert any("splits into" in w for w in check_class_noun(tokenizer, "corgi"))  # c o r gi: known poorly
    with pytest.raises(UserError, match="does not know"):
        check_class_noun(tokenizer, "Dog")
    with pytest.raises(UserError, match="--class is empty"):
        check_class_noun(tokenizer, " ")


def test_prompts():
    assert instance_prompt("xy", "dog") == "a xy dog"
    assert class_prompt("dog") == "a dog"


def test_word_list_is_packaged():
    words = known_words()
    assert len(words) > 4000 and {"dog", "the", "sks"} <= words
    assert all(re.fullmatch("[a-z]+", w) for w in words)


def test_cli_lists_candidates_and_the_chosen_one(tiny_cascade, tokenizer):
    result = CliRunner().invoke(main, ["identifier", "--model", str(tiny_cascade), "--seed", "3", "--limit", "5"])
    assert result.exit_code == 0, result.output
    assert "ids 156-311" in result.output and "why kept" in result.output and "rejected:" in result.output
    first = find_candidates(tokenizer, seed=3)[0]
    assert re.search(rf"^\s+{first.id}\s+▁{first.text}\s+{first.text}\s+\d letters", result.output, re.M)
    assert result.output.rstrip().endswith(f"chosen: {choose_identifier(tokenizer, seed=3)}")


def test_cli_check(tiny_cascade):
    ok = CliRunner().invoke(main, ["identifier", "--model", str(tiny_cascade), "--check", "dog"])
    assert ok.exit_code == 0 and "known word" in ok.output and "▁dog" in ok.output
    bad = CliRunner().invoke(main, ["identifier", "--model", str(tiny_cascade), "--check", "Xy"])
    assert bad.exit_code == 2 and bad.output.startswith("error: --identifier 'Xy'")


def test_cli_model_without_tokenizer(tmp_path):
    result = CliRunner().invoke(main, ["identifier", "--model", str(tmp_path)])
    assert result.exit_code == 2 and "model_index.json is missing" in result.output
