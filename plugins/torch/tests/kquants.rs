//! k-quants (Q4_K, Q5_K, Q6_K) against the `gguf` package's dequantization of the same blocks
//! (`scripts/make_kquant_fixtures.py`), and their quantized loading: Q4_K into int4 exactly (up
//! to the bf16 rounding of each group's scale and zero), Q5_K and Q6_K into int8 per channel
//! within the derived bound.

mod common;

use cresset_torch::gguf::{dequantize, GgmlType};
use cresset_torch::quant::QuantizedWeight;
use cresset_torch::tch::{Device, Kind, Tensor};

const ROWS: i64 = 64;
const COLS: i64 = 512;

fn fixture(name: &str) -> (Vec<u8>, Tensor) {
    let dir = common::fixtures("kquants");
    let read = |ext: &str| {
        let path = dir.join(format!("{name}.{ext}"));
        std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; run `make models`", path.display()))
    };
    let blocks = read("blocks");
    let floats: Vec<f32> = read("f32")
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (blocks, Tensor::from_slice(&floats).reshape([ROWS, COLS]))
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn k_quants_dequantize_as_the_gguf_package_does() {
    for (name, kind) in [
        ("Q4_K", GgmlType::Q4_K),
        ("Q5_K", GgmlType::Q5_K),
        ("Q6_K", GgmlType::Q6_K),
    ] {
        let (blocks, reference) = fixture(name);
        let ours = Tensor::from_slice(&dequantize(kind, &blocks)).reshape([ROWS, COLS]);
        let scale = reference.abs().max().double_value(&[]);
        let diff = max_diff(&ours, &reference);
        // The same f32 products in the same order: equal up to the last bit.
        assert!(diff <= scale * 1e-6, "{name}: {diff}");
    }
}

#[test]
fn q4_k_loads_as_int4_up_to_the_rounding_of_its_group_scales() {
    let (blocks, reference) = fixture("Q4_K");
    let q =
        QuantizedWeight::int4_from_gguf(GgmlType::Q4_K, &blocks, ROWS, COLS, None).expect("int4");
    // Per group, w = (q − 8)·s + z with s = d·sc and z = 8s − dmin·m each rounded to bf16
    // (8 significant bits: relative error ≤ 2⁻⁸): |Δw| ≤ 8·|Δs| + |Δz| ≤ 2⁻⁸·(8·s + |z|)
    // ≤ 2⁻⁸·(16·s + dmin·m). A group's values span −dmin·m .. 15·s − dmin·m, so 15·s and
    // dmin·m are each at most 2·max|w|: |Δw| ≤ 2⁻⁸·(16/15·2 + 2)·max|w| < 2⁻⁸·5·max|w|.
    let bound = 2f64.powi(-8) * 5.0 * reference.abs().max().double_value(&[]);
    let diff = max_diff(&q.dequantize(), &reference);
    assert!(diff <= bound, "{diff} > {bound}");
}

#[test]
fn q5_k_and_q6_k_load_as_int8_within_half_a_row_step() {
    for (name, kind) in [("Q5_K", GgmlType::Q5_K), ("Q6_K", GgmlType::Q6_K)] {
        let (blocks, reference) = fixture(name);
        let q = QuantizedWeight::int8_from_gguf(kind, &blocks, ROWS, COLS, None).expect("int8");
        // Half a step of the row's stored scale: max|w_row| / 127, grown by at most
        // (1 + 2⁻⁷)(1 + 2⁻⁸) when it is rounded up to bf16.
        let row_max = reference.abs().amax([1i64].as_slice(), true);
        let growth = (1.0 + 2f64.powi(-7)) * (1.0 + 2f64.powi(-8));
        let allowed = &row_max / 127.0 * growth * 0.5 + 1e-7;
        let err = (q.dequantize() - &reference).abs();
        let over = (err - allowed).max().double_value(&[]);
        assert!(over <= 0.0, "{name}: exceeds the bound by {over}");
        // And a matmul with it agrees with the dense one.
        let x = Tensor::randn([2, COLS], (Kind::Float, Device::Cpu));
        let y = q.forward(&x);
        let dense = x.matmul(&reference.transpose(0, 1));
        let relative = max_diff(&y, &dense) / dense.abs().max().double_value(&[]);
        assert!(relative < 0.03, "{name}: {relative}");
    }
}
