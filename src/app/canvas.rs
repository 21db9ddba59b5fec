//! The completion canvas: an RGB image at the model's resolution that a person paints on or
//! fills from a file, with undo/redo, and the handle that says how many image tokens (in
//! raster order) are kept; the rest is sampled.

/// A painting tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Tool {
    Brush,
    Eraser,
    Eyedropper,
}

/// Brush settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Brush {
    /// Radius in canvas pixels.
    pub radius: f32,
    /// 0 = hard edge, 1 = fully soft.
    pub softness: f32,
    pub colour: [u8; 3],
}

impl Default for Brush {
    fn default() -> Self {
        Self { radius: 3.0, softness: 0.3, colour: [220, 30, 30] }
    }
}

/// Where an imported image came from and which square of it was used.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportInfo {
    pub name: String,
    pub width: u32,
    pub height: u32,
    /// The centre crop used: x, y, side (source pixels).
    pub crop: [u32; 3],
}

/// The canvas' pixels and history.
#[derive(Debug, Clone)]
pub struct Canvas {
    size: usize,
    grid: usize,
    pixels: Vec<u8>,
    undo: Vec<Vec<u8>>,
    redo: Vec<Vec<u8>>,
    /// Image tokens kept before the handle (raster order), 0..=grid².
    keep_tokens: usize,
    /// Bumped on every change, so views can tell when to re-upload their texture.
    pub revision: u64,
    pub import: Option<ImportInfo>,
    stroke_open: bool,
    last_point: Option<(f32, f32)>,
}

/// The blank canvas colour.
pub const BLANK: [u8; 3] = [255, 255, 255];
const MAX_UNDO: usize = 200;

impl Canvas {
    pub fn new(size: usize, grid: usize) -> Self {
        Self {
            size,
            grid: grid.max(1),
            pixels: BLANK.repeat(size * size),
            undo: Vec::new(),
            redo: Vec::new(),
            keep_tokens: (grid * grid) / 2,
            revision: 0,
            import: None,
            stroke_open: false,
            last_point: None,
        }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn grid(&self) -> usize {
        self.grid
    }

    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }

    pub fn keep_tokens(&self) -> usize {
        self.keep_tokens
    }

    /// Sets the handle, snapped into 0..=grid².
    pub fn set_keep_tokens(&mut self, n: usize) {
        self.keep_tokens = n.min(self.grid * self.grid);
        self.revision += 1;
    }

    /// The handle position for a point on the canvas (canvas pixels): the token cell under
    /// it becomes the first sampled one.
    pub fn handle_at(&self, x: f32, y: f32) -> usize {
        let cell = self.size as f32 / self.grid as f32;
        let r = ((y / cell).floor().max(0.0) as usize).min(self.grid - 1);
        let c = ((x / cell).round().max(0.0) as usize).min(self.grid);
        r * self.grid + c
    }

    fn snapshot(&mut self) {
        self.undo.push(self.pixels.clone());
        if self.undo.len() > MAX_UNDO {
            self.undo.remove(0);
        }
        self.redo.clear();
    }

    fn changed(&mut self) {
        self.revision += 1;
    }

    pub fn can_undo(&self) -> bool {
        !self.undo.is_empty()
    }

    pub fn can_redo(&self) -> bool {
        !self.redo.is_empty()
    }

    pub fn undo(&mut self) -> bool {
        self.end_stroke();
        match self.undo.pop() {
            Some(prev) => {
                self.redo.push(std::mem::replace(&mut self.pixels, prev));
                self.changed();
                true
            }
            None => false,
        }
    }

    pub fn redo(&mut self) -> bool {
        self.end_stroke();
        match self.redo.pop() {
            Some(next) => {
                self.undo.push(std::mem::replace(&mut self.pixels, next));
                self.changed();
                true
            }
            None => false,
        }
    }

    /// Clears to blank (undoable).
    pub fn clear(&mut self) {
        self.snapshot();
        self.pixels = BLANK.repeat(self.size * self.size);
        self.import = None;
        self.changed();
    }

    /// Replaces the pixels with an image at the canvas' size (undoable).
    pub fn set_image(&mut self, rgb: Vec<u8>, import: Option<ImportInfo>) -> bool {
        if rgb.len() != self.size * self.size * 3 {
            return false;
        }
        self.snapshot();
        self.pixels = rgb;
        self.import = import;
        self.changed();
        true
    }

    pub fn pixel(&self, x: usize, y: usize) -> Option<[u8; 3]> {
        (x < self.size && y < self.size).then(|| {
            let i = (y * self.size + x) * 3;
            [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]]
        })
    }

    /// Starts or continues a stroke at canvas coordinates (pixels, may be fractional); the
    /// segment from the previous point is filled so fast strokes have no gaps.
    pub fn stroke_to(&mut self, tool: Tool, brush: &Brush, x: f32, y: f32) {
        if tool == Tool::Eyedropper {
            return;
        }
        if !self.stroke_open {
            self.snapshot();
            self.stroke_open = true;
            self.last_point = None;
        }
        let colour = if tool == Tool::Eraser { BLANK } else { brush.colour };
        let (x0, y0) = self.last_point.unwrap_or((x, y));
        let len = ((x - x0).powi(2) + (y - y0).powi(2)).sqrt();
        let steps = (len / (brush.radius * 0.25).max(0.25)).ceil().max(1.0) as usize;
        for i in 0..=steps {
            let t = i as f32 / steps as f32;
            self.dab(x0 + (x - x0) * t, y0 + (y - y0) * t, brush, colour);
        }
        self.last_point = Some((x, y));
        self.changed();
    }

    pub fn end_stroke(&mut self) {
        self.stroke_open = false;
        self.last_point = None;
    }

    /// One round dab: full strength inside (1 − softness)·radius, fading to 0 at the radius.
    fn dab(&mut self, cx: f32, cy: f32, brush: &Brush, colour: [u8; 3]) {
        let r = brush.radius.max(0.5);
        let inner = r * (1.0 - brush.softness.clamp(0.0, 1.0));
        let (x_lo, x_hi) = ((cx - r).floor().max(0.0) as usize, ((cx + r).ceil().max(0.0) as usize).min(self.size));
        let (y_lo, y_hi) = ((cy - r).floor().max(0.0) as usize, ((cy + r).ceil().max(0.0) as usize).min(self.size));
        for y in y_lo..y_hi {
            for x in x_lo..x_hi {
                let d = ((x as f32 + 0.5 - cx).powi(2) + (y as f32 + 0.5 - cy).powi(2)).sqrt();
                let a = if d <= inner {
                    1.0
                } else if d >= r {
                    0.0
                } else {
                    let t = (r - d) / (r - inner).max(1e-6);
                    t * t * (3.0 - 2.0 * t)
                };
                if a <= 0.0 {
                    continue;
                }
                let i = (y * self.size + x) * 3;
                for (p, &c) in self.pixels[i..i + 3].iter_mut().zip(colour.iter()) {
                    let old = *p as f32;
                    *p = (old + (c as f32 - old) * a).round().clamp(0.0, 255.0) as u8;
                }
            }
        }
    }
}
