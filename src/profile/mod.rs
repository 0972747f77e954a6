//! `dorafuse profile --device emu`: the memory figures Nsight Compute would show for each
//! kernel, from the emulator's access record, and the grid fill on named GPUs.
//!
//! [`run`] drives every kernel of `kernels/kernels.list` through the library's own entry
//! points (the norm with each variant of the specialisation table forced, the forward and
//! both backward modes, the merged weight, the multi-adapter forward, and the bench's unfused
//! rows for the baseline kernels) on a recording [`EmuBackend`], for every dtype pair a
//! kernel is stamped for. Each kernel's first launch is profiled ([`KernelProfile`]; its later launches are skipped):
//! requests, sectors per request, load and store efficiency ([`metrics`]), unique global
//! bytes against the launch's bytes-that-must-move ([`formula`]), shared-memory wavefronts per request, and the grid
//! fill on an H200, A100 and L40S ([`gpu`]) from the launch's block size, shared memory and
//! the ptxas register count ([`registers`]). docs/profile.md documents the JSON fields.
//!
//! Large launches are sampled: at most [`Settings::max_blocks`] blocks of a launch run and are
//! recorded (the others are skipped, so results are not meaningful, access patterns are);
//! grids, blocks and waves are those of the full launch; per-request figures are exact for
//! the recorded blocks; unique bytes are extrapolated as [`metrics`] says.

pub mod formula;
pub mod gpu;
pub mod metrics;
pub mod registers;

use crate::bench::formula::Op;
use crate::case_multi::{AdapterWeights, MultiLayer};
use crate::dtype::DType;
use crate::emu::record::{LaunchRecord, Sites};
use crate::emu::{EmuBackend, RecordOptions};
use crate::kernels::multi::{run_multi, MultiBase, SlotContent, SlotTables};
use crate::kernels::spec::{self, Tuning, VARIANTS};
use crate::kernels::KERNELS;
use crate::layer::{GradMode, Layer, Shape};
use crate::markdown::Table;
use crate::tensor::Tensor;
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What to profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The shape of the weight passes (the norm and the merged weight, which have no host
    /// GEMM): the bench's reference layer by default, 4096 × 4096, r = 16 (T unused).
    pub weight_shape: Shape,
    /// The layer of the forward, backward, multi-adapter and bench-row calls, whose host
    /// GEMMs (the emulator's `Backend::gemm`) run in full: T = 512 (the bench's prefill
    /// row), scaled down to 1024 × 1024 by default so that the run takes about a minute.
    pub shape: Shape,
    /// A second rank for the kernels that serve only larger ranks (`dora_tn_r64`).
    pub large_rank: usize,
    /// Profile only kernels whose entry point contains this, or one of its comma-separated
    /// parts (all when `None`).
    pub kernel: Option<String>,
    /// The launch configuration of the tuned kernels ([`spec::Tuning`]).
    pub tuning: Tuning,
    /// Blocks recorded (and run) per launch at most; 0 records every block.
    pub max_blocks: u32,
    /// Seed of the emulator's schedules.
    pub seed: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            weight_shape: Shape {
                t: 1,
                d_in: 4096,
                d_out: 4096,
                r: 16,
            },
            shape: Shape {
                t: 512,
                d_in: 1024,
                d_out: 1024,
                r: 16,
            },
            large_rank: 64,
            kernel: None,
            tuning: Tuning::Tuned,
            max_blocks: 2,
            seed: crate::emu::DEFAULT_SEED,
        }
    }
}

/// One site of a kernel's worst memory accesses.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Site {
    /// `file:line`.
    pub site: String,
    /// "global load", "global store", "atomic", "shared load" or "shared store".
    pub kind: &'static str,
    /// Requests at the site.
    pub requests: u64,
    /// Global: sectors per request; shared: wavefronts per request.
    pub per_request: f64,
    /// Global: bytes used / sector bytes; shared: `None`.
    pub efficiency: Option<f64>,
}

/// The profile of one kernel (its first launch in the run); docs/profile.md has each field.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KernelProfile {
    /// Entry point.
    pub kernel: String,
    /// The library call that launched it.
    pub step: String,
    /// The layer shape of that call.
    pub t: usize,
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
    /// Rank.
    pub r: usize,
    /// Grid.
    pub grid: [u32; 3],
    /// Block.
    pub block: [u32; 3],
    /// Blocks in the grid.
    pub blocks: u64,
    /// Blocks recorded.
    pub recorded_blocks: u64,
    /// Static plus dynamic shared memory per block, bytes.
    pub shared_bytes: u32,
    /// Registers per thread (ptxas, sm_90), when known.
    pub registers: Option<u32>,
    /// Global load, store and atomic requests (recorded blocks).
    pub requests: u64,
    /// 32-byte sectors per global request (loads, stores, atomics).
    pub sectors_per_request: f64,
    /// Global loads: bytes used / bytes of the sectors touched (`null` without loads).
    pub load_efficiency: Option<f64>,
    /// Global stores: bytes used / bytes of the sectors touched (`null` without stores).
    pub store_efficiency: Option<f64>,
    /// Distinct global sectors × 32 of the launch (extrapolated when sampled).
    pub unique_bytes: f64,
    /// The bytes this launch must move ([`formula`]: each array read once, each written
    /// once, from the launch's arguments).
    pub formula_bytes: Option<f64>,
    /// `unique_bytes / formula_bytes` (`null` when the formula failed: `formula_error`).
    pub unique_bytes_over_formula: Option<f64>,
    /// Why `formula_bytes` is `null` (a kernel whose signature the formula does not know).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub formula_error: Option<String>,
    /// Shared-memory load and store requests.
    pub shared_requests: u64,
    /// Shared-memory wavefronts per request (1 = no bank conflict; `null` without shared
    /// memory accesses).
    pub shared_wavefronts_per_request: Option<f64>,
    /// Waves on an H200.
    pub waves_h200: f64,
    /// Grid fill on each known GPU.
    pub fill: Vec<gpu::Fill>,
    /// The sites with the most wasted sector bytes or excess wavefronts, worst first (at
    /// most 3).
    pub worst_sites: Vec<Site>,
}

/// The profile of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Profile {
    /// How the figures were made.
    pub notes: Vec<String>,
    /// The kernels, in `kernels/kernels.list` order.
    pub kernels: Vec<KernelProfile>,
    /// Selected entry points of the list that no library call launches (so there is no
    /// launch to profile): e.g. `dora_merged_weight_f32out_f32`, since an f32 layer's merged
    /// weight is already f32 and takes `dora_merged_weight_f32`.
    pub not_launched: Vec<String>,
}

/// Entry points of `kernels/kernels.list` that no library call launches, so [`drive`] cannot
/// reach them: an f32 layer's merged weight is f32 already and takes `dora_merged_weight_f32`.
pub const NOT_LAUNCHED_BY_LIBRARY: &[&str] = &["dora_merged_weight_f32out_f32"];

/// One dtype pair a kernel family may be stamped for: (activations, adapters).
const PAIRS: [(DType, DType); 5] = [
    (DType::F32, DType::F32),
    (DType::F16, DType::F16),
    (DType::BF16, DType::BF16),
    (DType::F16, DType::F32),
    (DType::BF16, DType::F32),
];

/// A launch record with the call that made it.
pub struct Launch {
    /// The library call.
    pub step: String,
    /// Its layer shape.
    pub shape: Shape,
    /// Activation dtype.
    pub act: DType,
    /// The record.
    pub record: LaunchRecord,
}

fn layer_for(
    shape: Shape,
    act: DType,
    adapter: DType,
    seed: u64,
) -> Result<(Layer, Tensor, Tensor)> {
    let set = crate::bench::inputs::random_set(shape, act, seed)?;
    let mut layer = set.layer;
    if adapter != act {
        layer.lora_a = layer.lora_a.cast(adapter);
        layer.lora_b = layer.lora_b.cast(adapter);
    }
    Ok((layer, set.x, set.dy))
}

/// Runs every kernel of `kernels/kernels.list` on `b` (a recording backend) through the
/// library's entry points: the norm and merged weight at `weight_shape`, the rest at `shape`
/// (and at `large_rank`). `on_step` is told the call, its shape and its activation dtype
/// before each call (a record sink labels the launches that follow with it). A step runs
/// only when `wanted` accepts the name (prefix) of one of the kernel families it launches.
///
/// # Errors
/// A failing launch, naming the step and the kernel.
pub fn drive(
    b: &EmuBackend,
    weight_shape: Shape,
    shape: Shape,
    large_rank: usize,
    wanted: &dyn Fn(&str) -> bool,
    on_step: &dyn Fn(&str, Shape, DType),
) -> Result<()> {
    for (act, adapter) in PAIRS {
        // A step runs when it launches a selected kernel: the entry point of one of its
        // families for this pair (for the activation dtype alone where the family has no
        // `_a32` form), or the family's single entry point.
        let want_pair = |prefixes: &[&str]| {
            prefixes.iter().any(|p| {
                let single = crate::kernels::FAMILIES
                    .iter()
                    .any(|(_, name, sfxs)| *name == *p && sfxs.is_empty());
                match spec::stamped(p, act, adapter).or_else(|| spec::stamped(p, act, act)) {
                    Some(entry) => wanted(&entry),
                    None => single && wanted(p),
                }
            })
        };
        // The weight passes at the weight shape: the norm, each variant of the table that
        // can run the pair, and the merged weight.
        let norms: Vec<_> = VARIANTS
            .iter()
            .filter(|v| v.op == spec::Op::Norm && v.supports(act, adapter, weight_shape.r))
            .filter(|v| want_pair(&[v.prefix]))
            .collect();
        let merged = want_pair(&["dora_merged_weight_f32out"]);
        if !norms.is_empty() || merged {
            let wl = layer_for(weight_shape, act, adapter, 10)?.0;
            for v in norms {
                let step = format!("norm ({}, {act} with {adapter} adapters)", v.prefix);
                on_step(&step, weight_shape, act);
                crate::kernels::norm(b, &wl, Some(v)).with_context(|| step.clone())?;
            }
            if merged {
                let step = format!("merged weight (f32 out, {act} with {adapter} adapters)");
                on_step(&step, weight_shape, act);
                crate::kernels::merged_weight(b, &wl).with_context(|| step.clone())?;
            }
        }
        let (layer, x, dy) = layer_for(shape, act, adapter, 11)?;
        let fwd_bwd = [
            "dora_shrink",
            "dora_compose",
            "dora_bwd_dz",
            "dora_tn_r16",
            "dora_scale_rows",
            "dora_mag_reduce_f32",
            "dora_sum_partials_f32",
            "dora_norm_v1",
            "dora_norm_v2",
            "dora_merged_weight",
        ];
        if want_pair(&fwd_bwd) {
            for mode in [GradMode::Detached, GradMode::Exact] {
                let step = format!("forward + backward ({mode:?}, {act} with {adapter} adapters)");
                on_step(&step, shape, act);
                crate::kernels::run(b, &layer, &x, Some(&dy), mode)
                    .with_context(|| step.clone())?;
            }
        }
        if large_rank != shape.r && want_pair(&["dora_tn_r64"]) {
            let big = Shape {
                r: large_rank,
                ..shape
            };
            let (layer, x, dy) = layer_for(big, act, adapter, 12)?;
            let step =
                format!("forward + backward (r = {large_rank}, {act} with {adapter} adapters)");
            on_step(&step, big, act);
            crate::kernels::run(b, &layer, &x, Some(&dy), GradMode::Detached)
                .with_context(|| step.clone())?;
        }
        if want_pair(&["dora_multi_shrink", "dora_multi_expand"]) {
            let second = layer_for(shape, act, adapter, 13)?.0;
            let multi = MultiLayer {
                weight: layer.weight.clone(),
                bias: None,
                fan_in_fan_out: false,
                adapters: vec![
                    AdapterWeights {
                        lora_a: layer.lora_a.clone(),
                        lora_b: layer.lora_b.clone(),
                        magnitude: layer.magnitude.clone(),
                        scaling: layer.scaling,
                    },
                    AdapterWeights {
                        lora_a: second.lora_a,
                        lora_b: second.lora_b,
                        magnitude: None,
                        scaling: second.scaling,
                    },
                ],
            };
            // Tokens cycle through adapter 0, adapter 1 and no adapter, starting with adapter 0:
            // a sampled launch records its first blocks (token 0), which then do an adapter's
            // work rather than a base-only token's early exit.
            let index: Vec<i32> = (0..shape.t).map(|i| ((i + 1) % 3) as i32 - 1).collect();
            let step = format!("multi-adapter forward ({act} with {adapter} adapters)");
            on_step(&step, shape, act);
            run_multi(b, &multi, &x, &index, MultiBase::Compute).with_context(|| step.clone())?;
        }
        if act == adapter && act == DType::F32 && want_pair(&["dora_multi_copy_table"]) {
            // An adapter pool's swap: a slot-table image staged, then committed by one copy.
            let step = "adapter pool swap (slot table committed)".to_string();
            on_step(&step, shape, act);
            // SAFETY: no slot holds an adapter, so the tables hold no device address.
            let mut tables =
                unsafe { SlotTables::new(b, adapter, (shape.d_in, shape.d_out), shape.r, &[None]) }
                    .with_context(|| step.clone())?;
            let staged = tables
                .stage_slot(b, 0, SlotContent::BaseOnly)
                .with_context(|| step.clone())?;
            // SAFETY: the staged slot is base-only (no address); `b` is the staging stream
            // itself, so the copy is ordered after the upload.
            unsafe { tables.commit(b, &staged) }.with_context(|| step.clone())?;
        }
        if act == adapter
            && want_pair(&[
                "baseline_axpby",
                "baseline_scale_cols",
                "baseline_row_norm",
                "baseline_col_dot",
            ])
        {
            let step = format!("bench rows, forward + backward ({act})");
            on_step(&step, shape, act);
            unfused_rows(b, shape, act).with_context(|| step.clone())?;
        }
    }
    Ok(())
}

/// The bench's forward + backward rows (fused and PEFT's unfused graph, whose passes are the
/// baseline kernels) on `b`, run once.
fn unfused_rows(b: &EmuBackend, shape: Shape, dtype: DType) -> Result<()> {
    let cfg = crate::bench::runner::Config {
        shapes: vec![(shape.d_in, shape.d_out)],
        tokens: vec![shape.t],
        ranks: vec![shape.r],
        dtype,
        ops: vec![Op::ForwardBackward],
        plan: crate::bench::measure::Plan::fixed(0, 1),
    };
    crate::bench::device::run_emu_on(b, &cfg, &mut |_| {}).map(drop)
}

/// True when entry point `name` contains one of the non-empty comma-separated parts of
/// `filter`.
fn matches(filter: &str, name: &str) -> bool {
    (filter.split(',').map(str::trim)).any(|p| !p.is_empty() && name.contains(p))
}

/// Profiles every kernel (or those `settings.kernel` selects) on the emulator.
///
/// # Errors
/// A failing launch (naming the call and kernel), or a kernel filter that matches nothing.
pub fn run(settings: &Settings, progress: &mut dyn FnMut(&str)) -> Result<Profile> {
    let filter = settings.kernel.clone();
    let selected = |name: &str| filter.as_deref().map_or(true, |f| matches(f, name));
    let listed: Vec<&str> = KERNELS.iter().map(|(_, n)| *n).collect();
    if let Some(f) = &filter {
        for part in f.split(',') {
            anyhow::ensure!(
                listed.iter().any(|n| n.contains(part.trim())),
                "--kernel {part}: no entry point of kernels/kernels.list contains it"
            );
        }
    }
    // The sink profiles each selected kernel's first launch as it returns and drops every
    // record (records of large launches do not fit in memory together).
    type Step = (String, Shape, DType);
    struct State {
        step: Option<Step>,
        sites: Sites,
        done: HashMap<String, KernelProfile>,
        filter: Option<String>,
    }
    let state = Arc::new(Mutex::new(State {
        step: None,
        sites: Sites::new(),
        done: HashMap::new(),
        filter: filter.clone(),
    }));
    let sink_state = Arc::clone(&state);
    let sink = Box::new(move |record: LaunchRecord| {
        let mut st = sink_state.lock().unwrap_or_else(|e| e.into_inner());
        let st = &mut *st;
        if st
            .filter
            .as_deref()
            .is_some_and(|f| !matches(f, &record.kernel))
        {
            return;
        }
        if st.done.contains_key(&record.kernel) {
            return;
        }
        let (step, shape, act) = st.step.clone().unwrap_or_else(|| {
            let none = Shape {
                t: 0,
                d_in: 0,
                d_out: 0,
                r: 0,
            };
            ("(no call)".into(), none, DType::F32)
        });
        let l = Launch {
            step,
            shape,
            act,
            record,
        };
        let p = profile_launch(&l, &mut st.sites);
        st.done.insert(l.record.kernel.clone(), p);
    });
    // Launches of kernels not selected, or already profiled, are skipped.
    let filter_state = Arc::clone(&state);
    let launch_filter = Box::new(move |kernel: &str| {
        let st = filter_state.lock().unwrap_or_else(|e| e.into_inner());
        st.filter.as_deref().map_or(true, |f| matches(f, kernel)) && !st.done.contains_key(kernel)
    });
    let b = EmuBackend::new(settings.seed).recording_into(
        RecordOptions {
            max_blocks: settings.max_blocks,
            skip_unrecorded: settings.max_blocks > 0,
            max_accesses: 40_000_000,
        },
        sink,
        Some(launch_filter),
    );
    let wanted = |p: &str| listed.iter().any(|n| n.starts_with(p) && selected(n));
    progress(&format!(
        "running the kernels on the recording emulator ({} launch configuration)",
        settings.tuning.name()
    ));
    spec::with_tuning(settings.tuning, || {
        drive(
            &b,
            settings.weight_shape,
            settings.shape,
            settings.large_rank,
            &wanted,
            &|step, shape, act| {
                state.lock().unwrap_or_else(|e| e.into_inner()).step =
                    Some((step.to_string(), shape, act));
            },
        )
    })?;
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    let mut kernels = Vec::new();
    let mut not_launched = Vec::new();
    for name in listed.iter().filter(|n| selected(n)) {
        match st.done.remove(*name) {
            Some(p) => kernels.push(p),
            None => not_launched.push(name.to_string()),
        }
    }
    Ok(Profile {
        notes: vec![
            format!(
                "launch configuration: {} (spec::Tuning)",
                settings.tuning.name()
            ),
            format!(
                "emulator access record; at most {} blocks per launch recorded and run \
                 (0 = all); grids, blocks and waves are those of the full launch",
                settings.max_blocks
            ),
            format!(
                "norm and merged weight at {}x{} r={}; the other kernels at {}",
                settings.weight_shape.d_in,
                settings.weight_shape.d_out,
                settings.weight_shape.r,
                settings.shape
            ),
            "unique bytes: distinct 32-byte sectors read + distinct sectors written; with sampled \
             blocks, sectors of one block scaled by blocks / recorded blocks, sectors shared by \
             recorded blocks counted once, and at most the sectors each array of the launch \
             spans"
                .into(),
            format!("registers: {}", registers::source()),
        ],
        kernels,
        not_launched,
    })
}

/// The profile of one launch.
pub fn profile_launch(l: &Launch, sites: &mut Sites) -> KernelProfile {
    let rec = &l.record;
    let arrays = formula::arrays(&rec.kernel, &rec.args, rec.grid);
    let f = metrics::figures(rec, sites, arrays.as_ref().map_or(&[][..], |(a, _)| &a[..]));
    let mut global = f.global_load;
    for c in [f.global_store, f.atomic] {
        global.requests += c.requests;
        global.units += c.units;
        global.bytes_used += c.bytes_used;
    }
    let shared_req = f.shared_load.requests + f.shared_store.requests;
    let shared_wf = f.shared_load.units + f.shared_store.units;
    let shared_bytes = rec.static_shared + rec.dynamic_shared;
    let registers = registers::registers(&rec.kernel);
    let fill: Vec<gpu::Fill> = gpu::GPUS
        .iter()
        .map(|g| {
            g.fill(
                rec.blocks(),
                rec.threads_per_block(),
                shared_bytes,
                registers,
            )
        })
        .collect();
    let formula = formula::bytes(&rec.kernel, &rec.args, rec.grid);
    let formula_error = formula.as_ref().err().map(|e| format!("{e:#}"));
    let formula = formula.ok();
    KernelProfile {
        kernel: rec.kernel.clone(),
        step: l.step.clone(),
        t: l.shape.t,
        d_in: l.shape.d_in,
        d_out: l.shape.d_out,
        r: l.shape.r,
        grid: rec.grid,
        block: rec.block,
        blocks: rec.blocks(),
        recorded_blocks: rec.recorded_blocks(),
        shared_bytes,
        registers,
        requests: global.requests,
        sectors_per_request: global.per_request(),
        load_efficiency: f.global_load.efficiency(),
        store_efficiency: f.global_store.efficiency(),
        unique_bytes: f.unique_global_bytes,
        formula_bytes: formula,
        unique_bytes_over_formula: formula.map(|x| f.unique_global_bytes / x),
        formula_error,
        shared_requests: shared_req,
        shared_wavefronts_per_request: (shared_req > 0)
            .then(|| shared_wf as f64 / shared_req as f64),
        waves_h200: fill[0].waves,
        fill,
        worst_sites: f
            .sites
            .iter()
            .filter(|s| s.excess > 0.0)
            .take(3)
            .map(|s| Site {
                site: s.site.clone(),
                kind: s.kind,
                requests: s.counts.requests,
                per_request: s.counts.per_request(),
                efficiency: if s.kind.starts_with("shared") {
                    None
                } else {
                    s.counts.efficiency()
                },
            })
            .collect(),
    }
}

/// The kernel families whose launch the tuning changes ([`spec::Tuning`]), or which the
/// tuning's 16-byte loads and tensor-core forms reach, in the before/after table.
pub const TUNED_FAMILIES: &[&str] = &[
    "dora_norm_v1",
    "dora_norm_v2",
    "dora_norm_reduce_f32",
    "dora_shrink",
    "dora_compose",
    "dora_bwd_dz",
    "dora_tn_r16",
];

/// The entry points of [`TUNED_FAMILIES`] in bf16, and bf16 with f32 adapters, that
/// `kernels/kernels.list` stamps (the table follows the list: a form added there appears).
pub fn tuned_entry_points() -> Vec<&'static str> {
    KERNELS
        .iter()
        .map(|(_, n)| *n)
        .filter(|n| {
            TUNED_FAMILIES.iter().any(|f| {
                *n == *f
                    || n.strip_prefix(f)
                        .is_some_and(|s| s == "_bf16" || s == "_bf16_a32")
            })
        })
        .collect()
}

/// The headline figures of a kernel, `|`-separated: the columns of [`KernelProfile::figures`].
const FIGURES: &str = "blocks|waves H200|requests|sectors/req|load eff|store eff|\
                       unique/formula|smem wavefronts/req";

impl KernelProfile {
    /// The cells of the headline figures ([`FIGURES`]): blocks, waves on an H200, requests,
    /// sectors per request, load and store efficiency, unique bytes over the formula, and
    /// shared-memory wavefronts per request (`-` where there is nothing to measure).
    fn figures(&self) -> Vec<String> {
        let pct = |v: Option<f64>| v.map_or("-".into(), |x| format!("{:.1}%", 100.0 * x));
        let num = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.2}"));
        vec![
            self.blocks.to_string(),
            format!("{:.2}", self.waves_h200),
            self.requests.to_string(),
            format!("{:.2}", self.sectors_per_request),
            pct(self.load_efficiency),
            pct(self.store_efficiency),
            num(self.unique_bytes_over_formula),
            num(self.shared_wavefronts_per_request),
        ]
    }
}

/// Every profiled kernel's headline figures and registers (ptxas sm_90, when known), one row
/// per entry point.
pub fn kernel_table(p: &Profile) -> Table {
    let mut table = Table::new(&format!("kernel|{FIGURES}|regs"));
    for k in &p.kernels {
        let mut row = vec![k.kernel.clone()];
        row.extend(k.figures());
        row.push(k.registers.map_or("-".into(), |r| r.to_string()));
        table.rows.push(row);
    }
    table
}

/// The before/after table of kernels/README.md ("Tuning"): each entry point of
/// [`tuned_entry_points`] profiled under [`Tuning::Previous`] and [`Tuning::Tuned`] at
/// `settings`' shapes, one row per kernel and configuration.
///
/// # Errors
/// A failing launch, as [`run`].
pub fn tuning_table(settings: &Settings, progress: &mut dyn FnMut(&str)) -> Result<Table> {
    let names = tuned_entry_points();
    let mut runs = Vec::new();
    for tuning in Tuning::ALL {
        let s = Settings {
            kernel: Some(names.join(",")),
            tuning,
            ..settings.clone()
        };
        runs.push((tuning, run(&s, progress)?));
    }
    let mut table = Table::new(&format!("kernel|shape|tuning|grid|{FIGURES}"));
    for name in names {
        for (tuning, p) in &runs {
            let mut row = vec![format!("`{name}`"), String::new(), tuning.name().into()];
            let Some(k) = p.kernels.iter().find(|k| k.kernel == name) else {
                row.push("not launched".into());
                row.resize(table.header.len(), String::new());
                table.rows.push(row);
                continue;
            };
            row[1] = if k.kernel.starts_with("dora_norm") {
                format!("{}×{}, r = {}", k.d_in, k.d_out, k.r)
            } else {
                format!("T = {}, {}×{}, r = {}", k.t, k.d_in, k.d_out, k.r)
            };
            row.push(format!("{}×{}×{}", k.grid[0], k.grid[1], k.grid[2]));
            row.extend(k.figures());
            table.rows.push(row);
        }
    }
    Ok(table)
}

/// The launch geometry of the tuned kernels before and after tuning, at the reference shapes
/// ([`crate::kernels::spec::tuning_rows`]).
pub fn geometry_table() -> Table {
    Table {
        header: crate::markdown::columns(crate::kernels::spec::TUNING_COLUMNS),
        rows: crate::kernels::spec::tuning_rows(),
    }
}

/// The generated sections of kernels/README.md ([`crate::markdown::section`]): the bytes each
/// kernel must move ([`formula::table`]), the launch geometry ([`geometry_table`]) and the
/// profile of the tuned kernels ([`tuning_table`]), all written by `dorafuse profile --device
/// emu --markdown kernels/README.md`.
pub const README_SECTIONS: [&str; 3] = [
    "dorafuse-profile:formulas",
    "dorafuse-profile:geometry",
    "dorafuse-profile:tuning",
];
