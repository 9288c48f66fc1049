"""Tokenizers: the real one for pretrained weights, or a T5-style SentencePiece model trained
here on the run's own texts, for randomly initialised models that have no tokenizer."""
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, List, Optional

from .compat import load_sentencepiece_tokenizer
from .errors import UserError
from .models import canonical_size, refuse_training_checkpoint


def cache_root() -> Path:
    """Where trained tokenizers are kept between runs (`IPU_T5_CACHE` overrides)."""
    base = os.environ.get("IPU_T5_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ipu_t5")
    return Path(base)


def train_sentencepiece(texts: List[str], vocab_size: int, directory: Path) -> None:
    """Train a T5-style unigram model (pad 0, eos 1, unk 2, no bos) into `directory/spiece.model`."""
    import sentencepiece

    directory.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(directory / "spiece"),
        vocab_size=vocab_size, hard_vocab_limit=False, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        num_threads=1, minloglevel=2,
    )


def demo_tokenizer(texts: Iterable[str], vocab_size: int):
    """A tokenizer trained on `texts`, cached by their content so repeated runs reuse it."""
    texts = list(texts)
    digest = hashlib.sha256("\n".join(texts + [str(vocab_size)]).encode()).hexdigest()[:16]
    target = cache_root() / "tokenizers" / digest
    if not (target / "tokenizer_config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename, so a concurrent or interrupted run never sees half.
        staging = Path(tempfile.mkdtemp(dir=str(target.parent)))
        try:
            train_sentencepiece(texts, vocab_size, staging / "spiece")
            load_sentencepiece_tokenizer(str(staging / "spiece")).save_pretrained(str(staging / "hf"))
            try:
                os.rename(str(staging / "hf"), str(target))
            except OSError:
                if not (target / "tokenizer_config.json").is_file():
                    raise
        finally:
            shutil.rmtree(str(staging), ignore_errors=True)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(target))


def load_tokenizer(config, corpus: Optional[Iterable[str]] = None):
    """The run's tokenizer: `model.tokenizer`, else the one beside `model.pretrained` or the hub
    weights, else (random initialisation) one trained on `corpus`."""
    from transformers import AutoTokenizer

    size = canonical_size(config.model.name)
    source = config.model.tokenizer or config.model.pretrained or size.hub_id
    if source is None:
        if corpus is None:
            raise UserError("model '{}' has no tokenizer of its own: set model.tokenizer.".format(size.name))
        return demo_tokenizer(corpus, size.vocab_size)
    refuse_training_checkpoint(source)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise UserError("could not load the tokenizer '{}': {}. Without network access, set "
                        "model.tokenizer to a local directory.".format(source, str(err).splitlines()[0])) from None


def save_with_prompt_length(tokenizer, directory: str, prompt_length: Optional[int]) -> None:
    """`tokenizer.save_pretrained(directory)` with `model_max_length` set to the run's prompt length,
    so `tokenizer(..., truncation=True)` cuts prompts where training did; the caller's tokenizer
    is left as it was."""
    kept = tokenizer.model_max_length
    if prompt_length:
        tokenizer.model_max_length = prompt_length
    try:
        tokenizer.save_pretrained(directory)
    finally:
        tokenizer.model_max_length = kept
