//! How the evaluator's look-alike margin (`eval::SHAPE_MARGIN`) reads pictures.
//!
//! `cargo run --release --example shape_margin -- calib [PX] [SCENES]`: per capability, the
//! share of ground-truth renders, of near-miss contrasts (a look-alike shape, a block off its
//! column) and of any contrasts that pass their scene's caption at margins 0 to 0.05 (at 7 px;
//! defaults 64 px, 400 scenes). A margin is right where ground truth passes and contrasts do not.
//!
//! `… -- transforms MODEL_DIR [SCENES]`: transform scenes by kind and number of objects,
//! ground truth and its round trip through MODEL_DIR's dVAE at margin 0 and at the margin.
//!
//! `… -- misses [PX] [SCENES]`: the ground-truth renders that fail their own caption at the
//! margin, with what the evaluator reads in them (the evaluator's own misses).
//!
//! `… -- samples FILE [CAPTIONS] [PER_CAPTION] [SEED]`: the transform samples of an `eval
//! --samples-file` (64 px; defaults 50 captions, 16 samples, seed 0), seen and held out, by
//! what goes wrong first: the top object (the caption's pair), its copy, or the transform.
//!
//! `… -- flips BANK SEED OUT.png`: the samples of a judged bank (`tessera train judged --seed
//! SEED`) that the margin turns from wrong to right, per capability, and a grid of every fifth
//! (up to 64, ×3) with what the evaluator reads in each printed.
use std::collections::BTreeMap;
use std::path::Path;

use tessera::eval::{SHAPE_MARGIN, detect, judge_at, judge_within};
use tessera::model::{Model, from_rgb8, to_rgb8};
use tessera::report::eval_scenes;
use tessera::world::{Capability, Contrasts, Split, contrast_scene_as, generate, render};

type Res = Result<(), Box<dyn std::error::Error>>;

fn main() -> Res {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).map(String::as_str);
    tch::set_num_threads(1);
    match arg(1) {
        Some("calib") => {
            calib(arg(2).map(str::parse).transpose()?.unwrap_or(64), arg(3).map(str::parse).transpose()?.unwrap_or(400))
        }
        Some("transforms") => {
            let dir = Path::new(arg(2).ok_or("transforms MODEL_DIR [SCENES] [held]")?);
            let split = if arg(4) == Some("held") { Split::HeldOut } else { Split::Train };
            transforms(dir, arg(3).map(str::parse).transpose()?.unwrap_or(400), split)
        }
        Some("misses") => misses(
            arg(2).map(str::parse).transpose()?.unwrap_or(64),
            arg(3).map(str::parse).transpose()?.unwrap_or(200),
        ),
        Some("samples") => {
            let usage = "samples FILE [CAPTIONS] [PER_CAPTION] [SEED]";
            let file = Path::new(arg(2).ok_or(usage)?);
            let n = arg(3).map(str::parse).transpose()?.unwrap_or(50);
            let k = arg(4).map(str::parse).transpose()?.unwrap_or(16);
            transform_samples(file, n, k, arg(5).map(str::parse).transpose()?.unwrap_or(0))
        }
        Some("flips") => {
            let usage = "flips BANK SEED OUT.png";
            let (bank, seed, out) = (arg(2).ok_or(usage)?, arg(3).ok_or(usage)?.parse()?, arg(4).ok_or(usage)?);
            flips(Path::new(bank), seed, Path::new(out))
        }
        _ => Err(
            "usage: shape_margin calib [PX] [SCENES] | transforms MODEL_DIR [SCENES] [held] | flips BANK SEED OUT.png"
                .into(),
        ),
    }
}

fn calib(size: usize, n: usize) -> Res {
    let margins = [0.0f32, 0.01, 0.02, 0.03, 0.05];
    println!("{size} px, {n} scenes: % passing their caption at margins {margins:?} (the margin: {SHAPE_MARGIN})");
    for &cap in Capability::ALL {
        let mut rng = tessera::sample::SeedRng::new(3);
        let (mut gt, mut near, mut any, mut counted) = ([0usize; 5], [0usize; 5], [0usize; 5], 0);
        for i in 0..n {
            let scene = generate(cap, 50_000 + i as u64, Split::Train);
            let a = contrast_scene_as(&scene, &mut rng, Contrasts::Near);
            let b = contrast_scene_as(&scene, &mut rng, Contrasts::Any);
            // counts are read by colour and number: their reshaped contrasts are left out
            let unread = |o: &tessera::world::Scene| {
                cap == Capability::Count && o.objects.first().map(|o| o.shape) != Some(scene.objects[0].shape)
            };
            if unread(&a) || unread(&b) {
                continue;
            }
            counted += 1;
            let (r, ra, rb) = (render(&scene, size), render(&a, size), render(&b, size));
            for (tally, picture) in [(&mut gt, &r), (&mut near, &ra), (&mut any, &rb)] {
                for (k, v) in judge_at(&scene, picture, size, &margins).iter().enumerate() {
                    tally[k] += v.is_ok() as usize;
                }
            }
        }
        let pct = |v: [usize; 5]| {
            v.iter().map(|&x| format!("{:5.1}", 100.0 * x as f64 / counted.max(1) as f64)).collect::<Vec<_>>().join(" ")
        };
        println!("{:>22} ({counted:3}) ground truth {} | near {} | any {}", cap.name(), pct(gt), pct(near), pct(any));
    }
    Ok(())
}

fn transforms(dir: &Path, n: usize, split: Split) -> Res {
    let m = Model::load_dvae_only(dir, tch::Device::Cpu)?;
    let size = m.config.dvae.image_size;
    let scenes = eval_scenes(Capability::Transform, n, 0, split);
    let mut kinds: BTreeMap<String, [usize; 5]> = BTreeMap::new();
    for chunk in scenes.chunks(64) {
        let renders: Vec<Vec<u8>> = chunk.iter().map(|s| render(s, size)).collect();
        let x = from_rgb8(&renders, size, tch::Device::Cpu)?;
        let back = to_rgb8(&tch::no_grad(|| m.dvae.net.decode(&m.dvae.net.encode(&x))))?;
        for ((s, gt), rt) in chunk.iter().zip(&renders).zip(&back) {
            let e = kinds
                .entry(format!("{} × {} object(s)", s.transform.map_or("none", |t| t.name()), s.objects.len() / 2))
                .or_default();
            e[0] += 1;
            for (k, picture) in [(1, gt), (3, rt)] {
                let v = judge_at(s, picture, size, &[0.0, SHAPE_MARGIN]);
                e[k] += v[0].is_ok() as usize;
                e[k + 1] += v[1].is_ok() as usize;
            }
        }
    }
    println!(
        "{split:?} transform scenes passing (margin 0 / {SHAPE_MARGIN}): ground truth, round trip through {}",
        dir.display()
    );
    for (k, [n, g0, g, r0, r]) in kinds {
        println!("{k:>40}: {n:3} scenes; ground truth {g0} / {g}; round trip {r0} / {r}");
    }
    Ok(())
}

fn flips(dir: &Path, seed: u64, out: &Path) -> Res {
    let mut picked: Vec<(Vec<u8>, usize)> = Vec::new();
    let (mut total, mut back, mut i) = (0usize, 0usize, 0usize);
    let mut flipped: BTreeMap<&str, usize> = BTreeMap::new();
    let mut k = 0;
    while tessera::judged::part_path(dir, k).exists() {
        let part = tessera::judged::read_part(&tessera::judged::part_path(dir, k))?;
        k += 1;
        for c in 0..part.captions.len() {
            let s = tessera::judged::scene(seed, i);
            i += 1;
            if s.caption != part.captions[c] {
                return Err(format!("scene {i} of seed {seed} is not the bank's: {}", part.captions[c]).into());
            }
            for img in &part.pictures[c * part.per_scene..(c + 1) * part.per_scene] {
                total += 1;
                let v = judge_at(&s, img, part.size, &[0.0, SHAPE_MARGIN]);
                let (old, new) = (v[0], v[1]);
                back += (old.is_ok() && new.is_err()) as usize;
                if old.is_ok() || new.is_err() {
                    continue;
                }
                let f = flipped.entry(s.capability.name()).or_default();
                *f += 1;
                if picked.len() < 64 && flipped.values().sum::<usize>() % 5 == 1 {
                    let read: Vec<String> = detect(img, part.size, s.background)
                        .iter()
                        .take(4)
                        .map(|d| {
                            let how = drawn_as(d.flipped, d.outline);
                            format!("{} {}{how} (fit {:.2})", d.colour.name(), d.shape.name(), d.fit)
                        })
                        .collect();
                    println!("{:2}: {} | read {}", picked.len(), s.caption, read.join(", "));
                    picked.push((img.clone(), part.size));
                }
            }
        }
    }
    println!("{total} samples; wrong at margin 0, right at {SHAPE_MARGIN}: {flipped:?}; right → wrong: {back}");
    let size = picked.first().map_or(64, |p| p.1);
    let (cols, scale, pad) = (8usize, 3usize, 4usize);
    let cell = size * scale + pad;
    let rows = picked.len().div_ceil(cols).max(1);
    let mut grid = image::RgbImage::from_pixel((cols * cell) as u32, (rows * cell) as u32, image::Rgb([128, 128, 128]));
    for (n, (img, _)) in picked.iter().enumerate() {
        let (ox, oy) = ((n % cols) * cell + pad / 2, (n / cols) * cell + pad / 2);
        for y in 0..size * scale {
            for x in 0..size * scale {
                let q = 3 * ((y / scale) * size + x / scale);
                grid.put_pixel((ox + x) as u32, (oy + y) as u32, image::Rgb([img[q], img[q + 1], img[q + 2]]));
            }
        }
    }
    grid.save(out)?;
    Ok(())
}

fn misses(size: usize, n: usize) -> Res {
    for &cap in Capability::ALL {
        let mut failed = 0;
        for i in 0..n {
            let scene = generate(cap, 50_000 + i as u64, Split::Train);
            let picture = render(&scene, size);
            let Err(miss) = judge_within(&scene, &picture, size, SHAPE_MARGIN) else { continue };
            failed += 1;
            println!("{} | {}", scene.caption, miss.name());
            for o in &scene.objects {
                let how = drawn_as(o.flipped, o.outline);
                println!(
                    "    drawn {} {}{how} at ({:.2}, {:.2}), r {:.3}",
                    o.colour.name(),
                    o.shape.name(),
                    o.x,
                    o.y,
                    o.r
                );
            }
            for d in detect(&picture, size, scene.background) {
                let how = drawn_as(d.flipped, d.outline);
                println!(
                    "    read  {} {}{how} at ({:.2}, {:.2}), fit {:.2}, area {:.4}",
                    d.colour.name(),
                    d.shape.name(),
                    d.x,
                    d.y,
                    d.fit,
                    d.area
                );
            }
        }
        println!("{}: {failed} of {n} ground-truth renders fail", cap.name());
    }
    Ok(())
}

/// " upside-down", " outline", both or neither.
fn drawn_as(flipped: bool, outline: bool) -> String {
    format!("{}{}", if flipped { " upside-down" } else { "" }, if outline { " outline" } else { "" })
}

fn transform_samples(file: &Path, captions: usize, per: usize, seed: u64) -> Res {
    let bytes = std::fs::read(file)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let size = 64;
    for (split, key) in [(Split::Train, "seen/transform"), (Split::HeldOut, "held_out/transform")] {
        let data = st.tensor(key)?;
        let pictures: Vec<&[u8]> = data.data().chunks(size * size * 3).collect();
        if pictures.len() != captions * per {
            return Err(format!("{key}: {} pictures, not {captions} × {per}", pictures.len()).into());
        }
        let scenes = eval_scenes(Capability::Transform, captions, seed, split);
        let mut why: BTreeMap<String, usize> = BTreeMap::new();
        for (c, scene) in scenes.iter().enumerate() {
            let n = scene.objects.len() / 2;
            for img in &pictures[c * per..(c + 1) * per] {
                let found = detect(img, size, scene.background);
                let verdict = judge_within(scene, img, size, SHAPE_MARGIN);
                let key = if verdict.is_ok() {
                    "right".to_string()
                } else {
                    // the first top object not drawn upright in the top half, and what is there instead
                    let missing = scene.objects[..n].iter().find(|o| {
                        !found.iter().any(|d| d.colour == o.colour && d.y < 0.5 && d.reads_as(o.shape, SHAPE_MARGIN))
                    });
                    match missing {
                        Some(o) => {
                            let tops: Vec<_> = found.iter().filter(|d| d.y < 0.5).collect();
                            let held = tessera::world::is_held_out(o.colour, o.shape);
                            let instead = if tops.iter().any(|d| d.colour == o.colour) {
                                "its colour there, not its shape"
                            } else if tops.iter().any(|d| d.reads_as(o.shape, SHAPE_MARGIN)) {
                                "its shape there, not its colour"
                            } else {
                                "neither its colour nor its shape there"
                            };
                            format!(
                                "top object {} missing: {instead}",
                                if held { "(a held-out pair)" } else { "(a seen pair)" }
                            )
                        }
                        None => format!("tops right; {}", verdict.err().map_or("", |m| m.name())),
                    }
                };
                *why.entry(key).or_default() += 1;
            }
        }
        println!("{key} ({} samples):", captions * per);
        let mut rows: Vec<_> = why.into_iter().collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.1));
        for (k, v) in rows {
            println!("  {v:4}  {k}");
        }
    }
    Ok(())
}
