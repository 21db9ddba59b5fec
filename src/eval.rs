//! Reading an image back into objects and scoring it against the scene its caption came from.
//!
//! The world's conventions make this exact enough to grade a model: pixels are labelled with
//! the nearest palette colour, connected regions become objects, each object's shape is the
//! template (shape, upside-down or not, filled or outline) that best overlaps its mask scaled to
//! its bounding box (anti-aliased edge pixels count by how much of the colour they hold, even
//! where that blend lies nearer another palette colour; a shape whose template fits within
//! [`SHAPE_MARGIN`] of the best is read too: look-alikes the pixels cannot tell apart), and a
//! sign's letters are read cell by cell against the built-in font.
//! Each capability has its own test of the ground truth (see [`score`]).

use std::collections::VecDeque;
use std::sync::OnceLock;

use serde::Serialize;

use crate::world::{Capability, Colour, Relation, Scene, Shape, Sign, Transform, glyph, inside, sign_layout};

/// One region read from an image. Positions are fractions of the image side.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Detected {
    pub colour: Colour,
    pub shape: Shape,
    pub flipped: bool,
    pub outline: bool,
    /// How well the best template fits, 0..1 (intersection over union).
    pub fit: f32,
    pub x: f32,
    pub y: f32,
    /// Pixels as a fraction of the image.
    pub area: f32,
    /// Bounding box (x0, y0, x1, y1).
    pub bbox: (f32, f32, f32, f32),
    /// Every template's fit, in the order of `templates()`.
    #[serde(skip)]
    fits: Vec<f32>,
    /// Half the bounding box's mean side, in pixels.
    #[serde(skip)]
    radius_px: f32,
}

/// How much worse than the best template another may fit and still be read as what the
/// region shows, for a region 7 px in radius (a small object at 64 px); it shrinks as the
/// region grows (a pixel's rounding weighs less on a larger shape: the margin goes as one over
/// the radius). Ground truth reads right by its best template alone, but softened as a decoder
/// draws it, a circle, an octagon and a small heptagon fit each other's templates within a
/// hundredth whichever was drawn, and which wins is a pixel's rounding; any other pair of
/// shapes fits far worse than that (`tests/world.rs` holds both sides).
pub const SHAPE_MARGIN: f32 = 0.01;
const MARGIN_RADIUS_PX: f32 = 7.0;

impl Detected {
    /// `margin` (at 7 px) scaled to this region's radius.
    fn margin(&self, margin: f32) -> f32 {
        margin * MARGIN_RADIUS_PX / self.radius_px.max(1.0)
    }

    /// The best fit among the templates that `keep` accepts (0 where none).
    fn best_fit(&self, keep: impl Fn(&Template) -> bool) -> f32 {
        templates().iter().zip(&self.fits).filter(|(t, _)| keep(t)).map(|(_, &f)| f).fold(0.0, f32::max)
    }

    /// Whether the region reads as `shape` (any way up, filled or outline): a template of it
    /// fits within `margin` (at 7 px, scaled to the region) of the best template.
    pub fn reads_as(&self, shape: Shape, margin: f32) -> bool {
        self.shape == shape || self.best_fit(|t| t.shape == shape) >= self.fit - self.margin(margin)
    }

    /// Whether the region reads as `shape` drawn as asked: upside-down or not (`flipped`;
    /// `None` either way) and filled or outline, within `margin` of the best template.
    pub fn reads_as_drawn(&self, shape: Shape, flipped: Option<bool>, outline: bool, margin: f32) -> bool {
        let asked = |t: &Template| t.shape == shape && t.outline == outline && flipped.is_none_or(|f| t.flipped == f);
        self.best_fit(asked) >= self.fit - self.margin(margin)
    }
}

const LABEL_DISTANCE: i32 = 70;

fn nearest_colour(p: [u8; 3], palette: &[Colour]) -> Option<Colour> {
    let mut best = None;
    let mut best_d = i32::MAX;
    for &c in palette {
        let q = c.rgb();
        let d = (0..3).map(|k| (p[k] as i32 - q[k] as i32).pow(2)).sum::<i32>();
        if d < best_d {
            best_d = d;
            best = Some(c);
        }
    }
    best.filter(|_| best_d <= LABEL_DISTANCE * LABEL_DISTANCE)
}

/// Per-pixel palette labels (`None` for pixels near no colour, such as blended edges).
pub fn label(rgb: &[u8], size: usize) -> Vec<Option<Colour>> {
    (0..size * size).map(|i| nearest_colour([rgb[3 * i], rgb[3 * i + 1], rgb[3 * i + 2]], Colour::ALL)).collect()
}

/// Each (shape, upside-down, outline) variant with its area and centroid in the unit frame.
struct Template {
    shape: Shape,
    flipped: bool,
    outline: bool,
    area: f32,
    cu: f32,
    cv: f32,
}

impl Template {
    fn covers(&self, u: f32, v: f32) -> bool {
        let v = if self.flipped { -v } else { v };
        let a = inside(self.shape, u, v);
        if self.outline { a && !inside(self.shape, u / 0.6, v / 0.6) } else { a }
    }
}

fn templates() -> &'static [Template] {
    static T: OnceLock<Vec<Template>> = OnceLock::new();
    T.get_or_init(|| {
        let mut out = Vec::new();
        for &shape in Shape::ALL {
            for flipped in [false, true] {
                for outline in [false, true] {
                    let mut t = Template { shape, flipped, outline, area: 0.0, cu: 0.0, cv: 0.0 };
                    let n = 300;
                    let cell = 2.6 / n as f32;
                    let (mut a, mut su, mut sv) = (0.0f64, 0.0f64, 0.0f64);
                    for i in 0..n {
                        for j in 0..n {
                            let u = -1.3 + cell * (j as f32 + 0.5);
                            let v = -1.3 + cell * (i as f32 + 0.5);
                            if t.covers(u, v) {
                                a += 1.0;
                                su += u as f64;
                                sv += v as f64;
                            }
                        }
                    }
                    t.area = (a * (cell * cell) as f64) as f32;
                    t.cu = (su / a.max(1.0)) as f32;
                    t.cv = (sv / a.max(1.0)) as f32;
                    out.push(t);
                }
            }
        }
        out
    })
}

/// Finds the coloured regions of an image (anything that is not `background`).
pub fn detect(rgb: &[u8], size: usize, background: Colour) -> Vec<Detected> {
    let labels = label(rgb, size);
    // region index + 1 of each pixel (0 = none yet)
    let mut region = vec![0u32; size * size];
    let mut out = Vec::new();
    let min_pixels = ((size * size) as f32 * 0.002).max(4.0) as usize;
    for start in 0..size * size {
        let Some(colour) = labels[start] else { continue };
        if region[start] != 0 || colour == background {
            continue;
        }
        let id = out.len() as u32 + 1;
        // flood fill over 8-neighbours of the same label
        let mut pixels = Vec::new();
        let mut queue = VecDeque::from([start]);
        region[start] = id;
        while let Some(p) = queue.pop_front() {
            pixels.push(p);
            let (y, x) = ((p / size) as i64, (p % size) as i64);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (ny, nx) = (y + dy, x + dx);
                    if ny < 0 || nx < 0 || ny >= size as i64 || nx >= size as i64 {
                        continue;
                    }
                    let q = ny as usize * size + nx as usize;
                    if region[q] == 0 && labels[q] == Some(colour) {
                        region[q] = id;
                        queue.push_back(q);
                    }
                }
            }
        }
        if pixels.len() < min_pixels {
            // too small to be an object: its pixels stay claimed (u32::MAX) so no region reuses them
            for p in pixels {
                region[p] = u32::MAX;
            }
            continue;
        }
        let frame = Frame { rgb, labels: &labels, region: &region, size, background };
        out.push(describe_region(&pixels, &frame, id, colour));
    }
    out.sort_by(|a, b| b.area.total_cmp(&a.area));
    out
}

/// How much of `colour` over `background` a blended pixel holds, 0..1.
fn blend(p: [u8; 3], colour: Colour, background: Colour) -> f32 {
    let (c, b) = (colour.rgb(), background.rgb());
    let (mut num, mut den) = (0i32, 0i32);
    for k in 0..3 {
        let d = c[k] as i32 - b[k] as i32;
        num += (p[k] as i32 - b[k] as i32) * d;
        den += d * d;
    }
    if den == 0 { 0.0 } else { (num as f32 / den as f32).clamp(0.0, 1.0) }
}

/// How much of `colour` over `background` the pixel holds where it lies on the line
/// between the two (within half the labelling distance), else 0.
fn blend_of(p: [u8; 3], colour: Colour, background: Colour) -> f32 {
    let t = blend(p, colour, background);
    let (c, b) = (colour.rgb(), background.rgb());
    let off: f32 = (0..3)
        .map(|k| {
            let on_line = b[k] as f32 + t * (c[k] as f32 - b[k] as f32);
            (p[k] as f32 - on_line).powi(2)
        })
        .sum();
    if t > 0.0 && t < 1.0 && off <= (LABEL_DISTANCE as f32 / 2.0).powi(2) { t } else { 0.0 }
}

/// An image with its per-pixel palette labels and region ids.
struct Frame<'a> {
    rgb: &'a [u8],
    labels: &'a [Option<Colour>],
    region: &'a [u32],
    size: usize,
    background: Colour,
}

fn describe_region(pixels: &[usize], frame: &Frame, id: u32, colour: Colour) -> Detected {
    let Frame { rgb, labels, region, size, background } = *frame;
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    let (mut sx, mut sy) = (0.0f64, 0.0f64);
    for &p in pixels {
        let (y, x) = (p / size, p % size);
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
        sx += x as f64 + 0.5;
        sy += y as f64 + 0.5;
    }
    // Soft coverage over the region's box grown by two pixels: 1 inside the region, the
    // blend fraction on unlabelled edge pixels, 0 elsewhere.
    let (bx0, by0) = (x0.saturating_sub(2), y0.saturating_sub(2));
    let (bx1, by1) = ((x1 + 2).min(size - 1), (y1 + 2).min(size - 1));
    let mut cover = Vec::new();
    let (mut mass, mut mx, mut my) = (0.0f32, 0.0f32, 0.0f32);
    for y in by0..=by1 {
        for x in bx0..=bx1 {
            let p = y * size + x;
            let t = if region[p] == id {
                1.0
            } else if labels[p].is_none() {
                blend([rgb[3 * p], rgb[3 * p + 1], rgb[3 * p + 2]], colour, background)
            } else {
                // an edge pixel whose blend of this colour and the background lies nearer
                // another palette colour (magenta over white reads pink): partly this region
                blend_of([rgb[3 * p], rgb[3 * p + 1], rgb[3 * p + 2]], colour, background)
            };
            mass += t;
            mx += t * (x as f32 + 0.5);
            my += t * (y as f32 + 0.5);
            cover.push(t);
        }
    }
    let (cx, cy) = (mx / mass.max(1e-6), my / mass.max(1e-6));
    // Each template placed with the region's centroid and area, rendered on the same pixels
    // with 4×4 supersampling; the closest rendering names the shape.
    let mut best = (f32::MAX, &templates()[0]);
    let mut errs = Vec::with_capacity(templates().len());
    for t in templates() {
        let r = (mass / t.area).sqrt();
        let (ox, oy) = (cx - t.cu * r, cy - t.cv * r);
        let mut err = 0.0f32;
        let mut k = 0;
        for y in by0..=by1 {
            for x in bx0..=bx1 {
                let mut hits = 0;
                for sy in 0..4 {
                    for sx in 0..4 {
                        let u = (x as f32 + (sx as f32 + 0.5) / 4.0 - ox) / r;
                        let v = (y as f32 + (sy as f32 + 0.5) / 4.0 - oy) / r;
                        hits += t.covers(u, v) as u32;
                    }
                }
                err += (hits as f32 / 16.0 - cover[k]).abs();
                k += 1;
            }
        }
        errs.push(err);
        if err < best.0 {
            best = (err, t);
        }
    }
    let fit = 1.0 - best.0 / (2.0 * mass.max(1e-6));
    let fits = errs.iter().map(|e| 1.0 - e / (2.0 * mass.max(1e-6))).collect();
    let best = (fit, best.1.shape, best.1.flipped, best.1.outline);
    let n = pixels.len() as f64;
    let s = size as f32;
    Detected {
        colour,
        shape: best.1,
        flipped: best.2,
        outline: best.3,
        fit: best.0,
        x: (sx / n) as f32 / s,
        y: (sy / n) as f32 / s,
        area: pixels.len() as f32 / (s * s),
        bbox: (x0 as f32 / s, y0 as f32 / s, (x1 + 1) as f32 / s, (y1 + 1) as f32 / s),
        fits,
        radius_px: ((x1 + 1 - x0) + (y1 + 1 - y0)) as f32 / 4.0,
    }
}

/// Reads the word of the largest region of `sign_colour`, assuming the world's sign layout.
pub fn read_sign(rgb: &[u8], size: usize, sign_colour: Colour, letters: usize) -> Option<String> {
    read_sign_among(rgb, size, &detect(rgb, size, Colour::White), sign_colour, letters)
}

/// [`read_sign`] given the picture's regions on white (largest first), already detected.
fn read_sign_among(
    rgb: &[u8],
    size: usize,
    regions: &[Detected],
    sign_colour: Colour,
    letters: usize,
) -> Option<String> {
    let board = regions.iter().find(|d| d.colour == sign_colour)?;
    let (x0, y0, x1, y1) = board.bbox;
    let sign = Sign {
        word: "x".repeat(letters),
        colour: sign_colour,
        x: (x0 + x1) / 2.0,
        y: (y0 + y1) / 2.0,
        w: x1 - x0,
        h: y1 - y0,
    };
    let (lx, ly, cell) = sign_layout(&sign);
    let unit = cell / 5.0;
    let labels = label(rgb, size);
    let mut word = String::new();
    for i in 0..letters {
        let mut rows = [0u8; 7];
        for (r, row) in rows.iter_mut().enumerate() {
            for c in 0..5 {
                let px = lx + unit * ((i * 6 + c) as f32 + 0.5);
                let py = ly + unit * (r as f32 + 0.5);
                let (ix, iy) = ((px * size as f32) as usize, (py * size as f32) as usize);
                if ix < size && iy < size && labels[iy * size + ix] == Some(Colour::Black) {
                    *row |= 0x10 >> c;
                }
            }
        }
        let best = ('a'..='z')
            .min_by_key(|&ch| glyph(ch).iter().zip(&rows).map(|(a, b)| (a ^ b).count_ones()).sum::<u32>())?;
        word.push(best);
    }
    Some(word)
}

fn matches(d: &Detected, colour: Colour, shape: Shape, margin: f32) -> bool {
    d.colour == colour && d.reads_as(shape, margin)
}

/// Whether the image shows what the scene's caption asks for.
pub fn score(scene: &Scene, rgb: &[u8], size: usize) -> bool {
    judge(scene, rgb, size).is_ok()
}

/// Why an image fails its scene's caption: the first check of [`judge`] it does not pass.
/// Its [`Miss::name`] keys `tessera eval`'s report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// No object at all (single objects), or a stack block of a named colour is missing.
    NothingFound,
    /// The object has the right shape in another colour.
    Colour,
    /// The object has the right colour and another shape.
    Shape,
    /// Neither colour nor shape is right.
    ColourAndShape,
    /// Two objects: one of the two named objects is not there.
    OneMissing,
    /// Two objects: neither named object is there.
    BothMissing,
    /// Two objects are there, in the wrong relation.
    Position,
    /// Fewer objects of the colour than the caption's number.
    TooFew,
    /// More objects of the colour than the caption's number.
    TooMany,
    /// A stack block is not a square, or is off the column.
    Misplaced,
    /// The blocks are there, stacked in another order.
    Order,
    /// No sign, or letters that are not letters.
    Unreadable,
    /// A sign with another word.
    WrongWord,
    /// A transform's object, in the top half or the bottom, is missing or wrong.
    ObjectWrong,
    /// The objects are there, but the bottom half is not transformed as named.
    TransformWrong,
}

impl Miss {
    pub fn name(self) -> &'static str {
        match self {
            Miss::NothingFound => "nothing found",
            Miss::Colour => "colour",
            Miss::Shape => "shape",
            Miss::ColourAndShape => "colour and shape",
            Miss::OneMissing => "one object missing",
            Miss::BothMissing => "both objects missing",
            Miss::Position => "position",
            Miss::TooFew => "too few",
            Miss::TooMany => "too many",
            Miss::Misplaced => "block misplaced",
            Miss::Order => "order",
            Miss::Unreadable => "unreadable",
            Miss::WrongWord => "wrong word",
            Miss::ObjectWrong => "object wrong",
            Miss::TransformWrong => "transform wrong",
        }
    }
}

/// Scores the image against the scene's caption: `Ok` when it shows what the caption asks
/// for, otherwise the first thing it gets wrong.
pub fn judge(scene: &Scene, rgb: &[u8], size: usize) -> Result<(), Miss> {
    judge_within(scene, rgb, size, SHAPE_MARGIN)
}

/// [`judge`] with another tolerance for look-alike shapes ([`SHAPE_MARGIN`]; 0 reads each
/// region as its best template alone).
pub fn judge_within(scene: &Scene, rgb: &[u8], size: usize, margin: f32) -> Result<(), Miss> {
    judge_regions(scene, rgb, size, &detect(rgb, size, scene.background), margin)
}

/// [`judge_within`] at each of `margins`, the picture's regions found once.
pub fn judge_at(scene: &Scene, rgb: &[u8], size: usize, margins: &[f32]) -> Vec<Result<(), Miss>> {
    let found = detect(rgb, size, scene.background);
    margins.iter().map(|&m| judge_regions(scene, rgb, size, &found, m)).collect()
}

/// The verdict on a picture whose regions on the scene's background are `found`.
fn judge_regions(scene: &Scene, rgb: &[u8], size: usize, found: &[Detected], margin: f32) -> Result<(), Miss> {
    let matches = |d: &Detected, colour: Colour, shape: Shape| matches(d, colour, shape, margin);
    let pass = |ok: bool, miss: Miss| if ok { Ok(()) } else { Err(miss) };
    match scene.capability {
        Capability::SingleObject => {
            let o = &scene.objects[0];
            let d = found.first().ok_or(Miss::NothingFound)?;
            match (d.colour == o.colour, d.reads_as(o.shape, margin)) {
                (true, true) => Ok(()),
                (false, true) => Err(Miss::Colour),
                (true, false) => Err(Miss::Shape),
                (false, false) => Err(Miss::ColourAndShape),
            }
        }
        Capability::TwoObjectsPosition => {
            let (a, b) = (&scene.objects[0], &scene.objects[1]);
            let da = found.iter().find(|d| matches(d, a.colour, a.shape));
            let db = found.iter().find(|d| matches(d, b.colour, b.shape));
            match (da, db, scene.relation) {
                (Some(da), Some(db), Some(rel)) => {
                    let (dx, dy) = (da.x - db.x, da.y - db.y);
                    let ok = match rel {
                        Relation::Above => dy < 0.0 && dy.abs() > dx.abs(),
                        Relation::Below => dy > 0.0 && dy.abs() > dx.abs(),
                        Relation::LeftOf => dx < 0.0 && dx.abs() > dy.abs(),
                        Relation::RightOf => dx > 0.0 && dx.abs() > dy.abs(),
                    };
                    pass(ok, Miss::Position)
                }
                (Some(_), Some(_), None) => Err(Miss::Position),
                (None, None, _) => Err(Miss::BothMissing),
                _ => Err(Miss::OneMissing),
            }
        }
        Capability::Count => {
            let o = &scene.objects[0];
            let expected = std::f32::consts::PI * o.r * o.r;
            let n = found.iter().filter(|d| d.colour == o.colour && d.area > 0.25 * expected).count();
            match scene.count {
                Some(want) if n < want => Err(Miss::TooFew),
                Some(want) if n > want => Err(Miss::TooMany),
                Some(_) => Ok(()),
                None => Err(Miss::TooFew),
            }
        }
        Capability::Stack => {
            // where the stack stands is the caption's to leave open: its blocks must be squares
            // on one column (centres within a block's radius of each other), in order
            let mut blocks: Vec<&Detected> = Vec::new();
            for o in &scene.objects {
                let d = found.iter().find(|d| d.colour == o.colour).ok_or(Miss::NothingFound)?;
                pass(d.reads_as(Shape::Square, margin), Miss::Misplaced)?;
                blocks.push(d);
            }
            let r = scene.objects.iter().map(|o| o.r).fold(f32::INFINITY, f32::min);
            let (lo, hi) =
                blocks.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), d| (lo.min(d.x), hi.max(d.x)));
            pass(hi - lo <= r, Miss::Misplaced)?;
            pass(blocks.windows(2).all(|w| w[0].y < w[1].y), Miss::Order)
        }
        Capability::Text => {
            let s = scene.sign.as_ref().ok_or(Miss::Unreadable)?;
            // the sign's colour counts where the caption names it ("a yellow sign that says
            // …"); "a sign with the word … on it" leaves it to the picture: its largest board
            // of a sign colour
            let named = scene.caption.contains(&format!("{} sign", s.colour.name()));
            // signs stand on white: the regions found on the scene's background are those
            let other;
            let on_white = if scene.background == Colour::White {
                found
            } else {
                other = detect(rgb, size, Colour::White);
                &other
            };
            let colour = if named {
                s.colour
            } else {
                on_white
                    .iter()
                    .find(|d| crate::world::SIGN_COLOURS.contains(&d.colour))
                    .map(|d| d.colour)
                    .ok_or(Miss::Unreadable)?
            };
            let word = read_sign_among(rgb, size, on_white, colour, s.word.chars().count()).ok_or(Miss::Unreadable)?;
            pass(word == s.word, Miss::WrongWord)
        }
        Capability::Transform => {
            // each named object in the top half (wherever the caption leaves it), and its
            // transformed copy where the transform puts it: the same place in the bottom half,
            // or mirrored there for upside-down
            let kind = scene.transform.ok_or(Miss::ObjectWrong)?;
            let n = scene.objects.len() / 2;
            for (o, copy) in scene.objects[..n].iter().zip(&scene.objects[n..]) {
                // symmetric shapes read the same either way up
                let either = |flip: bool| if symmetric_vertically(o.shape) { None } else { Some(flip) };
                let upright = |d: &&Detected| {
                    d.colour == o.colour && d.y < 0.5 && d.reads_as_drawn(o.shape, either(false), false, margin)
                };
                let tops: Vec<&Detected> = found.iter().filter(upright).collect();
                pass(!tops.is_empty(), Miss::ObjectWrong)?;
                let want_flip = kind == Transform::UpsideDown;
                let want_outline = kind == Transform::Outline;
                let (mut placed, mut transformed) = (false, false);
                for t in &tops {
                    let (x, y) = (t.x, if want_flip { 1.0 - t.y } else { t.y + 0.5 });
                    let near = |d: &&Detected| (d.x - x).abs() < copy.r && (d.y - y).abs() < copy.r;
                    for d in found.iter().filter(near).filter(|d| matches(d, copy.colour, copy.shape)) {
                        placed = true;
                        transformed |= d.reads_as_drawn(copy.shape, either(want_flip), want_outline, margin);
                    }
                }
                pass(placed, Miss::ObjectWrong)?;
                pass(transformed, Miss::TransformWrong)?;
            }
            Ok(())
        }
    }
}

/// Shapes that look the same upside-down.
pub fn symmetric_vertically(shape: Shape) -> bool {
    matches!(shape, Shape::Circle | Shape::Square | Shape::Diamond | Shape::Cross | Shape::Hexagon | Shape::Octagon)
}
