"""Build the TorchScript models of the default model store and the e2e fixtures, with the
venv's torch, and write the outputs Python torch gives for fixed inputs (the e2e tests compare
Cresset's answers against them).

Usage: python scripts/make_models.py REPO_ROOT
Writes (git-ignored):
  model_store/iris/model.pt                     a 4-16-3 MLP classifier (labels committed)
  tests/fixtures/generated/two_inputs/model.pt  forward(x, y) -> (x @ W + y, x.sum(1))
  tests/fixtures/generated/expected.json        inputs and reference outputs
  tests/fixtures/generated/bench_mlp/model.pt   a 256-4096-4096-4096-10 MLP for bench/
"""

import json
import pathlib
import sys

import torch


class Iris(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
        )

    def forward(self, x):
        return self.net(x)


class BenchMlp(torch.nn.Module):
    """Compute-bound enough (about 70 MFLOP per row) that a benchmark measures serving, not
    just HTTP."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(256, 4096), torch.nn.ReLU(),
            torch.nn.Linear(4096, 4096), torch.nn.ReLU(),
            torch.nn.Linear(4096, 4096), torch.nn.ReLU(),
            torch.nn.Linear(4096, 10),
        )

    def forward(self, x):
        return self.net(x)


class TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, 2))

    def forward(self, x, y):
        return x @ self.w + y, x.sum(1)


def main(root: pathlib.Path) -> None:
    torch.manual_seed(0)
    iris = torch.jit.script(Iris().eval())
    two = torch.jit.script(TwoInputs().eval())

    store = root / "model_store" / "iris"
    store.mkdir(parents=True, exist_ok=True)
    iris.save(str(store / "model.pt"))
    gen = root / "tests" / "fixtures" / "generated"
    (gen / "two_inputs").mkdir(parents=True, exist_ok=True)
    two.save(str(gen / "two_inputs" / "model.pt"))
    (gen / "bench_mlp").mkdir(parents=True, exist_ok=True)
    torch.jit.script(BenchMlp().eval()).save(str(gen / "bench_mlp" / "model.pt"))

    g = torch.Generator().manual_seed(1)
    rows = torch.randn(5, 4, generator=g) * 3
    x = torch.randn(2, 3, generator=g)
    y = torch.randn(2, 2, generator=g)
    with torch.no_grad():
        logits = iris(rows)
        probs = torch.softmax(logits, -1)
        top_p, top_i = probs.topk(3, -1)
        out0, out1 = two(x, y)

    expected = {
        "torch_version": torch.__version__,
        "iris": {
            "inputs": rows.tolist(),
            "logits": logits.tolist(),
            "top_probabilities": top_p.tolist(),
            "top_indices": top_i.tolist(),
        },
        "two_inputs": {
            "x": x.tolist(),
            "y": y.tolist(),
            "output0": out0.tolist(),
            "output1": out1.tolist(),
        },
    }
    (gen / "expected.json").write_text(json.dumps(expected, indent=1))
    print(f"make_models: wrote {store / 'model.pt'} and {gen}", file=sys.stderr)


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve())
