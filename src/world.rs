//! The synthetic world (SPEC §3): captioned scenes of coloured shapes, generated from a seed,
//! rendered anti-aliased at any resolution, each with its ground truth.
//!
//! Nothing can be downloaded here, so Tessera draws its own data. Scenes cover what the DALL·E
//! blog probes: colour (with near neighbours such as navy and blue), shape, size, two objects
//! with their own attributes and a relative position, counts, stacks, a word on a sign, a
//! background colour, and image-to-image pairs (the top half transformed onto the bottom half)
//! for completion. Some colour–shape pairs are held out of training to measure compositional
//! generalisation. Because the generator knows what it drew, `eval` can score what a model draws.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::sample::SeedRng;

macro_rules! named_enum {
    ($(#[$m:meta])* $name:ident { $($v:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($v),+ }
        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$v),+];
            pub fn name(self) -> &'static str {
                match self { $($name::$v => $s),+ }
            }
            pub fn index(self) -> usize {
                Self::ALL.iter().position(|&x| x == self).unwrap_or(0)
            }
            pub fn from_name(s: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|x| x.name() == s)
            }
        }
    };
}

named_enum!(
    /// The palette. Near neighbours (navy/blue, olive/green, teal/cyan) are deliberate.
    Colour {
        Red => "red", Green => "green", Blue => "blue", Yellow => "yellow", Purple => "purple",
        Orange => "orange", Pink => "pink", Brown => "brown", Black => "black", White => "white",
        Gray => "gray", Navy => "navy", Olive => "olive", Teal => "teal", Cyan => "cyan",
        Magenta => "magenta",
    }
);

impl Colour {
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 30, 30],
            Colour::Green => [40, 170, 50],
            Colour::Blue => [40, 90, 230],
            Colour::Yellow => [245, 220, 40],
            Colour::Purple => [130, 50, 170],
            Colour::Orange => [245, 140, 20],
            Colour::Pink => [245, 130, 190],
            Colour::Brown => [125, 75, 35],
            Colour::Black => [20, 20, 20],
            Colour::White => [250, 250, 250],
            Colour::Gray => [128, 128, 128],
            Colour::Navy => [20, 30, 110],
            Colour::Olive => [120, 130, 30],
            Colour::Teal => [0, 128, 128],
            Colour::Cyan => [70, 220, 235],
            Colour::Magenta => [215, 35, 200],
        }
    }

    /// Colours objects may take (everything but the backgrounds' white).
    pub fn object_colours() -> Vec<Colour> {
        Colour::ALL.iter().copied().filter(|c| *c != Colour::White).collect()
    }
}

named_enum!(
    /// Shapes, each drawn inside a unit circle, point up.
    Shape {
        Circle => "circle", Square => "square", Triangle => "triangle", Pentagon => "pentagon",
        Hexagon => "hexagon", Heptagon => "heptagon", Octagon => "octagon", Star => "star",
        Heart => "heart", Diamond => "diamond", Cross => "cross",
    }
);

named_enum!(
    /// Object sizes, as radii relative to the image side.
    Size { Small => "small", Medium => "medium", Large => "large" }
);

impl Size {
    pub fn radius(self) -> f32 {
        match self {
            Size::Small => 0.10,
            Size::Medium => 0.15,
            Size::Large => 0.21,
        }
    }
}

named_enum!(
    /// Relative positions of two objects.
    Relation { Above => "above", Below => "below", LeftOf => "to the left of", RightOf => "to the right of" }
);

named_enum!(
    /// What the bottom half of an image-to-image scene does to the top half.
    Transform { Pink => "colored pink", UpsideDown => "reflected upside-down", Outline => "as outlines" }
);

named_enum!(
    /// The capabilities the evaluator scores.
    Capability {
        SingleObject => "single_object", TwoObjectsPosition => "two_objects_position", Count => "count",
        Stack => "stack", Text => "text", Transform => "transform",
    }
);

/// One drawn object. Positions and radius are fractions of the image side; y grows downward.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Object {
    pub shape: Shape,
    pub colour: Colour,
    pub size: Size,
    pub x: f32,
    pub y: f32,
    pub r: f32,
    #[serde(default)]
    pub flipped: bool,
    #[serde(default)]
    pub outline: bool,
}

/// A sign with a word, drawn as a rectangle with letters of a built-in 5×7 font.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sign {
    pub word: String,
    pub colour: Colour,
    pub x: f32,
    pub y: f32,
    pub w: f32,
    pub h: f32,
}

/// A scene with its ground truth: what was asked and what was drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub capability: Capability,
    pub background: Colour,
    pub objects: Vec<Object>,
    #[serde(default)]
    pub sign: Option<Sign>,
    /// Objects 0 and 1 stand in this relation (two-object scenes).
    #[serde(default)]
    pub relation: Option<Relation>,
    /// How many objects the caption asks for (count scenes).
    #[serde(default)]
    pub count: Option<usize>,
    /// The bottom half's transformation (image-to-image scenes); objects of the top half come
    /// first, then their transformed copies.
    #[serde(default)]
    pub transform: Option<Transform>,
    pub caption: String,
}

/// Training scenes never use held-out colour–shape pairs; held-out scenes always use one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    HeldOut,
}

/// Whether a colour–shape pair is held out of training (about one pair in nine).
pub fn is_held_out(colour: Colour, shape: Shape) -> bool {
    (colour.index() * 7 + shape.index() * 3) % 9 == 4
}

impl Capability {
    /// A capability by the name the report gives it (surrounding spaces ignored), or an error
    /// that lists the names.
    pub fn parse(name: &str) -> std::result::Result<Capability, String> {
        Capability::from_name(name.trim()).ok_or_else(|| {
            let names: Vec<&str> = Capability::ALL.iter().map(|c| c.name()).collect();
            format!("unknown capability {:?} (one of {})", name.trim(), names.join(", "))
        })
    }
}

/// The colours of the held-out pairs (every held-out pair takes one). The like-for-like
/// control of a held-out cell is the seen captions whose objects take one too: what is left
/// between them is the pairs, not the colours.
pub fn held_out_colours() -> Vec<Colour> {
    Colour::object_colours().into_iter().filter(|&c| Shape::ALL.iter().any(|&s| is_held_out(c, s))).collect()
}

/// Whether any object of `scene` takes a colour of the held-out pairs.
pub fn uses_held_out_colour(scene: &Scene) -> bool {
    let held = held_out_colours();
    scene.objects.iter().any(|o| held.contains(&o.colour))
}

const WORDS: &[&str] = &[
    "cat", "dog", "sun", "art", "map", "box", "car", "hat", "pen", "cup", "fox", "owl", "bee", "sky", "tea", "ice",
    "joy", "zoo", "web", "key",
];

/// Numbers as words, for counts.
pub const NUMBER_WORDS: &[&str] = &["zero", "one", "two", "three", "four", "five", "six", "seven", "eight"];

/// The backgrounds a single object may stand on, white first (the only one of other scenes).
pub const BACKGROUNDS: [Colour; 4] = [Colour::White, Colour::Black, Colour::Gray, Colour::Yellow];

struct Gen {
    rng: SeedRng,
    split: Split,
    even_backgrounds: bool,
}

impl Gen {
    fn below(&mut self, n: usize) -> usize {
        (self.rng.next_u64() % n.max(1) as u64) as usize
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len())]
    }
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.rng.next_f64() as f32
    }
    fn chance(&mut self, p: f64) -> bool {
        self.rng.next_f64() < p
    }

    /// A colour–shape pair allowed in this split; `held` forces a held-out pair.
    fn pair(&mut self, background: Colour, held: bool) -> (Colour, Shape) {
        let colours = Colour::object_colours();
        loop {
            let c = self.pick(&colours);
            let s = self.pick(Shape::ALL);
            if c == background {
                continue;
            }
            let h = is_held_out(c, s);
            let ok = match self.split {
                Split::Train => !h,
                Split::HeldOut => !held || h,
            };
            if ok {
                return (c, s);
            }
        }
    }

    fn background(&mut self) -> Colour {
        if self.even_backgrounds {
            return self.pick(&BACKGROUNDS);
        }
        if self.chance(0.75) { Colour::White } else { self.pick(&BACKGROUNDS[1..]) }
    }
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" }
}

fn describe(o: &Object, with_size: bool) -> String {
    let words = if with_size {
        format!("{} {} {}", o.size.name(), o.colour.name(), o.shape.name())
    } else {
        format!("{} {}", o.colour.name(), o.shape.name())
    };
    format!("{} {words}", article(&words))
}

fn plural(shape: Shape) -> String {
    format!("{}s", shape.name())
}

fn background_phrase(bg: Colour) -> String {
    if bg == Colour::White { String::new() } else { format!(" on a {} background", bg.name()) }
}

/// Draws a scene for `capability` from `seed`.
pub fn generate(capability: Capability, seed: u64, split: Split) -> Scene {
    generate_with(capability, seed, split, false)
}

/// [`generate`], where `even_backgrounds` draws the backgrounds that vary (single objects')
/// from white, black, grey and yellow equally often instead of white three times in four.
pub fn generate_with(capability: Capability, seed: u64, split: Split, even_backgrounds: bool) -> Scene {
    let rng = SeedRng::new(seed ^ 0x7E55_E4A0_0000_0000 ^ (capability.index() as u64) << 48);
    let mut g = Gen { rng, split, even_backgrounds };
    let held = split == Split::HeldOut;
    match capability {
        Capability::SingleObject => single(&mut g, held),
        Capability::TwoObjectsPosition => two(&mut g, held),
        Capability::Count => count(&mut g, held),
        Capability::Stack => stack(&mut g, held),
        Capability::Text => text(&mut g),
        Capability::Transform => transform(&mut g, held),
    }
}

/// The share of each capability in training data.
pub const MIX: [(Capability, f64); 6] = [
    (Capability::SingleObject, 0.30),
    (Capability::TwoObjectsPosition, 0.25),
    (Capability::Count, 0.15),
    (Capability::Stack, 0.10),
    (Capability::Text, 0.10),
    (Capability::Transform, 0.10),
];

/// Sample `index` of the world with base seed `seed`: a capability drawn by [`MIX`], then a
/// scene. The same (seed, index) always gives the same scene.
pub fn sample(seed: u64, index: u64, split: Split) -> Scene {
    sample_with(seed, index, split, Pictures::Usual)
}

/// What a world data source draws: its captioned scenes as they are, with single objects'
/// backgrounds drawn evenly, or half of its pictures crowds of objects (pictures for a dVAE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pictures {
    /// [`sample`]'s scenes (spec `world`).
    #[default]
    Usual,
    /// Single objects' four backgrounds equally often (spec `world-balanced`): [`generate_with`].
    EvenBackgrounds,
    /// Half the pictures [`crowd`]s, half `EvenBackgrounds` scenes (spec `world-dense`): every
    /// shape's edges and corners, in every size, flipped and outlined, against every background,
    /// several times per picture. For a dVAE only: a crowd's caption lists what it holds and asks
    /// for nothing the evaluator scores.
    Dense,
}

/// [`sample`] with [`Pictures`]' choice of scenes (the same capability mix; `Usual` gives
/// exactly `sample`'s scenes).
pub fn sample_with(seed: u64, index: u64, split: Split, pictures: Pictures) -> Scene {
    sample_mixed(seed, index, split, pictures, &Mix::USUAL)
}

/// How often each capability is drawn, as multipliers of its [`MIX`] share (renormalised): a
/// data spec's `@text=2.5,transform=2` draws text scenes 2.5 times and transforms twice as
/// often against the rest as the usual mix does. All ones is the usual mix, exactly.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mix {
    /// One multiplier per capability, in [`Capability::ALL`]'s order.
    pub weights: [f64; 6],
}

impl Default for Mix {
    fn default() -> Self {
        Mix::USUAL
    }
}

impl Mix {
    pub const USUAL: Mix = Mix { weights: [1.0; 6] };

    /// Parses `CAP=W[,CAP=W…]` (capability names as the report writes them: `single_object`,
    /// `two_objects_position`, `count`, `stack`, `text`, `transform`; W a finite number ≥ 0);
    /// capabilities not named keep 1. At least one capability must keep a share above zero.
    pub fn parse(s: &str) -> std::result::Result<Mix, String> {
        let mut weights = [1.0; 6];
        let mut seen = [false; 6];
        for part in s.split(',') {
            let (name, w) = part
                .split_once('=')
                .ok_or_else(|| format!("capability weight {part:?} is not CAP=W (for example text=2)"))?;
            let cap = Capability::parse(name).map_err(|e| format!("{e} in the mix"))?;
            let w: f64 = w.trim().parse().map_err(|_| format!("bad weight {w:?} for {}", cap.name()))?;
            if !w.is_finite() || w < 0.0 {
                return Err(format!("the weight of {} must be a finite number ≥ 0, not {w}", cap.name()));
            }
            if std::mem::replace(&mut seen[cap.index()], true) {
                return Err(format!("{} is weighted twice in the mix", cap.name()));
            }
            weights[cap.index()] = w;
        }
        let mix = Mix { weights };
        if mix.shares().iter().all(|&(_, p)| p <= 0.0) {
            return Err("the mix gives every capability a share of zero".into());
        }
        Ok(mix)
    }

    /// Each capability's share of the scenes drawn (they sum to 1; [`MIX`] itself when usual).
    pub fn shares(&self) -> [(Capability, f64); 6] {
        if *self == Mix::USUAL {
            return MIX;
        }
        let raw = MIX.map(|(c, p)| (c, p * self.weights[c.index()]));
        let total: f64 = raw.iter().map(|&(_, p)| p).sum();
        if total <= 0.0 {
            return raw;
        }
        raw.map(|(c, p)| (c, p / total))
    }

    /// The spec suffix that gives this mix back (`""` for the usual one).
    pub fn spec_suffix(&self) -> String {
        if *self == Mix::USUAL {
            return String::new();
        }
        let parts: Vec<String> = Capability::ALL
            .iter()
            .filter(|c| self.weights[c.index()] != 1.0)
            .map(|c| format!("{}={}", c.name(), self.weights[c.index()]))
            .collect();
        format!("@{}", parts.join(","))
    }
}

/// [`sample_with`] with the capabilities drawn by `mix` ([`Mix::USUAL`] gives exactly
/// `sample_with`'s scenes; under two mixes of one seed, scene `index` is the same scene
/// whenever both draw the same capability for it).
pub fn sample_mixed(seed: u64, index: u64, split: Split, pictures: Pictures, mix: &Mix) -> Scene {
    let mut rng = SeedRng::new(seed.wrapping_mul(0x9E37_79B9).wrapping_add(index));
    if pictures == Pictures::Dense && rng.next_f64() < 0.5 {
        return crowd(rng.next_u64(), split);
    }
    let u = rng.next_f64();
    let mut acc = 0.0;
    let shares = mix.shares();
    // what rounding leaves above the shares' sum: single objects in the usual mix (as always),
    // else the last capability with a share (never one weighted out)
    let mut cap = if *mix == Mix::USUAL {
        Capability::SingleObject
    } else {
        shares.iter().rev().find(|&&(_, p)| p > 0.0).map_or(Capability::SingleObject, |&(c, _)| c)
    };
    for &(c, p) in &shares {
        acc += p;
        if u < acc {
            cap = c;
            break;
        }
    }
    generate_with(cap, rng.next_u64(), split, pictures != Pictures::Usual)
}

/// A picture for a dVAE: three to eight objects of the split's colour–shape pairs, each of its
/// own radius between the world's smallest (a count's 0.085) and largest (0.21), a quarter
/// upside-down and a sixth outlined (crosses never, as in transforms), apart from each other,
/// on any of the four backgrounds. Its capability is `Count` with no number asked: nothing
/// scores it.
pub fn crowd(seed: u64, split: Split) -> Scene {
    let mut g = Gen { rng: SeedRng::new(seed ^ 0xC20_4D00), split, even_backgrounds: true };
    let background = g.pick(&BACKGROUNDS);
    let n = 3 + g.below(6);
    let cols = (n as f32).sqrt().ceil();
    // the largest radius that keeps neighbours on the scatter grid apart
    let r_max = (0.9 / cols / 2.0).min(Size::Large.radius());
    let radii: Vec<f32> = (0..n).map(|_| g.uniform(0.085, r_max.max(0.085))).collect();
    let widest = radii.iter().copied().fold(0.0, f32::max);
    let places = scatter(&mut g, n, widest, (0.05, 0.05, 0.95, 0.95));
    let mut objects = Vec::new();
    for (&(x, y), &r) in places.iter().zip(&radii) {
        let (colour, shape) = g.pair(background, false);
        let size = *Size::ALL
            .iter()
            .min_by(|a, b| (a.radius() - r).abs().total_cmp(&(b.radius() - r).abs()))
            .unwrap_or(&Size::Small);
        let flipped = g.chance(0.25);
        let outline = shape != Shape::Cross && g.chance(1.0 / 6.0);
        objects.push(Object { shape, colour, size, x, y, r, flipped, outline });
    }
    let names: Vec<String> = objects
        .iter()
        .map(|o| {
            let how = match (o.flipped, o.outline) {
                (true, true) => "upside-down outlined ",
                (true, false) => "upside-down ",
                (false, true) => "outlined ",
                (false, false) => "",
            };
            format!("{how}{} {}", o.colour.name(), o.shape.name())
        })
        .collect();
    let caption = format!("{}{}", names.join(", "), background_phrase(background));
    Scene {
        capability: Capability::Count,
        background,
        objects,
        sign: None,
        relation: None,
        count: None,
        transform: None,
        caption,
    }
}

fn single(g: &mut Gen, held: bool) -> Scene {
    let background = g.background();
    let (colour, shape) = g.pair(background, held);
    let size = g.pick(Size::ALL);
    let r = size.radius();
    let o = Object {
        shape,
        colour,
        size,
        x: g.uniform(0.5 - (0.45 - r) * 0.6, 0.5 + (0.45 - r) * 0.6),
        y: g.uniform(0.5 - (0.45 - r) * 0.6, 0.5 + (0.45 - r) * 0.6),
        r,
        flipped: false,
        outline: false,
    };
    let d = describe(&o, true);
    let caption = match g.below(3) {
        0 => format!("{d}{}", background_phrase(background)),
        1 => format!("an image of {d}{}", background_phrase(background)),
        _ => format!("a picture of {d}{}", background_phrase(background)),
    };
    Scene {
        capability: Capability::SingleObject,
        background,
        objects: vec![o],
        sign: None,
        relation: None,
        count: None,
        transform: None,
        caption,
    }
}

fn two(g: &mut Gen, held: bool) -> Scene {
    let background = Colour::White;
    let (c0, s0) = g.pair(background, held);
    let (c1, s1) = loop {
        let p = g.pair(background, false);
        if p != (c0, s0) {
            break p;
        }
    };
    let relation = g.pick(Relation::ALL);
    let sizes = [Size::Small, Size::Medium];
    let (z0, z1) = (g.pick(&sizes), g.pick(&sizes));
    // object 0 stands in `relation` to object 1
    let (dx, dy): (f32, f32) = match relation {
        Relation::Above => (0.0, -1.0),
        Relation::Below => (0.0, 1.0),
        Relation::LeftOf => (-1.0, 0.0),
        Relation::RightOf => (1.0, 0.0),
    };
    let gap = 0.22 + g.uniform(0.0, 0.08);
    let jitter = g.uniform(-0.06, 0.06);
    let (cx, cy) = (0.5 + g.uniform(-0.05, 0.05), 0.5 + g.uniform(-0.05, 0.05));
    let mk = |shape, colour, size: Size, x, y| Object {
        shape,
        colour,
        size,
        x,
        y,
        r: size.radius(),
        flipped: false,
        outline: false,
    };
    let o0 = mk(s0, c0, z0, cx + dx * gap + dy.abs() * jitter, cy + dy * gap + dx.abs() * jitter);
    let o1 = mk(s1, c1, z1, cx - dx * gap + dy.abs() * jitter, cy - dy * gap + dx.abs() * jitter);
    let caption = match g.below(2) {
        0 => format!("{} {} {}", describe(&o0, true), relation.name(), describe(&o1, true)),
        _ => format!("there is {} {} {}", describe(&o0, true), relation.name(), describe(&o1, true)),
    };
    Scene {
        capability: Capability::TwoObjectsPosition,
        background,
        objects: vec![o0, o1],
        sign: None,
        relation: Some(relation),
        count: None,
        transform: None,
        caption,
    }
}

/// Non-overlapping positions on a jittered grid for `n` objects of radius `r`.
fn scatter(g: &mut Gen, n: usize, r: f32, region: (f32, f32, f32, f32)) -> Vec<(f32, f32)> {
    let (x0, y0, x1, y1) = region;
    let cols = (n as f32).sqrt().ceil() as usize;
    let rows = n.div_ceil(cols);
    let mut cells: Vec<(usize, usize)> = (0..rows).flat_map(|i| (0..cols).map(move |j| (i, j))).collect();
    // shuffle the cells
    for i in (1..cells.len()).rev() {
        let j = g.below(i + 1);
        cells.swap(i, j);
    }
    let (cw, ch) = ((x1 - x0) / cols as f32, (y1 - y0) / rows as f32);
    cells
        .into_iter()
        .take(n)
        .map(|(i, j)| {
            let slack_x = (cw / 2.0 - r).max(0.0) * 0.8;
            let slack_y = (ch / 2.0 - r).max(0.0) * 0.8;
            (
                x0 + cw * (j as f32 + 0.5) + g.uniform(-slack_x, slack_x),
                y0 + ch * (i as f32 + 0.5) + g.uniform(-slack_y, slack_y),
            )
        })
        .collect()
}

fn count(g: &mut Gen, held: bool) -> Scene {
    let background = Colour::White;
    let (colour, shape) = g.pair(background, held);
    let n = 1 + g.below(6);
    let r = if n <= 2 {
        0.12
    } else if n <= 4 {
        0.10
    } else {
        0.085
    };
    let objects = scatter(g, n, r, (0.05, 0.05, 0.95, 0.95))
        .into_iter()
        .map(|(x, y)| Object { shape, colour, size: Size::Small, x, y, r, flipped: false, outline: false })
        .collect();
    let noun = if n == 1 { shape.name().to_string() } else { plural(shape) };
    let caption = match g.below(2) {
        0 => format!("{} {} {noun}", NUMBER_WORDS[n], colour.name()),
        _ => format!("a picture of {} {} {noun}", NUMBER_WORDS[n], colour.name()),
    };
    Scene {
        capability: Capability::Count,
        background,
        objects,
        sign: None,
        relation: None,
        count: Some(n),
        transform: None,
        caption,
    }
}

fn stack(g: &mut Gen, held: bool) -> Scene {
    let background = Colour::White;
    let levels = 2 + g.below(2);
    let mut colours: Vec<Colour> = Vec::new();
    while colours.len() < levels {
        let (c, _) = g.pair(background, held && colours.is_empty());
        if !colours.contains(&c) && (held || !is_held_out(c, Shape::Square)) {
            colours.push(c);
        }
    }
    let r = 0.12;
    let side = 0.8 * r * 2.0; // a square's side
    let x = 0.5 + g.uniform(-0.15, 0.15);
    let bottom = 0.9 - side / 2.0;
    // colours[0] is the top
    let objects: Vec<Object> = colours
        .iter()
        .enumerate()
        .map(|(i, &colour)| Object {
            shape: Shape::Square,
            colour,
            size: Size::Medium,
            x,
            y: bottom - side * (levels - 1 - i) as f32,
            r,
            flipped: false,
            outline: false,
        })
        .collect();
    let noun = g.pick(&["cube", "block"]);
    let parts: Vec<String> = colours.iter().map(|c| format!("a {} {noun}", c.name())).collect();
    let caption = parts.join(" on top of ");
    Scene {
        capability: Capability::Stack,
        background,
        objects,
        sign: None,
        relation: None,
        count: None,
        transform: None,
        caption,
    }
}

/// The colours a sign is drawn in.
pub const SIGN_COLOURS: [Colour; 5] = [Colour::Yellow, Colour::Cyan, Colour::Pink, Colour::Orange, Colour::Gray];

fn text(g: &mut Gen) -> Scene {
    let background = Colour::White;
    let word = g.pick(WORDS).to_string();
    let colour = g.pick(&SIGN_COLOURS);
    let w = 0.86;
    let h = 0.42;
    let sign = Sign { word: word.clone(), colour, x: 0.5, y: 0.5 + g.uniform(-0.2, 0.2), w, h };
    let caption = match g.below(2) {
        0 => format!("a sign with the word '{word}' on it"),
        _ => format!("{} {} sign that says '{word}'", article(colour.name()), colour.name()),
    };
    Scene {
        capability: Capability::Text,
        background,
        objects: Vec::new(),
        sign: Some(sign),
        relation: None,
        count: None,
        transform: None,
        caption,
    }
}

fn transform(g: &mut Gen, held: bool) -> Scene {
    let background = Colour::White;
    let kind = g.pick(Transform::ALL);
    let n = 1 + g.below(2);
    let r = 0.11;
    let mut top = Vec::new();
    let places = scatter(g, n, r, (0.08, 0.06, 0.92, 0.44));
    for (i, &(x, y)) in places.iter().enumerate() {
        let (colour, shape) = loop {
            let p = g.pair(background, held && i == 0);
            // a pink object cannot turn pink; a cross's outline is too thin to read at small sizes
            if !(kind == Transform::Pink && p.0 == Colour::Pink || kind == Transform::Outline && p.1 == Shape::Cross) {
                break p;
            }
        };
        top.push(Object { shape, colour, size: Size::Small, x, y, r, flipped: false, outline: false });
    }
    let bottom: Vec<Object> = top
        .iter()
        .map(|o| match kind {
            Transform::Pink => Object { colour: Colour::Pink, y: o.y + 0.5, ..*o },
            Transform::UpsideDown => Object { y: 1.0 - o.y, flipped: true, ..*o },
            Transform::Outline => Object { y: o.y + 0.5, outline: true, ..*o },
        })
        .collect();
    let what: Vec<String> = top.iter().map(|o| describe(o, false)).collect();
    let caption = format!("{} on the top, and the exact same shapes {} on the bottom", what.join(" and "), kind.name());
    let mut objects = top;
    objects.extend(bottom);
    Scene {
        capability: Capability::Transform,
        background,
        objects,
        sign: None,
        relation: None,
        count: None,
        transform: Some(kind),
        caption,
    }
}

// ---------------------------------------------------------------------------------------
// Rendering

/// Whether the point (u, v) of a shape's unit frame (radius 1, v downward) is inside it.
pub fn inside(shape: Shape, u: f32, v: f32) -> bool {
    match shape {
        Shape::Circle => u * u + v * v <= 1.0,
        Shape::Square => u.abs() <= 0.8 && v.abs() <= 0.8,
        Shape::Diamond => u.abs() + v.abs() <= 1.0,
        Shape::Cross => (u.abs() <= 0.3 && v.abs() <= 0.9) || (u.abs() <= 0.9 && v.abs() <= 0.3),
        Shape::Triangle => regular_polygon(3, u, v + 0.2, 1.15),
        Shape::Pentagon => regular_polygon(5, u, v, 1.0),
        Shape::Hexagon => regular_polygon(6, u, v, 1.0),
        Shape::Heptagon => regular_polygon(7, u, v, 1.0),
        Shape::Octagon => regular_polygon(8, u, v, 1.0),
        Shape::Star => star(u, v),
        Shape::Heart => {
            let (x, y) = (u * 1.2, -v * 1.2 + 0.15);
            let a = x * x + y * y - 1.0;
            a * a * a - x * x * y * y * y <= 0.0
        }
    }
}

/// A regular n-gon with one vertex pointing up, circumradius `rad`.
fn regular_polygon(n: usize, u: f32, v: f32, rad: f32) -> bool {
    let apothem = rad * (std::f32::consts::PI / n as f32).cos();
    (0..n).all(|k| {
        // outward normal of edge k, between vertices k and k+1
        let a = -std::f32::consts::FRAC_PI_2 + std::f32::consts::TAU * (k as f32 + 0.5) / n as f32;
        u * a.cos() + v * a.sin() <= apothem
    })
}

fn star(u: f32, v: f32) -> bool {
    let pts: Vec<(f32, f32)> = (0..10)
        .map(|k| {
            let a = -std::f32::consts::FRAC_PI_2 + std::f32::consts::TAU * k as f32 / 10.0;
            let rad = if k % 2 == 0 { 1.0 } else { 0.45 };
            (rad * a.cos(), rad * a.sin() + 0.08)
        })
        .collect();
    // even-odd rule
    let mut inside = false;
    let mut j = pts.len() - 1;
    for i in 0..pts.len() {
        let (xi, yi) = pts[i];
        let (xj, yj) = pts[j];
        if (yi > v) != (yj > v) && u < (xj - xi) * (v - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// Whether an object covers the point (px, py) in image fractions.
pub fn object_covers(o: &Object, px: f32, py: f32) -> bool {
    let u = (px - o.x) / o.r;
    let mut v = (py - o.y) / o.r;
    if o.flipped {
        v = -v;
    }
    if u.abs() > 1.3 || v.abs() > 1.3 {
        return false;
    }
    if o.outline { inside(o.shape, u, v) && !inside(o.shape, u / 0.6, v / 0.6) } else { inside(o.shape, u, v) }
}

/// Rows of the 5×7 glyph of a lowercase letter (bit 4 = leftmost column).
pub fn glyph(c: char) -> [u8; 7] {
    match c {
        'a' => [0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'b' => [0x10, 0x10, 0x1E, 0x11, 0x11, 0x11, 0x1E],
        'c' => [0x00, 0x00, 0x0E, 0x10, 0x10, 0x10, 0x0E],
        'd' => [0x01, 0x01, 0x0F, 0x11, 0x11, 0x11, 0x0F],
        'e' => [0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E],
        'f' => [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08],
        'g' => [0x00, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'h' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11],
        'i' => [0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E],
        'j' => [0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0C],
        'k' => [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'm' => [0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11],
        'n' => [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11],
        'o' => [0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E],
        'p' => [0x00, 0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10],
        'q' => [0x00, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x01],
        'r' => [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0x00, 0x00, 0x0F, 0x10, 0x0E, 0x01, 0x1E],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06],
        'u' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D],
        'v' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'w' => [0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A],
        'x' => [0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11],
        'y' => [0x00, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'z' => [0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F],
        _ => [0; 7],
    }
}

/// The layout of a sign's letters: (x0, y0, cell) in image fractions, one glyph cell being
/// `cell` wide (5 columns) and 7/5 as tall.
pub fn sign_layout(s: &Sign) -> (f32, f32, f32) {
    let n = s.word.chars().count().max(1) as f32;
    let cell = (s.w * 0.85 / (n * 6.0 - 1.0)).min(s.h * 0.8 / 7.0) * 5.0;
    let total_w = cell * (n * 6.0 - 1.0) / 5.0;
    let x0 = s.x - total_w / 2.0;
    let y0 = s.y - cell * 7.0 / 5.0 / 2.0;
    (x0, y0, cell)
}

fn sign_colour_at(s: &Sign, px: f32, py: f32) -> Option<Colour> {
    if (px - s.x).abs() > s.w / 2.0 || (py - s.y).abs() > s.h / 2.0 {
        return None;
    }
    let (x0, y0, cell) = sign_layout(s);
    let unit = cell / 5.0;
    let (gx, gy) = ((px - x0) / unit, (py - y0) / unit);
    if gx >= 0.0 && (0.0..7.0).contains(&gy) {
        let (col, row) = (gx as usize, gy as usize);
        let letter = col / 6;
        let within = col % 6;
        if within < 5
            && let Some(c) = s.word.chars().nth(letter)
            && glyph(c)[row] & (0x10 >> within) != 0
        {
            return Some(Colour::Black);
        }
    }
    Some(s.colour)
}

/// The colour at a point of the scene (the last object drawn wins).
pub fn colour_at(scene: &Scene, px: f32, py: f32) -> Colour {
    if let Some(c) = scene.sign.as_ref().and_then(|s| sign_colour_at(s, px, py)) {
        return c;
    }
    scene.objects.iter().rev().find(|o| object_covers(o, px, py)).map(|o| o.colour).unwrap_or(scene.background)
}

/// Renders the scene as `size × size` RGB8, anti-aliased by 4×4 supersampling.
pub fn render(scene: &Scene, size: usize) -> Vec<u8> {
    const SS: usize = 4;
    let mut out = vec![0u8; size * size * 3];
    let inv = 1.0 / size as f32;
    for py in 0..size {
        for px in 0..size {
            let mut acc = [0u32; 3];
            for sy in 0..SS {
                for sx in 0..SS {
                    let x = (px as f32 + (sx as f32 + 0.5) / SS as f32) * inv;
                    let y = (py as f32 + (sy as f32 + 0.5) / SS as f32) * inv;
                    let c = colour_at(scene, x, y).rgb();
                    for k in 0..3 {
                        acc[k] += c[k] as u32;
                    }
                }
            }
            let i = (py * size + px) * 3;
            for k in 0..3 {
                out[i + k] = ((acc[k] + (SS * SS / 2) as u32) / (SS * SS) as u32) as u8;
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Contrasts: hard negatives for the reranker

/// A scene that differs from `scene` in one detail its caption names: a colour or a shape, the
/// relation of two objects (they trade places), the number of objects (one fewer or one more),
/// the order or a colour of a stack, a letter of a sign, or what the bottom half of a transform
/// shows. Its picture does not match `scene`'s caption, which makes it a hard negative for that
/// caption when the reranker trains (`train reranker --contrast-images`). Its caption is left
/// empty. Drawn from `rng`, so a seeded run draws the same.
pub fn contrast_scene(scene: &Scene, rng: &mut SeedRng) -> Scene {
    contrast_scene_as(scene, rng, Contrasts::Any)
}

/// Which changes [`contrast_scene_as`] draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contrasts {
    /// Any other colour or shape ([`contrast_scene`]).
    Any,
    /// Near misses: a changed shape is, three times in four, one of its two look-alikes
    /// ([`look_alikes`]: an octagon becomes a circle or a heptagon, a cross a diamond), and a
    /// third of the stacks' contrasts move a block off the column or give it a look-alike
    /// shape: what samples that are almost right get wrong.
    Near,
}

/// The two shapes whose outlines overlap `shape`'s most when drawn with the same area and
/// centre (intersection over union of their masks): the shapes a blurred or small drawing of
/// it is mistaken for.
pub fn look_alikes(shape: Shape) -> [Shape; 2] {
    static TABLE: OnceLock<Vec<[Shape; 2]>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        const N: usize = 96;
        // each mask on a fine grid, scaled to one area and moved to one centre
        let mask = |s: Shape| -> Vec<bool> {
            let raw = |scale: f32, dx: f32, dy: f32| -> Vec<bool> {
                (0..N * N)
                    .map(|i| {
                        let u = ((i % N) as f32 + 0.5) / N as f32 * 3.0 - 1.5;
                        let v = ((i / N) as f32 + 0.5) / N as f32 * 3.0 - 1.5;
                        inside(s, u * scale + dx, v * scale + dy)
                    })
                    .collect()
            };
            let m = raw(1.0, 0.0, 0.0);
            let area = m.iter().filter(|&&b| b).count().max(1) as f32;
            let (mut cx, mut cy) = (0.0f32, 0.0f32);
            for (i, _) in m.iter().enumerate().filter(|(_, b)| **b) {
                cx += ((i % N) as f32 + 0.5) / N as f32 * 3.0 - 1.5;
                cy += ((i / N) as f32 + 0.5) / N as f32 * 3.0 - 1.5;
            }
            let scale = (area / (0.25 * (N * N) as f32)).sqrt();
            raw(scale, cx / area, cy / area)
        };
        let masks: Vec<Vec<bool>> = Shape::ALL.iter().map(|&s| mask(s)).collect();
        let iou = |a: &[bool], b: &[bool]| {
            let both = a.iter().zip(b).filter(|(x, y)| **x && **y).count();
            let any = a.iter().zip(b).filter(|(x, y)| **x || **y).count();
            both as f32 / any.max(1) as f32
        };
        (0..Shape::ALL.len())
            .map(|i| {
                let mut others: Vec<(f32, Shape)> = (0..Shape::ALL.len())
                    .filter(|&j| j != i)
                    .map(|j| (iou(&masks[i], &masks[j]), Shape::ALL[j]))
                    .collect();
                others.sort_by(|a, b| b.0.total_cmp(&a.0));
                [others[0].1, others[1].1]
            })
            .collect()
    });
    let i = Shape::ALL.iter().position(|&s| s == shape).unwrap_or(0);
    table[i]
}

/// [`contrast_scene`], with the kind of change chosen by `mode`. `Contrasts::Any` draws
/// exactly what [`contrast_scene`] draws.
pub fn contrast_scene_as(scene: &Scene, rng: &mut SeedRng, mode: Contrasts) -> Scene {
    let near = mode == Contrasts::Near;
    let mut below = |n: usize| (rng.next_u64() % n.max(1) as u64) as usize;
    let mut c = Scene { caption: String::new(), ..scene.clone() };
    let n = c.objects.len();
    let recolour = |o: &mut Object, avoid: &[Colour], k: usize| {
        let options: Vec<Colour> =
            Colour::object_colours().into_iter().filter(|x| *x != o.colour && !avoid.contains(x)).collect();
        o.colour = options[k % options.len()];
    };
    // k < 48 of 64 picks a look-alike when `near`
    let reshape = |o: &mut Object, k: usize| {
        if near && k < 48 {
            o.shape = look_alikes(o.shape)[k % 2];
            return;
        }
        let options: Vec<Shape> = Shape::ALL.iter().copied().filter(|x| *x != o.shape).collect();
        o.shape = options[k % options.len()];
    };
    let bg = c.background;
    match c.capability {
        Capability::SingleObject | Capability::TwoObjectsPosition | Capability::Count if n == 0 => {}
        Capability::SingleObject | Capability::TwoObjectsPosition => {
            let i = below(n);
            match below(if n == 2 { 3 } else { 2 }) {
                0 => recolour(&mut c.objects[i], &[bg], below(64)),
                1 => reshape(&mut c.objects[i], below(64)),
                _ => {
                    let (a, b) = ((c.objects[0].x, c.objects[0].y), (c.objects[1].x, c.objects[1].y));
                    (c.objects[0].x, c.objects[0].y, c.objects[1].x, c.objects[1].y) = (b.0, b.1, a.0, a.1);
                }
            }
        }
        Capability::Count => {
            // one fewer or one more, so that the number is wrong both ways (negatives that only
            // ever had fewer objects would teach that more is better); one more needs room
            let k = below(4);
            let r = c.objects[0].r;
            let free = if k == 1 || (k == 0 && n >= 2) {
                (0..64)
                    .map(|_| {
                        let mut at = || 0.05 + r + (0.9 - 2.0 * r) * below(1024) as f32 / 1023.0;
                        (at(), at())
                    })
                    .find(|&(x, y)| c.objects.iter().all(|o| (o.x - x).hypot(o.y - y) > 2.2 * r))
            } else {
                None
            };
            match (k, free) {
                (1, Some((x, y))) => c.objects.push(Object { x, y, ..c.objects[0] }),
                (0 | 1, _) if n >= 2 => {
                    c.objects.remove(below(n));
                }
                (1 | 2, _) => {
                    let k = below(64);
                    c.objects.iter_mut().for_each(|o| recolour(o, &[bg], k));
                }
                _ => {
                    let k = below(64);
                    c.objects.iter_mut().for_each(|o| reshape(o, k));
                }
            }
            c.count = Some(c.objects.len());
        }
        Capability::Stack if n >= 2 && near && below(3) == 0 => {
            // a block off the column, or not a square
            let i = below(n);
            if below(2) == 0 {
                let side = if c.objects[i].x < 0.5 { 1.0 } else { -1.0 };
                c.objects[i].x += side * 1.6 * c.objects[i].r;
            } else {
                reshape(&mut c.objects[i], below(48));
            }
        }
        Capability::Stack if n >= 2 => {
            if below(2) == 0 {
                // two levels trade colours
                let i = below(n);
                let j = (i + 1 + below(n - 1)) % n;
                let (a, b) = (c.objects[i].colour, c.objects[j].colour);
                (c.objects[i].colour, c.objects[j].colour) = (b, a);
            } else {
                let used: Vec<Colour> = c.objects.iter().map(|o| o.colour).chain([bg]).collect();
                let i = below(n);
                recolour(&mut c.objects[i], &used, below(64));
            }
        }
        Capability::Text => {
            if let Some(sign) = c.sign.as_mut() {
                let letters: Vec<char> = sign.word.chars().collect();
                if !letters.is_empty() {
                    let i = below(letters.len());
                    let from = (letters[i] as u32).wrapping_sub('a' as u32) as usize % 26;
                    let other = (b'a' + ((from + 1 + below(25)) % 26) as u8) as char;
                    sign.word = letters.iter().enumerate().map(|(j, &l)| if j == i { other } else { l }).collect();
                }
            }
        }
        Capability::Transform if n >= 2 => {
            // one copy in the bottom half is not what the transform makes of its original
            let i = n / 2 + below(n - n / 2);
            if below(2) == 0 {
                recolour(&mut c.objects[i], &[bg], below(64));
            } else {
                reshape(&mut c.objects[i], below(64));
            }
        }
        Capability::Stack | Capability::Transform => {}
    }
    c
}

/// Captions that differ from `caption` in one detail a picture shows, grouped by kind of
/// change: a colour, a shape, a size, a count, a relation (above/below, left/right), the order
/// of two colours or of two shapes (what is on top of a stack, which object is where), a
/// letter of a quoted word, or the transform named. Each is false of any picture `caption` is
/// true of (for this world's captions). Groups with no candidate are left out; a caption
/// naming none of these words has none. The reranker trains against them as hard negatives.
pub fn contrast_captions(caption: &str) -> Vec<Vec<String>> {
    let words: Vec<&str> = caption.split(' ').collect();
    let join = |w: &[String]| w.join(" ");
    let owned = || words.iter().map(|s| s.to_string()).collect::<Vec<String>>();
    // replaces word i, keeping a correct article before it correct
    let replace = |i: usize, new: &str| {
        let mut w = owned();
        if i > 0 && w[i - 1] == article(words[i]) {
            w[i - 1] = article(new).to_string();
        }
        w[i] = new.to_string();
        join(&w)
    };
    let shape_of = |w: &str| {
        Shape::from_name(w)
            .map(|s| (s, false))
            .or_else(|| Shape::ALL.iter().find(|s| plural(**s) == w).map(|s| (*s, true)))
    };
    let (mut colours, mut shapes, mut sizes, mut counts, mut relations, mut orders, mut letters, mut transforms) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let colour_at: Vec<(usize, Colour)> =
        words.iter().enumerate().filter_map(|(i, w)| Colour::from_name(w).map(|c| (i, c))).collect();
    let shape_at: Vec<(usize, Shape, bool)> =
        words.iter().enumerate().filter_map(|(i, w)| shape_of(w).map(|(s, p)| (i, s, p))).collect();
    for &(i, c) in &colour_at {
        for &other in Colour::ALL.iter().filter(|&&o| o != c) {
            colours.push(replace(i, other.name()));
        }
    }
    for &(i, s, many) in &shape_at {
        for &other in Shape::ALL.iter().filter(|&&o| o != s) {
            shapes.push(replace(i, &if many { plural(other) } else { other.name().to_string() }));
        }
    }
    for (i, w) in words.iter().enumerate() {
        if let Some(z) = Size::from_name(w) {
            for &other in Size::ALL.iter().filter(|&&o| o != z) {
                sizes.push(replace(i, other.name()));
            }
        }
        // counts of two or more, so the noun stays plural
        if let Some(n) = NUMBER_WORDS.iter().position(|x| x == w).filter(|&n| n >= 2) {
            for m in (2..=6).filter(|&m| m != n) {
                counts.push(replace(i, NUMBER_WORDS[m]));
            }
        }
        let opposite = match *w {
            "above" => Some("below"),
            "below" => Some("above"),
            "left" if i > 0 && words[i - 1] == "the" => Some("right"),
            "right" if i > 0 && words[i - 1] == "the" => Some("left"),
            _ => None,
        };
        if let Some(o) = opposite {
            relations.push(replace(i, o));
        }
        let quoted = w.len() > 2 && w.starts_with('\'') && w.ends_with('\'');
        if quoted && w.is_ascii() {
            let inner = &w[1..w.len() - 1];
            for (j, ch) in inner.char_indices().filter(|(_, ch)| ch.is_ascii_lowercase()) {
                for other in ('a'..='z').filter(|&o| o != ch) {
                    letters.push(replace(i, &format!("'{}{other}{}'", &inner[..j], &inner[j + 1..])));
                }
            }
        }
    }
    // two different colours (or shapes) trading places
    for (a, &(i, ci)) in colour_at.iter().enumerate() {
        for &(j, cj) in &colour_at[a + 1..] {
            if ci != cj {
                let mut w = owned();
                w.swap(i, j);
                orders.push(join(&w));
            }
        }
    }
    for (a, &(i, si, pi)) in shape_at.iter().enumerate() {
        for &(j, sj, pj) in &shape_at[a + 1..] {
            if si != sj && pi == pj {
                let mut w = owned();
                w.swap(i, j);
                orders.push(join(&w));
            }
        }
    }
    for t in Transform::ALL {
        if let Some(at) = caption.find(t.name()) {
            for o in Transform::ALL.iter().filter(|&&o| o != *t) {
                transforms.push(format!("{}{}{}", &caption[..at], o.name(), &caption[at + t.name().len()..]));
            }
        }
    }
    [colours, shapes, sizes, counts, relations, orders, letters, transforms]
        .into_iter()
        .map(|mut g| {
            g.retain(|c| c != caption);
            g.dedup();
            g
        })
        .filter(|g| !g.is_empty())
        .collect()
}

/// Up to `k` distinct contrasting captions of `caption` ([`contrast_captions`]), drawn by
/// `rng`: a kind of change uniformly, then a caption of that kind.
pub fn pick_contrasts(caption: &str, k: usize, rng: &mut SeedRng) -> Vec<String> {
    if k == 0 {
        return Vec::new();
    }
    let groups = contrast_captions(caption);
    let total: usize = groups.iter().map(Vec::len).sum();
    let mut out: Vec<String> = Vec::with_capacity(k);
    let mut tries = 0;
    while out.len() < k.min(total) && tries < 16 * k {
        tries += 1;
        let g = &groups[(rng.next_u64() % groups.len() as u64) as usize];
        let c = &g[(rng.next_u64() % g.len() as u64) as usize];
        if !out.contains(c) {
            out.push(c.clone());
        }
    }
    out
}
