//! The CPU decode kernels against references computed another way (libtorch in double
//! precision), and the property sampling relies on: a row's result does not depend on the rows
//! beside it, bit for bit.
use tch::{Device, Kind, Tensor};
use tessera::kernels::{PackedLinear, block_attention, block_attention_step, draw_rows, layer_norm};

use crate::common::max_abs_diff;

fn randn(shape: &[i64]) -> Tensor {
    Tensor::randn(shape, (Kind::Float, Device::Cpu))
}

#[test]
fn bf16_panels_give_the_f32_panels_products_bit_for_bit() {
    // Weights whose values are all bf16 (as stored weights widened to f32 are) go into bf16
    // panels, widened in registers: every product, epilogue and row count the same bits as f32
    // panels of the same weights. Odd input counts leave a pair half empty.
    tch::manual_seed(12);
    for (o, i) in [(200i64, 96i64), (37, 25), (300, 256), (64, 1031)] {
        let w = randn(&[o, i]).to_kind(Kind::BFloat16).to_kind(Kind::Float);
        let b = randn(&[o]);
        let narrow = PackedLinear::new(&w, Some(&b)).unwrap();
        let wide = PackedLinear::new_f32(&w, Some(&b)).unwrap();
        assert!(narrow.is_bf16() && !wide.is_bf16(), "{o}×{i}: packed as {} / {}", narrow.is_bf16(), wide.is_bf16());
        let all = randn(&[33, i]);
        let res = randn(&[33, o]);
        for rows in [1i64, 2, 3, 4, 5, 8, 16, 17, 33] {
            let x = all.narrow(0, 0, rows);
            let r = res.narrow(0, 0, rows);
            assert!(narrow.forward(&x).unwrap().equal(&wide.forward(&x).unwrap()), "{o}×{i}, {rows} rows");
            assert!(narrow.forward_gelu(&x).unwrap().equal(&wide.forward_gelu(&x).unwrap()), "{o}×{i} GELU");
            assert!(narrow.forward_add(&x, &r).unwrap().equal(&wide.forward_add(&x, &r).unwrap()), "{o}×{i} add");
        }
        // and both against libtorch in double precision
        let x = all.narrow(0, 0, 5);
        let want = x.to_kind(Kind::Double).matmul(&w.to_kind(Kind::Double).tr()) + b.to_kind(Kind::Double);
        let d = max_abs_diff(&narrow.forward(&x).unwrap().to_kind(Kind::Double), &want);
        assert!(d < 1e-4 * (i as f64).sqrt(), "{o}×{i}: bf16 panels off by {d}");
    }
    // one value that is not a bf16: f32 panels
    let w = randn(&[40, 24]).to_kind(Kind::BFloat16).to_kind(Kind::Float);
    let _ = w.get(7).get(3).fill_(0.1f64);
    assert!(!PackedLinear::new(&w, None).unwrap().is_bf16());
}

#[test]
fn the_default_models_decode_steps_read_bf16_panels() {
    // its weights are stored in bf16: every packed product of a step is in bf16 panels
    let model = tessera::model::Model::load_embedded_default(Device::Cpu).unwrap();
    let panels = tch::no_grad(|| model.transformer.net.panels()).unwrap();
    assert!(panels.layers.iter().flatten().chain([&panels.image_head]).all(PackedLinear::is_bf16));
}

#[test]
fn panel_products_equal_a_double_precision_reference_at_every_batch_size() {
    tch::manual_seed(11);
    // outputs a multiple of the 16-wide panels and not (in groups of three panels and alone,
    // a partial panel inside a group: 37, 200), inputs a multiple of 16 and not, and rows
    // through every register block (8, 4, 2, 1 and their remainders)
    for (o, i) in [(200i64, 96i64), (16, 16), (37, 24), (300, 256), (64, 1030)] {
        let w = randn(&[o, i]);
        let b = randn(&[o]);
        for bias in [Some(&b), None] {
            let p = PackedLinear::new(&w, bias).unwrap();
            let all = randn(&[64, i]);
            let alone: Vec<Tensor> = (0..64).map(|r| p.forward(&all.narrow(0, r, 1)).unwrap()).collect();
            for rows in [1i64, 2, 3, 5, 8, 15, 16, 17, 31, 33, 64] {
                let x = all.narrow(0, 0, rows);
                let got = p.forward(&x).unwrap();
                assert_eq!(got.size(), [rows, o]);
                let mut want = x.to_kind(Kind::Double).matmul(&w.to_kind(Kind::Double).tr());
                if let Some(b) = bias {
                    want += b.to_kind(Kind::Double);
                }
                let d = max_abs_diff(&got.to_kind(Kind::Double), &want);
                assert!(
                    d < 1e-4 * (i as f64 / 64.0).max(1.0),
                    "{o}×{i}, {rows} rows, bias {}: off by {d}",
                    bias.is_some()
                );
                // every row is the bits it has when multiplied alone
                for r in 0..rows {
                    assert!(
                        got.get(r).equal(&alone[r as usize].get(0)),
                        "{o}×{i}: row {r} of {rows} differs from the row alone"
                    );
                }
            }
        }
    }
    // GELU in the epilogue: the exact form (x·Φ(x), libtorch's double precision) of the same
    // product's outputs, within the erf approximation's 1.5e−7; rows independent of the batch
    let w = randn(&[300, 256]);
    let b = randn(&[300]);
    let p = PackedLinear::new(&w, Some(&b)).unwrap();
    let all = randn(&[33, 256]) * 0.3;
    let alone: Vec<Tensor> = (0..33).map(|r| p.forward_gelu(&all.narrow(0, r, 1)).unwrap()).collect();
    for rows in [1i64, 5, 16, 33] {
        let x = all.narrow(0, 0, rows);
        let pre = p.forward(&x).unwrap().to_kind(Kind::Double);
        let got = p.forward_gelu(&x).unwrap();
        let want = pre.gelu("none");
        let err = (got.to_kind(Kind::Double) - &want).abs() / (pre.abs() + 1.0);
        let e = err.max().double_value(&[]);
        assert!(e < 3e-7, "GELU epilogue, {rows} rows: off by {e} (relative to 1 + |x|)");
        for r in 0..rows {
            assert!(got.get(r).equal(&alone[r as usize].get(0)), "GELU row {r} of {rows} differs alone");
        }
    }
    // the inputs cover both tails and the middle
    let pre = p.forward(&all).unwrap();
    assert!(pre.min().double_value(&[]) < -4.0 && pre.max().double_value(&[]) > 4.0);

    // a residual added in the epilogue: the bits of adding it after the product
    let res = randn(&[33, 300]);
    for rows in [1i64, 7, 16, 33] {
        let (x, r) = (all.narrow(0, 0, rows), res.narrow(0, 0, rows));
        let got = p.forward_add(&x, &r).unwrap();
        assert!(got.equal(&(&r + p.forward(&x).unwrap())), "residual epilogue, {rows} rows");
    }
    assert!(p.forward_add(&all.narrow(0, 0, 2), &res.narrow(0, 0, 3)).is_err());
    assert!(p.forward_add(&all.narrow(0, 0, 2), &res.narrow(0, 0, 2).narrow(1, 0, 299)).is_err());

    // leading dimensions are kept; a wrong width and a weight the kernels do not take are errors
    let w = randn(&[40, 32]);
    let p = PackedLinear::new(&w, None).unwrap();
    assert_eq!(p.forward(&randn(&[3, 1, 32])).unwrap().size(), [3, 1, 40]);
    assert!(p.forward(&randn(&[3, 31])).is_err());
    assert!(PackedLinear::new(&w.to_kind(Kind::BFloat16), None).is_err());
    assert!(PackedLinear::new(&randn(&[2, 3, 4]), None).is_err());
}

/// Row `b`, head `h` of block attention computed in double precision: softmax(q·Kᵀ/√D)·V over
/// the caption keys of row `src` and the row's own keys at `pos`.
fn reference(q: &Tensor, kv: &Tensor, b: i64, h: i64, src: i64, n_caption: i64, pos: &[i64]) -> Tensor {
    let kv = kv.to_kind(Kind::Double);
    let mut keys = Vec::new();
    let mut values = Vec::new();
    if n_caption > 0 {
        keys.push(kv.get(0).get(src).get(h).narrow(0, 0, n_caption));
        values.push(kv.get(1).get(src).get(h).narrow(0, 0, n_caption));
    }
    let idx = Tensor::from_slice(pos);
    keys.push(kv.get(0).get(b).get(h).index_select(0, &idx));
    values.push(kv.get(1).get(b).get(h).index_select(0, &idx));
    let (k, v) = (Tensor::cat(&keys, 0), Tensor::cat(&values, 0));
    let qd = q.get(b).get(h).to_kind(Kind::Double);
    let d = qd.size()[0] as f64;
    let p = (k.matmul(&qd) / d.sqrt()).softmax(0, Kind::Double);
    p.matmul(&v)
}

#[test]
fn block_attention_equals_softmax_over_the_picked_keys() {
    tch::manual_seed(12);
    let (b, h, l) = (5i64, 3i64, 90i64);
    // head dimensions with a register build (16, 64) and without (24)
    for d in [16i64, 64, 24] {
        let kv = randn(&[2, b, h, l, d]);
        // scores far apart (large queries) as well as close together
        for amp in [1.0, 30.0] {
            let q = randn(&[b, h, d]) * amp;
            // rows 0–1 share row 0's caption, 2–4 row 2's
            let src = [0i64, 0, 2, 2, 2];
            let pos: Vec<i64> = (40..73).chain([75, 79, 83]).collect();
            for n_caption in [0usize, 1, 17] {
                let got = block_attention(&q, &kv, &pos, n_caption, &src).unwrap();
                assert_eq!(got.size(), [b, h, d]);
                for r in 0..b {
                    for hh in 0..h {
                        let want = reference(&q, &kv, r, hh, src[r as usize], n_caption as i64, &pos);
                        let e = max_abs_diff(&got.get(r).get(hh).to_kind(Kind::Double), &want);
                        // scores 30× larger carry 30× the rounding (more without fused
                        // multiply-adds, as in the baseline build)
                        assert!(
                            e < 2e-5 * amp,
                            "D {d}, amplitude {amp}, {n_caption} caption keys: row {r} head {hh} off by {e}"
                        );
                    }
                }
                // row 3 alone, in a cache of one row that holds its caption group's keys: the same bits
                let one = kv.narrow(1, 3, 1).copy();
                if n_caption > 0 {
                    one.narrow(3, 0, n_caption as i64).copy_(&kv.narrow(1, 2, 1).narrow(3, 0, n_caption as i64));
                }
                let alone = block_attention(&q.narrow(0, 3, 1), &one, &pos, n_caption, &[0]).unwrap();
                assert!(alone.get(0).equal(&got.get(3)), "D {d}: row 3 differs when attended alone");
            }
        }
    }
    // keys outside the cache, caption rows outside the batch, mismatched sizes: errors
    let kv = randn(&[2, 2, 1, 10, 16]);
    let q = randn(&[2, 1, 16]);
    assert!(block_attention(&q, &kv, &[3, 10], 2, &[0, 1]).is_err());
    assert!(block_attention(&q, &kv, &[3], 2, &[0, 2]).is_err());
    assert!(block_attention(&q, &kv, &[3], 2, &[0]).is_err());
    assert!(block_attention(&q, &kv, &[], 0, &[0, 1]).is_err());
    assert!(block_attention(&randn(&[2, 1, 8]), &kv, &[3], 2, &[0, 1]).is_err());
    assert!(block_attention(&q, &kv, &[3], 11, &[0, 1]).is_err());
}

#[test]
fn layer_norm_equals_libtorch_in_double_precision() {
    tch::manual_seed(15);
    // widths a multiple of 16 and not; rows with a large mean beside their spread
    for c in [256i64, 288, 37] {
        let w = randn(&[c]);
        let b = randn(&[c]);
        let x = randn(&[9, 1, c]) * 3.0 + 20.0;
        let got = layer_norm(&x, &w, &b, 1e-5).unwrap();
        assert_eq!(got.size(), [9, 1, c]);
        let xd = x.to_kind(Kind::Double);
        let want = xd.layer_norm([c], Some(w.to_kind(Kind::Double)), Some(b.to_kind(Kind::Double)), 1e-5, false);
        let e = max_abs_diff(&got.to_kind(Kind::Double), &want);
        assert!(e < 1e-5, "width {c}: off by {e}");
        // a row alone: the same bits
        let alone = layer_norm(&x.narrow(0, 4, 1), &w, &b, 1e-5).unwrap();
        assert!(alone.get(0).equal(&got.get(4)), "width {c}: row 4 differs alone");
    }
    // mismatched weight, another dtype: errors
    let x = randn(&[2, 16]);
    assert!(layer_norm(&x, &randn(&[15]), &randn(&[16]), 1e-5).is_err());
    assert!(layer_norm(&x.to_kind(Kind::Double), &randn(&[16]), &randn(&[16]), 1e-5).is_err());
}

#[test]
fn a_step_writes_its_keys_then_attends_as_block_attention() {
    tch::manual_seed(14);
    let (b, h, l) = (6i64, 4i64, 80i64);
    for d in [32i64, 24] {
        let inner = h * d;
        let kv = randn(&[2, b, h, l, d]);
        let qkv = randn(&[b, 3 * inner]);
        let src = [0i64, 0, 0, 3, 3, 5];
        let (n_caption, at) = (9usize, 50i64);
        // the pattern's keys include the step's own position
        let pos: Vec<i64> = (30..=at).step_by(4).chain([at]).collect();
        // reference: the keys and values written by libtorch, then the query-only kernel
        let want_kv = kv.copy();
        let parts = qkv.view([b, 3, h, d]);
        want_kv.get(0).select(2, at).copy_(&parts.select(1, 1));
        want_kv.get(1).select(2, at).copy_(&parts.select(1, 2));
        let want = block_attention(&parts.select(1, 0).contiguous(), &want_kv, &pos, n_caption, &src).unwrap();
        let got = block_attention_step(&qkv, &kv, at as usize, &pos, n_caption, &src).unwrap();
        assert!(got.equal(&want), "D {d}: the step's attention differs from writing then attending");
        assert!(kv.equal(&want_kv), "D {d}: the cache differs from libtorch's writes");
    }
    // a write position inside the caption or past the cache, a qkv of the wrong width: errors,
    // and the cache is left as it was
    let kv = randn(&[2, 2, 2, 20, 16]);
    let before = kv.copy();
    let qkv = randn(&[2, 96]);
    assert!(block_attention_step(&qkv, &kv, 3, &[3], 4, &[0, 1]).is_err());
    assert!(block_attention_step(&qkv, &kv, 20, &[3], 4, &[0, 1]).is_err());
    assert!(block_attention_step(&randn(&[2, 64]), &kv, 10, &[10], 4, &[0, 1]).is_err());
    assert!(block_attention_step(&qkv, &kv, 10, &[25], 4, &[0, 1]).is_err());
    assert!(kv.equal(&before), "a refused step wrote into the cache");
}

#[test]
fn row_draws_equal_the_cdf_search_in_double_precision() {
    tch::manual_seed(13);
    // 4,000 rows of 1,000 logits (a vocabulary not a multiple of 16), every other row with
    // most tokens removed as top-k leaves them; uniforms spread over [0, 1)
    let (rows, v) = (4000i64, 1000i64);
    let logits = randn(&[rows, v]) * 3.0;
    let removed = Tensor::rand([rows, v], (Kind::Float, Device::Cpu)).lt(0.9);
    let odd = Tensor::arange(rows, (Kind::Int64, Device::Cpu)).remainder(2).eq(1).unsqueeze(1);
    let logits = logits.masked_fill(&removed.logical_and(&odd), f64::NEG_INFINITY);
    let u = Tensor::rand([rows], (Kind::Double, Device::Cpu));
    let got = draw_rows(&logits, &u).unwrap();
    let cdf = logits.softmax(1, Kind::Double).cumsum(1, Kind::Double);
    let want = (u.view([-1, 1]) * cdf.narrow(1, v - 1, 1))
        .searchsorted(&cdf, false, true, "right", None::<Tensor>)
        .squeeze_dim(1);
    let same = got.eq_tensor(&want).sum(Kind::Int64).int64_value(&[]);
    // the two differ only where u falls within rounding (~1e-7) of a boundary
    assert!(same >= rows - 1, "{} of {rows} draws differ from the double-precision search", rows - same);
    // never a removed token
    let picked = logits.gather(1, &got.view([-1, 1]), false);
    assert!(picked.isfinite().all().int64_value(&[]) == 1, "a removed token was drawn");
    // u at the ends: the first and the last token with any weight
    let row =
        Tensor::from_slice(&[f32::NEG_INFINITY, 0.5, f32::NEG_INFINITY, 0.2, 1.0, f32::NEG_INFINITY]).view([1, 6]);
    for (uu, want) in [(0.0, 1i64), (1.0 - 1e-17, 4), (1.0, 4)] {
        let t = draw_rows(&row, &Tensor::from_slice(&[uu])).unwrap();
        assert_eq!(t.int64_value(&[0]), want, "u = {uu}");
    }
    // a uniform per row, on the logits' device, f32 logits: else an error
    assert!(draw_rows(&row, &Tensor::from_slice(&[0.5, 0.5])).is_err());
    assert!(draw_rows(&row.to_kind(Kind::Double), &Tensor::from_slice(&[0.5])).is_err());
}

#[test]
fn the_avx2_and_baseline_builds_pass_the_kernel_tests() {
    // the kernels' instruction set is chosen once per process, so the other builds run in a
    // child: this test binary again, with the kernel tests only, the lower build named; one
    // test at a time, so that each test's seeded data is the same at every run
    if std::env::var_os("TESSERA_KERNELS_ISA").is_some() {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    // the kernel tests the child should run: this module's, but this one
    let list = std::process::Command::new(&exe).args(["kernels::", "--list"]).output().unwrap();
    let n = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|l| l.starts_with("kernels::") && l.ends_with(": test") && !l.contains("the_avx2_and_baseline_builds"))
        .count();
    assert!(n >= 7, "found {n} kernel tests");
    for isa in ["avx2", "baseline"] {
        let out = std::process::Command::new(&exe)
            .args(["kernels::", "--skip", "the_avx2_and_baseline_builds", "--test-threads", "1"])
            .env("TESSERA_KERNELS_ISA", isa)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "the {isa} build failed the kernel tests:\n{text}");
        assert!(
            text.contains(&format!("{n} passed")),
            "the {isa} build ran other tests than the {n} expected:\n{text}"
        );
    }
}
