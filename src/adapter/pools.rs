//! Several PEFT adapters of one base model served together: every module any of them adapts
//! gets a [`DoraLinear`] (its base weight and bias) and an [`AdapterPool`] whose slot k holds
//! adapter k's part for that module, or is marked base-only when adapter k leaves the module
//! alone, so one per-token adapter index serves every module of the model.
//!
//! Each adapter is first checked against the base as for a single adapter
//! ([`AdaptedModel::with_options`]: target modules present, shapes, layouts); then against the
//! pools. Every refusal is one line naming the adapter and the module: a rank above the pools'
//! limit, a module that is not `nn.Linear`/`Conv1D`, an initialisation that rewrote the base
//! (PiSSA, OLoRA: adapters could not share it), a `lora_B.bias`.

use super::apply::{AdaptedModel, ApplyOptions};
use super::base::BaseModel;
use super::config::Init;
use super::model::{Adapter, ModuleKind};
use crate::backend::Backend;
use crate::dtype::DType;
use crate::kernels::{AdapterPool, DoraAdapter, DoraLinear};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::sync::Arc;

/// How [`ModelPools::load`] sizes the pools.
#[derive(Debug, Clone, Default)]
pub struct PoolOptions {
    /// Slots per module; `None`: one per adapter given. More leave room for later loads.
    pub slots: Option<usize>,
    /// The largest rank a slot may hold (1..=256; the U workspace is `T·r_max` f32); `None`:
    /// the largest rank of the adapters given.
    pub r_max: Option<usize>,
    /// The storage dtype of lora_A and lora_B on the device: the base dtype or f32; `None`:
    /// f32, as PEFT holds adapter weights by default (`autocast_adapter_dtype=True`).
    pub adapter_dtype: Option<DType>,
    /// Name mapping and layouts, as for a single adapter.
    pub apply: ApplyOptions,
}

/// One adapted module: its base layer and its pool.
pub struct ServedModule<B: Backend> {
    /// The module's name in the adapters (PEFT's, e.g. `model.layers.0.self_attn.q_proj`).
    pub name: String,
    /// W0 and bias on the serving stream.
    pub linear: DoraLinear<B>,
    /// Slot k: adapter k's part for this module, or base-only.
    pub pool: AdapterPool<B>,
}

/// The pools of every module the adapters adapt (see the module doc).
pub struct ModelPools<B: Backend> {
    /// Adapter names by slot (slot k serves adapter k of [`ModelPools::load`]).
    pub adapters: Vec<String>,
    /// The modules, by name.
    pub modules: BTreeMap<String, ServedModule<B>>,
    opts: PoolOptions,
}

/// Checks one adapter against the base and the pools; returns it paired with the base.
fn check<'a>(
    base: &'a BaseModel,
    name: &str,
    adapter: &'a Adapter,
    opts: &PoolOptions,
    r_max: usize,
) -> Result<AdaptedModel<'a>> {
    let model = AdaptedModel::with_options(base, adapter, &opts.apply)
        .with_context(|| format!("adapter {name}"))?;
    if model.init != Init::KeepsBase {
        bail!(
            "adapter {name}: init_lora_weights {:?} rewrote the base weights; adapters in one \
             pool must share the original base",
            model.init
        );
    }
    for m in adapter.modules.values() {
        if m.kind != ModuleKind::Linear {
            bail!(
                "adapter {name}: module {}: a {:?} module; pools serve linear modules only",
                m.name,
                m.kind
            );
        }
        if m.lora_bias.is_some() {
            bail!(
                "adapter {name}: module {}: lora_B.bias (lora_bias=True) would change the base \
                 bias per adapter; pools do not serve it",
                m.name
            );
        }
        if m.rank > r_max {
            bail!(
                "adapter {name}: module {}: rank {} above the pools' largest rank {r_max}",
                m.name,
                m.rank
            );
        }
    }
    Ok(model)
}

impl<B: Backend> ModelPools<B> {
    /// Loads `adapters` (name, adapter) of `base` into pools on `main` (the serving stream),
    /// slot k holding adapter k; each adapter's g is computed on `side` at load
    /// ([`AdapterPool::load`]).
    ///
    /// # Errors
    /// One line naming the adapter and the module: anything [`AdaptedModel::with_options`]
    /// refuses (a target module absent from the base, a shape that does not fit), a
    /// non-linear module, a rank above `r_max`, a rewritten base, two adapters whose base
    /// layers of a module differ; more adapters than slots; or a device failure.
    pub fn load(
        main: Arc<B>,
        side: &B,
        base: &BaseModel,
        adapters: &[(String, &Adapter)],
        opts: &PoolOptions,
    ) -> Result<Self> {
        let largest = adapters
            .iter()
            .flat_map(|(_, a)| a.modules.values().map(|m| m.rank))
            .max()
            .unwrap_or(1);
        let r_max = opts.r_max.unwrap_or(largest);
        let slots = opts.slots.unwrap_or(adapters.len()).max(1);
        if adapters.len() > slots {
            bail!("{} adapters for pools of {slots} slots", adapters.len());
        }
        let models = adapters
            .iter()
            .map(|(n, a)| check(base, n, a, opts, r_max))
            .collect::<Result<Vec<_>>>()?;
        let mut me = ModelPools {
            adapters: adapters.iter().map(|(n, _)| n.clone()).collect(),
            modules: BTreeMap::new(),
            opts: PoolOptions {
                slots: Some(slots),
                r_max: Some(r_max),
                ..opts.clone()
            },
        };
        let mut names: Vec<&String> = adapters
            .iter()
            .flat_map(|(_, a)| a.modules.keys())
            .collect();
        names.sort();
        names.dedup();
        for module in names {
            let (k0, model) = models
                .iter()
                .enumerate()
                .find(|(_, m)| m.adapter.modules.contains_key(module))
                .expect("a module of some adapter");
            let ctx = || format!("adapter {}: module {module}", me.adapters[k0]);
            let layer = model.layer(module).with_context(ctx)?;
            let adt = opts.adapter_dtype.unwrap_or(DType::F32);
            let linear = DoraLinear::upload(main.clone(), &layer).with_context(ctx)?;
            let pool = AdapterPool::new(&linear, slots, r_max, adt).with_context(ctx)?;
            let mut served = ServedModule {
                name: module.clone(),
                linear,
                pool,
            };
            for (k, model) in models.iter().enumerate() {
                me.fill(side, &mut served, k, model, Some(&layer))?;
            }
            me.modules.insert(module.clone(), served);
        }
        Ok(me)
    }

    /// Puts adapter `k`'s part for `m` into its slot (base-only when it leaves `m` alone),
    /// checking that the adapter sees the same base layer as the pool's.
    fn fill(
        &self,
        side: &B,
        m: &mut ServedModule<B>,
        k: usize,
        model: &AdaptedModel,
        base_layer: Option<&crate::layer::Layer>,
    ) -> Result<()> {
        let name = &self.adapters[k];
        let Some(module) = model.adapter.modules.get(&m.name) else {
            return m
                .pool
                .set_base_only(side, k)
                .with_context(|| format!("adapter {name}: module {}", m.name));
        };
        let ctx = || format!("adapter {name}: module {}", m.name);
        if let Some(base_layer) = base_layer {
            let mine = model.layer(&m.name).with_context(ctx)?;
            if mine.weight != base_layer.weight
                || mine.bias != base_layer.bias
                || mine.fan_in_fan_out != base_layer.fan_in_fan_out
            {
                bail!(
                    "adapter {name}: module {}: another base layer (weight, bias or layout) than \
                     the other adapters of the pool",
                    m.name
                );
            }
        }
        let adt = m.pool.adapter_dtype();
        let adapter = DoraAdapter::upload(side, module, adt).with_context(ctx)?;
        m.pool
            .replace(&m.linear, side, k, adapter)
            .with_context(ctx)
    }

    /// Replaces adapter `k` in every module's pool by `adapter` of `base` (a hot swap on
    /// `side`, ordered as [`AdapterPool::replace`]); modules it leaves alone become base-only
    /// for slot `k`. An adapter that adapts a module no pool has is refused.
    ///
    /// # Errors
    /// As [`ModelPools::load`] for the new adapter, `k` outside the pools, or a device failure.
    /// Modules swapped before a failure keep the new adapter.
    pub fn replace_adapter(
        &mut self,
        side: &B,
        base: &BaseModel,
        k: usize,
        name: &str,
        adapter: &Adapter,
    ) -> Result<()> {
        let slots = self.opts.slots.unwrap_or(1);
        if k >= slots {
            bail!("adapter {name}: slot {k} outside the pools' {slots} slots");
        }
        let r_max = self.opts.r_max.unwrap_or(1);
        let model = check(base, name, adapter, &self.opts, r_max)?;
        if let Some(m) = adapter
            .modules
            .keys()
            .find(|m| !self.modules.contains_key(*m))
        {
            bail!("adapter {name}: module {m}: no pool serves it (load it with the others)");
        }
        if k >= self.adapters.len() {
            self.adapters.resize(k + 1, String::new());
        }
        self.adapters[k] = name.to_string();
        let mut modules = std::mem::take(&mut self.modules);
        let r = modules
            .values_mut()
            .try_for_each(|m| self.fill(side, m, k, &model, None));
        self.modules = modules;
        r
    }

    /// The module `name`.
    pub fn module(&self, name: &str) -> Option<&ServedModule<B>> {
        self.modules.get(name)
    }
}
