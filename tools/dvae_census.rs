//! Where a dVAE spends its codebook and which single objects it loses: each code decoded as a
//! tiled grid and named by the palette colour it draws, how often the encoder picks it on
//! white and on other backgrounds, and single-object round trips by background and size.
//!
//! `cargo run --release --example dvae_census -- MODEL_DIR [SCENES]` (default 400, the scenes
//! `tessera eval --captions SCENES` scores). MODEL_DIR needs only config.json and
//! dvae.safetensors.
use std::collections::BTreeMap;
use std::path::Path;

use tessera::eval::judge;
use tessera::model::{Model, from_rgb8, to_rgb8};
use tessera::report::eval_scenes;
use tessera::world::{Capability, Colour, Split, render};

fn nearest(p: [u8; 3]) -> Colour {
    let d = |c: &Colour| {
        let q = c.rgb();
        (0..3).map(|k| (p[k] as i32 - q[k] as i32).pow(2)).sum::<i32>()
    };
    Colour::ALL.iter().copied().min_by_key(d).unwrap_or(Colour::White)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = Path::new(args.get(1).ok_or("usage: dvae_census MODEL_DIR [SCENES]")?);
    let n: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(400);
    tch::set_num_threads(1);
    let m = Model::load_dvae_only(dir, tch::Device::Cpu)?;
    let net = &m.dvae.net;
    let size = m.config.dvae.image_size;
    let (v, g) = (m.config.dvae.vocab_size as i64, m.config.dvae.grid_size() as i64);

    let scenes = eval_scenes(Capability::SingleObject, n, 0, Split::Train);
    let renders: Vec<Vec<u8>> = scenes.iter().map(|s| render(s, size)).collect();
    let (mut on_white, mut on_other) = (vec![0usize; v as usize], vec![0usize; v as usize]);
    let mut by: BTreeMap<(String, String), (usize, usize)> = BTreeMap::new();
    let mut misses: BTreeMap<(bool, &str), usize> = BTreeMap::new();
    for (chunk, imgs) in scenes.chunks(64).zip(renders.chunks(64)) {
        let x = from_rgb8(imgs, size, tch::Device::Cpu)?;
        let codes = tch::no_grad(|| net.encode(&x));
        let back = to_rgb8(&tch::no_grad(|| net.decode(&codes)))?;
        let codes = Vec::<i64>::try_from(codes.flatten(0, -1))?;
        for (i, (s, r)) in chunk.iter().zip(&back).enumerate() {
            let white = s.background == Colour::White;
            for &c in &codes[i * (g * g) as usize..(i + 1) * (g * g) as usize] {
                if let Some(k) = if white { on_white.get_mut(c as usize) } else { on_other.get_mut(c as usize) } {
                    *k += 1;
                }
            }
            let verdict = judge(s, r, size);
            let e = by.entry((s.background.name().to_string(), s.objects[0].size.name().to_string())).or_default();
            e.0 += verdict.is_ok() as usize;
            e.1 += 1;
            if let Err(miss) = verdict {
                *misses.entry((white, miss.name())).or_insert(0) += 1;
            }
        }
    }

    // each code tiled over the whole grid: the palette colour at the picture's centre
    let tiled = tch::Tensor::arange(v, (tch::Kind::Int64, tch::Device::Cpu)).view([v, 1, 1]).expand([v, g, g], true);
    let pictures = to_rgb8(&tch::no_grad(|| net.decode(&tiled.contiguous())))?;
    let centre = (size / 2 * size + size / 2) * 3;
    let mut census: BTreeMap<&str, (usize, usize, usize, usize)> = BTreeMap::new();
    for (k, p) in pictures.iter().enumerate() {
        let c = nearest([p[centre], p[centre + 1], p[centre + 2]]);
        let e = census.entry(c.name()).or_default();
        e.0 += 1;
        e.1 += (on_white[k] > 0) as usize;
        e.2 += (on_other[k] > 0) as usize;
        e.3 += on_other[k];
    }
    let used = |u: &[usize]| u.iter().filter(|&&x| x > 0).count();
    let only_other = on_white.iter().zip(&on_other).filter(|(w, o)| **w == 0 && **o > 0).count();
    println!(
        "{}: {v} codes; used on white single objects {}, on other backgrounds {} ({} only there)",
        dir.display(),
        used(&on_white),
        used(&on_other),
        only_other
    );
    println!("\ncodes by the colour they draw tiled | codes | used on white | used on others | cells on others");
    let mut rows: Vec<_> = census.into_iter().collect();
    rows.sort_by_key(|b| std::cmp::Reverse(b.1.0));
    for (c, (k, w, o, cells)) in rows {
        println!("{c:>8} | {k:4} | {w:4} | {o:4} | {cells:6}");
    }
    println!("\nsingle objects through the dVAE, passed of scenes (background × size):");
    for ((bg, sz), (ok, t)) in &by {
        println!("{bg:>7} {sz:<6} {ok:4} of {t:4}");
    }
    println!("\nwhy they fail (white / other backgrounds):");
    for ((white, miss), k) in &misses {
        println!("{:>6} {miss}: {k}", if *white { "white" } else { "other" });
    }
    Ok(())
}
