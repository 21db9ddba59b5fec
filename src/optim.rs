//! AdamW, gradient clipping and a parameter EMA whose whole state can be saved and restored,
//! so that training resumes exactly where a checkpoint left it [P A.2, B.2].
//!
//! When every parameter is f32 on one device, the update, the clipping and the average run as
//! libtorch's fused and multi-tensor kernels (a few launches per step instead of ~10 per
//! parameter tensor); otherwise, or with `TESSERA_FUSED_OPTIM=0`, as one operation per tensor.
//! Both compute the same update up to rounding.

use std::collections::BTreeMap;

use tch::nn::VarStore;
use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// AdamW with decoupled weight decay, applied to weight matrices only (not to biases, norms'
/// gains or other vectors).
#[derive(Debug)]
pub struct AdamW {
    names: Vec<String>,
    params: Vec<Tensor>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    decay: Vec<bool>,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Updates taken so far.
    pub step: usize,
    /// Runs the fused kernels (see the module notes).
    pub fused: bool,
    /// The update number as a device scalar, for the fused kernel's bias corrections.
    step_t: Option<Tensor>,
}

/// Whether fused kernels may be used for these tensors: all f32 on one device, and not turned
/// off with `TESSERA_FUSED_OPTIM=0`.
fn fusable(params: &[Tensor]) -> bool {
    let on = std::env::var("TESSERA_FUSED_OPTIM").map(|v| v != "0").unwrap_or(true);
    let dev = params.first().map(|p| p.device());
    on && params.iter().all(|p| p.kind() == Kind::Float && Some(p.device()) == dev)
}

impl AdamW {
    pub fn new(vs: &VarStore, beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Self {
        let vars: BTreeMap<String, Tensor> = vs.trainable_variables_named();
        let names: Vec<String> = vars.keys().cloned().collect();
        let params: Vec<Tensor> = vars.into_values().collect();
        let zeros = |p: &Tensor| p.zeros_like().to_kind(Kind::Float);
        let fused = fusable(&params);
        Self {
            m: params.iter().map(zeros).collect(),
            v: params.iter().map(zeros).collect(),
            decay: params.iter().map(|p| p.dim() >= 2 && !p.size().contains(&1)).collect(),
            names,
            params,
            beta1,
            beta2,
            eps,
            weight_decay,
            step: 0,
            fused,
            step_t: None,
        }
    }

    pub fn zero_grad(&self) {
        for p in &self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// Scales the gradients so their global norm is at most `max`; returns the norm before,
    /// as a scalar tensor on the device: nothing waits for the device here (read it only when
    /// it is logged).
    pub fn clip_grad_norm(&self, max: f64) -> Tensor {
        tch::no_grad(|| {
            let grads: Vec<Tensor> = self.params.iter().map(|p| p.grad()).filter(|g| g.defined()).collect();
            if grads.is_empty() {
                return Tensor::zeros([], (Kind::Float, tch::Device::Cpu));
            }
            let fused = if self.fused {
                crate::shim::foreach_norm(&grads).map(|n| Tensor::stack(&n, 0).norm()).ok()
            } else {
                None
            };
            let total = fused.unwrap_or_else(|| {
                let norms: Vec<Tensor> = grads.iter().map(|g| g.to_kind(Kind::Float).norm().square()).collect();
                Tensor::stack(&norms, 0).sum(Kind::Float).sqrt()
            });
            // factor min(1, max / norm), left at 1 when the norm is not finite (as before)
            let k = (max / (&total + 1e-6)).clamp_max(1.0);
            let k = k.where_self(&total.isfinite(), &k.ones_like());
            if !(self.fused && crate::shim::foreach_mul_(&grads, &k).is_ok()) {
                for g in &grads {
                    let _ = g.shallow_clone().g_mul_(&k);
                }
            }
            total
        })
    }

    /// One update with learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(t);
        let c2 = 1.0 - b2.powi(t);
        if self.fused {
            match tch::no_grad(|| self.step_fused(lr)) {
                Ok(()) => return,
                Err(e) => {
                    // the kernel checks its inputs before touching them: nothing was updated
                    eprintln!("tessera: {e}; AdamW goes on unfused");
                    self.fused = false;
                }
            }
        }
        tch::no_grad(|| {
            for i in 0..self.params.len() {
                let g = self.params[i].grad();
                if !g.defined() {
                    continue;
                }
                let g = g.to_kind(Kind::Float);
                let _ = self.m[i].g_mul_scalar_(b1).g_add_(&(&g * (1.0 - b1)));
                let _ = self.v[i].g_mul_scalar_(b2).g_add_(&(&g * &g * (1.0 - b2)));
                let update = (&self.m[i] / c1) / ((&self.v[i] / c2).sqrt() + self.eps);
                let p = &mut self.params[i];
                if self.decay[i] && self.weight_decay > 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
                }
                let _ = p.g_sub_(&(update * lr).to_kind(p.kind()));
            }
        });
    }

    /// [`AdamW::step`] with libtorch's fused kernel: one call for the tensors with weight decay,
    /// one for those without.
    fn step_fused(&mut self, lr: f64) -> Result<()> {
        let Some(first) = self.params.first() else {
            return Ok(());
        };
        let dev = first.device();
        let st = self.step_t.get_or_insert_with(|| Tensor::zeros([], (Kind::Float, dev)));
        let _ = st.fill_(self.step as f64);
        let mut groups: [[Vec<Tensor>; 4]; 2] = Default::default();
        for i in 0..self.params.len() {
            let g = self.params[i].grad();
            if !g.defined() {
                continue;
            }
            let k = usize::from(self.decay[i] && self.weight_decay > 0.0);
            groups[k][0].push(self.params[i].shallow_clone());
            groups[k][1].push(g);
            groups[k][2].push(self.m[i].shallow_clone());
            groups[k][3].push(self.v[i].shallow_clone());
        }
        for (k, [p, g, m, v]) in groups.iter().enumerate() {
            let wd = if k == 1 { self.weight_decay } else { 0.0 };
            crate::shim::fused_adamw(p, g, m, v, st, lr, (self.beta1, self.beta2), wd, self.eps)?;
        }
        Ok(())
    }

    /// The moment buffers, named `m.<param>` and `v.<param>`.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, n) in self.names.iter().enumerate() {
            out.push((format!("m.{n}"), self.m[i].shallow_clone()));
            out.push((format!("v.{n}"), self.v[i].shallow_clone()));
        }
        out
    }

    /// Restores moment buffers saved by [`AdamW::state`].
    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        tch::no_grad(|| {
            for (i, n) in self.names.iter().enumerate() {
                for (buf, prefix) in [(&mut self.m[i], "m"), (&mut self.v[i], "v")] {
                    let key = format!("{prefix}.{n}");
                    let t = state.get(&key).ok_or_else(|| Error::Invalid(format!("optimizer state lacks {key}")))?;
                    if t.size() != buf.size() {
                        return Err(Error::Invalid(format!("optimizer state {key} has shape {:?}", t.size())));
                    }
                    buf.copy_(t);
                }
            }
            Ok(())
        })
    }
}

/// An exponential moving average of a model's parameters.
#[derive(Debug)]
pub struct Ema {
    names: Vec<String>,
    params: Vec<Tensor>,
    shadow: Vec<Tensor>,
    pub decay: f64,
    /// Averages with one multi-tensor kernel (see the module notes).
    pub fused: bool,
}

impl Ema {
    pub fn new(vs: &VarStore, decay: f64) -> Self {
        let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
        let names: Vec<String> = vars.keys().cloned().collect();
        let params: Vec<Tensor> = vars.into_values().collect();
        let shadow = params.iter().map(|p| p.detach().copy()).collect();
        let fused = fusable(&params);
        Self { names, params, shadow, decay, fused }
    }

    /// Whether the parameter `name` is frozen (takes no gradient, so its average is the
    /// parameter itself, bit for bit).
    pub fn is_frozen(&self, name: &str) -> bool {
        self.names.iter().position(|n| n == name).is_some_and(|i| !self.params[i].requires_grad())
    }

    /// The decay used after `step` updates (0-based): `decay`, warmed up as
    /// (1 + step) / (10 + step) so that a short run's average is not dominated by the random
    /// initial weights (with 0.999 and no warm-up, 37% of the average after 1,000 steps would
    /// still be the initialisation).
    pub fn decay_at(&self, step: usize) -> f64 {
        self.decay.min((1.0 + step as f64) / (10.0 + step as f64))
    }

    /// Folds the current parameters into the average after update number `step` (0-based).
    /// Frozen parameters (no gradient) are left as they are, bit for bit.
    pub fn update(&mut self, step: usize) {
        let d = self.decay_at(step);
        if self.fused {
            let (s, p): (Vec<&Tensor>, Vec<&Tensor>) =
                self.shadow.iter().zip(&self.params).filter(|(_, p)| p.requires_grad()).unzip();
            match tch::no_grad(|| crate::shim::foreach_lerp_(&s, &p, 1.0 - d)) {
                Ok(()) => return,
                Err(e) => {
                    eprintln!("tessera: {e}; the average goes on unfused");
                    self.fused = false;
                }
            }
        }
        tch::no_grad(|| {
            for (s, p) in self.shadow.iter_mut().zip(&self.params) {
                if !p.requires_grad() {
                    continue;
                }
                let _ = s.g_mul_scalar_(d).g_add_(&(p * (1.0 - d)));
            }
        });
    }

    /// The averaged parameters, by name.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.names.iter().cloned().zip(self.shadow.iter().map(|t| t.shallow_clone())).collect()
    }

    pub fn load(&mut self, state: &BTreeMap<String, Tensor>, prefix: &str) -> Result<()> {
        tch::no_grad(|| {
            for (n, s) in self.names.iter().zip(self.shadow.iter_mut()) {
                let key = format!("{prefix}{n}");
                let t = state.get(&key).ok_or_else(|| Error::Invalid(format!("EMA state lacks {key}")))?;
                s.copy_(t);
            }
            Ok(())
        })
    }
}

/// Named trainable variables, sorted.
trait NamedTrainable {
    fn trainable_variables_named(&self) -> BTreeMap<String, Tensor>;
}

impl NamedTrainable for VarStore {
    fn trainable_variables_named(&self) -> BTreeMap<String, Tensor> {
        self.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect()
    }
}
