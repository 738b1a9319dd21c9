"""The committed torchtext 0.18 vocabulary fixture (tests/fixtures/torchtext/): the vocabulary
of the text fixtures' corpus (corpus.json) as torchtext 0.12 to 0.18 make and save it,
`build_vocab_from_iterator` over basic_english tokens and their bigrams with `<unk>` first,
then `torch.save(vocab, ...)`: source_vocab_0.18_no_default.pt as it is, source_vocab_0.18.pt
after `set_default_index(0)`. Since 0.10 that object is an nn.Module around torchtext's C++
vocabulary, pickled differently from the Python Vocab that scripts/make_text_fixtures.py
saves.

torchtext 0.18 (the last release) runs only on torch 2.3, which the test venv is not, so the
file is made once and committed; scripts/make-torchtext-vocab.sh makes it again in a venv of
its own. Beside it, lookups.json records what torchtext answers for `vocab[token]` (known and
unknown tokens) and `vocab.get_itos()`.
"""

import json
import pathlib
import sys

import torch
import torchtext

torchtext.disable_torchtext_deprecation_warning()
from torchtext.data.utils import get_tokenizer, ngrams_iterator  # noqa: E402
from torchtext.vocab import build_vocab_from_iterator  # noqa: E402

out = pathlib.Path(sys.argv[1]) / "tests/fixtures/torchtext"
corpus = json.loads((out / "corpus.json").read_text())
tokenizer = get_tokenizer("basic_english")
vocab = build_vocab_from_iterator(
    (ngrams_iterator(tokenizer(line), 2) for line in corpus), specials=["<unk>"]
)
# Without a default index first: an unknown token is then an error in torchtext.
torch.save(vocab, out / "source_vocab_0.18_no_default.pt")
vocab.set_default_index(vocab["<unk>"])
torch.save(vocab, out / "source_vocab_0.18.pt")
probe = ["the", "reuters", "wall st", "stocks", "zebra", "<unk>", "final"]
lookups = {
    "versions": {"torch": torch.__version__, "torchtext": torchtext.__version__},
    "itos": vocab.get_itos(),
    "default_index": vocab.get_default_index(),
    "lookups": {t: vocab[t] for t in probe},
}
(out / "lookups.json").write_text(json.dumps(lookups, indent=1, ensure_ascii=False) + "\n")
print(f"make_torchtext_vocab: wrote {out}")
