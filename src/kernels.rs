//! CPU kernels for decode steps (`src/kernels.cpp`), where a step's batch of a few rows meets
//! the weights and the cache:
//!
//! - **Panel products.** A decode step multiplies B rows by every weight once. libtorch's
//!   products for a few rows repack the weight at every call (on this project's 2-core CPU the
//!   packing took more time than the arithmetic: P's image head, 8,192 × 256 at 16 rows,
//!   ~1.0 ms); [`PackedLinear`] packs it once per sampling run into panels of 16 outputs, which a
//!   step streams in order with a tile of 48 outputs × 8 rows held in registers, reading the
//!   input rows in place and writing the result row-major (no transposed copy before or after).
//!   A weight whose values are all bf16 (a stored model's) is packed in bf16 panels and widened
//!   in registers: the same products, half the bytes.
//! - **Block attention.** A sparse layer's step reads the caption's keys and a few image keys
//!   per row and head; in libtorch ops that is a dozen small products, views and copies per
//!   layer. [`block_attention`] does the scores, softmax and weighted values of every row and
//!   head in one pass over the cache, reading a caption group's keys from one row.
//!
//! - **The rest of a step.** A decode step's other work was a libtorch call each, a few
//!   microseconds of dispatch for a few hundred numbers: the keys and values are written into
//!   the cache by [`block_attention_step`] (from the qkv product's rows, no split or copy),
//!   GELU and the residual sums happen in the products' epilogues
//!   ([`PackedLinear::forward_gelu`], [`PackedLinear::forward_add`]), and [`layer_norm`] runs
//!   on the calling thread.
//!
//! All compute every row with the same instructions in the same order whatever the batch
//! (a sample does not depend on its neighbours or the batch size), with AVX-512 or AVX2 chosen
//! at run time and a baseline build for other CPUs. Each returns an error (never panics) when
//! handed tensors it does not take; callers then use libtorch's ops.

use std::ffi::{c_char, c_void};

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

type Handle = *const c_void;

unsafe extern "C" {
    fn tessera_free_message(m: *mut c_char);
    fn tessera_kernels_isa() -> i32;
    fn tessera_pack_panels(w: Handle, narrow: i32, out: *mut *mut c_void) -> *mut c_char;
    fn tessera_panel_linear(
        x: Handle,
        packed: Handle,
        bias: Handle,
        out_features: i64,
        act: i32,
        residual: Handle,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn tessera_layer_norm(x: Handle, w: Handle, b: Handle, eps: f64, out: *mut *mut c_void) -> *mut c_char;
    fn tessera_block_attention(
        q: Handle,
        kv: Handle,
        write: i32,
        write_pos: i64,
        pos: *const i64,
        n_pos: i64,
        n_caption: i64,
        caption_src: *const i64,
        scale: f64,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn tessera_draw_rows(logits: Handle, uniforms: Handle, out: *mut *mut c_void) -> *mut c_char;
}

/// A new tensor from the shim, or its message as an error naming `what`.
fn take(what: &str, m: *mut c_char, out: *mut c_void) -> Result<Tensor> {
    if !m.is_null() {
        // SAFETY: a non-null message is a NUL-terminated string from malloc, freed here once.
        let text = unsafe {
            let s = std::ffi::CStr::from_ptr(m).to_string_lossy().into_owned();
            tessera_free_message(m);
            s
        };
        return Err(Error::Invalid(format!("{what}: {}", text.lines().next().unwrap_or("failed"))));
    }
    if out.is_null() {
        return Err(Error::Invalid(format!("{what}: no result")));
    }
    // SAFETY: on success the shim wrote a tensor it allocated, owned from here on.
    Ok(unsafe { Tensor::from_ptr(out.cast()) })
}

/// The instruction set the kernels use on this CPU: "avx512", "avx2" or "baseline".
pub fn isa() -> &'static str {
    // SAFETY: no arguments; reads the CPU's feature flags.
    match unsafe { tessera_kernels_isa() } {
        4 => "avx512",
        3 => "avx2",
        _ => "baseline",
    }
}

/// Whether the kernels take tensors of this device and dtype (f32 on the CPU).
pub fn applies(device: Device, kind: Kind) -> bool {
    device == Device::Cpu && kind == Kind::Float
}

/// A linear layer's weight packed for [`PackedLinear::forward`] (f32 inputs and outputs, CPU):
/// in bf16 panels when every value of the weight is a bf16 (as weights stored in bf16 are,
/// the embedded default model's among them) — half the bytes a decode step reads, widened in
/// registers to the same f32 values, so the same products bit for bit — else in f32 panels.
#[derive(Debug)]
pub struct PackedLinear {
    panels: Tensor,
    bias: Option<Tensor>,
    out_features: i64,
    in_features: i64,
}

impl PackedLinear {
    /// Packs `weight` [O, I] (and keeps `bias` [O]); the weight is read now, not later.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        Self::pack(weight, bias, true)
    }

    /// [`PackedLinear::new`] in f32 panels whatever the weight's values (the reference the
    /// bf16 panels are checked against).
    pub fn new_f32(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        Self::pack(weight, bias, false)
    }

    fn pack(weight: &Tensor, bias: Option<&Tensor>, narrow: bool) -> Result<Self> {
        let (o, i) = weight.size2().map_err(|e| Error::Invalid(format!("packing a weight: {e}")))?;
        let mut out = std::ptr::null_mut();
        // SAFETY: `weight` is a live tensor for the call; `out` receives one new handle.
        let m = unsafe { tessera_pack_panels(weight.as_ptr() as Handle, i32::from(narrow), &mut out) };
        let panels = take("packing a weight", m, out)?;
        let bias = bias.map(|b| b.detach().copy());
        Ok(Self { panels, bias, out_features: o, in_features: i })
    }

    /// Whether the weight sits in bf16 panels.
    pub fn is_bf16(&self) -> bool {
        self.panels.kind() == Kind::Int16
    }

    /// `x·Wᵀ + b` for `x` [.., I]: [.., O].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.product(x, false, None)
    }

    /// `GELU(x·Wᵀ + b)` (the exact form, x·Φ(x)) for `x` [.., I]: [.., O], the activation
    /// applied to the outputs while they are still in registers.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        self.product(x, true, None)
    }

    /// `residual + (x·Wᵀ + b)` for `x` [.., I] and `residual` [.., O] (a block's residual
    /// stream): the same bits as adding after the product, without another pass.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.product(x, false, Some(residual))
    }

    fn product(&self, x: &Tensor, gelu: bool, residual: Option<&Tensor>) -> Result<Tensor> {
        let shape = x.size();
        if shape.last() != Some(&self.in_features) {
            return Err(Error::Invalid(format!(
                "panel product: input {shape:?} for a weight of {} inputs",
                self.in_features
            )));
        }
        let x2 = x.reshape([-1, self.in_features]);
        let mut want = shape.clone();
        if let Some(last) = want.last_mut() {
            *last = self.out_features;
        }
        let r2 = match residual {
            Some(r) if r.size() == want => Some(r.reshape([-1, self.out_features])),
            Some(r) => {
                return Err(Error::Invalid(format!("panel product: residual {:?} for an output {want:?}", r.size())));
            }
            None => None,
        };
        let res = r2.as_ref().map_or(std::ptr::null(), |r| r.as_ptr() as Handle);
        let bias = self.bias.as_ref().map_or(std::ptr::null(), |b| b.as_ptr() as Handle);
        let mut out = std::ptr::null_mut();
        // SAFETY: every handle is a live tensor borrowed for the call (the bias and residual
        // may be null, which the shim takes as none); `out` receives one new handle.
        let m = unsafe {
            tessera_panel_linear(
                x2.as_ptr() as Handle,
                self.panels.as_ptr() as Handle,
                bias,
                self.out_features,
                i32::from(gelu),
                res,
                &mut out,
            )
        };
        Ok(take("panel product", m, out)?.view(want.as_slice()))
    }
}

/// Attention of one query per row and head, `q` [B, H, D], over keys and values of the cache
/// `kv` [2, B, H, L, D]: the caption's keys `0..n_caption` read from row `caption_src[b]` (a row
/// that holds the same caption as row b; b itself when none is shared), then row b's own keys
/// at `positions`; one softmax over them all, scaled by `1/√D`. Returns [B, H, D].
pub fn block_attention(
    q: &Tensor,
    kv: &Tensor,
    positions: &[i64],
    n_caption: usize,
    caption_src: &[i64],
) -> Result<Tensor> {
    attend(q, kv, None, positions, n_caption, caption_src)
}

/// Both block attention entry points: `write_pos` given, `q` is a step's qkv whose keys and
/// values the kernel writes into the cache there first.
fn attend(
    q: &Tensor,
    kv: &Tensor,
    write_pos: Option<usize>,
    positions: &[i64],
    n_caption: usize,
    caption_src: &[i64],
) -> Result<Tensor> {
    let size = kv.size();
    let b = size.get(1).copied().unwrap_or(0);
    if caption_src.len() as i64 != b {
        return Err(Error::Invalid(format!("block attention: {} caption rows for {b} rows", caption_src.len())));
    }
    let d = size.last().copied().unwrap_or(1).max(1);
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = std::ptr::null_mut();
    // SAFETY: the tensors are live for the call and the cache is written only inside its
    // bounds (the shim checks the sizes, the write position, every key position and caption
    // row against the cache); the slices' lengths are passed with them.
    let m = unsafe {
        tessera_block_attention(
            q.as_ptr() as Handle,
            kv.as_ptr() as Handle,
            i32::from(write_pos.is_some()),
            write_pos.unwrap_or(0) as i64,
            positions.as_ptr(),
            positions.len() as i64,
            n_caption as i64,
            caption_src.as_ptr(),
            scale,
            &mut out,
        )
    };
    take("block attention", m, out)
}

/// A decode step's [`block_attention`] from the step's `qkv` [B, 3·H·D] (each row: the
/// queries, keys and values, head by head, as the layer's product gives them): writes the keys
/// and values into the cache `kv` at `write_pos` (past the caption), then attends with the
/// queries. One call instead of splitting, copying and attending. Returns [B, H, D].
pub fn block_attention_step(
    qkv: &Tensor,
    kv: &Tensor,
    write_pos: usize,
    positions: &[i64],
    n_caption: usize,
    caption_src: &[i64],
) -> Result<Tensor> {
    attend(qkv, kv, Some(write_pos), positions, n_caption, caption_src)
}

/// Layer norm over the last dimension of `x` [.., C] with `weight` and `bias` [C] (f32, CPU):
/// the mean and variance of each row by two passes in f32, on the calling thread (a decode
/// step's few rows take less time than a libtorch call's dispatch). Returns [.., C].
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let shape = x.size();
    let c = shape.last().copied().unwrap_or(0);
    let x2 = x.reshape([-1, c.max(1)]);
    let mut out = std::ptr::null_mut();
    // SAFETY: the tensors are live for the call (the shim checks their sizes and dtypes); `out`
    // receives one new handle.
    let m = unsafe {
        tessera_layer_norm(x2.as_ptr() as Handle, weight.as_ptr() as Handle, bias.as_ptr() as Handle, eps, &mut out)
    };
    Ok(take("layer norm", m, out)?.view(shape.as_slice()))
}

/// One token per row of filtered logits [B, V] (f32, CPU; removed tokens −∞) by inverting the
/// CDF of their softmax at `uniforms` [B] or [B, 1]: the first token whose running probability
/// exceeds u (running sums in double, e^x in f32). Returns Int64 [B]. One pass over each row
/// instead of a softmax, a cumulative sum and a search in double over the whole vocabulary.
pub fn draw_rows(logits: &Tensor, uniforms: &Tensor) -> Result<Tensor> {
    let mut out = std::ptr::null_mut();
    // SAFETY: both tensors are live for the call; `out` receives one new handle.
    let m = unsafe { tessera_draw_rows(logits.as_ptr() as Handle, uniforms.as_ptr() as Handle, &mut out) };
    take("draw", m, out)
}
