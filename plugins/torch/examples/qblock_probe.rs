//! Probe: Cresset's block kernel against libtorch's int4 kernel on the same Q4_1 weights, for
//! SmolLM2-135M's layer shapes and 1 to 32 rows of activations (a decode step of 1 to 32
//! sequences). `cargo run --release -p cresset-torch --example qblock_probe -- [THREADS]`.
//! Prints milliseconds per call (the median of a few hundred) and the ratio.

use std::time::Instant;

use cresset_torch::gguf::GgmlType;
use cresset_torch::quant::blocks::KernelPath;
use cresset_torch::quant::{BlockWeight, QuantizedWeight};
use cresset_torch::tch::{self, Device, Kind, Tensor};

fn q4_1(out: usize, inp: usize) -> Vec<u8> {
    let mut state = 12345u64;
    let mut bytes = Vec::with_capacity(out * inp / 32 * 20);
    for _ in 0..out * inp / 32 {
        bytes.extend(half::f16::from_f32(0.01).to_le_bytes());
        bytes.extend(half::f16::from_f32(-0.08).to_le_bytes());
        for _ in 0..16 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            bytes.push((state >> 40) as u8);
        }
    }
    bytes
}

fn q8_0(out: usize, inp: usize) -> Vec<u8> {
    let mut state = 777u64;
    let mut bytes = Vec::with_capacity(out * inp / 32 * 34);
    for _ in 0..out * inp / 32 {
        bytes.extend(half::f16::from_f32(0.002).to_le_bytes());
        for _ in 0..32 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            bytes.push((state >> 40) as u8);
        }
    }
    bytes
}

fn median_ms(mut f: impl FnMut()) -> f64 {
    for _ in 0..20 {
        f();
    }
    let mut times: Vec<f64> = (0..200)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    let threads: i32 = std::env::args()
        .nth(1)
        .map(|t| t.parse().expect("threads"))
        .unwrap_or(2);
    tch::set_num_threads(threads);
    let _guard = tch::no_grad_guard();
    println!(
        "vectorized block kernel: {}",
        cresset_torch::quant::blocks::vectorized()
    );
    println!(
        "weights | shape (out×in) | rows | blocks ms | blocks, float path ms | libtorch ms | libtorch ÷ blocks"
    );
    let shapes = [
        (GgmlType::Q4_1, 960, 576),
        (GgmlType::Q4_1, 576, 576),
        (GgmlType::Q4_1, 3072, 576),
        (GgmlType::Q4_1, 576, 1536),
        (GgmlType::Q8_0, 49152, 576),
    ];
    for (kind, out, inp) in shapes {
        let (o, i) = (out as i64, inp as i64);
        let (raw, bits) = match kind {
            GgmlType::Q8_0 => (q8_0(out, inp), 8),
            _ => (q4_1(out, inp), 4),
        };
        let blocks = BlockWeight::from_gguf(kind, &raw, o, i, None, bits).expect("blocks");
        // libtorch's kernels: int4 group 32 for Q4, int8 per channel (requantized) for Q8_0.
        let int4 = match kind {
            GgmlType::Q8_0 => QuantizedWeight::int8_from_gguf(kind, &raw, o, i, None),
            _ => QuantizedWeight::int4_from_gguf(kind, &raw, o, i, None),
        }
        .expect("libtorch layout");
        for rows in [1i64, 2, 4, 8, 16, 32] {
            let x = Tensor::randn([rows, i], (Kind::Float, Device::Cpu));
            let a = median_ms(|| {
                let _ = blocks.forward(&x);
            });
            let f = median_ms(|| {
                let _ = blocks.forward_on(&x, KernelPath::Float);
            });
            let b = median_ms(|| {
                let _ = int4.forward(&x);
            });
            println!(
                "{kind:?} | {out}×{inp} | {rows} | {a:.3} | {f:.3} | {b:.3} | {:.2}",
                b / a
            );
        }
    }
}
