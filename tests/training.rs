//! A few hundred optimiser steps on a tiny batch drive both losses down, and the schedules
//! follow the paper's endpoints.

use tch::nn::{Module, OptimizerConfig};
use tch::{Device, Kind, Tensor, nn};
use tessera::dvae::{DvaeSchedule, cosine_anneal};

use crate::common::{random_batch, tiny_model};

/// Four 16×16 pictures: coloured squares on different backgrounds.
fn pictures() -> Tensor {
    let mut imgs = Tensor::zeros([4, 3, 16, 16], (Kind::Float, Device::Cpu));
    let colours = [[1.0, 0.0, 0.0], [0.0, 0.8, 0.2], [0.1, 0.2, 0.9], [0.9, 0.9, 0.1]];
    for (i, c) in colours.iter().enumerate() {
        let bg = colours[(i + 1) % 4];
        for ch in 0..3 {
            let _ = imgs.get(i as i64).get(ch).fill_(bg[ch as usize] * 0.5);
            let (y, x) = (2 + 2 * i as i64, 8 - 2 * i as i64);
            let _ = imgs.get(i as i64).get(ch).narrow(0, y, 6).narrow(1, x.max(0), 6).fill_(c[ch as usize]);
        }
    }
    imgs = imgs.clamp(0.0, 1.0);
    imgs
}

#[test]
fn dvae_loss_goes_down() {
    tch::manual_seed(0);
    let model = tiny_model(None, 1);
    let x = pictures();
    let mut opt = nn::Adam::default().build(&model.dvae.vs, 3e-3).unwrap();
    let first = model.dvae.net.loss(&x, 1.0, 0.0);
    let (nll0, mse0) = (first.nll.double_value(&[]), first.mse.double_value(&[]));
    for step in 0..300 {
        let l = model.dvae.net.loss(&x, 1.0, cosine_anneal(0.0, 0.5, step, 300));
        opt.backward_step(&l.loss);
    }
    let last = tch::no_grad(|| model.dvae.net.loss(&x, 1.0, 0.5));
    let (nll1, mse1) = (last.nll.double_value(&[]), last.mse.double_value(&[]));
    assert!(nll1 < nll0 - 0.5, "dVAE nll {nll0} → {nll1}");
    assert!(mse1 < 0.5 * mse0, "dVAE mse {mse0} → {mse1}");
    // hard codes decode to something close to the input too
    let rec = tch::no_grad(|| model.dvae.net.decode(&model.dvae.net.encode(&x)));
    assert_eq!(rec.size(), x.size());
    let mse_hard = (rec - &x).square().mean(Kind::Float).double_value(&[]);
    assert!(mse_hard < mse0, "hard-code reconstruction mse {mse_hard} vs initial {mse0}");
}

#[test]
fn transformer_loss_goes_down() {
    let model = tiny_model(None, 2);
    let (text, image) = random_batch(&model, 4, 3);
    let mut opt = nn::AdamW { beta1: 0.9, beta2: 0.96, wd: 4.5e-2, eps: 1e-8, amsgrad: false }
        .build(&model.transformer.vs, 3e-3)
        .unwrap();
    let net = &model.transformer.net;
    let l0 = net.loss(&text, &image, true);
    let (img0, txt0) = (l0.image.double_value(&[]), l0.text.double_value(&[]));
    for _ in 0..200 {
        let l = net.loss(&text, &image, true);
        opt.zero_grad();
        l.loss.backward();
        opt.clip_grad_norm(4.0);
        opt.step();
    }
    let l1 = tch::no_grad(|| net.loss(&text, &image, false));
    let (img1, txt1) = (l1.image.double_value(&[]), l1.text.double_value(&[]));
    assert!(img1 < 0.3 * img0, "image loss {img0} → {img1}");
    assert!(txt1 < 0.5 * txt0, "text loss {txt0} → {txt1}");
    // the combined loss weighs the modalities 1/8 and 7/8
    let w = model.config.transformer.text_loss_weight;
    let combined = l1.loss.double_value(&[]);
    assert!((combined - (w * txt1 + (1.0 - w) * img1)).abs() < 1e-5);
}

#[test]
fn schedules_follow_the_paper() {
    let s = DvaeSchedule::default();
    assert_eq!(s.beta(0), 0.0);
    assert!((s.beta(5_000) - 6.6).abs() < 1e-12 && (s.beta(9_999) - 6.6).abs() < 1e-12);
    assert!((s.beta(2_500) - 3.3).abs() < 1e-9);
    assert_eq!(s.tau(0), 1.0);
    assert!((s.tau(150_000) - 1.0 / 16.0).abs() < 1e-12);
    assert!(s.tau(75_000) < 1.0 && s.tau(75_000) > 1.0 / 16.0);
    assert!((s.lr(0) - 1e-4).abs() < 1e-15 && (s.lr(s.lr_steps) - 1.25e-6).abs() < 1e-15);
}

#[test]
fn caption_dropout_trains_the_null_caption() {
    let mut cfg = crate::common::tiny_with(None);
    cfg.transformer.cond_drop_prob = 1.0;
    let model = tessera::Model::random_init(&cfg, Device::Cpu, 4).unwrap();
    let (text, image) = random_batch(&model, 3, 5);
    let net = &model.transformer.net;
    let loss = |t: &Tensor, train: bool| tch::no_grad(|| net.loss(t, &image, train).loss.double_value(&[]));
    let dropped = loss(&text, true);
    let null = loss(&net.null_text(3), false);
    let kept = loss(&text, false);
    assert!((dropped - null).abs() < 1e-6, "dropped {dropped} vs null {null}");
    assert!((dropped - kept).abs() > 1e-4, "the caption was not dropped");
}

#[test]
fn mixed_precision_matches_f32_and_trains() {
    let mut model = tiny_model(None, 6);
    let (text, image) = random_batch(&model, 4, 7);
    let f32_loss = tch::no_grad(|| model.transformer.net.loss(&text, &image, false).loss.double_value(&[]));
    model.transformer.net.set_compute_kind(Some(Kind::BFloat16));
    let net = &model.transformer.net;
    let bf16_loss = tch::no_grad(|| net.loss(&text, &image, false).loss.double_value(&[]));
    assert!((f32_loss - bf16_loss).abs() < 0.02 * f32_loss, "f32 {f32_loss} vs mixed {bf16_loss}");
    let mut opt = nn::Adam::default().build(&model.transformer.vs, 3e-3).unwrap();
    for _ in 0..150 {
        opt.backward_step(&net.loss(&text, &image, true).loss);
    }
    let after = tch::no_grad(|| net.loss(&text, &image, false).image.double_value(&[]));
    assert!(after < 0.5 * bf16_loss, "mixed-precision training: {bf16_loss} → {after}");
    // the master weights stay f32
    assert!(model.transformer.vs.variables().values().all(|t| t.kind() == Kind::Float));
}

#[test]
fn dvae_mixed_precision_matches_f32_and_trains() {
    let mut model = tiny_model(None, 4);
    let x = pictures();
    let u = tch::no_grad(|| model.dvae.net.encoder_logits(&x)).rand_like(); // the same Gumbel noise
    let losses = |net: &tessera::dvae::Dvae| {
        let l = tch::no_grad(|| net.loss_with_noise(&x, Some(&u), 1.0, 0.5, 0.0, false));
        (l.nll.double_value(&[]), l.kl.double_value(&[]), net.encode(&x))
    };
    let (nll, kl, codes) = losses(&model.dvae.net);
    model.dvae.net.set_compute_kind(Some(Kind::BFloat16));
    let (nll_bf, kl_bf, codes_bf) = losses(&model.dvae.net);
    assert!((nll - nll_bf).abs() < 0.02 * nll.abs().max(0.1), "nll f32 {nll} vs mixed {nll_bf}");
    assert!((kl - kl_bf).abs() < 0.05 * kl.abs().max(0.01), "kl f32 {kl} vs mixed {kl_bf}");
    // the codes are chosen in the weights' dtype whatever the compute kind; the bf16 logits
    // stay close enough that their own argmax mostly agrees
    assert!(codes.equal(&codes_bf), "bf16 convolutions changed the hard codes");
    let argmax_bf = tch::no_grad(|| model.dvae.net.encoder_logits(&x)).argmax(1, false);
    let same = codes.eq_tensor(&argmax_bf).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
    assert!(same > 0.9, "only {same} of the bf16 logits' argmax agree with the codes");
    let net = &model.dvae.net;
    let mut opt = nn::Adam::default().build(&model.dvae.vs, 3e-3).unwrap();
    for _ in 0..200 {
        opt.backward_step(&net.loss_variant(&x, 1.0, 0.5, 0.0, false).loss);
    }
    let after = tch::no_grad(|| net.loss_variant(&x, 1.0, 0.5, 0.0, false).nll.double_value(&[]));
    assert!(after < nll_bf - 0.5, "mixed-precision dVAE training: nll {nll_bf} → {after}");
    assert!(model.dvae.vs.variables().values().all(|t| t.kind() == Kind::Float));
}

#[test]
fn the_decoder_fine_tune_in_bf16_trains_on_the_codes_sampling_gives() {
    // the default model's dVAE on world scenes: many of its codes are near ties, so bf16
    // convolutions would pick others; sampling, shards and the transformer use the f32 ones
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/models/default");
    let mut m = tessera::Model::load(&dir, Device::Cpu).expect("the default model");
    let size = m.config.dvae.image_size;
    let pictures: Vec<Vec<u8>> = (0..24u64)
        .map(|k| {
            let cap = tessera::world::Capability::ALL[k as usize % tessera::world::Capability::ALL.len()];
            tessera::world::render(&tessera::world::generate(cap, 77_003 * k + 5, tessera::world::Split::Train), size)
        })
        .collect();
    let x = tessera::model::from_rgb8(&pictures, size, Device::Cpu).unwrap();
    let net = &mut m.dvae.net;
    let codes = tch::no_grad(|| net.encode(&x));
    net.set_compute_kind(Some(Kind::BFloat16));
    let bf16_argmax = tch::no_grad(|| net.encoder_logits(&x).argmax(1, false));
    let changed = bf16_argmax.ne_tensor(&codes).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
    assert!(changed > 0.01, "bf16 logits change only {changed} of the codes: the check below would not tell");
    assert!(tch::no_grad(|| net.encode(&x)).equal(&codes), "encode depends on the compute kind");
    // the fine-tune's error is the error of decoding exactly those codes (in the same precision)
    let loss = tch::no_grad(|| net.decoder_loss(&x));
    let err = |c: &Tensor| tch::no_grad(|| (net.decode(c) - &x).square().mean(Kind::Float).double_value(&[]));
    let (want, other) = (err(&codes), err(&bf16_argmax));
    let got = loss.mse.double_value(&[]);
    let tol = 1e-6 * want.max(1e-3);
    assert!((got - want).abs() < tol, "fine-tune error {got} vs decoding the codes {want}");
    // the changed codes are near ties and may draw nearly the same pictures (the twentieth
    // session's dVAE: errors 1e-7 to 1e-5 apart), yet far beyond the tolerance
    assert!(
        (other - want).abs() > 100.0 * tol,
        "decoding the bf16 argmax gave the same error ({other} against {want}): the check above would not tell"
    );
}

#[test]
fn the_report_gives_the_dvaes_ceiling_on_held_out_pairs_from_their_own_scenes() {
    // `eval --only transform --samples 0` on the default model: its round trips, seen and held
    // out, against the same scenes' round trips scored one at a time here
    use tessera::world::{Capability, Split};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/models/default");
    let m = tessera::Model::load_dvae_only(&dir, Device::Cpu).expect("the default model's dVAE");
    let size = m.config.dvae.image_size;
    let (captions, seed) = (40, 0);
    let opts = tessera::report::EvalOptions {
        captions,
        samples: 0,
        seed,
        sample: Default::default(),
        samples_file: None,
        only: vec![Capability::Transform],
    };
    let out = tempfile::tempdir().unwrap();
    let r = tessera::report::evaluate(&m, &opts, out.path(), |_| {}).unwrap();
    let one_at_a_time = |split: Split| {
        let scenes = tessera::report::eval_scenes(Capability::Transform, captions, seed, split);
        let renders: Vec<Vec<u8>> = scenes.iter().map(|s| tessera::world::render(s, size)).collect();
        let x = tessera::model::from_rgb8(&renders, size, Device::Cpu).unwrap();
        let back = tessera::model::to_rgb8(&tch::no_grad(|| m.dvae.net.decode(&m.dvae.net.encode(&x)))).unwrap();
        let passed = scenes.iter().zip(&back).filter(|(s, b)| tessera::eval::judge(s, b, size).is_ok()).count();
        passed as f64 / captions as f64
    };
    let (seen, held) = (one_at_a_time(Split::Train), one_at_a_time(Split::HeldOut));
    assert_ne!(seen, held, "seen and held-out scenes pass alike here: the check below would not tell them apart");
    assert_eq!(r.dvae_roundtrip.keys().collect::<Vec<_>>(), ["transform"]);
    assert_eq!(r.dvae_roundtrip["transform"], seen);
    assert_eq!(r.dvae_roundtrip_held_out.keys().collect::<Vec<_>>(), ["transform"]);
    assert_eq!(r.dvae_roundtrip_held_out["transform"], held);
    let md = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    let cell = |x: f64| format!("{:.0}%", 100.0 * x);
    assert!(md.contains(&format!("| {} / {} |", cell(seen), cell(held))), "{md}");
}

#[test]
fn a_batch_encodes_and_decodes_on_the_cpu_as_each_picture_alone() {
    // on the CPU, encode and decode take a batch a few pictures at a time; a batch of 11 (two
    // full passes and a short one) must give every picture, in order, what it gives alone
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/models/default");
    let m = tessera::Model::load(&dir, Device::Cpu).expect("the default model");
    let cfg = &m.config.dvae;
    let n = 11i64;
    let per_pass = tessera::dvae::pictures_per_pass(cfg.dec_group_width(0), cfg.image_size) as i64;
    assert!((2..n / 2).contains(&per_pass), "{per_pass} pictures per pass: the batch would not be split");
    let pictures: Vec<Vec<u8>> = (0..n as u64)
        .map(|k| {
            let cap = tessera::world::Capability::ALL[k as usize % tessera::world::Capability::ALL.len()];
            tessera::world::render(
                &tessera::world::generate(cap, 31_013 * k + 7, tessera::world::Split::Train),
                cfg.image_size,
            )
        })
        .collect();
    let x = tessera::model::from_rgb8(&pictures, cfg.image_size, Device::Cpu).unwrap();
    let net = &m.dvae.net;
    let codes = tch::no_grad(|| net.encode(&x));
    let images = tch::no_grad(|| net.decode(&codes));
    assert_eq!(images.size(), [n, 3, cfg.image_size as i64, cfg.image_size as i64]);
    for i in 0..n {
        let alone = tch::no_grad(|| net.encode(&x.narrow(0, i, 1)));
        assert!(alone.equal(&codes.narrow(0, i, 1)), "picture {i}'s codes differ in the batch");
        let drawn = tch::no_grad(|| net.decode(&alone));
        let diff = (drawn - images.narrow(0, i, 1)).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "picture {i} decodes {diff} apart in the batch");
    }
    // and the pictures differ from one another, so a mix-up of the order would show
    let first = images.narrow(0, 0, 1);
    assert!((images.narrow(0, 1, 1) - first).abs().max().double_value(&[]) > 0.1);
}

#[test]
fn ema_of_a_short_run_forgets_the_initialisation() {
    // A parameter that jumps from its initial value to 1 and stays there: after 1,000 updates
    // at decay 0.999 the average must be (almost) 1, not 63% of the way there.
    let vs = nn::VarStore::new(Device::Cpu);
    let w = vs.root().zeros("w", &[4]);
    let mut ema = tessera::optim::Ema::new(&vs, 0.999);
    tch::no_grad(|| {
        let _ = w.shallow_clone().fill_(1.0);
    });
    for step in 0..1000 {
        ema.update(step);
    }
    let avg = ema.tensors()[0].1.mean(Kind::Float).double_value(&[]);
    assert!(avg > 0.999, "EMA after 1,000 steps still holds the initialisation: {avg}");
    // The decay warms up to the configured value and never exceeds it.
    assert!((ema.decay_at(0) - 0.1).abs() < 1e-12);
    assert_eq!(ema.decay_at(1_000_000), 0.999);
}

/// The summed magnitude of the gradients on the dVAE encoder's parameters.
fn encoder_gradient(model: &tessera::Model) -> f64 {
    let vars = model.dvae.vs.variables();
    vars.iter()
        .filter(|(n, _)| n.starts_with("encoder."))
        .map(|(_, t)| t.grad().abs().sum(Kind::Double).double_value(&[]))
        .sum()
}

/// Squared error of decoding, by hand, the codes that Gumbel noise from uniforms `u` samples.
fn sampled_code_error(net: &tessera::dvae::Dvae, x: &Tensor, u: &Tensor) -> f64 {
    tch::no_grad(|| {
        let logits = net.encoder_logits(x);
        let u = u.clamp(1e-10, 1.0 - 1e-7);
        let codes = (&logits - (-u.log()).log()).argmax(1, false);
        (net.decode(&codes) - x).square().mean(Kind::Float).double_value(&[])
    })
}

/// `--argmax-codes`: the straight-through loss decodes exactly the codes `encode` gives at
/// inference, whatever the noise, and still trains the encoder.
#[test]
fn straight_through_from_argmax_codes_decodes_what_inference_decodes() {
    let mut model = tiny_model(None, 1);
    let x = pictures();
    let u = tch::no_grad(|| model.dvae.net.encoder_logits(&x)).rand_like();
    let sampled = sampled_code_error(&model.dvae.net, &x, &u);
    let net = &mut model.dvae.net;
    net.set_argmax_codes(true);
    let l = net.loss_with_noise(&x, Some(&u), 0.5, 1.0, 0.0, true);
    let other = tch::no_grad(|| net.loss_with_noise(&x, Some(&u.rand_like()), 0.5, 1.0, 0.0, true));
    let by_hand = tch::no_grad(|| (net.decode(&net.encode(&x)) - &x).square().mean(Kind::Float).double_value(&[]));
    let mse = l.mse.double_value(&[]);
    assert!((mse - by_hand).abs() < 1e-6, "straight-through mse {mse} vs decoding encode's codes {by_hand}");
    assert_eq!(mse, other.mse.double_value(&[]), "the argmax codes depend on the noise");
    // a Gumbel sample's codes decode otherwise, so the check above tells the two apart
    assert!((sampled - by_hand).abs() > 1e-6, "the sampled codes decode as the argmax ones ({sampled})");
    l.loss.backward();
    assert!(encoder_gradient(&model) > 0.0, "no gradient reached the encoder");
}

#[test]
fn straight_through_decodes_the_sampled_one_hot_and_trains_the_encoder() {
    let model = tiny_model(None, 1);
    let net = &model.dvae.net;
    let x = pictures();
    let u = tch::no_grad(|| net.encoder_logits(&x)).rand_like();
    let l = net.loss_with_noise(&x, Some(&u), 0.5, 1.0, 0.0, true);
    // the same Gumbel noise by hand: the decoder was given exactly the one-hot of the sample
    let by_hand = sampled_code_error(net, &x, &u);
    let mse = l.mse.double_value(&[]);
    assert!((mse - by_hand).abs() < 1e-6, "straight-through mse {mse} vs hard decode {by_hand}");
    // and the relaxed forward pass differs from it
    let soft = net.loss_with_noise(&x, Some(&u), 0.5, 1.0, 0.0, false).mse.double_value(&[]);
    assert!((soft - by_hand).abs() > 1e-6, "relaxed mse {soft} equals the hard one");
    // gradients reach the encoder through the relaxed sample
    l.loss.backward();
    assert!(encoder_gradient(&model) > 0.0, "no gradient reached the encoder");
}

#[test]
fn fused_optimiser_kernels_match_the_per_tensor_update() {
    // Two identical networks trained 30 steps on the same batches: one with libtorch's fused
    // AdamW, multi-tensor clipping and averaging, one with an operation per tensor. (A plain
    // network: in a transformer the attention keys' bias has a gradient that is rounding noise,
    // which Adam turns into full-size steps of either sign, so two correct runs drift apart.)
    // Nothing here draws from libtorch's global generator, which tests running beside this
    // one reseed and draw from: both networks start from the same copied weights and train on
    // batches computed from the step.
    let start = nn::VarStore::new(Device::Cpu);
    let layers = |root: nn::Path| {
        nn::seq()
            .add(nn::linear(&root / "a", 12, 32, Default::default()))
            .add_fn(|x| x.tanh())
            .add(nn::linear(&root / "b", 32, 32, Default::default()))
            .add_fn(|x| x.tanh())
            .add(nn::linear(&root / "c", 32, 3, Default::default()))
    };
    let _ = layers(start.root());
    let run = |fused: bool| {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let net = layers(vs.root());
        vs.copy(&start).unwrap();
        let mut opt = tessera::optim::AdamW::new(&vs, 0.9, 0.96, 1e-8, 4.5e-2);
        let mut ema = tessera::optim::Ema::new(&vs, 0.9);
        assert!(opt.fused && ema.fused, "f32 parameters on one device take the fused path");
        opt.fused = fused;
        ema.fused = fused;
        let mut norms = Vec::new();
        for step in 0..30 {
            let k = Tensor::arange(64 * 12, (Kind::Float, Device::Cpu)).view([64, 12]);
            let x = ((k * (0.37 + 0.011 * step as f64) + step as f64).sin() * 1.7).sin() * 1.5;
            let y = x.narrow(1, 0, 3).sin() * 2.0;
            opt.zero_grad();
            (net.forward(&x) - y).square().mean(Kind::Float).backward();
            // a bound that clips the early steps and not the later ones
            norms.push(opt.clip_grad_norm(1.0).double_value(&[]));
            opt.step(1e-2);
            ema.update(step as usize);
        }
        assert_eq!(opt.fused, fused, "the fused kernels failed and fell back");
        let mut live: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        live.sort_by(|a, b| a.0.cmp(&b.0));
        (live, ema.tensors(), opt.state(), norms)
    };
    let (p_f, e_f, s_f, n_f) = run(true);
    let (p_u, e_u, s_u, n_u) = run(false);
    assert!(n_u.first() > Some(&1.0) && n_u.last() < Some(&1.0), "gradient norms {n_u:?}");
    for (a, b) in n_f.iter().zip(&n_u) {
        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "gradient norms {a} vs {b}");
    }
    let close = |what: &str, a: &[(String, Tensor)], b: &[(String, Tensor)]| {
        assert_eq!(a.len(), b.len());
        for ((na, ta), (nb, tb)) in a.iter().zip(b) {
            assert_eq!(na, nb);
            let diff = (ta - tb).abs().max().double_value(&[]);
            let scale = tb.abs().max().double_value(&[]);
            assert!(
                scale > 0.0 && diff <= 1e-4 * scale,
                "{what} {na}: fused and per-tensor differ by {diff} (scale {scale})"
            );
        }
    };
    close("parameter", &p_f, &p_u);
    close("average", &e_f, &e_u);
    close("moment", &s_f, &s_u);
}

#[test]
fn the_squared_error_option_is_fifty_times_the_pixel_error() {
    use tessera::dvae::Recon;
    let mut model = tiny_model(None, 1);
    let x = pictures();
    let u = tch::no_grad(|| model.dvae.net.encoder_logits(&x)).rand_like();
    let laplace = model.dvae.net.loss_with_noise(&x, Some(&u), 0.5, 0.0, 0.0, true);
    model.dvae.net.set_recon(Recon::Mse);
    let net = &model.dvae.net;
    let l = net.loss_with_noise(&x, Some(&u), 0.5, 0.0, 0.0, true);
    // the straight-through decoder input is the one-hot of the sampled code: decode it by hand
    let by_hand = sampled_code_error(net, &x, &u);
    let term = l.nll.double_value(&[]);
    // the term counts the error unclamped (a clamped pixel is never further from its target,
    // which lies in [0, 1]); an untrained decoder overshoots in a few places
    assert!(
        term / 50.0 >= by_hand - 1e-7 && term / 50.0 <= 1.02 * by_hand,
        "squared-error term {term} vs 50 × {by_hand}"
    );
    assert!((l.loss.double_value(&[]) - term).abs() < 1e-6, "β = 0: the loss is the reconstruction term");
    assert!((l.mse.double_value(&[]) - by_hand).abs() < 1e-6);
    // the paper's term is another number for the same reconstruction
    assert!((laplace.nll.double_value(&[]) - term).abs() > 1e-3);
    assert_eq!("mse".parse::<Recon>(), Ok(Recon::Mse));
    assert_eq!("laplace".parse::<Recon>(), Ok(Recon::LogitLaplace));
    assert!("l2".parse::<Recon>().is_err());
    assert_eq!(serde_json::to_string(&Recon::Mse).unwrap(), "\"mse\"");
}

/// `--recon l1` with `--decoder-only`: the term is ten times the mean absolute pixel error of
/// decoding the encoder's own codes, computed here by decoding them by hand.
#[test]
fn the_absolute_error_option_is_ten_times_the_pixel_error_of_the_decoded_codes() {
    use tessera::dvae::Recon;
    let mut model = tiny_model(None, 2);
    let x = pictures();
    let squared = model.dvae.net.decoder_loss(&x);
    model.dvae.net.set_recon(Recon::L1);
    let net = &model.dvae.net;
    let l = net.decoder_loss(&x);
    let decoded = tch::no_grad(|| net.decode(&net.encode(&x)));
    let by_hand = (&decoded - &x).abs().mean(Kind::Float).double_value(&[]);
    let term = l.nll.double_value(&[]);
    // unclamped in the term, clamped in the decoded pictures: never less than by hand
    assert!(
        term / 10.0 >= by_hand - 1e-7 && term / 10.0 <= 1.02 * by_hand,
        "absolute-error term {term} vs 10 × {by_hand}"
    );
    assert!((l.loss.double_value(&[]) - term).abs() < 1e-6);
    let sq = (&decoded - &x).square().mean(Kind::Float).double_value(&[]);
    assert!((l.mse.double_value(&[]) - sq).abs() < 1e-6, "the logged squared error is the same either way");
    assert!((squared.nll.double_value(&[]) - term).abs() > 1e-3, "another term than the default's");
    // it trains the decoder: its gradient reaches the decoder's weights and not the encoder's
    l.loss.backward();
    let grads = |prefix: &str| {
        model.dvae.vs.variables().iter().filter(|(n, _)| n.starts_with(prefix)).any(|(_, t)| {
            let g = t.grad();
            g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0
        })
    };
    assert!(grads("decoder."));
    assert!(!grads("encoder."));
    assert_eq!("l1".parse::<Recon>(), Ok(Recon::L1));
    assert_eq!(serde_json::to_string(&Recon::L1).unwrap(), "\"l1\"");
    assert_eq!(Recon::L1.to_string(), "l1");
}

/// A tiny reranker drawn from `seed`, `n` random pictures and the captions of the brute-force
/// loss tests.
fn contrast_fixture(seed: i64, n: usize) -> (tessera::model::RerankerModel, Tensor) {
    let cfg = crate::common::tiny_with(None);
    tch::manual_seed(seed);
    let r = tessera::model::RerankerModel::new(&cfg, Device::Cpu);
    let size = cfg.dvae.image_size as i64;
    (r, Tensor::rand([n as i64, 3, size, size], (Kind::Float, Device::Cpu)))
}

fn fixture_caption(i: usize) -> Vec<i64> {
    vec![(i % 7) as i64 + 1, (3 * i % 5) as i64 + 2, (i % 4) as i64]
}

/// −log softmax of `own` among `all`.
fn softmax_nll(own: f64, all: &[f64]) -> f64 {
    all.iter().map(|s| (s - own).exp()).sum::<f64>().ln()
}

/// CLIP's loss with hard negatives from one score at a time, the softmax written out: `pair(i,
/// j)` scores image i against caption j; `caption_contrast(c)` scores image c / k against its
/// contrasting caption c, `picture_contrast(c)` contrasting picture c against caption c / k
/// (c = i·k + j), each kept where `real[c]`.
fn brute_force_loss(
    (b, k): (usize, usize),
    real: &[bool],
    pair: impl Fn(usize, usize) -> f64,
    caption_contrast: Option<&dyn Fn(usize) -> f64>,
    picture_contrast: Option<&dyn Fn(usize) -> f64>,
) -> f64 {
    let (mut image_side, mut text_side) = (0.0, 0.0);
    for i in 0..b {
        let kept: Vec<usize> = (i * k..(i + 1) * k).filter(|&c| real[c]).collect();
        let mut row: Vec<f64> = (0..b).map(|j| pair(i, j)).collect();
        row.extend(caption_contrast.iter().flat_map(|f| kept.iter().map(|&c| f(c))));
        image_side += softmax_nll(row[i], &row);
        let mut column: Vec<f64> = (0..b).map(|j| pair(j, i)).collect();
        column.extend(picture_contrast.iter().flat_map(|f| kept.iter().map(|&c| f(c))));
        text_side += softmax_nll(column[i], &column);
    }
    (image_side + text_side) / (2.0 * b as f64)
}

/// The loss with every hard negative and with those of `dropped` left out matches the brute
/// force; leaving some out lowers it, and with none (k = 0) it is CLIP's loss `plain`, lower
/// still.
fn check_hard_negative_loss(
    (b, k): (usize, usize),
    loss_with: impl Fn(&[bool], usize) -> f64,
    brute: impl Fn(&[bool]) -> f64,
    dropped: &[usize],
    plain: f64,
) {
    let all = vec![true; b * k];
    let (got, want) = (loss_with(&all, k), brute(&all));
    assert!((got - want).abs() < 1e-4 * want.abs().max(1.0), "loss {got} vs brute force {want}");
    let mut some = all.clone();
    for &d in dropped {
        some[d] = false;
    }
    let (part, want_part) = (loss_with(&some, k), brute(&some));
    assert!((part - want_part).abs() < 1e-4 * want_part.abs().max(1.0), "loss {part} vs brute force {want_part}");
    assert!(part < got);
    assert_eq!(plain, loss_with(&[], 0));
    assert!(got > plain);
}

#[test]
fn the_contrast_loss_matches_a_brute_force_softmax() {
    let (b, k) = (3usize, 2usize);
    let (r, images) = contrast_fixture(3, b);
    let (net, caption) = (&r.net, fixture_caption);
    let (ids, valid) = net.batch_text(&(0..b).map(caption).collect::<Vec<_>>(), Device::Cpu);
    let (oids, ovalid) = net.batch_text(&(0..b * k).map(|j| caption(10 + j)).collect::<Vec<_>>(), Device::Cpu);
    let loss_with = |real: &[bool], k: usize| {
        let real = Tensor::from_slice(real).view([b as i64, k as i64]);
        tch::no_grad(|| net.loss_with_contrasts(&images, &ids, &valid, &oids, &ovalid, &real)).double_value(&[])
    };
    // the same from one score at a time
    let score = |i: usize, text: &[i64]| -> f64 {
        tch::no_grad(|| net.score(&images.narrow(0, i as i64, 1), text)).double_value(&[0])
    };
    let contrast = |c: usize| score(c / k, &caption(10 + c));
    let brute = |real: &[bool]| brute_force_loss((b, k), real, |i, j| score(i, &caption(j)), Some(&contrast), None);
    // pictures with fewer contrasts: the missing ones are left out
    let plain = tch::no_grad(|| net.loss(&images, &ids, &valid)).double_value(&[]);
    check_hard_negative_loss((b, k), loss_with, brute, &[1, 2 * k - 1], plain);
}

#[test]
fn the_contrasting_picture_loss_matches_a_brute_force_softmax() {
    let (b, k) = (3usize, 2usize);
    let (r, images) = contrast_fixture(4, b);
    let (net, caption) = (&r.net, fixture_caption);
    let others = Tensor::rand([(b * k) as i64, 3, images.size()[2], images.size()[3]], (Kind::Float, Device::Cpu));
    let (ids, valid) = net.batch_text(&(0..b).map(caption).collect::<Vec<_>>(), Device::Cpu);
    let loss_with = |real: &[bool], k: usize| {
        let real = Tensor::from_slice(real).view([b as i64, k as i64]);
        let o = others.narrow(0, 0, (b * k) as i64);
        tch::no_grad(|| net.loss_with_image_contrasts(&images, &ids, &valid, &o, &real)).double_value(&[])
    };
    // one score at a time
    let score = |pic: &Tensor, text: &[i64]| -> f64 { tch::no_grad(|| net.score(pic, text)).double_value(&[0]) };
    let pair = |i: usize, j: usize| score(&images.narrow(0, i as i64, 1), &caption(j));
    let contrast = |c: usize| score(&others.narrow(0, c as i64, 1), &caption(c / k));
    let brute = |real: &[bool]| brute_force_loss((b, k), real, pair, None, Some(&contrast));
    let plain = tch::no_grad(|| net.loss(&images, &ids, &valid)).double_value(&[]);
    check_hard_negative_loss((b, k), loss_with, brute, &[0], plain);
}

#[test]
fn both_kinds_of_contrast_together_match_a_brute_force_softmax() {
    let (b, k) = (3usize, 2usize);
    let (r, images) = contrast_fixture(5, b);
    let (net, caption) = (&r.net, fixture_caption);
    let others = Tensor::rand([(b * k) as i64, 3, images.size()[2], images.size()[3]], (Kind::Float, Device::Cpu));
    let (ids, valid) = net.batch_text(&(0..b).map(caption).collect::<Vec<_>>(), Device::Cpu);
    let (oids, ovalid) = net.batch_text(&(0..b * k).map(|j| caption(10 + j)).collect::<Vec<_>>(), Device::Cpu);
    // the same mask for both kinds: pair i's j-th contrasting caption and picture are there
    // or missing together
    let loss_with = |real: &[bool], k: usize| {
        let real = Tensor::from_slice(real).view([b as i64, k as i64]);
        let (ci, cv, o) = (
            oids.narrow(0, 0, (b * k) as i64),
            ovalid.narrow(0, 0, (b * k) as i64),
            others.narrow(0, 0, (b * k) as i64),
        );
        tch::no_grad(|| net.loss_with_all_contrasts(&images, &ids, &valid, Some((&ci, &cv, &real)), Some((&o, &real))))
            .double_value(&[])
    };
    // one score at a time: image i against every caption and its own contrasting captions,
    // caption i against every image and its own contrasting pictures
    let score = |pic: &Tensor, text: &[i64]| -> f64 { tch::no_grad(|| net.score(pic, text)).double_value(&[0]) };
    let pair = |i: usize, j: usize| score(&images.narrow(0, i as i64, 1), &caption(j));
    let with_caption = |c: usize| score(&images.narrow(0, (c / k) as i64, 1), &caption(10 + c));
    let with_picture = |c: usize| score(&others.narrow(0, c as i64, 1), &caption(c / k));
    let brute = |real: &[bool]| brute_force_loss((b, k), real, pair, Some(&with_caption), Some(&with_picture));
    let plain = tch::no_grad(|| net.loss(&images, &ids, &valid)).double_value(&[]);
    check_hard_negative_loss((b, k), loss_with, brute, &[1, 4], plain);
    // and it is more than either kind alone
    let all = Tensor::ones([b as i64, k as i64], (Kind::Bool, Device::Cpu));
    let both = loss_with(&[true; 6], k);
    let captions_only =
        tch::no_grad(|| net.loss_with_contrasts(&images, &ids, &valid, &oids, &ovalid, &all)).double_value(&[]);
    let pictures_only =
        tch::no_grad(|| net.loss_with_image_contrasts(&images, &ids, &valid, &others, &all)).double_value(&[]);
    assert!(both > captions_only && both > pictures_only, "{both} vs {captions_only} / {pictures_only}");
}

#[test]
fn the_decoders_upsampling_equals_libtorchs_nearest_upsampling_and_its_gradient() {
    tch::manual_seed(31);
    // contiguous and not (a permuted view), odd sizes
    let a = Tensor::randn([3, 5, 7, 4], (Kind::Float, Device::Cpu));
    let b = Tensor::randn([3, 4, 7, 5], (Kind::Float, Device::Cpu)).permute([0, 3, 2, 1]);
    for x in [a, b] {
        let (_, _, h, w) = x.size4().unwrap();
        let want = x.upsample_nearest2d([2 * h, 2 * w], 2.0, 2.0);
        let got = tessera::dvae::upsample2(&x);
        assert!(got.equal(&want), "upsampling differs from libtorch's");
        // the gradient: each input's four copies summed
        let xg = x.detach().set_requires_grad(true);
        let g = Tensor::randn(want.size(), (Kind::Float, Device::Cpu));
        let (gw, gg) = {
            let y1 = xg.upsample_nearest2d([2 * h, 2 * w], 2.0, 2.0);
            let d1 = Tensor::run_backward(&[(&y1 * &g).sum(Kind::Float)], &[&xg], false, false);
            let y2 = tessera::dvae::upsample2(&xg);
            let d2 = Tensor::run_backward(&[(&y2 * &g).sum(Kind::Float)], &[&xg], false, false);
            (d1[0].shallow_clone(), d2[0].shallow_clone())
        };
        let e = (gw - gg).abs().max().double_value(&[]);
        assert!(e < 1e-5, "gradients differ by {e}");
    }
}
