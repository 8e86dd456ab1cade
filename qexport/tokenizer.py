"""Word-level caption tokenizer for the moving-shapes vocabulary (numpy only).

Shared by the models (training, the caption encoder) and the edge runtime, so it imports nothing
from qexport.models: the vocabulary spells out qexport.models.shapes' colours, shapes and
directions in their order (token ids; tests/test_tokenizer.py checks that the two agree).
"""

from __future__ import annotations

import numpy as np

from qexport.errors import QexportError

PAD = "<pad>"
COLOUR_WORDS: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan")
SHAPE_WORDS: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTION_WORDS: tuple[str, ...] = ("left", "right", "up", "down")
VOCAB: tuple[str, ...] = (PAD, "a", "moving", *COLOUR_WORDS, *SHAPE_WORDS, *DIRECTION_WORDS)
MAX_TOKENS = 8


def tokenize(
    prompts: list[str], max_tokens: int = MAX_TOKENS, vocab: tuple[str, ...] | list[str] = VOCAB
) -> np.ndarray:
    """Token ids, int64 [len(prompts), max_tokens], right-padded with <pad> (id 0).

    The empty prompt "" is the null caption used for classifier-free guidance.

    Raises:
        QexportError: a word outside the vocabulary, or a caption longer than max_tokens.
    """
    index = {w: i for i, w in enumerate(vocab)}
    ids = np.zeros((len(prompts), max_tokens), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        words = prompt.lower().split()
        if len(words) > max_tokens:
            raise QexportError(f"prompt {prompt!r} has {len(words)} words; at most {max_tokens} are allowed")
        for col, word in enumerate(words):
            if word not in index:
                words_known = " ".join(vocab[1:])
                raise QexportError(f"unknown word {word!r} in prompt {prompt!r}; the vocabulary is: {words_known}")
            ids[row, col] = index[word]
    return ids
