"""The built-in character-level tokenizer (for tiny models built locally).

One token per character (a ``tokenizers`` WordLevel model over single
characters, a pre-tokenizer that isolates every character, a decoder that
concatenates with no separator), plus four special tokens with fixed ids:
``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3; characters follow
in alphabet order from id 4.

What ``tokenizer(text)`` returns: ``input_ids`` with one id per character and
NO special tokens added (no BOS, no EOS): callers append ``eos_token_id`` to
targets themselves. Decoding ids gives back the exact string (with
``skip_special_tokens=True`` the specials vanish; without it they appear as
``<eos>`` etc.). ``padding_side`` is left at "right"; callers that need left
padding (generation batches) set it.

It ships a chat template (:data:`CHAT_TEMPLATE`) in the task's own plain format, so chat
rows work with the built-in model exactly as with real chat models: a system turn is its text
and a newline, a user turn its text, an assistant turn its text and ``<eos>`` (the token the
model stops on); the generation prompt adds nothing. A one-turn chat prompt therefore renders
to its text alone, and a demonstration ``[user, assistant]`` to ``prompt + response + <eos>``.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)

# Covers the built-in "reverse" task ("rev abcde=" -> "edcba") with room to
# spare for users' own small synthetic tasks: letters, digits, common ASCII
# punctuation, space and newline.
DEFAULT_ALPHABET = (
    string.ascii_lowercase + string.ascii_uppercase + string.digits + " \n" + string.punctuation
)


CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
    "{% elif m['role'] == 'system' %}{{ m['content'] + '\\n' }}"
    "{% else %}{{ m['content'] }}{% endif %}"
    "{% endfor %}"
)


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over ``alphabet`` (duplicate characters are ignored)."""
    chars = list(dict.fromkeys(alphabet))  # keep first occurrence, in order
    if not chars:
        raise ValueError("alphabet must not be empty")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # [\s\S] matches any one character, newline included (Oniguruma has no "(?s)"); "isolated"
    # makes each match its own piece.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Fuse concatenates pieces: the default WordLevel decoding would join with spaces.
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="right",
        truncation_side="left",  # prompts keep their end (where the answer starts) when truncated
        clean_up_tokenization_spaces=False,  # would delete spaces before punctuation
        model_max_length=1_000_000,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
