//! Drawing the app with egui: prompt and settings on the left, the completion canvas on the
//! right, the gallery in the middle, a status bar below, and the viewer, compare and notice
//! windows on top.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use eframe::egui::{
    self, Color32, ColorImage, Key, Modifiers, Pos2, Rect, Role, Sense, TextureHandle, TextureOptions, Vec2,
};

use super::canvas::Tool;
use super::{JobStatus, Level, SortMode, TesseraApp};

/// Gallery thumbnails as textures, for the rows on screen only; the least recently drawn
/// are dropped past a cap so thousands of samples cost no more GPU memory than a screenful.
#[derive(Default)]
pub struct ThumbCache {
    textures: HashMap<u64, (TextureHandle, u64)>,
    frame: u64,
    /// Per job: (rows, first seed) of the uploaded previews, and their textures.
    previews: HashMap<u64, ((usize, u64), Vec<TextureHandle>)>,
}

const THUMB_CAP: usize = 600;

impl ThumbCache {
    fn get(&mut self, ctx: &egui::Context, id: u64, size: usize, rgb: &[u8]) -> Option<TextureHandle> {
        self.frame += 1;
        if let Some((t, used)) = self.textures.get_mut(&id) {
            *used = self.frame;
            return Some(t.clone());
        }
        if rgb.len() != size * size * 3 {
            return None;
        }
        let tex =
            ctx.load_texture(format!("thumb-{id}"), ColorImage::from_rgb([size, size], rgb), TextureOptions::NEAREST);
        self.textures.insert(id, (tex.clone(), self.frame));
        if self.textures.len() > THUMB_CAP {
            let mut by_age: Vec<(u64, u64)> = self.textures.iter().map(|(k, (_, u))| (*u, *k)).collect();
            by_age.sort_unstable();
            for (_, k) in by_age.iter().take(self.textures.len() - THUMB_CAP) {
                self.textures.remove(k);
            }
        }
        Some(tex)
    }

    /// A running job's preview textures, uploaded again only when new rows arrived.
    fn previews(
        &mut self,
        ctx: &egui::Context,
        job: u64,
        rows: usize,
        images: &[(u64, Vec<u8>)],
    ) -> Vec<TextureHandle> {
        let key = (rows, images.first().map_or(0, |(seed, _)| *seed));
        let fresh = self.previews.get(&job).is_some_and(|(k, t)| *k == key && t.len() == images.len());
        if !fresh {
            let tex = images
                .iter()
                .map(|(seed, img)| {
                    let size = (img.len() / 3).isqrt();
                    let image = ColorImage::from_rgb([size, size], img);
                    ctx.load_texture(format!("preview-{job}-{seed}"), image, TextureOptions::NEAREST)
                })
                .collect();
            self.previews.insert(job, (key, tex));
        }
        self.previews.get(&job).map(|(_, t)| t.clone()).unwrap_or_default()
    }

    /// Drops the preview textures of jobs that no longer show previews.
    fn retain_previews(&mut self, live: &[u64]) {
        self.previews.retain(|job, _| live.contains(job));
    }
}

/// Zoom and pan of the canvas view, and its texture.
pub struct CanvasView {
    pub zoom: f32,
    pub pan: Vec2,
    texture: Option<(TextureHandle, u64)>,
    dragging_handle: bool,
}

impl Default for CanvasView {
    fn default() -> Self {
        Self { zoom: 1.0, pan: Vec2::ZERO, texture: None, dragging_handle: false }
    }
}

fn labelled(resp: &egui::Response, role: Role, label: String) {
    resp.widget_info(|| egui::WidgetInfo::labeled(role, true, label.clone()));
}

fn fmt_secs(s: f64) -> String {
    if !s.is_finite() {
        "–".into()
    } else if s < 60.0 {
        format!("{s:.1} s")
    } else {
        format!("{}:{:02} min", (s / 60.0) as u64, (s % 60.0) as u64)
    }
}

impl TesseraApp {
    /// Draws one frame (the whole window).
    pub fn show(&mut self, ui: &mut egui::Ui) {
        let started = Instant::now();
        self.set_context(ui.ctx());
        self.poll_worker();
        self.handle_input(ui);
        egui::Panel::top("menu").show(ui, |ui| self.menu_bar(ui));
        egui::Panel::bottom("status").show(ui, |ui| self.status_bar(ui));
        egui::Panel::left("prompt").resizable(true).default_size(330.0).show(ui, |ui| {
            egui::ScrollArea::vertical().id_salt("left-scroll").show(ui, |ui| self.prompt_panel(ui));
        });
        egui::Panel::right("canvas").resizable(true).default_size(360.0).show(ui, |ui| self.canvas_panel(ui));
        egui::CentralPanel::default().show(ui, |ui| self.gallery_panel(ui));
        self.viewer_window(ui.ctx());
        self.notices_area(ui.ctx());
        if self.is_busy() || self.loading.is_some() {
            ui.ctx().request_repaint_after(std::time::Duration::from_millis(100));
        }
        self.record_frame(started);
    }

    fn handle_input(&mut self, ui: &mut egui::Ui) {
        let (dropped, pasted) = ui.input(|i| {
            let dropped: Vec<std::path::PathBuf> = i.raw.dropped_files.iter().map(|f| f.path().to_path_buf()).collect();
            let pasted: Vec<Arc<ColorImage>> = i
                .events
                .iter()
                .filter_map(|e| if let egui::Event::PasteImage(img) = e { Some(img.clone()) } else { None })
                .collect();
            (dropped, pasted)
        });
        for p in dropped {
            self.import_image(&p);
        }
        for img in pasted {
            self.paste_image(&img);
        }
        if ui.input_mut(|i| i.consume_key(Modifiers::COMMAND, Key::Enter)) {
            self.generate();
        }
        if self.viewer.is_none() && !ui.ctx().egui_wants_keyboard_input() {
            if ui.input_mut(|i| i.consume_key(Modifiers::COMMAND | Modifiers::SHIFT, Key::Z)) {
                if let Some(c) = self.canvas.as_mut() {
                    c.redo();
                }
            } else if ui.input_mut(|i| i.consume_key(Modifiers::COMMAND, Key::Z))
                && let Some(c) = self.canvas.as_mut()
            {
                c.undo();
            }
        }
    }

    fn menu_bar(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            ui.heading("Tessera");
            ui.separator();
            if ui.button("Open model…").clicked() {
                self.dialog("model");
            }
            if ui.button("Default model").clicked() {
                self.load_model(super::worker::ModelSource::Embedded);
            }
            ui.separator();
            let n = self.selected().len();
            if ui.add_enabled(n > 0, egui::Button::new(format!("Export selected ({n})"))).clicked() {
                if self.settings.export_dir.is_some() {
                    self.export_selected();
                } else {
                    self.dialog("export");
                }
            }
            if ui.button("Export folder…").clicked() {
                self.dialog("export");
            }
            if let Some(d) = &self.settings.export_dir {
                ui.weak(format!("to {}", d.display()));
            }
            ui.separator();
            if ui.add_enabled(n >= 2, egui::Button::new("Compare")).clicked() {
                self.compare = true;
            }
            if ui.add_enabled(n > 0, egui::Button::new("Clear selection")).clicked() {
                for g in &mut self.gallery {
                    g.selected = false;
                }
            }
        });
    }

    fn status_bar(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            match (&self.model, &self.loading) {
                (_, Some((what, f))) => {
                    ui.add(egui::Spinner::new());
                    ui.label(what);
                    ui.add(egui::ProgressBar::new(*f).desired_width(100.0));
                }
                (Some(m), None) => {
                    ui.label(format!(
                        "{} · {}×{} px, {}×{} tokens · {:.1} M params · {} {}{}",
                        m.name,
                        m.image_size,
                        m.image_size,
                        m.grid,
                        m.grid,
                        m.params as f64 / 1e6,
                        m.device,
                        m.dtype,
                        if m.has_reranker { " · reranker" } else { " · no reranker" }
                    ));
                }
                (None, None) => {
                    ui.colored_label(Color32::LIGHT_RED, "no model loaded");
                }
            }
            ui.separator();
            if let Some(j) = self.jobs.iter().find(|j| j.status == JobStatus::Running) {
                ui.label(format!(
                    "tokens {}/{} · {:.0} tokens/s · {} left",
                    j.done,
                    j.total,
                    j.tokens_per_s,
                    fmt_secs(j.eta_s)
                ));
                let f = if j.total > 0 { j.done as f32 / j.total as f32 } else { 0.0 };
                ui.add(egui::ProgressBar::new(f).desired_width(160.0));
            } else {
                ui.label(format!("{} samples", self.gallery.len()));
            }
        });
    }

    fn prompt_panel(&mut self, ui: &mut egui::Ui) {
        let label = ui.label("Prompt");
        let edit = egui::TextEdit::multiline(&mut self.prompt)
            .desired_rows(4)
            .desired_width(f32::INFINITY)
            .hint_text("a small red circle above a large green square");
        ui.add(edit).labelled_by(label.id);
        match self.prompt_tokens() {
            Some((n, true, len)) => {
                ui.colored_label(Color32::from_rgb(240, 170, 40), format!("{n}/{len} tokens: the end will be cut"));
            }
            Some((n, false, len)) => {
                ui.weak(format!("{n}/{len} tokens"));
            }
            None => {}
        }
        ui.horizontal(|ui| {
            let can = self.model.is_some() && !self.prompt.trim().is_empty();
            if ui.add_enabled(can, egui::Button::new("Generate")).on_hover_text("Ctrl+Enter").clicked() {
                self.generate();
            }
            if ui.add_enabled(self.is_busy(), egui::Button::new("Cancel all")).clicked() {
                self.cancel_all();
            }
            egui::ComboBox::from_id_salt("history")
                .selected_text("History")
                .width(90.0)
                .show_ui(ui, |ui| {
                    let mut chosen = None;
                    for h in self.history.iter().rev().take(50) {
                        if ui.selectable_label(false, h).clicked() {
                            chosen = Some(h.clone());
                        }
                    }
                    if let Some(h) = chosen {
                        self.prompt = h;
                    }
                })
                .response
                .on_hover_text("Earlier prompts");
        });
        ui.separator();
        let s = &mut self.settings;
        egui::Grid::new("settings").num_columns(2).show(ui, |ui| {
            let l = ui.label("Samples");
            ui.add(egui::DragValue::new(&mut s.n).range(1..=1024)).labelled_by(l.id);
            ui.end_row();
            let l = ui.label("Keep top");
            ui.add(egui::DragValue::new(&mut s.keep).range(1..=1024)).labelled_by(l.id);
            ui.end_row();
            let l = ui.label("Temperature");
            ui.add(egui::Slider::new(&mut s.temperature, 0.0..=2.0)).labelled_by(l.id);
            ui.end_row();
            let l = ui.label("Top-k");
            ui.add(egui::DragValue::new(&mut s.top_k).range(0..=100_000)).labelled_by(l.id).on_hover_text("0 = off");
            ui.end_row();
            let l = ui.label("Top-p");
            ui.add(egui::Slider::new(&mut s.top_p, 0.01..=1.0)).labelled_by(l.id);
            ui.end_row();
            let l = ui.label("Guidance");
            ui.add(egui::Slider::new(&mut s.guidance, 1.0..=8.0)).labelled_by(l.id).on_hover_text("1 = off");
            ui.end_row();
            let l = ui.label("Seed");
            ui.horizontal(|ui| {
                ui.checkbox(&mut s.random_seed, "random");
                ui.add_enabled(!s.random_seed, egui::DragValue::new(&mut s.seed)).labelled_by(l.id);
            });
            ui.end_row();
            let l = ui.label("Batch");
            ui.add(egui::DragValue::new(&mut s.chunk).range(1..=64))
                .labelled_by(l.id)
                .on_hover_text("samples drawn together; a cancel keeps finished batches");
            ui.end_row();
        });
        let model_sampling = self.model.as_ref().map(|m| m.sampling.clone());
        ui.horizontal(|ui| {
            if ui
                .button("512, keep best 32")
                .on_hover_text("The paper's workflow: draw 512 samples, keep the 32 the reranker likes best")
                .clicked()
            {
                (s.n, s.keep, s.chunk) = (512, 32, 64);
            }
            let differs = model_sampling.as_ref().is_some_and(|m| *m != s.sample_options());
            let disabled_hover = match &model_sampling {
                Some(_) => "Temperature, top-k, top-p and guidance are the loaded model's own",
                None => "No model loaded",
            };
            let button = ui.add_enabled(differs, egui::Button::new("Model's settings"));
            // the values are formatted only while the pointer is on the button
            let button = button.on_hover_ui(|ui| {
                if let Some(m) = &model_sampling {
                    ui.label(format!(
                        "Back to the loaded model's own sampling: temperature {}, top-k {}, top-p {}, guidance {}",
                        m.temperature, m.top_k, m.top_p, m.guidance
                    ));
                }
            });
            if button.on_disabled_hover_text(disabled_hover).clicked()
                && let Some(m) = &model_sampling
            {
                s.reset_to_model_sampling(m);
            }
        });
        ui.checkbox(&mut self.settings.use_canvas, "Complete the canvas");
        ui.separator();
        ui.heading("Queue");
        let mut cancel = None;
        for j in self.jobs.iter().rev().take(20) {
            ui.horizontal(|ui| {
                let state = match j.status {
                    JobStatus::Queued => "queued".to_string(),
                    JobStatus::Running => format!("{}/{}", j.done, j.total),
                    JobStatus::Done => "done".into(),
                    JobStatus::Cancelled => "cancelled".into(),
                    JobStatus::Failed => "failed".into(),
                };
                ui.label(format!("#{} {state}", j.id));
                if matches!(j.status, JobStatus::Queued | JobStatus::Running) {
                    let b = ui.small_button("Cancel");
                    labelled(&b, Role::Button, format!("Cancel job {}", j.id));
                    if b.clicked() {
                        cancel = Some(j.id);
                    }
                }
                // truncated to the panel's width, so a running job's longer row cannot widen
                // the panel (it used to, by a few pixels, depending on when a frame was drawn)
                ui.add(egui::Label::new(egui::RichText::new(&j.prompt).weak()).truncate()).on_hover_text(&j.prompt);
            });
            if !j.previews.is_empty() {
                let textures = self.thumbs.previews(ui.ctx(), j.id, j.preview_rows, &j.previews);
                ui.horizontal_wrapped(|ui| {
                    for ((seed, _), tex) in j.previews.iter().zip(&textures) {
                        ui.add(egui::Image::new(tex).fit_to_exact_size(Vec2::splat(56.0)))
                            .on_hover_text(format!("seed {seed}, {} rows", j.preview_rows));
                    }
                });
            }
        }
        let live: Vec<u64> = self.jobs.iter().filter(|j| !j.previews.is_empty()).map(|j| j.id).collect();
        self.thumbs.retain_previews(&live);
        if let Some(id) = cancel {
            self.cancel(id);
        }
    }

    fn canvas_panel(&mut self, ui: &mut egui::Ui) {
        ui.heading("Completion canvas");
        let Some(canvas) = self.canvas.as_mut() else {
            ui.label("The canvas appears once a model is loaded.");
            return;
        };
        let s = &mut self.settings;
        let mut open_dialog = false;
        ui.horizontal(|ui| {
            ui.selectable_value(&mut s.tool, Tool::Brush, "Brush");
            ui.selectable_value(&mut s.tool, Tool::Eraser, "Eraser");
            ui.selectable_value(&mut s.tool, Tool::Eyedropper, "Eyedropper");
        });
        ui.horizontal(|ui| {
            let l = ui.label("Size");
            ui.add(egui::Slider::new(&mut s.brush.radius, 0.5..=16.0)).labelled_by(l.id);
        });
        ui.horizontal(|ui| {
            let l = ui.label("Soft");
            ui.add(egui::Slider::new(&mut s.brush.softness, 0.0..=1.0)).labelled_by(l.id);
            let mut c = Color32::from_rgb(s.brush.colour[0], s.brush.colour[1], s.brush.colour[2]);
            let r = egui::color_picker::color_edit_button_srgba(ui, &mut c, egui::color_picker::Alpha::Opaque);
            labelled(&r, Role::ColorWell, "Brush colour".into());
            s.brush.colour = [c.r(), c.g(), c.b()];
        });
        ui.horizontal(|ui| {
            if ui.add_enabled(canvas.can_undo(), egui::Button::new("Undo")).clicked() {
                canvas.undo();
            }
            if ui.add_enabled(canvas.can_redo(), egui::Button::new("Redo")).clicked() {
                canvas.redo();
            }
            if ui.button("Clear").clicked() {
                canvas.clear();
            }
            if ui.button("Upload…").clicked() {
                open_dialog = true;
            }
            if ui.button("Fit").on_hover_text("Ctrl+wheel zooms, right-drag pans").clicked() {
                self.canvas_view.zoom = 1.0;
                self.canvas_view.pan = Vec2::ZERO;
            }
        });
        let (g, size) = (canvas.grid(), canvas.size());
        ui.horizontal(|ui| {
            let mut k = canvas.keep_tokens();
            let l = ui.label("Keep tokens");
            if ui.add(egui::Slider::new(&mut k, 0..=g * g)).labelled_by(l.id).changed() {
                canvas.set_keep_tokens(k);
            }
        });
        ui.weak(format!(
            "rows 0–{} kept{}; drag the orange handle (Shift+drag on the canvas) to move it",
            canvas.keep_tokens() / g,
            if canvas.keep_tokens() % g > 0 { format!(" + {} cells", canvas.keep_tokens() % g) } else { String::new() }
        ));
        if let Some(imp) = &canvas.import {
            ui.weak(format!(
                "{}: {}×{} px, centre crop {}×{} at ({}, {})",
                imp.name, imp.width, imp.height, imp.crop[2], imp.crop[2], imp.crop[0], imp.crop[1]
            ));
        }
        // The canvas itself: pixel-sharp, zoom with Ctrl+wheel, pan with the middle button.
        let view = &mut self.canvas_view;
        let avail = ui.available_size();
        let (rect, resp) = ui.allocate_exact_size(Vec2::new(avail.x, avail.y.max(200.0)), Sense::click_and_drag());
        labelled(&resp, Role::Canvas, "Canvas".into());
        if resp.hovered() {
            let z = ui.input(|i| i.zoom_delta());
            if z != 1.0 {
                view.zoom = (view.zoom * z).clamp(0.25, 16.0);
            }
        }
        if resp.dragged_by(egui::PointerButton::Middle) || resp.dragged_by(egui::PointerButton::Secondary) {
            view.pan += resp.drag_delta();
        }
        // Fit the canvas to the panel at zoom 1; whole screen pixels per canvas pixel keep
        // the display sharp.
        let ppp = ui.ctx().pixels_per_point();
        let fit = (rect.width().min(rect.height()) * ppp / size as f32).floor().max(1.0);
        let scale = (fit * view.zoom).round().max(1.0) / ppp;
        let side = size as f32 * scale;
        let origin = rect.center() - Vec2::splat(side / 2.0) + view.pan;
        let img_rect = Rect::from_min_size(origin, Vec2::splat(side));
        let need = view.texture.as_ref().is_none_or(|(_, rev)| *rev != canvas.revision);
        if need {
            let tex = ui.ctx().load_texture(
                "canvas",
                ColorImage::from_rgb([size, size], canvas.pixels()),
                TextureOptions::NEAREST,
            );
            view.texture = Some((tex, canvas.revision));
        }
        let painter = ui.painter_at(rect);
        painter.rect_filled(rect, 0.0, Color32::from_gray(40));
        if let Some((tex, _)) = &view.texture {
            painter.image(tex.id(), img_rect, Rect::from_min_max(Pos2::ZERO, Pos2::new(1.0, 1.0)), Color32::WHITE);
        }
        let cell = side / g as f32;
        let keep = canvas.keep_tokens();
        if self.grid_gpu {
            painter.add(super::grid::overlay(img_rect, g, keep));
        } else {
            super::grid::overlay_fallback(&painter, img_rect, g, keep);
        }
        // The handle: a staircase line where sampling begins.
        let (hr, hc) = (keep / g, keep % g);
        let y1 = img_rect.top() + hr as f32 * cell;
        let x1 = img_rect.left() + hc as f32 * cell;
        let stroke = egui::Stroke::new(2.5, Color32::from_rgb(255, 140, 0));
        painter.line_segment([Pos2::new(x1, y1), Pos2::new(img_rect.right(), y1)], stroke);
        if hr < g {
            painter.line_segment([Pos2::new(x1, y1), Pos2::new(x1, y1 + cell)], stroke);
            painter.line_segment([Pos2::new(img_rect.left(), y1 + cell), Pos2::new(x1, y1 + cell)], stroke);
        }
        let to_canvas = |p: Pos2| ((p.x - img_rect.left()) / scale, (p.y - img_rect.top()) / scale);
        let shift = ui.input(|i| i.modifiers.shift);
        if let Some(p) = resp.interact_pointer_pos() {
            let (x, y) = to_canvas(p);
            let near_handle = (p.y - y1).abs() < 8.0 || (p.y - (y1 + cell)).abs() < 8.0;
            if resp.drag_started_by(egui::PointerButton::Primary) {
                view.dragging_handle = shift || near_handle && !resp.clicked();
            }
            if resp.is_pointer_button_down_on() && ui.input(|i| i.pointer.primary_down()) {
                if view.dragging_handle || shift {
                    canvas.set_keep_tokens(canvas.handle_at(x, y));
                } else if s.tool == Tool::Eyedropper {
                    if let Some(c) = canvas.pixel(x.max(0.0) as usize, y.max(0.0) as usize) {
                        s.brush.colour = c;
                    }
                } else if (0.0..size as f32).contains(&x) && (0.0..size as f32).contains(&y) {
                    canvas.stroke_to(s.tool, &s.brush, x, y);
                }
            }
        }
        if resp.drag_stopped() || resp.clicked() || !ui.input(|i| i.pointer.primary_down()) {
            canvas.end_stroke();
            view.dragging_handle = false;
        }
        if open_dialog {
            self.dialog("image");
        }
    }

    fn gallery_panel(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            ui.label("Sort:");
            let before = (self.settings.sort, self.settings.show_all);
            ui.selectable_value(&mut self.settings.sort, SortMode::Score, "best first");
            ui.selectable_value(&mut self.settings.sort, SortMode::Newest, "newest first");
            ui.checkbox(&mut self.settings.show_all, "show all samples");
            if before != (self.settings.sort, self.settings.show_all) {
                self.resort();
            }
            let l = ui.label("Size");
            ui.add(egui::Slider::new(&mut self.settings.thumb, 48.0..=256.0)).labelled_by(l.id);
        });
        ui.separator();
        let order = self.order().to_vec();
        if order.is_empty() {
            ui.centered_and_justified(|ui| {
                ui.weak("Type a prompt and press Generate (Ctrl+Enter). Samples appear here, best first.");
            });
            return;
        }
        let thumb = self.settings.thumb;
        let spacing = ui.spacing().item_spacing;
        let per_row = ((ui.available_width() + spacing.x) / (thumb + spacing.x)).floor().max(1.0) as usize;
        let rows = order.len().div_ceil(per_row);
        let row_h = thumb + 18.0;
        let mut open = None;
        let mut send = None;
        egui::ScrollArea::vertical().id_salt("gallery").auto_shrink([false, false]).show_rows(
            ui,
            row_h,
            rows,
            |ui, range| {
                for r in range {
                    ui.horizontal(|ui| {
                        for &i in order.iter().skip(r * per_row).take(per_row) {
                            ui.vertical(|ui| {
                                ui.set_width(thumb);
                                let (rect, resp) = ui.allocate_exact_size(Vec2::splat(thumb), Sense::click());
                                let item = &self.gallery[i];
                                let (id, size, seed, selected) = (item.id, item.size, item.params.seed, item.selected);
                                let label = format!("sample {seed}");
                                resp.widget_info(|| {
                                    egui::WidgetInfo::selected(Role::Image, true, selected, label.clone())
                                });
                                if ui.is_rect_visible(rect)
                                    && let Some(rgb) = self.item_rgb(i)
                                    && let Some(tex) = self.thumbs.get(ui.ctx(), id, size, &rgb)
                                {
                                    ui.painter().image(
                                        tex.id(),
                                        rect,
                                        Rect::from_min_max(Pos2::ZERO, Pos2::new(1.0, 1.0)),
                                        Color32::WHITE,
                                    );
                                }
                                if selected {
                                    ui.painter().rect_stroke(
                                        rect,
                                        2.0,
                                        egui::Stroke::new(3.0, Color32::from_rgb(80, 160, 255)),
                                        egui::StrokeKind::Inside,
                                    );
                                }
                                if resp.double_clicked() {
                                    open = Some(id);
                                } else if resp.clicked() {
                                    self.gallery[i].selected = !selected;
                                }
                                resp.context_menu(|ui| {
                                    if ui.button("Open").clicked() {
                                        open = Some(id);
                                    }
                                    if ui.button("Complete from here").clicked() {
                                        send = Some(i);
                                    }
                                });
                                let item = &self.gallery[i];
                                let score = item.params.score.map_or("–".into(), |s| format!("{s:.2}"));
                                ui.small(format!("{score} · seed {}", item.params.seed));
                            });
                        }
                    });
                }
            },
        );
        if let Some(id) = open {
            self.viewer = Some(id);
        }
        if let Some(i) = send {
            self.complete_from(i);
        }
    }

    fn viewer_window(&mut self, ctx: &egui::Context) {
        if let Some(id) = self.viewer {
            let order = self.order().to_vec();
            let pos = order.iter().position(|&i| self.gallery[i].id == id);
            let Some(pos) = pos else {
                self.viewer = None;
                return;
            };
            let (left, right, esc) = ctx
                .input(|i| (i.key_pressed(Key::ArrowLeft), i.key_pressed(Key::ArrowRight), i.key_pressed(Key::Escape)));
            let pos = if left && pos > 0 {
                pos - 1
            } else if right && pos + 1 < order.len() {
                pos + 1
            } else {
                pos
            };
            let i = order[pos];
            self.viewer = Some(self.gallery[i].id);
            let mut open = !esc;
            let mut send = false;
            let rgb = self.item_rgb(i);
            let item = self.gallery[i].clone();
            egui::Window::new("Sample").open(&mut open).default_size([520.0, 600.0]).show(ctx, |ui| {
                ui.label(format!(
                    "{} · seed {} · score {} · {}/{}",
                    item.params.prompt,
                    item.params.seed,
                    item.params.score.map_or("–".into(), |s| format!("{s:.3}")),
                    pos + 1,
                    order.len()
                ));
                ui.weak("Left and Right arrows browse, Esc closes");
                if let Some(rgb) = rgb
                    && let Some(tex) = self.thumbs.get(ui.ctx(), item.id, item.size, &rgb)
                {
                    let side = ui.available_width().min(ui.available_height() - 30.0).max(64.0);
                    ui.add(egui::Image::new(&tex).fit_to_exact_size(Vec2::splat(side)));
                }
                if ui.button("Complete from here").clicked() {
                    send = true;
                }
            });
            if send {
                self.complete_from(i);
            }
            if !open {
                self.viewer = None;
            }
        }
        if self.compare {
            let sel = self.selected();
            let mut open = sel.len() >= 2;
            let mut shown = Vec::new();
            for &i in sel.iter().take(6) {
                if let Some(rgb) = self.item_rgb(i) {
                    shown.push((self.gallery[i].clone(), rgb));
                }
            }
            egui::Window::new("Compare").open(&mut open).show(ctx, |ui| {
                ui.horizontal(|ui| {
                    for (item, rgb) in &shown {
                        ui.vertical(|ui| {
                            if let Some(tex) = self.thumbs.get(ui.ctx(), item.id, item.size, rgb) {
                                ui.add(egui::Image::new(&tex).fit_to_exact_size(Vec2::splat(256.0)));
                            }
                            ui.small(format!(
                                "seed {} · score {}",
                                item.params.seed,
                                item.params.score.map_or("–".into(), |s| format!("{s:.3}"))
                            ));
                        });
                    }
                });
            });
            self.compare = open;
        }
    }

    fn notices_area(&mut self, ctx: &egui::Context) {
        self.notices.retain(|n| n.level == Level::Error || n.at.elapsed().as_secs() < 6);
        if self.notices.is_empty() {
            return;
        }
        let mut dismiss = None;
        egui::Area::new(egui::Id::unique("notices")).anchor(egui::Align2::RIGHT_BOTTOM, [-12.0, -40.0]).show(
            ctx,
            |ui| {
                for (k, n) in self.notices.iter().enumerate().rev().take(5) {
                    egui::Frame::popup(ui.style()).show(ui, |ui| {
                        ui.horizontal(|ui| {
                            let colour =
                                if n.level == Level::Error { Color32::LIGHT_RED } else { ui.visuals().text_color() };
                            ui.colored_label(colour, &n.text);
                            if n.level == Level::Error && ui.small_button("Dismiss").clicked() {
                                dismiss = Some(k);
                            }
                        });
                    });
                }
            },
        );
        if let Some(k) = dismiss {
            self.notices.remove(k);
        }
        ctx.request_repaint_after(std::time::Duration::from_millis(500));
    }
}
