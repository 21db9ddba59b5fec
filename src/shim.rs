//! What tch 0.24 does not bind, from `src/shim.cpp` (compiled by build.rs against the same
//! libtorch): the fused AdamW update and multi-tensor ("foreach") kernels, which update every
//! parameter in a few launches instead of several per tensor, and CUDA graph capture and
//! replay, which turn a decode step's hundreds of kernel launches into one. The binary does not
//! link libtorch's CUDA libraries: the shim opens them before `main` where an NVIDIA driver is
//! installed ([`cuda_libraries`] says what it found).
//!
//! Tensors cross as tch's handles (`at::Tensor*`); every C++ exception comes back as an
//! [`Error::Invalid`] naming the operation.

use std::ffi::{CStr, c_char, c_void};

use tch::{Device, Tensor};

use crate::error::{Error, Result};

type Handle = *const c_void;

unsafe extern "C" {
    fn tessera_free_message(m: *mut c_char);
    fn tessera_fused_adamw(
        params: *const Handle,
        grads: *const Handle,
        m: *const Handle,
        v: *const Handle,
        n: usize,
        step: Handle,
        lr: f64,
        beta1: f64,
        beta2: f64,
        wd: f64,
        eps: f64,
    ) -> *mut c_char;
    fn tessera_foreach_norm(ts: *const Handle, n: usize, out: *mut *mut c_void) -> *mut c_char;
    fn tessera_foreach_mul_tensor(ts: *const Handle, n: usize, k: Handle) -> *mut c_char;
    fn tessera_foreach_lerp(a: *const Handle, b: *const Handle, n: usize, w: f64) -> *mut c_char;
    fn tessera_cuda_status(loaded: *mut i32, registered: *mut i32, graphs: *mut i32) -> *const c_char;
    fn tessera_stream_enter(device: i32, out: *mut *mut c_void) -> *mut c_char;
    fn tessera_stream_exit(s: *mut c_void) -> *mut c_char;
    fn tessera_graph_new(out: *mut *mut c_void) -> *mut c_char;
    fn tessera_graph_begin(g: *mut c_void) -> *mut c_char;
    fn tessera_graph_end(g: *mut c_void) -> *mut c_char;
    fn tessera_graph_replay(g: *mut c_void) -> *mut c_char;
    fn tessera_graph_free(g: *mut c_void) -> *mut c_char;
    fn tessera_ops_begin() -> *mut c_char;
    fn tessera_ops_end(out: *mut *mut c_char) -> *mut c_char;
}

/// The text of a string the shim malloc'd (a message, a recording), freed here; `None` for null.
fn take_string(m: *mut c_char) -> Option<String> {
    if m.is_null() {
        return None;
    }
    // SAFETY: a non-null string from the shim is NUL-terminated and from malloc, freed here once.
    Some(unsafe {
        let s = CStr::from_ptr(m).to_string_lossy().into_owned();
        tessera_free_message(m);
        s
    })
}

/// Turns the shim's returned message (null = success) into a result.
fn check(what: &str, m: *mut c_char) -> Result<()> {
    match take_string(m) {
        None => Ok(()),
        Some(text) => Err(Error::Invalid(format!("{what}: {}", text.lines().next().unwrap_or("failed")))),
    }
}

fn handles<T: std::borrow::Borrow<Tensor>>(ts: &[T]) -> Vec<Handle> {
    ts.iter().map(|t| t.borrow().as_ptr() as Handle).collect()
}

/// One AdamW update of every tensor in `params`, in place (libtorch's fused kernel): moments
/// `m`, `v`, decoupled weight decay `wd`, bias corrections for update number `step` (a float
/// scalar tensor on the parameters' device). All lists have the same length.
#[allow(clippy::too_many_arguments)]
pub fn fused_adamw<T: std::borrow::Borrow<Tensor>>(
    params: &[T],
    grads: &[T],
    m: &[T],
    v: &[T],
    step: &Tensor,
    lr: f64,
    betas: (f64, f64),
    wd: f64,
    eps: f64,
) -> Result<()> {
    let n = params.len();
    if grads.len() != n || m.len() != n || v.len() != n {
        return Err(Error::Invalid("fused AdamW: lists of different lengths".into()));
    }
    if n == 0 {
        return Ok(());
    }
    let (p, g, m, v) = (handles(params), handles(grads), handles(m), handles(v));
    // SAFETY: every handle is a live tensor borrowed for the call; n matches each list.
    let r = unsafe {
        tessera_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            n,
            step.as_ptr() as Handle,
            lr,
            betas.0,
            betas.1,
            wd,
            eps,
        )
    };
    check("fused AdamW", r)
}

/// The 2-norm of each tensor (one multi-tensor kernel), as scalar tensors on their devices.
pub fn foreach_norm<T: std::borrow::Borrow<Tensor>>(ts: &[T]) -> Result<Vec<Tensor>> {
    if ts.is_empty() {
        return Ok(Vec::new());
    }
    let h = handles(ts);
    let mut out: Vec<*mut c_void> = vec![std::ptr::null_mut(); ts.len()];
    // SAFETY: the handles are live; `out` has room for one new handle per input.
    check("foreach norm", unsafe { tessera_foreach_norm(h.as_ptr(), h.len(), out.as_mut_ptr()) })?;
    // SAFETY: on success each slot holds a tensor allocated by the shim, owned from here on.
    Ok(out.into_iter().map(|p| unsafe { Tensor::from_ptr(p.cast()) }).collect())
}

/// Multiplies every tensor in place by the one-element tensor `k` (no host synchronisation).
pub fn foreach_mul_<T: std::borrow::Borrow<Tensor>>(ts: &[T], k: &Tensor) -> Result<()> {
    if ts.is_empty() {
        return Ok(());
    }
    let h = handles(ts);
    // SAFETY: the handles are live for the call.
    check("foreach mul", unsafe { tessera_foreach_mul_tensor(h.as_ptr(), h.len(), k.as_ptr() as Handle) })
}

/// `a[i] += w · (b[i] − a[i])` in place for every pair.
pub fn foreach_lerp_<T: std::borrow::Borrow<Tensor>>(a: &[T], b: &[T], w: f64) -> Result<()> {
    if a.len() != b.len() {
        return Err(Error::Invalid("foreach lerp: lists of different lengths".into()));
    }
    if a.is_empty() {
        return Ok(());
    }
    let (ha, hb) = (handles(a), handles(b));
    // SAFETY: the handles are live for the call; both lists have `len` entries.
    check("foreach lerp", unsafe { tessera_foreach_lerp(ha.as_ptr(), hb.as_ptr(), ha.len(), w) })
}

/// What the start-up loading of libtorch's CUDA libraries found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CudaLibraries {
    /// libtorch_cuda is in the process.
    pub loaded: bool,
    /// libtorch's CUDA backend is registered (its queries answer; a device need not exist).
    pub registered: bool,
    /// The CUDA graph functions were found (the CUDA half of the shim).
    pub graphs: bool,
    /// One line for people: what was loaded, or why not.
    pub note: String,
}

/// What the start-up loading of libtorch's CUDA libraries found. They are opened before `main`
/// where `libcuda.so.1` (the NVIDIA driver) can be opened, never on a machine without one;
/// `TESSERA_CUDA=0` keeps them out, `TESSERA_CUDA=force` loads them without a driver.
pub fn cuda_libraries() -> CudaLibraries {
    let (mut loaded, mut registered, mut graphs) = (0, 0, 0);
    // SAFETY: writes three ints; the note is a NUL-terminated string that lives as long as the
    // process (it is set once, before any caller can see it).
    let note = unsafe {
        let p = tessera_cuda_status(&mut loaded, &mut registered, &mut graphs);
        if p.is_null() { String::new() } else { CStr::from_ptr(p).to_string_lossy().into_owned() }
    };
    CudaLibraries { loaded: loaded != 0, registered: registered != 0, graphs: graphs != 0, note }
}

/// One ATen operation that [`record_ops`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpCall {
    /// 0 for an operation called from Rust, 1 for one that such an operation called, and so on.
    pub depth: usize,
    /// libtorch's name, as `aten::addmm`.
    pub name: String,
}

/// Runs `f` and returns what it returned with the ATen operations it called on this thread, in
/// order (libtorch's record-function hooks; nothing is recorded on other threads).
/// [`working_ops`] picks those that launch work. Recordings do not nest.
pub fn record_ops<R>(f: impl FnOnce() -> R) -> Result<(R, Vec<OpCall>)> {
    /// Ends the recording if `f` unwinds, so that the thread can record again.
    struct Recording(bool);
    impl Recording {
        fn end(&mut self) -> Result<String> {
            self.0 = false;
            let mut out = std::ptr::null_mut();
            // SAFETY: `out` receives a malloc'd NUL-terminated string on success.
            check("recording operations", unsafe { tessera_ops_end(&mut out) })?;
            Ok(take_string(out).unwrap_or_default())
        }
    }
    impl Drop for Recording {
        fn drop(&mut self) {
            if self.0 {
                let _ = self.end();
            }
        }
    }
    // SAFETY: no arguments; the message, if any, is freed by `check`.
    check("recording operations", unsafe { tessera_ops_begin() })?;
    let mut recording = Recording(true);
    let r = f();
    let text = recording.end()?;
    let calls = text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(d, n)| OpCall { depth: d.parse().unwrap_or(0), name: n.to_string() })
        .collect();
    Ok((r, calls))
}

/// Operations that only make a new view of a tensor, an uninitialised one, or nothing: no work.
const NO_WORK: &[&str] = &[
    "aten::view",
    "aten::_reshape_alias",
    "aten::_unsafe_view",
    "aten::as_strided",
    "aten::narrow",
    "aten::slice",
    "aten::select",
    "aten::squeeze",
    "aten::unsqueeze",
    "aten::transpose",
    "aten::permute",
    "aten::expand",
    "aten::expand_as",
    "aten::view_as",
    "aten::flatten",
    "aten::unflatten",
    "aten::t",
    "aten::detach",
    "aten::alias",
    "aten::lift_fresh",
    "aten::empty",
    "aten::empty_strided",
    "aten::empty_like",
    "aten::resize_",
    "aten::unbind",
    "aten::split",
    "aten::chunk",
    "aten::result_type",
    "aten::resolve_conj",
    "aten::resolve_neg",
    "aten::_has_compatible_shallow_copy_type",
];

/// Operations that do their work by calling others (which the recording shows under them).
const COMPOSITE: &[&str] = &[
    "aten::linear",
    "aten::matmul",
    "aten::embedding",
    "aten::layer_norm",
    "aten::scaled_dot_product_attention",
    "aten::clone",
    "aten::_to_copy",
    "aten::to",
    "aten::contiguous",
    "aten::reshape",
    "aten::softmax",
    "aten::log_softmax",
    "aten::dropout",
    "aten::repeat",
    "aten::masked_fill",
    "aten::zeros",
    "aten::zeros_like",
    "aten::full",
    "aten::full_like",
    "aten::ones_like",
    "aten::new_zeros",
    "aten::zero_",
    // the attention back ends that call their kernel as another operation (CUDA's flash and
    // memory-efficient attention) or only compose others (the math one)
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_attention_math",
];

/// The operations of a recording that launch work: neither views, allocations, nor composites
/// that only call others (a composite such as `linear` counts as the `addmm` it calls), nor an
/// overload that calls its namesake (`add` of a scalar calling `add` of a tensor). On a GPU each
/// is about one kernel launch.
pub fn working_ops(calls: &[OpCall]) -> Vec<&OpCall> {
    calls
        .iter()
        .enumerate()
        .filter(|(i, c)| {
            let wrapper = calls.get(i + 1).is_some_and(|n| n.depth == c.depth + 1 && n.name == c.name);
            !wrapper && !NO_WORK.contains(&c.name.as_str()) && !COMPOSITE.contains(&c.name.as_str())
        })
        .map(|(_, c)| c)
        .collect()
}

/// Whether CUDA graphs can be captured: the CUDA half of the shim was built and loaded (a GPU
/// must still be present to use them).
pub fn cuda_graphs_available() -> bool {
    cuda_libraries().graphs
}

/// A CUDA side stream made the current stream of this thread for as long as the value lives
/// (graphs cannot be captured on the default stream). Entering and leaving wait for the device,
/// so work before and after keeps its order.
#[derive(Debug)]
pub struct SideStream(*mut c_void);

impl SideStream {
    pub fn enter(device: Device) -> Result<Self> {
        let Device::Cuda(i) = device else {
            return Err(Error::Invalid("a CUDA stream needs a CUDA device".into()));
        };
        let mut s = std::ptr::null_mut();
        // SAFETY: writes one handle on success.
        check("CUDA stream", unsafe { tessera_stream_enter(i as i32, &mut s) })?;
        Ok(Self(s))
    }
}

impl Drop for SideStream {
    fn drop(&mut self) {
        // SAFETY: the handle came from tessera_stream_enter and is released once.
        if let Err(e) = check("CUDA stream", unsafe { tessera_stream_exit(self.0) }) {
            eprintln!("tessera: {e}");
        }
    }
}

/// A captured CUDA graph: the kernels one call of a closure launched, replayed as one launch.
/// Tensors the closure read and wrote are the graph's inputs and outputs: replays read and
/// write the same memory, so inputs are updated in place between replays.
#[derive(Debug)]
pub struct CudaGraph(*mut c_void);

impl CudaGraph {
    /// Captures the work `f` queues on the current (side) stream: nothing runs during capture.
    /// A capture that fails (an operation that cannot be captured, a panic inside `f`) is an
    /// error and leaves no graph behind.
    pub fn capture<R>(f: impl FnOnce() -> R) -> Result<(Self, R)> {
        let mut g = std::ptr::null_mut();
        // SAFETY: writes one handle on success.
        check("CUDA graph", unsafe { tessera_graph_new(&mut g) })?;
        let graph = Self(g);
        // SAFETY: the graph handle is live.
        check("CUDA graph capture", unsafe { tessera_graph_begin(graph.0) })?;
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        // SAFETY: the graph handle is live; capture always ends, also after a panic.
        let ended = check("CUDA graph capture", unsafe { tessera_graph_end(graph.0) });
        match out {
            Ok(r) => ended.map(|()| (graph, r)),
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into());
                Err(Error::Invalid(format!("CUDA graph capture: {}", msg.lines().next().unwrap_or(""))))
            }
        }
    }

    /// Launches the captured work once on the current stream.
    pub fn replay(&self) -> Result<()> {
        // SAFETY: the graph handle is live and was captured.
        check("CUDA graph replay", unsafe { tessera_graph_replay(self.0) })
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: the handle came from tessera_graph_new and is released once.
        if let Err(e) = check("CUDA graph", unsafe { tessera_graph_free(self.0) }) {
            eprintln!("tessera: {e}");
        }
    }
}
