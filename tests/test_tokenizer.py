"""The demo tokenizer: T5's special ids, lossless round trips, reloadable by AutoTokenizer."""
import pytest
from transformers import AutoTokenizer

from ipu_t5.tokenizer import demo_tokenizer

pytestmark = pytest.mark.core

TEXTS = ["mnli hypothesis: The chef cooked dinner. premise: As usual, the chef cooked dinner at noon.",
         "entailment", "neutral", "contradiction", "Nobody painted the fence because it was raining."] * 40


def test_special_ids_and_round_trip(tmp_path):
    tokenizer = demo_tokenizer(TEXTS, vocab_size=200)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    for text in set(TEXTS):
        ids = tokenizer(text).input_ids
        assert ids[-1] == 1 and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # A word never seen in training, made of seen characters, splits into known pieces, not <unk>.
    unseen = tokenizer("dreamt").input_ids
    assert tokenizer.unk_token_id not in unseen and tokenizer.decode(unseen, skip_special_tokens=True) == "dreamt"
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert reloaded(TEXTS[0]).input_ids == tokenizer(TEXTS[0]).input_ids


def test_cached_by_content():
    first = demo_tokenizer(TEXTS, vocab_size=200)
    second = demo_tokenizer(TEXTS, vocab_size=200)
    assert first.name_or_path == second.name_or_path
    assert demo_tokenizer(TEXTS[:3] * 50, vocab_size=200).name_or_path != first.name_or_path
