//! Files: atomic writes and strict safetensors reading and writing of a `VarStore`.
//!
//! Every file Tessera writes goes to a temporary file in the same folder first and is renamed
//! into place, so a kill or a full disk leaves either the old file or the new one, never half
//! of one. Loading compares the file against the model the config describes and names each
//! missing, unexpected or wrongly shaped tensor.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, View};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = temp_path(dir, path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        write_all(&mut f, bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// The temporary name `path` is written under before it is renamed or linked into place:
/// hidden, in the same folder, marked as Tessera's with this process's id.
pub fn temp_path(dir: &Path, path: &Path) -> std::path::PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dir.join(format!(".{name}.tessera-{}.tmp", std::process::id()))
}

/// Removes the temporary files killed Tessera processes left in `dir` (Tessera's own names
/// only, of processes that no longer run); returns how many. Where it cannot tell whether a
/// process runs (no `/proc`), it removes nothing. Errors are ignored: this is tidying only.
pub fn remove_stale_temps(dir: &Path) -> usize {
    let proc = Path::new("/proc/self");
    if !proc.exists() {
        return 0;
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")) else { continue };
        let Some(pid) = stem.rsplit_once(".tessera-").and_then(|(_, p)| p.parse::<u32>().ok()) else { continue };
        let alive = pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists();
        if !alive && std::fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

thread_local! {
    static FAIL_AFTER: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

static ENV_FAIL_AFTER: std::sync::OnceLock<Option<std::sync::atomic::AtomicU64>> = std::sync::OnceLock::new();

/// Test hook: on this thread, writes fail with "no space left on device" once `bytes` more
/// bytes have been written (`None` ends it). The variable `TESSERA_FAIL_WRITES_AFTER=N` does
/// the same for a whole process, so a full disk can be simulated through the binary.
pub fn inject_write_failure(bytes: Option<u64>) {
    FAIL_AFTER.with(|c| c.set(bytes));
}

/// `write_all`, honouring [`inject_write_failure`]. Every file Tessera writes goes through it.
pub fn write_all(f: &mut impl Write, bytes: &[u8]) -> std::io::Result<()> {
    use std::sync::atomic::Ordering;
    let full = || std::io::Error::from_raw_os_error(28); // ENOSPC
    if let Some(left) = FAIL_AFTER.with(|c| c.get()) {
        let n = (bytes.len() as u64).min(left);
        FAIL_AFTER.with(|c| c.set(Some(left - n)));
        f.write_all(&bytes[..n as usize])?;
        return if (n as usize) < bytes.len() { Err(full()) } else { Ok(()) };
    }
    let env = ENV_FAIL_AFTER.get_or_init(|| {
        std::env::var("TESSERA_FAIL_WRITES_AFTER")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(std::sync::atomic::AtomicU64::new)
    });
    if let Some(left) = env {
        let want = bytes.len() as u64;
        let got = left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| Some(l - l.min(want))).unwrap_or(0);
        let n = got.min(want) as usize;
        f.write_all(&bytes[..n])?;
        return if n < bytes.len() { Err(full()) } else { Ok(()) };
    }
    f.write_all(bytes)
}

/// Raw bytes of one tensor, for serialising.
pub(crate) struct Raw {
    pub(crate) shape: Vec<usize>,
    pub(crate) data: Vec<u8>,
    pub(crate) dtype: Dtype,
}

impl View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn tensor_f32_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let flat = t.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous().flatten(0, -1);
    let v = Vec::<f32>::try_from(&flat)?;
    Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

fn tensor_bf16_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let v = Vec::<f32>::try_from(&t.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous().flatten(0, -1))?;
    Ok(v.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect())
}

/// Serialises named tensors (as f32) into safetensors bytes, with optional metadata.
pub fn tensors_to_safetensors(
    tensors: &[(String, Tensor)],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>> {
    tensors_to_safetensors_as(tensors, metadata, Kind::Float)
}

/// Serialises named tensors as f32 or bf16 (`kind`; rounded to nearest even) into safetensors
/// bytes. Loading reads either back into f32 variables.
pub fn tensors_to_safetensors_as(
    tensors: &[(String, Tensor)],
    metadata: Option<std::collections::HashMap<String, String>>,
    kind: Kind,
) -> Result<Vec<u8>> {
    tensors_to_safetensors_each(tensors, metadata, |_| kind)
}

/// Serialises named tensors into safetensors bytes, each stored in the dtype `kind_of` gives
/// its name (bf16, or f32 for any other).
pub fn tensors_to_safetensors_each(
    tensors: &[(String, Tensor)],
    metadata: Option<std::collections::HashMap<String, String>>,
    kind_of: impl Fn(&str) -> Kind,
) -> Result<Vec<u8>> {
    let mut raws = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let shape = t.size().iter().map(|&d| d as usize).collect();
        let raw = match kind_of(name) {
            Kind::BFloat16 => Raw { shape, data: tensor_bf16_bytes(t)?, dtype: Dtype::BF16 },
            _ => Raw { shape, data: tensor_f32_bytes(t)?, dtype: Dtype::F32 },
        };
        raws.push((name.clone(), raw));
    }
    let views = raws.iter().map(|(n, r)| (n.as_str(), r));
    safetensors::serialize(views, &metadata).map_err(|e| Error::Invalid(format!("cannot serialise weights: {e}")))
}

/// Serialises the variables of `vs` (as f32) into safetensors bytes, names sorted.
pub fn varstore_to_safetensors(vs: &VarStore) -> Result<Vec<u8>> {
    let vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect::<BTreeMap<_, _>>().into_iter().collect();
    tensors_to_safetensors(&vars, None)
}

/// Reads every tensor (as f32, on the CPU) and the metadata of a safetensors file.
/// Named tensors and the string metadata of a safetensors file.
pub type TensorsWithMetadata = (Vec<(String, Tensor)>, std::collections::HashMap<String, String>);

pub fn read_safetensors(path: &Path) -> Result<TensorsWithMetadata> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let corrupt =
        |e: String| Error::checkpoint(path, format!("not a readable safetensors file (corrupt or truncated?): {e}"));
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let values = decode_values(view.dtype(), view.data())
            .ok_or_else(|| corrupt(format!("tensor {name}: unsupported dtype")))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        out.push((name, Tensor::from_slice(&values).view(shape.as_slice())));
    }
    Ok((out, meta.metadata().clone().unwrap_or_default()))
}

/// Writes the variables of `vs` to a safetensors file, atomically.
pub fn save_varstore(vs: &VarStore, path: &Path) -> Result<()> {
    write_atomic(path, &varstore_to_safetensors(vs)?)
}

fn decode_values(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    match dtype {
        Dtype::F32 => Some(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
        Dtype::F16 => Some(bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()),
        Dtype::BF16 => Some(bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()),
        _ => None,
    }
}

/// Loads safetensors bytes into `vs`, which must hold exactly the same names and shapes.
pub fn load_varstore_bytes(vs: &mut VarStore, bytes: &[u8], path: &Path) -> Result<()> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| {
        Error::checkpoint(path, format!("not a readable safetensors file (corrupt or truncated?): {e}"))
    })?;
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let mut problems = Vec::new();
    for (name, var) in &vars {
        match st.tensor(name) {
            Err(_) => problems.push(format!("missing tensor {name}")),
            Ok(view) => {
                let want: Vec<usize> = var.size().iter().map(|&d| d as usize).collect();
                if view.shape() != want.as_slice() {
                    problems.push(format!(
                        "tensor {name} has shape {:?} in the file but the config needs {:?}",
                        view.shape(),
                        want
                    ));
                } else if !matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                    problems.push(format!("tensor {name} has unsupported dtype {:?}", view.dtype()));
                }
            }
        }
    }
    for name in st.names() {
        if !vars.contains_key(name.as_str()) {
            problems.push(format!("unexpected tensor {name}"));
        }
    }
    if !problems.is_empty() {
        let n = problems.len();
        problems.truncate(6);
        let more = if n > 6 { format!(" (and {} more)", n - 6) } else { String::new() };
        return Err(Error::checkpoint(path, format!("weights do not match the config: {}{more}", problems.join("; "))));
    }
    tch::no_grad(|| -> Result<()> {
        for (name, var) in &vars {
            let view = st.tensor(name).map_err(|e| Error::checkpoint(path, e.to_string()))?;
            let values = decode_values(view.dtype(), view.data())
                .ok_or_else(|| Error::checkpoint(path, format!("tensor {name}: bad dtype")))?;
            let t = Tensor::from_slice(&values).view(var.size().as_slice());
            let mut var = var.shallow_clone();
            var.f_copy_(&t.to_kind(var.kind()).to_device(var.device()))?;
        }
        Ok(())
    })
}

/// Loads a safetensors file into `vs` (see [`load_varstore_bytes`]).
pub fn load_varstore(vs: &mut VarStore, path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    load_varstore_bytes(vs, &bytes, path)
}
