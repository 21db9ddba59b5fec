//! Cached sampling against full recomputation, prefixes, seeds, filters, guidance, cancel.

use tch::{Device, Kind, Tensor};
use tessera::sample::{Sampler, batch_seeds, draw, filter_logits};
use tessera::transformer::DecodeMode;
use tessera::{AttentionKind, Error, SampleOptions};

use crate::common::{max_abs_diff, random_batch, tiny_model};

const KINDS: [Option<AttentionKind>; 5] = [
    Some(AttentionKind::Full),
    Some(AttentionKind::Row),
    Some(AttentionKind::Column),
    Some(AttentionKind::Conv),
    None, // the paper's mix
];

#[test]
fn cached_logits_equal_full_recomputation() {
    // decode steps over the keys written so far (the CPU's default: sparse layers read only the
    // keys their pattern allows, or, to compare, every key written with a mask) and
    // static-shape steps over the whole masked cache (CUDA's) all equal the full pass
    let modes = [DecodeMode::Growing, DecodeMode::GrowingMasked, DecodeMode::Static];
    for (kind, mode) in KINDS.into_iter().flat_map(|k| modes.map(|m| (k, m))) {
        let mut model = tiny_model(kind, 1);
        model.transformer.net.set_decode_mode(mode);
        let net = &model.transformer.net;
        let (text, image) = random_batch(&model, 3, 2);
        let (_, full) = tch::no_grad(|| net.forward(&text, &image, false));
        let i_len = image.size()[1];
        // from the caption alone, then one token at a time
        let mut cache = net.new_cache(3);
        let mut logits = tch::no_grad(|| net.prefill(&mut cache, &text, None));
        for j in 0..i_len {
            let want = full.select(1, j);
            let d = max_abs_diff(&logits, &want);
            assert!(d < 1e-4, "{kind:?} ({mode:?}): logits of image token {j} differ by {d}");
            if j + 1 < i_len {
                logits = tch::no_grad(|| net.decode_step(&mut cache, &image.select(1, j), j as usize));
            }
        }
        // from the caption and a prefix of 5 tokens in one pass
        let logits = tch::no_grad(|| net.prefill(&mut cache, &text, Some(&image.narrow(1, 0, 5))));
        let d = max_abs_diff(&logits, &full.select(1, 5));
        assert!(d < 1e-4, "{kind:?}: prefilled logits differ by {d}");
    }
}

#[test]
fn rows_that_share_a_caption_read_its_keys_once_and_equal_the_full_pass() {
    // a batch of one prompt (and guidance's null-caption rows) holds the same caption keys in
    // every row: sparse steps read them once a run of rows, and each row still gets its own
    // full-pass logits
    for kind in KINDS {
        let model = tiny_model(kind, 4);
        let net = &model.transformer.net;
        let (text, image) = random_batch(&model, 5, 6);
        // rows 0, 1 | 2, 3, 4 share captions (different images)
        let text = Tensor::cat(&[text.get(0).expand([2, -1], false), text.get(1).expand([3, -1], false)], 0);
        let (_, full) = tch::no_grad(|| net.forward(&text, &image, false));
        let mut cache = net.new_cache(5);
        let mut logits = tch::no_grad(|| net.prefill(&mut cache, &text, None));
        assert_eq!(cache.caption_groups(), &[(0, 2), (2, 3)], "{kind:?}");
        for j in 0..image.size()[1] {
            let d = max_abs_diff(&logits, &full.select(1, j));
            assert!(d < 1e-4, "{kind:?}: logits of image token {j} differ by {d}");
            if j + 1 < image.size()[1] {
                logits = tch::no_grad(|| net.decode_step(&mut cache, &image.select(1, j), j as usize));
            }
        }
        // captions that all differ leave every row to read its own
        let (text, _) = random_batch(&model, 3, 7);
        let mut cache = net.new_cache(3);
        let _ = tch::no_grad(|| net.prefill(&mut cache, &text, None));
        assert!(cache.caption_groups().is_empty());
    }
}

#[test]
fn given_prefix_comes_back_unchanged() {
    let model = tiny_model(None, 3);
    let net = &model.transformer.net;
    let (text, image) = random_batch(&model, 2, 4);
    for p in [0, 1, 7, 16] {
        let prefix = image.narrow(1, 0, p);
        let out =
            Sampler::new(net, &text, Some(&prefix), &[1, 2], &SampleOptions::default()).unwrap().run(|_| true).unwrap();
        assert_eq!(out.size(), image.size());
        assert!(out.narrow(1, 0, p).equal(&prefix), "prefix of {p} tokens changed");
    }
}

#[test]
fn a_seed_gives_the_same_codes_at_any_batch_size() {
    let mut model = tiny_model(None, 5);
    let opts = SampleOptions { temperature: 1.0, top_k: 0, top_p: 0.95, guidance: 1.0 };
    let mut growing = None;
    // growing steps with sparse layers reading their pattern's keys, with masks, and static
    for mode in [DecodeMode::Growing, DecodeMode::GrowingMasked, DecodeMode::Static] {
        model.transformer.net.set_decode_mode(mode);
        let run = |n: usize, seed: u64| {
            model.sampler("a red circle above a blue square", n, seed, None, &opts).unwrap().run(|_| true).unwrap()
        };
        let five = run(5, 100);
        let many = run(64, 98);
        for i in 0..5 {
            let one = run(1, 100 + i as u64);
            assert!(one.get(0).equal(&five.get(i)), "seed {} differs between batch 1 and 5 ({mode:?})", 100 + i);
            assert!(many.get(i + 2).equal(&five.get(i)), "seed {} differs at batch 64 ({mode:?})", 100 + i);
        }
        // and different seeds do differ
        assert!(!five.get(0).equal(&five.get(1)));
        // every way of decoding draws the same images
        match &growing {
            None => growing = Some(five),
            Some(g) => assert!(g.equal(&five), "decoding ({mode:?}) drew other codes"),
        }
    }
}

#[test]
fn top_k_one_and_tiny_top_p_are_greedy() {
    tch::manual_seed(0);
    let logits = Tensor::randn([6, 50], (Kind::Float, Device::Cpu));
    let greedy = logits.argmax(1, false);
    let u: Vec<f64> = (0..6).map(|i| (i as f64 + 0.5) / 6.0).collect();
    for opts in [
        SampleOptions { top_k: 1, ..Default::default() },
        SampleOptions { top_p: 1e-6, ..Default::default() },
        SampleOptions { temperature: 0.0, ..Default::default() },
    ] {
        let got = draw(&filter_logits(&logits, &opts), &u, opts.temperature == 0.0);
        assert!(got.equal(&greedy), "{opts:?} is not greedy");
    }
}

#[test]
fn top_k_and_top_p_keep_the_right_tokens() {
    let logits = Tensor::from_slice(&[0.5f32, 0.2, 0.15, 0.1, 0.05]).log().view([1, 5]);
    let kept = |o: SampleOptions| {
        let f = filter_logits(&logits, &o);
        Vec::<bool>::try_from(f.isfinite().view([-1])).unwrap()
    };
    assert_eq!(kept(SampleOptions { top_k: 2, ..Default::default() }), [true, true, false, false, false]);
    // 0.5 + 0.2 = 0.7 < 0.8, so the third token is needed to reach 0.8
    assert_eq!(kept(SampleOptions { top_p: 0.8, ..Default::default() }), [true, true, true, false, false]);
    assert_eq!(kept(SampleOptions { top_p: 0.5, ..Default::default() }), [true, false, false, false, false]);
}

#[test]
fn inverse_cdf_draws_follow_the_distribution() {
    let probs = [0.1f64, 0.6, 0.3];
    let logits = Tensor::from_slice(&probs).log().to_kind(Kind::Float).view([1, 3]);
    let n = 3000;
    let mut counts = [0usize; 3];
    for i in 0..n {
        let u = (i as f64 + 0.5) / n as f64; // a uniform grid: exact quantiles
        let t = draw(&logits, &[u], false).int64_value(&[0]) as usize;
        counts[t] += 1;
    }
    for k in 0..3 {
        let f = counts[k] as f64 / n as f64;
        assert!((f - probs[k]).abs() < 2e-3, "token {k}: frequency {f}, probability {}", probs[k]);
    }
}

#[test]
fn guidance_zero_is_the_unconditional_model() {
    let model = tiny_model(None, 7);
    let net = &model.transformer.net;
    let (text, _) = random_batch(&model, 2, 8);
    let greedy = SampleOptions { temperature: 0.0, ..Default::default() };
    let guided = Sampler::new(net, &text, None, &[1, 2], &SampleOptions { guidance: 0.0, ..greedy.clone() })
        .unwrap()
        .run(|_| true)
        .unwrap();
    let uncond = Sampler::new(net, &net.null_text(2), None, &[1, 2], &greedy).unwrap().run(|_| true).unwrap();
    assert!(guided.equal(&uncond));
    let cond = Sampler::new(net, &text, None, &[1, 2], &greedy).unwrap().run(|_| true).unwrap();
    let one = Sampler::new(net, &text, None, &[1, 2], &SampleOptions { guidance: 1.0, ..greedy })
        .unwrap()
        .run(|_| true)
        .unwrap();
    assert!(cond.equal(&one));
}

#[test]
fn cancel_stops_between_steps() {
    let model = tiny_model(None, 9);
    let mut steps = 0;
    let r = model.sampler("a cat", 2, 0, None, &SampleOptions::default()).unwrap().run(|_| {
        steps += 1;
        steps < 3
    });
    assert!(matches!(r, Err(Error::Cancelled)));
    assert_eq!(steps, 3);
}

#[test]
fn progress_counts_every_token() {
    let model = tiny_model(None, 10);
    let mut seen = Vec::new();
    let prefix = Tensor::zeros([1, 4], (Kind::Int64, Device::Cpu));
    let _ = model
        .sampler("a dog", 2, 0, Some(&prefix), &SampleOptions::default())
        .unwrap()
        .run(|s| {
            seen.push(s.progress().done);
            true
        })
        .unwrap();
    let total = model.config.image_len();
    assert_eq!(seen, (5..=total).collect::<Vec<_>>());
    assert_eq!(batch_seeds(7, 3), vec![7, 8, 9]);
}

#[test]
fn bad_sampling_input_is_an_error() {
    let model = tiny_model(None, 11);
    let o = SampleOptions::default();
    assert!(matches!(model.sampler("", 1, 0, None, &o), Err(Error::EmptyPrompt)));
    assert!(matches!(model.sampler("   ", 1, 0, None, &o), Err(Error::EmptyPrompt)));
    assert!(model.sampler("x", 0, 0, None, &o).is_err());
    assert!(model.sampler("x", 1, 0, None, &SampleOptions { top_p: 0.0, ..o.clone() }).is_err());
    assert!(model.sampler("x", 1, 0, None, &SampleOptions { temperature: -1.0, ..o.clone() }).is_err());
    let too_long = Tensor::zeros([1, 17], (Kind::Int64, Device::Cpu));
    assert!(model.sampler("x", 1, 0, Some(&too_long), &o).is_err());
    let bad_ids = Tensor::full([1, 3], 999, (Kind::Int64, Device::Cpu));
    assert!(model.sampler("x", 1, 0, Some(&bad_ids), &o).is_err());
}

#[test]
fn bf16_sampling_tracks_f32() {
    let mut model = tiny_model(None, 12);
    let (text, image) = random_batch(&model, 2, 13);
    let logits = |m: &tessera::Model| {
        let net = &m.transformer.net;
        let mut cache = net.new_cache(2);
        tch::no_grad(|| net.prefill(&mut cache, &text, Some(&image.narrow(1, 0, 6)))).to_kind(Kind::Float)
    };
    let f32_logits = logits(&model);
    model.set_dtype(Kind::BFloat16).unwrap();
    let bf16_logits = logits(&model);
    let scale = f32_logits.abs().max().double_value(&[]);
    let d = max_abs_diff(&f32_logits, &bf16_logits);
    assert!(d < 0.05 * scale.max(1.0), "bf16 logits differ by {d} (scale {scale})");
    // in bf16, static-shape steps (an additive bf16 bias over the aligned cache) track growing
    // ones (boolean windows over the keys written so far) step by step
    let steps = |m: &mut tessera::Model, whole: bool| {
        m.transformer.net.set_decode_mode(if whole { DecodeMode::Static } else { DecodeMode::Growing });
        let net = &m.transformer.net;
        let mut cache = net.new_cache(2);
        let mut out = vec![tch::no_grad(|| net.prefill(&mut cache, &text, None))];
        for j in 0..6 {
            out.push(tch::no_grad(|| net.decode_step(&mut cache, &image.select(1, j), j as usize)));
        }
        Tensor::stack(&out, 0).to_kind(Kind::Float)
    };
    let (growing, whole) = (steps(&mut model, false), steps(&mut model, true));
    let d = max_abs_diff(&growing, &whole);
    assert!(d < 0.02 * scale.max(1.0), "bf16 static steps differ from growing ones by {d} (scale {scale})");
    let s = model.generate("a red circle", 2, 3, None, &SampleOptions::default(), |_| true).unwrap();
    assert_eq!(s.len(), 2);
    assert!(model.set_dtype(Kind::Int64).is_err());
}

#[test]
fn a_batch_out_of_memory_is_halved_and_set_batches_give_the_same_images() {
    let mut model = tiny_model(None, 6);
    let opts = SampleOptions::default();
    let whole = model.generate("a red circle", 12, 40, None, &opts, |_| true).unwrap();
    // batches above 3 fail as a full device would: 12 → 6 → 3, then every batch of 3 works
    model.inject_oom_above = Some(3);
    let mut batches = Vec::new();
    let halved = model
        .generate("a red circle", 12, 40, None, &opts, |s| {
            let b = s.tokens().size()[0];
            if batches.last() != Some(&b) || s.progress().done == 1 {
                batches.push(b);
            }
            true
        })
        .unwrap();
    assert_eq!(halved.len(), 12);
    assert!(batches.iter().all(|&b| b == 3), "sampled in batches {batches:?}");
    for (a, b) in whole.iter().zip(&halved) {
        assert_eq!((a.seed, &a.tokens, &a.rgb), (b.seed, &b.tokens, &b.rgb), "seed {} changed", a.seed);
    }
    // a set batch size: 12 samples in 5, 5 and 2, the same images
    model.inject_oom_above = None;
    model.sample_batch = Some(5);
    let mut firsts = Vec::new();
    let chunked = model
        .generate("a red circle", 12, 40, None, &opts, |s| {
            if s.progress().done == 1 {
                firsts.push(s.tokens().size()[0]);
            }
            true
        })
        .unwrap();
    assert_eq!(firsts, [5, 5, 2]);
    for (a, b) in whole.iter().zip(&chunked) {
        assert_eq!((a.seed, &a.tokens, &a.rgb), (b.seed, &b.tokens, &b.rgb), "seed {} changed in batches of 5", a.seed);
    }
    // on the CPU, batches of CPU_SAMPLE_BATCH unless set
    model.sample_batch = None;
    assert_eq!(model.sample_batch_limit(), tessera::model::CPU_SAMPLE_BATCH);
    // a batch of one that fails is an error, not an endless retry
    model.inject_oom_above = Some(0);
    let err = model.generate("a red circle", 2, 40, None, &opts, |_| true).unwrap_err();
    assert!(tessera::model::is_out_of_memory(&err), "{err}");
}

#[test]
fn device_held_positions_draw_the_same_codes_as_host_positions() {
    // The step a CUDA graph captures (positions in device tensors, attention over the whole
    // masked cache) run eagerly on the CPU, against the static-shape step with host positions:
    // every attention kind, filters, guidance, a given prefix, batches of 1 and 5.
    let opts = [
        SampleOptions::default(),
        SampleOptions { temperature: 0.8, top_k: 7, top_p: 0.9, guidance: 1.0 },
        SampleOptions { temperature: 1.0, top_k: 0, top_p: 1.0, guidance: 3.0 },
        SampleOptions { temperature: 0.0, ..Default::default() },
    ];
    for (kind, o) in KINDS.into_iter().zip(opts.iter().cycle()) {
        let mut model = tiny_model(kind, 9);
        model.transformer.net.set_decode_mode(DecodeMode::Static);
        let net = &model.transformer.net;
        for (b, p) in [(1usize, 0i64), (5, 0), (5, 3)] {
            let (text, image) = random_batch(&model, b, 12);
            let prefix = image.narrow(1, 0, p);
            let seeds = batch_seeds(40, b);
            let mk = || Sampler::new(net, &text, (p > 0).then_some(&prefix), &seeds, o).unwrap();
            let host = mk().run(|_| true).unwrap();
            let mut steps = 0;
            let device = mk()
                .with_device_positions()
                .run(|s| {
                    steps += 1;
                    assert!(!s.uses_cuda_graph());
                    s.tokens().narrow(1, 0, s.progress().done as i64).equal(&host.narrow(
                        1,
                        0,
                        s.progress().done as i64,
                    ))
                })
                .unwrap();
            assert_eq!(steps, image.size()[1] - p, "{kind:?} b {b} p {p}: steps");
            assert!(device.equal(&host), "{kind:?} {o:?} b {b} p {p}: device-held positions drew other codes");
        }
    }
}

#[test]
fn few_row_products_equal_a_double_precision_reference() {
    // a decode step's matrix products (2 to 64 rows on a CPU) take another route through
    // libtorch than a training batch's: both must give x·Wᵀ + b
    use tch::nn::{self, Module};
    use tessera::attention::{FEW_ROWS, dense};
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let with_bias = nn::linear(vs.root() / "a", 96, 200, Default::default());
    let no_bias = nn::linear(vs.root() / "b", 96, 200, nn::LinearConfig { bias: false, ..Default::default() });
    for l in [&with_bias, &no_bias] {
        for shape in
            [vec![1, 96], vec![2, 96], vec![5, 1, 96], vec![FEW_ROWS, 96], vec![FEW_ROWS + 1, 96], vec![3, 7, 96]]
        {
            let x = Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu));
            let want = {
                let y = x.to_kind(Kind::Double).matmul(&l.ws.to_kind(Kind::Double).tr());
                match &l.bs {
                    Some(b) => y + b.to_kind(Kind::Double),
                    None => y,
                }
            };
            let got = tch::no_grad(|| dense(l, &x, None));
            let mut out = shape.clone();
            *out.last_mut().unwrap() = 200;
            assert_eq!(got.size(), out, "shape of {shape:?}");
            assert!(got.is_contiguous());
            let d = max_abs_diff(&got.to_kind(Kind::Double), &want);
            assert!(d < 1e-4, "{shape:?}: off by {d}");
            // and with autograd on, the weights' gradients are the plain product's
            let g = |y: Tensor| {
                l.ws.shallow_clone().zero_grad();
                y.sum(Kind::Float).backward();
                l.ws.grad().copy()
            };
            let (mine, plain) = (g(dense(l, &x, None)), g(l.forward(&x)));
            assert!(max_abs_diff(&mine, &plain) < 1e-4, "{shape:?}: gradients differ");
        }
    }
}

#[test]
fn recorded_operations_name_the_work_they_launch() {
    use tessera::shim::{record_ops, working_ops};
    let a = Tensor::ones([3, 4], (Kind::Float, Device::Cpu));
    let b = Tensor::ones([4, 2], (Kind::Float, Device::Cpu));
    let c = Tensor::ones([3, 2], (Kind::Float, Device::Cpu));
    let (y, calls) = record_ops(|| (a.matmul(&b) + &c).transpose(0, 1)).unwrap();
    assert_eq!(Vec::<f32>::try_from(y.flatten(0, -1)).unwrap(), vec![5.0; 6]);
    let top: Vec<&str> = calls.iter().filter(|c| c.depth == 0).map(|c| c.name.as_str()).collect();
    assert_eq!(top, ["aten::matmul", "aten::add", "aten::transpose"], "{calls:?}");
    // the product is counted as the kernel `matmul` calls, the view not at all
    let work: Vec<&str> = working_ops(&calls).iter().map(|c| c.name.as_str()).collect();
    assert_eq!(work, ["aten::mm", "aten::add"], "{calls:?}");
    // recordings do not nest, and one that unwinds leaves the thread free to record again
    let nested = record_ops(|| record_ops(|| a.sum(Kind::Float)).map(|_| ())).unwrap().0;
    assert!(nested.is_err());
    let unwound = std::panic::catch_unwind(|| record_ops(|| panic!("inside")));
    assert!(unwound.is_err());
    let (_, again) = record_ops(|| a.sum(Kind::Float)).unwrap();
    assert!(again.iter().any(|c| c.depth == 0 && c.name == "aten::sum"), "{again:?}");
}

#[test]
fn a_device_held_step_calls_the_same_operations_at_every_position() {
    // what a CUDA graph captures must not depend on the position: the same operations on the
    // same shapes at every step (every kind's mask row chosen with one selection)
    use tessera::shim::{record_ops, working_ops};
    for kind in [Some(AttentionKind::Full), None] {
        let mut model = tiny_model(kind, 3);
        model.transformer.net.set_decode_mode(DecodeMode::Static);
        model.set_dtype(Kind::BFloat16).unwrap(); // libtorch's operations (no CPU panel kernels)
        let net = &model.transformer.net;
        let (text, _) = random_batch(&model, 2, 5);
        let mut s = Sampler::new(net, &text, None, &batch_seeds(1, 2), &SampleOptions::default())
            .unwrap()
            .with_device_positions();
        let steps: Vec<_> = (0..4).map(|_| record_ops(|| s.step()).unwrap().1).collect();
        for (i, st) in steps.iter().enumerate().skip(1) {
            assert_eq!(st, &steps[0], "{kind:?}: step {i} calls other operations than step 0");
        }
        let selects = working_ops(&steps[0]).iter().filter(|c| c.name == "aten::index_select").count();
        // the uniforms, the token embedding, the position table and the mask rows: one each
        assert_eq!(selects, 4, "{kind:?}: {:?}", steps[0]);
    }
}
