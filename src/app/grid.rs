//! The canvas' token-grid overlay: a WGSL shader (`shaders/grid.wgsl`) drawn through an
//! egui wgpu paint callback, with a painter fallback when no wgpu renderer is present.

use eframe::egui::{self, Color32, Pos2, Rect};
use eframe::egui_wgpu::{self, wgpu};

const LINE: [f32; 4] = [0.1, 0.1, 0.1, 0.35];
const SHADE: [f32; 4] = [0.25, 0.45, 1.0, 0.22];

struct GridGpu {
    pipeline: wgpu::RenderPipeline,
    bind_group: wgpu::BindGroup,
    uniforms: wgpu::Buffer,
}

/// Builds the overlay pipeline and stores it in the renderer's callback resources; returns
/// false when there is no wgpu renderer.
pub fn install(rs: Option<&egui_wgpu::RenderState>) -> bool {
    let Some(rs) = rs else { return false };
    let device = &rs.device;
    let shader = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("tessera-grid"),
        source: wgpu::ShaderSource::Wgsl(include_str!("../../shaders/grid.wgsl").into()),
    });
    let layout_entry = wgpu::BindGroupLayoutEntry {
        binding: 0,
        visibility: wgpu::ShaderStages::VERTEX | wgpu::ShaderStages::FRAGMENT,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Uniform,
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    };
    let bgl = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some("tessera-grid"),
        entries: &[layout_entry],
    });
    let layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some("tessera-grid"),
        bind_group_layouts: &[Some(&bgl)],
        immediate_size: 0,
    });
    let target = wgpu::ColorTargetState {
        format: rs.target_format,
        blend: Some(wgpu::BlendState::PREMULTIPLIED_ALPHA_BLENDING),
        write_mask: wgpu::ColorWrites::ALL,
    };
    let pipeline = device.create_render_pipeline(&wgpu::RenderPipelineDescriptor {
        label: Some("tessera-grid"),
        layout: Some(&layout),
        vertex: wgpu::VertexState {
            module: &shader,
            entry_point: Some("vs_main"),
            compilation_options: wgpu::PipelineCompilationOptions::default(),
            buffers: &[],
        },
        primitive: wgpu::PrimitiveState::default(),
        depth_stencil: None,
        multisample: wgpu::MultisampleState::default(),
        fragment: Some(wgpu::FragmentState {
            module: &shader,
            entry_point: Some("fs_main"),
            compilation_options: wgpu::PipelineCompilationOptions::default(),
            targets: &[Some(target)],
        }),
        multiview_mask: None,
        cache: None,
    });
    let uniforms = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("tessera-grid"),
        size: 48,
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("tessera-grid"),
        layout: &bgl,
        entries: &[wgpu::BindGroupEntry { binding: 0, resource: uniforms.as_entire_binding() }],
    });
    rs.renderer.write().callback_resources.insert(GridGpu { pipeline, bind_group, uniforms });
    true
}

struct GridCallback {
    size_pt: [f32; 2],
    grid: f32,
    keep: f32,
}

impl GridCallback {
    fn bytes(&self, ppp: f32) -> Vec<u8> {
        let vals = [self.size_pt[0] * ppp, self.size_pt[1] * ppp, self.grid, self.keep];
        vals.iter().chain(LINE.iter()).chain(SHADE.iter()).flat_map(|v| v.to_le_bytes()).collect()
    }
}

impl egui_wgpu::CallbackTrait for GridCallback {
    fn prepare(
        &self,
        _device: &wgpu::Device,
        queue: &wgpu::Queue,
        screen: &egui_wgpu::ScreenDescriptor,
        _encoder: &mut wgpu::CommandEncoder,
        resources: &mut egui_wgpu::CallbackResources,
    ) -> Vec<wgpu::CommandBuffer> {
        if let Some(r) = resources.get::<GridGpu>() {
            queue.write_buffer(&r.uniforms, 0, &self.bytes(screen.pixels_per_point));
        }
        Vec::new()
    }

    fn paint(
        &self,
        _info: egui::PaintCallbackInfo,
        pass: &mut wgpu::RenderPass<'static>,
        resources: &egui_wgpu::CallbackResources,
    ) {
        if let Some(r) = resources.get::<GridGpu>() {
            pass.set_pipeline(&r.pipeline);
            pass.set_bind_group(0, &r.bind_group, &[]);
            pass.draw(0..3, 0..1);
        }
    }
}

/// The overlay for a canvas drawn at `rect` with a `grid`×`grid` token grid, `keep` kept.
pub fn overlay(rect: Rect, grid: usize, keep: usize) -> egui::Shape {
    let cb = GridCallback { size_pt: [rect.width(), rect.height()], grid: grid as f32, keep: keep as f32 };
    egui_wgpu::Callback::new_paint_callback(rect, cb).into()
}

/// The same overlay drawn with egui shapes (no wgpu renderer).
pub fn overlay_fallback(painter: &egui::Painter, rect: Rect, grid: usize, keep: usize) {
    let g = grid.max(1);
    let cell = rect.width() / g as f32;
    let shade = Color32::from_rgba_unmultiplied(64, 115, 255, 56);
    for t in keep..g * g {
        let (r, c) = ((t / g) as f32, (t % g) as f32);
        let min = Pos2::new(rect.left() + c * cell, rect.top() + r * cell);
        painter.rect_filled(Rect::from_min_size(min, egui::Vec2::splat(cell)), 0.0, shade);
    }
    let line = egui::Stroke::new(1.0, Color32::from_rgba_unmultiplied(25, 25, 25, 90));
    for k in 0..=g {
        let o = k as f32 * cell;
        painter.line_segment([Pos2::new(rect.left() + o, rect.top()), Pos2::new(rect.left() + o, rect.bottom())], line);
        painter.line_segment([Pos2::new(rect.left(), rect.top() + o), Pos2::new(rect.right(), rect.top() + o)], line);
    }
}
