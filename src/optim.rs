//! AdamW, gradient clipping and a parameter EMA whose whole state can be saved and restored,
//! so that training resumes exactly where a checkpoint left it [P A.2, B.2].

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
}

impl AdamW {
    pub fn new(vs: &VarStore, beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Self {
        let vars: BTreeMap<String, Tensor> = vs.trainable_variables_named();
        let names: Vec<String> = vars.keys().cloned().collect();
        let params: Vec<Tensor> = vars.into_values().collect();
        let zeros = |p: &Tensor| p.zeros_like().to_kind(Kind::Float);
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
            let norms: Vec<Tensor> = grads.iter().map(|g| g.to_kind(Kind::Float).norm().square()).collect();
            let total = Tensor::stack(&norms, 0).sum(Kind::Float).sqrt();
            // factor min(1, max / norm), left at 1 when the norm is not finite (as before)
            let k = (max / (&total + 1e-6)).clamp_max(1.0);
            let k = k.where_self(&total.isfinite(), &k.ones_like());
            for g in &grads {
                let _ = g.shallow_clone().g_mul_(&k);
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
}

impl Ema {
    pub fn new(vs: &VarStore, decay: f64) -> Self {
        let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
        let names: Vec<String> = vars.keys().cloned().collect();
        let params: Vec<Tensor> = vars.into_values().collect();
        let shadow = params.iter().map(|p| p.detach().copy()).collect();
        Self { names, params, shadow, decay }
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
