import numpy as np
import pytest

from qexport.errors import QexportError
from qexport.models.shapes import COLOURS, DIRECTIONS, SHAPES
from qexport.tokenizer import MAX_TOKENS, PAD, VOCAB, tokenize


def test_vocabulary_matches_the_shapes_data():
    # the tokenizer spells the words out (the runtime may not import qexport.models); token ids
    # depend on their order, which must stay the data's
    assert (PAD, "a", "moving", *COLOURS, *SHAPES, *DIRECTIONS) == VOCAB


def test_tokenize_pads_and_maps_words():
    ids = tokenize(["a red circle moving left", ""])
    assert ids.shape == (2, MAX_TOKENS) and ids.dtype == np.int64
    assert [VOCAB[i] for i in ids[0, :5]] == ["a", "red", "circle", "moving", "left"]
    assert (ids[0, 5:] == 0).all() and (ids[1] == 0).all()


def test_unknown_word_lists_the_vocabulary():
    with pytest.raises(QexportError, match="unknown word 'purple'") as err:
        tokenize(["a purple circle moving left"])
    assert "red" in str(err.value) and "triangle" in str(err.value)


def test_too_long_caption():
    with pytest.raises(QexportError, match="at most"):
        tokenize(["a " * 20])
