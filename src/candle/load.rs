//! PEFT adapter directories put onto base weights loaded with candle.

use super::MultiDoraLinear;
use crate::adapter::{Adapter, AdapterModule, Init, ModuleKind};
use crate::case_multi::AdapterWeights;
use anyhow::{bail, ensure, Context, Result};
use candle_core::Tensor;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Mutex;

/// Refuses a module that is not a plain `lora.Linear` over an `nn.Linear` weight.
pub(crate) fn check_linear(module: &AdapterModule) -> Result<()> {
    let name = &module.name;
    ensure!(
        module.kind == ModuleKind::Linear,
        "module {name}: {:?} adapters are not supported by the candle layers (linear only)",
        module.kind
    );
    ensure!(
        module.lora_bias.is_none(),
        "module {name}: lora_B.bias (lora_bias=True) is not supported by the candle layers"
    );
    Ok(())
}

/// Several PEFT adapters (`save_pretrained` directories) loaded for one base model, each in
/// a slot (its position in the list), ready to be put onto the model's linear layers as
/// [`MultiDoraLinear`]s. Every adapted module must be placed: [`AdapterSet::check_all_placed`]
/// names the first one a model never asked for (a name that does not fit the model would
/// otherwise leave the adapter silently unused).
#[derive(Debug)]
pub struct AdapterSet {
    names: Vec<String>,
    adapters: Vec<Adapter>,
    placed: Mutex<BTreeSet<(usize, String)>>,
}

impl AdapterSet {
    /// Loads `(name, directory)` pairs, in slot order ([`Adapter::load`]: the config and
    /// every tensor checked).
    ///
    /// # Errors
    /// A repeated or reserved name (`-` means no adapter), an unreadable or invalid adapter
    /// (naming the directory and the tensor), or an adapter the candle layers do not run:
    /// `fan_in_fan_out` (Conv1D bases), an initialisation that rewrote the base (PiSSA,
    /// OLoRA), `modules_to_save`, non-linear modules, `lora_bias`.
    pub fn load(named: &[(String, PathBuf)]) -> Result<Self> {
        let mut names = Vec::new();
        let mut adapters = Vec::new();
        for (name, dir) in named {
            ensure!(
                !name.is_empty() && name != "-",
                "adapter name {name:?} is reserved (\"-\" means no adapter)"
            );
            ensure!(
                !names.contains(name),
                "adapter name {name:?} is given twice"
            );
            let load = || -> Result<Adapter> {
                let a = Adapter::load(dir)?;
                ensure!(
                    !a.config.lora.fan_in_fan_out,
                    "fan_in_fan_out adapters (GPT-2 Conv1D bases) are not supported by the candle layers"
                );
                ensure!(
                    a.config.init()? == Init::KeepsBase,
                    "init_lora_weights {:?} rewrote the base weights; load the adapter with `dorafuse merge` instead",
                    a.config.raw.get("init_lora_weights")
                );
                if let Some(t) = a.saved.keys().next() {
                    bail!("modules_to_save tensor {t} is not supported by the candle layers");
                }
                for m in a.modules.values() {
                    check_linear(m)?;
                }
                Ok(a)
            };
            let a = load().with_context(|| format!("adapter {name} ({})", dir.display()))?;
            names.push(name.clone());
            adapters.push(a);
        }
        Ok(Self {
            names,
            adapters,
            placed: Mutex::new(BTreeSet::new()),
        })
    }

    /// The adapter names, in slot order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The loaded adapters, in slot order.
    pub fn adapters(&self) -> &[Adapter] {
        &self.adapters
    }

    /// The slot of adapter `name`, or −1 for `-` (no adapter).
    ///
    /// # Errors
    /// A name that is neither `-` nor a loaded adapter's.
    pub fn slot(&self, name: &str) -> Result<i32> {
        if name == "-" {
            return Ok(-1);
        }
        match self.names.iter().position(|n| n == name) {
            Some(k) => Ok(k as i32),
            None => bail!(
                "adapter {name:?} was not loaded (loaded: {}; \"-\" = none)",
                self.names.join(", ")
            ),
        }
    }

    /// The multi-adapter layer of `module` (the base model's module name, e.g.
    /// `encoder.layer.0.attention.self.query`) over its base `weight [d_out, d_in]` and
    /// `bias`, with every adapter that targets it in its slot.
    ///
    /// # Errors
    /// Shapes that disagree with the base weight, naming the module and the tensor.
    pub fn multi_linear(
        &self,
        module: &str,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<MultiDoraLinear> {
        let mut slots = Vec::with_capacity(self.adapters.len());
        for (k, a) in self.adapters.iter().enumerate() {
            slots.push(a.modules.get(module).map(|m| AdapterWeights {
                lora_a: m.lora_a.clone(),
                lora_b: m.lora_b.clone(),
                magnitude: m.magnitude.clone(),
                scaling: m.scaling,
            }));
            if a.modules.contains_key(module) {
                self.placed
                    .lock()
                    .expect("the placed set is never poisoned: no panics while held")
                    .insert((k, module.to_string()));
            }
        }
        // Each adapter's weights are checked against the base with the adapter named.
        for (k, a) in self.adapters.iter().enumerate() {
            if let Some(m) = a.modules.get(module) {
                let (d_in, _, r) = m.dims();
                let ws = weight.dims();
                ensure!(
                    ws.len() == 2 && ws[1] == d_in && ws[0] == m.lora_b.shape()[0],
                    "adapter {}: module {module}: lora_A [{r}, {d_in}] and lora_B {:?} do not fit the base weight {ws:?} ([d_out, d_in])",
                    self.names[k],
                    m.lora_b.shape()
                );
            }
        }
        MultiDoraLinear::new(module, weight, bias, slots)
    }

    /// Fails naming the first adapted module no layer was built for.
    ///
    /// # Errors
    /// An adapter module the model never placed (a name that does not fit the model).
    pub fn check_all_placed(&self) -> Result<()> {
        let placed = self
            .placed
            .lock()
            .expect("the placed set is never poisoned: no panics while held");
        for (k, a) in self.adapters.iter().enumerate() {
            if let Some(m) = a
                .modules
                .keys()
                .find(|m| !placed.contains(&(k, (*m).clone())))
            {
                bail!(
                    "adapter {}: module {m} is not a linear layer of this model (not placed)",
                    self.names[k]
                );
            }
        }
        Ok(())
    }
}
