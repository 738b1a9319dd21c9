"""k-quant blocks and what the `gguf` package dequantizes them to, for the Rust tests of
cresset-torch (gguf::kquant, quant::int4_from_gguf, quant::int8_from_gguf).

For each of Q4_K, Q5_K and Q6_K: a 64 x 512 tensor (two super-blocks per row) of random bytes
with sane f16 scales, written as `<type>.blocks`, and `<type>.f32`, the gguf package's
dequantization (little-endian f32). Usage: make_kquant_fixtures.py REPO_ROOT
"""

import json
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

ROWS, COLS = 64, 512
SIZES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def blocks(name: str, rng: np.random.Generator) -> np.ndarray:
    n = ROWS * COLS // 256
    raw = rng.integers(0, 256, size=(n, SIZES[name]), dtype=np.uint8)
    d = (rng.random(n) * 0.01 + 0.001).astype(np.float16).view(np.uint8).reshape(n, 2)
    if name == "Q6_K":
        raw[:, 208:210] = d
    else:
        dmin = (rng.random(n) * 0.01).astype(np.float16).view(np.uint8).reshape(n, 2)
        raw[:, 0:2] = d
        raw[:, 2:4] = dmin
    return raw


def main() -> None:
    out = Path(sys.argv[1]) / "tests/fixtures/generated/kquants"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(12)
    meta = {"rows": ROWS, "cols": COLS, "types": list(SIZES)}
    for name in SIZES:
        raw = blocks(name, rng)
        ref = dequantize(raw.reshape(-1), GGMLQuantizationType[name]).astype("<f4")
        assert ref.size == ROWS * COLS and np.isfinite(ref).all()
        (out / f"{name}.blocks").write_bytes(raw.tobytes())
        (out / f"{name}.f32").write_bytes(ref.tobytes())
    (out / "meta.json").write_text(json.dumps(meta))
    print(f"make_kquant_fixtures: wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
