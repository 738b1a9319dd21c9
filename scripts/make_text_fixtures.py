"""Fixtures for the `text` plugin (TorchServe's `text_classifier`): the model of TorchServe's
text classification example (an EmbeddingBag over token and bigram ids, then one linear
layer; random weights, four AG_NEWS classes), a vocabulary built from a small corpus by
torchtext 0.6's Vocab (by frequency, then alphabetically, with `<unk>` first), saved as the
example saved it (source_vocab.pt) and as JSON, and what TorchServe 0.12.0's own `TextClassifier`
handler makes of a set of test texts: the token ids its preprocessing gives (HTML removed,
lowercased, contractions expanded, accents and punctuation removed, basic_english tokens and
bigrams) and the probabilities it answers.

Run with the TorchServe venv's python (scripts/setup-torchserve.sh: torchserve 0.12.0 and the
torch venv's packages): `python scripts/make_text_fixtures.py ROOT`. Writes
tests/fixtures/generated/text/: model.pt (TorchScript), model.onnx, model.pt2 (AOTInductor),
source_vocab.pt, source_vocab_legacy.pt, source_vocab_dict.pt, vocab.json, index_to_name.json, expected.json.
"""

import collections
import json
import pathlib
import sys

import torch
from torch import nn
from torchtext.vocab import Vocab
from ts.handler_utils.text_utils import ngrams_iterator
from ts.torch_handler.text_classifier import TextClassifier

root = pathlib.Path(sys.argv[1])
out = root / "tests/fixtures/generated/text"
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)

# The training corpus the vocabulary comes from (shared with make_torchtext_vocab.py, which
# makes the same vocabulary with torchtext 0.18).
corpus = json.loads((root / "tests/fixtures/torchtext/corpus.json").read_text())
tokenizer = TextClassifier().tokenizer
counts = collections.Counter()
for line in corpus:
    counts.update(ngrams_iterator(tokenizer(line), 2))
# The vocabulary as TorchServe's text classification example made it: torchtext's Python Vocab
# (torchtext.vocab.Vocab up to 0.9) of the counts, `<unk>` first, then by frequency (descending), ties
# alphabetically; saved by torch.save as source_vocab.pt, in the zip format and, as torch
# before 1.6 saved it, in the legacy one.
vocab = Vocab(counts, specials=["<unk>"])
itos = vocab.itos
assert itos[0] == "<unk>" and itos[1:] == [
    t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
]
torch.save(vocab, out / "source_vocab.pt")
torch.save(vocab, out / "source_vocab_legacy.pt", _use_new_zipfile_serialization=False)
# A plain dict of token to index, as `vocab.stoi` saved alone.
torch.save(dict(vocab.stoi), out / "source_vocab_dict.pt")
(out / "vocab.json").write_text(json.dumps(itos, ensure_ascii=False))
labels = {"0": "World", "1": "Sports", "2": "Business", "3": "Sci/Tech"}
(out / "index_to_name.json").write_text(json.dumps(labels))


class TextSentiment(nn.Module):
    """TorchServe's examples/text_classification model."""

    def __init__(self, vocab_size, embed_dim, num_class):
        super().__init__()
        self.embedding = nn.EmbeddingBag(vocab_size, embed_dim, sparse=True)
        self.fc = nn.Linear(embed_dim, num_class)

    def forward(self, text, offsets):
        embedded = self.embedding(text, offsets)
        return self.fc(embedded)


model = TextSentiment(len(itos), 32, len(labels)).eval()
scripted = torch.jit.script(model)
scripted.save(str(out / "model.pt"))

# Example inputs: two texts of 5 and 3 ids.
ids = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8], dtype=torch.int64)
offsets = torch.tensor([0, 5], dtype=torch.int64)
torch.onnx.export(
    model,
    (ids, offsets),
    str(out / "model.onnx"),
    dynamo=False,
    opset_version=17,
    input_names=["text", "offsets"],
    output_names=["logits"],
    dynamic_axes={"text": {0: "tokens"}, "offsets": {0: "batch"}, "logits": {0: "batch"}},
)
tokens_dim = torch.export.Dim("tokens", min=1, max=1 << 20)
batch_dim = torch.export.Dim("batch", min=1, max=4096)
with torch.no_grad():
    program = torch.export.export(
        model, (ids, offsets), dynamic_shapes=({0: tokens_dim}, {0: batch_dim})
    )
torch._inductor.aoti_compile_and_package(
    program,
    package_path=str(out / "model.pt2"),
    inductor_configs={"cpp.dynamic_threads": True},
)

# TorchServe's own handler on the test texts: its preprocessing's ids and its answer.
handler = TextClassifier()
# As its initialize loads it (torch.load before torch 2.6, whose default became weights_only).
handler.source_vocab = torch.load(out / "source_vocab.pt", weights_only=False)
handler.model = model
handler.device = torch.device("cpu")
handler.mapping = labels
texts = [
    "Wall St. Bears Claw Back Into the Black (Reuters)",
    "<p>Phelps <b>wins</b> the 200m butterfly &amp; can't stop &#8212; he doesn't want to!</p>",
    "I'd say the CAFÉ crowd won't wait: they'd like the final at home.",
    "Naïve investors &#x27;rally&#x27; as Oil prices soar; NASA's telescope finds water.",
    "Ünïcödé\u00a0spaces\tand\nnew\x1clines, y'all can't've",
    "completely unknown words only",
    "𝐁𝐞𝐚𝐫𝐬 ℌold the ᴬ Stocks, ﬁnally",
    "It's the striker's cup: scored twice on Saturday, 3-1!",
]
cases = []
with torch.inference_mode():
    for text in texts:
        tensor, tokens = handler.preprocess([{"data": text.encode("utf-8")}])
        answer = handler.postprocess(handler.inference((tensor, tokens)))[0]
        cases.append(
            {
                "text": text,
                "tokens": tokens,
                "ids": tensor.tolist(),
                "answer": answer,
            }
        )
expected = {
    "cases": cases,
    "ngrams": TextClassifier.ngrams,
    "versions": {"torch": torch.__version__, "torchserve": "0.12.0", "torchtext": "0.6.0"},
}
(out / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False))
print(f"make_text_fixtures: wrote {out}")
