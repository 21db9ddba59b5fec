//! How much the evaluator tolerates: ground-truth renders of the scenes `tessera eval` scores
//! (seed 0, the training split), slightly blurred or noised, read back and scored per
//! capability, with the PSNR each change costs. It tells how close a dVAE's round trip must
//! come for the evaluator to read it as the ground truth.
//!
//! `cargo run --release --example eval_robustness [SCENES_PER_CAPABILITY]` (default 200).
use tessera::report::eval_scenes;
use tessera::sample::SeedRng;
use tessera::world::{Capability, Split, render};

/// A separable Gaussian blur of σ `sigma` pixels, edges clamped.
fn blur(rgb: &[u8], size: usize, sigma: f32) -> Vec<u8> {
    let r = (3.0 * sigma).ceil() as i64;
    let k: Vec<f32> = (-r..=r).map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp()).collect();
    let total: f32 = k.iter().sum();
    let last = size as i64 - 1;
    // one pass along x (dx = 1) or y (dy = 1)
    let pass = |src: &[f32], dx: i64, dy: i64| -> Vec<f32> {
        let mut out = vec![0.0; src.len()];
        for y in 0..size as i64 {
            for x in 0..size as i64 {
                for c in 0..3 {
                    let sum: f32 = (-r..=r)
                        .map(|i| {
                            let (sx, sy) = ((x + i * dx).clamp(0, last) as usize, (y + i * dy).clamp(0, last) as usize);
                            k[(i + r) as usize] * src[(sy * size + sx) * 3 + c]
                        })
                        .sum();
                    out[(y as usize * size + x as usize) * 3 + c] = sum / total;
                }
            }
        }
        out
    };
    let src: Vec<f32> = rgb.iter().map(|&v| v as f32).collect();
    pass(&pass(&src, 1, 0), 0, 1).iter().map(|v| v.round().clamp(0.0, 255.0) as u8).collect()
}

/// Gaussian noise of `std` levels (Box–Muller over the project's seeded generator).
fn noise(rgb: &[u8], std: f32, seed: u64) -> Vec<u8> {
    let mut rng = SeedRng::new(seed);
    rgb.iter()
        .map(|&v| {
            let (u1, u2) = (rng.next_f64().max(1e-12), rng.next_f64());
            let g = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            (v as f64 + g * std as f64).round().clamp(0.0, 255.0) as u8
        })
        .collect()
}

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse = a.iter().zip(b).map(|(&x, &y)| ((x as f64 - y as f64) / 255.0).powi(2)).sum::<f64>() / a.len() as f64;
    -10.0 * mse.max(1e-12).log10()
}

/// What is done to a ground-truth render before it is scored.
#[derive(Clone, Copy)]
enum Perturb {
    Exact,
    /// Gaussian blur of this σ in pixels: rounds corners as a slightly soft reconstruction does.
    Blur(f32),
    /// Gaussian noise of this standard deviation in levels of 255: keeps every edge.
    Noise(f32),
}

impl Perturb {
    fn apply(self, rgb: &[u8], size: usize, seed: u64) -> Vec<u8> {
        match self {
            Perturb::Exact => rgb.to_vec(),
            Perturb::Blur(sigma) => blur(rgb, size, sigma),
            Perturb::Noise(std) => noise(rgb, std, seed),
        }
    }

    fn name(self) -> String {
        match self {
            Perturb::Exact => "exact".into(),
            Perturb::Blur(s) => format!("blur σ {s} px"),
            Perturb::Noise(s) => format!("noise σ {s}"),
        }
    }
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(200);
    let size = 64;
    let kinds = [
        Perturb::Exact,
        Perturb::Blur(0.3),
        Perturb::Blur(0.5),
        Perturb::Blur(0.7),
        Perturb::Noise(3.0),
        Perturb::Noise(6.0),
        Perturb::Noise(10.0),
    ];
    // every scene rendered once; per kind of picture: (passed per capability, PSNR sum, count)
    let scenes: Vec<_> = Capability::ALL
        .iter()
        .map(|&cap| {
            eval_scenes(cap, n, 0, Split::Train).into_iter().map(|sc| (render(&sc, size), sc)).collect::<Vec<_>>()
        })
        .collect();
    print!("| picture | PSNR |");
    for c in Capability::ALL {
        print!(" {} |", c.name());
    }
    println!();
    for kind in kinds {
        let mut row = String::new();
        let (mut ps, mut np) = (0.0, 0);
        for rendered in &scenes {
            let mut ok = 0;
            for (i, (gt, sc)) in rendered.iter().enumerate() {
                let p = kind.apply(gt, size, i as u64 + 1);
                if !matches!(kind, Perturb::Exact) {
                    ps += psnr(gt, &p);
                    np += 1;
                }
                ok += tessera::eval::score(sc, &p, size) as usize;
            }
            row += &format!(" {:.0}% |", 100.0 * ok as f64 / n as f64);
        }
        let p = if np > 0 { format!("{:.1} dB", ps / np as f64) } else { "∞".into() };
        println!("| {} | {p} |{row}", kind.name());
    }
}
