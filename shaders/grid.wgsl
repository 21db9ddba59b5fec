// Token-grid overlay for the completion canvas, drawn through an egui paint callback.
// The callback's viewport is the canvas image rectangle, so one full-viewport triangle
// covers it; the fragment shader draws a line at every token-cell boundary and shades the
// cells that will be sampled (raster order from `keep` on).

struct Params {
    // Canvas rectangle size in physical pixels.
    size_px: vec2<f32>,
    // Cells per side, kept cells (raster order).
    grid: f32,
    keep: f32,
    line: vec4<f32>,
    shade: vec4<f32>,
};

@group(0) @binding(0) var<uniform> params: Params;

struct VsOut {
    @builtin(position) pos: vec4<f32>,
    @location(0) uv: vec2<f32>,
};

@vertex
fn vs_main(@builtin(vertex_index) i: u32) -> VsOut {
    // A triangle that covers the viewport: (-1,-1), (3,-1), (-1,3).
    let x = f32((i << 1u) & 2u) * 2.0 - 1.0;
    let y = f32(i & 2u) * 2.0 - 1.0;
    var out: VsOut;
    out.pos = vec4<f32>(x, y, 0.0, 1.0);
    out.uv = vec2<f32>((x + 1.0) * 0.5, (1.0 - y) * 0.5);
    return out;
}

@fragment
fn fs_main(in: VsOut) -> @location(0) vec4<f32> {
    let cell = in.uv * params.grid;
    let idx = floor(cell);
    // Distance to the nearest cell boundary, in physical pixels.
    let frac = abs(cell - round(cell));
    let px = frac * params.size_px / params.grid;
    let on_line = min(px.x, px.y) < 0.75;
    let token = idx.y * params.grid + idx.x;
    var colour = vec4<f32>(0.0);
    if (token >= params.keep) {
        colour = params.shade;
    }
    if (on_line) {
        colour = params.line;
    }
    // Premultiplied alpha, as egui blends.
    return vec4<f32>(colour.rgb * colour.a, colour.a);
}
