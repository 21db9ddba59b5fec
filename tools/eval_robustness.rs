//! How much the evaluator tolerates: ground-truth renders of the scenes `tessera eval` scores
//! (seed 0, the training split), slightly blurred or noised, read back and scored per
//! capability, with the PSNR each change costs. It tells how close a dVAE's round trip must
//! come for the evaluator to read it as the ground truth.
//!
//! `cargo run --release --example eval_robustness [SCENES_PER_CAPABILITY]` (default 200).
use tessera::report::eval_scenes;
use tessera::world::{Capability, Split, render};

fn blur(rgb: &[u8], size: usize, sigma: f32) -> Vec<u8> {
    let r = (3.0 * sigma).ceil() as i64;
    let k: Vec<f32> = (-r..=r).map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp()).collect();
    let s: f32 = k.iter().sum();
    let k: Vec<f32> = k.iter().map(|v| v / s).collect();
    let px = |img: &[f32], x: i64, y: i64, c: usize| {
        let (x, y) = (x.clamp(0, size as i64 - 1) as usize, y.clamp(0, size as i64 - 1) as usize);
        img[(y * size + x) * 3 + c]
    };
    let src: Vec<f32> = rgb.iter().map(|&v| v as f32).collect();
    let mut tmp = vec![0.0; src.len()];
    let mut out = vec![0.0; src.len()];
    for y in 0..size as i64 {
        for x in 0..size as i64 {
            for c in 0..3 {
                tmp[(y as usize * size + x as usize) * 3 + c] =
                    (-r..=r).map(|i| k[(i + r) as usize] * px(&src, x + i, y, c)).sum();
            }
        }
    }
    for y in 0..size as i64 {
        for x in 0..size as i64 {
            for c in 0..3 {
                out[(y as usize * size + x as usize) * 3 + c] =
                    (-r..=r).map(|i| k[(i + r) as usize] * px(&tmp, x, y + i, c)).sum();
            }
        }
    }
    out.iter().map(|v| v.round().clamp(0.0, 255.0) as u8).collect()
}

fn noise(rgb: &[u8], std: f32, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut uni = || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((s >> 11) as f64 / (1u64 << 53) as f64).max(1e-12)
    };
    rgb.iter()
        .map(|&v| {
            let g = (-2.0 * uni().ln()).sqrt() * (2.0 * std::f64::consts::PI * uni()).cos();
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
    print!("| picture | PSNR |");
    for c in Capability::ALL {
        print!(" {} |", c.name());
    }
    println!();
    for kind in kinds {
        let mut row = String::new();
        let (mut ps, mut np) = (0.0, 0);
        for &cap in Capability::ALL {
            let scenes = eval_scenes(cap, n, 0, Split::Train);
            let mut ok = 0;
            for (i, sc) in scenes.iter().enumerate() {
                let gt = render(sc, size);
                let p = kind.apply(&gt, size, i as u64 + 1);
                if !matches!(kind, Perturb::Exact) {
                    ps += psnr(&gt, &p);
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
