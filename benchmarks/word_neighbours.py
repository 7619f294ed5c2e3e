"""Which layer of the frozen prompt encoder reads unseen words as the words they mean.

    .venv/bin/python benchmarks/word_neighbours.py

The held-out paraphrase set (`training.evaluation.paraphrases`) names colours, shapes, backgrounds, sizes and places
in words no training caption uses ("scarlet", "lozenge", "khaki", "up in the northwest corner"). A teacher can only
draw them right if the encoder's states put such a word near the training words of the same meaning. For every
paraphrase word that is not also a training word, this script takes the encoder's state of its tokens (mean over
them) inside a short frame, at every layer, and finds the nearest training word (cosine) in the same frame: the
share whose nearest training word means the same thing, per kind of word and per layer. No training is involved;
it takes seconds, and it says which layers (`text_encoder.layers` in the teacher config) are worth reading.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from aptp.conditioning.encoder import EncoderConfig, PromptEncoder
from aptp.formats.report import collect_provenance, write_report
from training.data import shapes
from training.evaluation import paraphrases

# kind of word -> (the training words by meaning, the paraphrase words by meaning, the frame both are read in)
KINDS = {
    "colour": (shapes.COLOUR_WORDS, paraphrases.COLOURS, "a {} circle"),
    "shape": (shapes.SHAPE_WORDS, paraphrases.SHAPES, "a red {}"),
    "background": (shapes.BACKGROUND_WORDS, paraphrases.BACKGROUNDS, "a red circle on a {} background"),
    "size": (shapes.SIZE_WORDS, paraphrases.SIZES, "a {} red circle"),
    "place": (dict(enumerate(shapes.CELL_PHRASES)), dict(enumerate(paraphrases.PLACES)), "a red circle {}"),
}


def phrase_states(encoder: PromptEncoder, frame: str, phrases: list[str]) -> torch.Tensor:
    """`(len(phrases), layers, hidden)`: each phrase's token states, averaged over its tokens, in `frame`."""
    encoded = encoder.encode([frame.format(phrase) for phrase in phrases])
    layers = len(encoder.config.layers)
    rows = []
    for i, phrase in enumerate(phrases):
        ids = encoder.tokenizer(frame.format(phrase))["input_ids"]
        own = encoder.tokenizer(phrase, add_special_tokens=False)["input_ids"]
        start = next((j for j in range(len(ids) - len(own) + 1) if ids[j : j + len(own)] == own), None)
        if start is None:
            raise ValueError(f"{phrase!r} is not tokenised alike inside {frame!r}")
        rows.append(encoded.states[i, start : start + len(own)].mean(0).view(layers, -1))
    return torch.stack(rows)


def neighbour_agreement(encoder: PromptEncoder, trained: dict, unseen: dict, frame: str) -> tuple[int, list[float]]:
    """How many unseen words there are, and per layer the share whose nearest trained word has their meaning."""
    known = [(meaning, word) for meaning, words in trained.items() for word in dict.fromkeys(words)]
    words = {word for _, word in known}
    queries = [(meaning, word) for meaning, options in unseen.items() for word in options if word not in words]
    if not queries:
        return 0, []
    reference = F.normalize(phrase_states(encoder, frame, [word for _, word in known]), dim=-1)
    asked = F.normalize(phrase_states(encoder, frame, [word for _, word in queries]), dim=-1)
    nearest = torch.einsum("qld,kld->lqk", asked, reference).argmax(-1)  # (layers, queries)
    meanings = [meaning for meaning, _ in known]
    return len(queries), [
        sum(meanings[k] == queries[q][0] for q, k in enumerate(row.tolist())) / len(queries) for row in nearest
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="all-MiniLM-L6-v2")
    parser.add_argument("--name", default="word-neighbours")
    parser.add_argument("--out", default="benchmarks/results/text-understanding")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    probe = PromptEncoder(EncoderConfig(name=args.encoder, max_length=40))
    depth = int(probe.model.config.num_hidden_layers)
    encoder = PromptEncoder(EncoderConfig(name=args.encoder, max_length=40, layers=list(range(depth + 1))))
    figures = {"encoder": args.encoder, "layers": list(range(depth + 1)), "kinds": {}}
    lines = [
        "### Unseen words whose nearest training word means the same, per encoder layer (0: the embedding layer)",
        "",
        "| kind | unseen words | " + " | ".join(f"layer {layer}" for layer in figures["layers"]) + " |",
        "|---|---|" + "---|" * len(figures["layers"]),
    ]
    for kind, (trained, unseen, frame) in KINDS.items():
        count, shares = neighbour_agreement(encoder, trained, unseen, frame)
        figures["kinds"][kind] = {"unseen_words": count, "share_by_layer": shares}
        lines.append(f"| {kind} | {count} | " + " | ".join(f"{share:.2f}" for share in shares) + " |")
    provenance = collect_provenance(config={"encoder": args.encoder})
    write_report(args.out, args.name, figures, "\n".join(lines) + "\n", echo=True, provenance=provenance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
