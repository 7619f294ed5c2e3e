"""benchmarks/word_neighbours.py on the real (offline) encoder: an unseen word is matched, layer by layer, to the
training word nearest to its own states, and only words the training tables lack are asked about."""

from __future__ import annotations

import pytest

from aptp.conditioning.encoder import EncoderConfig, PromptEncoder
from benchmarks.word_neighbours import neighbour_agreement, phrase_states


@pytest.fixture(scope="module")
def three_layers() -> PromptEncoder:
    return PromptEncoder(EncoderConfig(max_length=16, layers=[0, 3, 6]))


def test_phrase_states_are_the_phrase_tokens_own_per_layer(three_layers):
    states = phrase_states(three_layers, "a {} circle", ["red", "bright blue"])
    assert tuple(states.shape) == (2, 3, 384)
    with pytest.raises(ValueError, match="tokenised"):
        phrase_states(three_layers, "un{} circle", ["able"])  # "unable" is one token: "able" is not in it


def test_an_unseen_word_counts_when_its_nearest_training_word_means_the_same(three_layers):
    trained = {"red": ("red", "crimson"), "blue": ("blue", "navy")}
    assert neighbour_agreement(three_layers, trained, {"red": ("red", "crimson")}, "a {} circle") == (0, [])
    # "blue " is not a training word, and its states are those of "blue": right when "blue" means blue ...
    right = neighbour_agreement(three_layers, {"red": ("red",), "blue": ("blue",)}, {"blue": ("blue ",)}, "a {}")
    assert right == (1, [1.0, 1.0, 1.0])
    # ... and wrong at every layer when the table says "blue" means red
    wrong = neighbour_agreement(three_layers, {"red": ("blue",), "blue": ("red",)}, {"blue": ("blue ",)}, "a {}")
    assert wrong == (1, [0.0, 0.0, 0.0])
