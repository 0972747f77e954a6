//! The benchmark's results as data: the versioned JSON document that `dorafuse bench
//! --json` and `benches/peft_bench.py` both write (schema in `docs/bench-json.md`), and the
//! facts every report carries (device, date, commit, ceilings).

use super::stats::Stats;
use crate::dtype::DType;
use crate::formula::{cost, floor_s, Cost, LayerKind, Op};
use crate::layer::Shape;
use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

/// The `schema` field of every document.
pub const SCHEMA: &str = "dorafuse-bench";
/// The `version` field; bumped on any incompatible change (docs/bench-json.md keeps the
/// history). Version 1 documents are read too: their `epilogue` rows are `compose` rows.
pub const VERSION: u32 = 2;

/// Implementation names of the `impl` field.
pub mod imp {
    /// The frozen base layer alone: cuBLAS on a GPU, the GEMM crate on the CPU.
    pub const BASE: &str = "base";
    /// dorafuse itself (fused kernels on a GPU or the emulator; the CPU path on the CPU),
    /// for LoRA and DoRA layers alike (the row's `kind` says which).
    pub const DORAFUSE: &str = "dorafuse";
    /// DoRA as PEFT performs it (materialised B·A, separate norm, scale and add passes),
    /// composed inside dorafuse from GEMMs and simple passes.
    pub const UNFUSED: &str = "unfused";
    /// PEFT's own layer in PyTorch eager mode (benches/peft_bench.py).
    pub const PEFT_EAGER: &str = "peft_eager";
    /// PEFT's layer under `torch.compile` (benches/peft_bench.py).
    pub const PEFT_COMPILE: &str = "peft_compile";
}

/// Every (implementation, layer kind) series a report can hold, in the order of the tables'
/// columns and the plot's legend.
pub const SERIES: [(&str, LayerKind); 8] = [
    (imp::BASE, LayerKind::Base),
    (imp::PEFT_EAGER, LayerKind::Base),
    (imp::DORAFUSE, LayerKind::Lora),
    (imp::UNFUSED, LayerKind::Dora),
    (imp::DORAFUSE, LayerKind::Dora),
    (imp::PEFT_EAGER, LayerKind::Lora),
    (imp::PEFT_EAGER, LayerKind::Dora),
    (imp::PEFT_COMPILE, LayerKind::Dora),
];

/// What ran the benchmark.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// `"cuda"`, `"cpu"` or `"emu"`.
    pub kind: String,
    /// A human description: GPU name and SM count, or the CPU model.
    pub name: String,
    /// CPU cores (logical) or GPU multiprocessors, when known.
    #[serde(default)]
    pub units: Option<u64>,
    /// Device (GPU) or host (CPU) memory in bytes, when known.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
}

/// How the runs were made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// The clock (CUDA events, host wall clock, ...).
    pub clock: String,
    /// Untimed runs before timing.
    pub warmup: usize,
    /// Fewest timed runs per row.
    pub min_reps: usize,
    /// Most timed runs per row.
    pub max_reps: usize,
    /// Per-row time budget of the timed runs, seconds (`null`: fixed count).
    #[serde(default)]
    pub budget_s: Option<f64>,
    /// How the cache was kept out of the measurement.
    pub cache_policy: String,
}

/// The machine's measured ceilings, taken in the same run as the rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ceilings {
    /// Copy bandwidth, GB/s (10⁹ bytes/s), counting bytes read plus bytes written.
    pub copy_gbps: f64,
    /// How it was measured (buffer size, method).
    pub copy_method: String,
    /// Large GEMM rate, TFLOP/s (10¹² FLOP/s).
    pub gemm_tflops: f64,
    /// Its dtype (`bf16` for cuBLAS on a GPU, `f32` for sgemm on the CPU).
    pub gemm_dtype: String,
    /// How it was measured (library, m×n×k).
    pub gemm_method: String,
}

/// One measured row: one implementation of one operation at one shape and dtype.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// Implementation (see [`imp`]).
    #[serde(rename = "impl")]
    pub implementation: String,
    /// The layer: base, LoRA or DoRA.
    pub kind: LayerKind,
    /// The operation.
    pub op: Op,
    /// Activation and weight dtype (`f32`, `f16`, `bf16`).
    pub dtype: String,
    /// Tokens.
    pub t: usize,
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
    /// Adapter rank (also recorded on base rows: the shape the row belongs to).
    pub r: usize,
    /// Timing summary.
    pub time: Stats,
    /// Bytes by formula (`formula::cost`).
    #[serde(default)]
    pub bytes: f64,
    /// FLOPs by formula.
    #[serde(default)]
    pub flops: f64,
    /// bytes / median time, GB/s.
    #[serde(default)]
    pub gbps: f64,
    /// FLOPs / median time, TFLOP/s.
    #[serde(default)]
    pub tflops: f64,
    /// Achieved fraction of the measured copy bandwidth.
    #[serde(default)]
    pub frac_copy: Option<f64>,
    /// Achieved fraction of the measured GEMM rate.
    #[serde(default)]
    pub frac_gemm: Option<f64>,
    /// Floor time (max of bytes/bandwidth and FLOPs/rate) over the median: 1.0 is the
    /// roofline.
    #[serde(default)]
    pub frac_floor: Option<f64>,
    /// Peak memory beyond the inputs and outputs, bytes, when known.
    #[serde(default)]
    pub extra_mem_bytes: Option<u64>,
    /// How `extra_mem_bytes` was obtained.
    #[serde(default)]
    pub extra_mem_source: Option<String>,
    /// Anything a reader must know about this row.
    #[serde(default)]
    pub note: Option<String>,
}

impl Row {
    /// Builds a row, filling bytes, FLOPs and the achieved rates from the formulas and the
    /// ceilings.
    ///
    /// # Errors
    /// An operation that `kind` does not have (e.g. the norm of a base layer).
    pub fn new(
        implementation: &str,
        kind: LayerKind,
        op: Op,
        shape: Shape,
        dtype: DType,
        time: Stats,
        ceilings: Option<&Ceilings>,
    ) -> Result<Row> {
        let c: Cost = cost(kind, op, shape, dtype)
            .with_context(|| format!("a {kind:?} layer has no {} operation", op.name()))?;
        let med = time.median_s;
        let gbps = c.bytes / med / 1e9;
        let tflops = c.flops / med / 1e12;
        let (frac_copy, frac_gemm, frac_floor) = match ceilings {
            Some(ce) => (
                Some(gbps / ce.copy_gbps),
                Some(tflops / ce.gemm_tflops),
                Some(floor_s(c, ce.copy_gbps * 1e9, ce.gemm_tflops * 1e12) / med),
            ),
            None => (None, None, None),
        };
        Ok(Row {
            implementation: implementation.to_string(),
            kind,
            op,
            dtype: dtype.name().to_string(),
            t: shape.t,
            d_in: shape.d_in,
            d_out: shape.d_out,
            r: shape.r,
            time,
            bytes: c.bytes,
            flops: c.flops,
            gbps,
            tflops,
            frac_copy,
            frac_gemm,
            frac_floor,
            extra_mem_bytes: None,
            extra_mem_source: None,
            note: None,
        })
    }

    /// The row's shape.
    pub fn shape(&self) -> Shape {
        Shape {
            t: self.t,
            d_in: self.d_in,
            d_out: self.d_out,
            r: self.r,
        }
    }

    /// A short label of the implementation and layer: `base`, `LoRA`, `DoRA fused`,
    /// `DoRA unfused`, `PEFT DoRA (eager)`, ...
    pub fn series(&self) -> String {
        series_label(&self.implementation, self.kind)
    }
}

/// The label of an (implementation, kind) pair in tables and plots.
pub fn series_label(implementation: &str, kind: LayerKind) -> String {
    let k = match kind {
        LayerKind::Base => "base",
        LayerKind::Lora => "LoRA",
        LayerKind::Dora => "DoRA",
    };
    match implementation {
        imp::BASE => "base".into(),
        imp::DORAFUSE if kind == LayerKind::Dora => "DoRA fused".into(),
        imp::DORAFUSE => k.into(),
        imp::UNFUSED => format!("{k} unfused"),
        imp::PEFT_EAGER => format!("PEFT {k} (eager)"),
        imp::PEFT_COMPILE => format!("PEFT {k} (compile)"),
        other => format!("{other} {k}"),
    }
}

/// A whole benchmark document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Always [`SCHEMA`].
    pub schema: String,
    /// [`VERSION`] of the writer.
    pub version: u32,
    /// The program that wrote it (`dorafuse 0.1.0`, `peft_bench.py (peft 0.21.2, torch
    /// 2.5.1)`).
    pub producer: String,
    /// What ran it.
    pub device: DeviceInfo,
    /// When (UTC, RFC 3339).
    pub date: String,
    /// The commit the binary was built from (or `DORAFUSE_GIT_COMMIT`), see [`git_commit`].
    #[serde(default)]
    pub git_commit: Option<String>,
    /// How the runs were made.
    pub settings: Settings,
    /// Ceilings measured in the same run (absent on the emulator: meaningless there).
    #[serde(default)]
    pub ceilings: Option<Ceilings>,
    /// The rows.
    pub rows: Vec<Row>,
    /// Caveats, one sentence each (e.g. "emulator times say nothing about GPU speed").
    #[serde(default)]
    pub notes: Vec<String>,
}

impl Report {
    /// An empty report stamped with the producer, date and commit.
    pub fn new(device: DeviceInfo, settings: Settings, ceilings: Option<Ceilings>) -> Report {
        Report {
            schema: SCHEMA.into(),
            version: VERSION,
            producer: format!("dorafuse {}", env!("CARGO_PKG_VERSION")),
            device,
            date: utc_now_rfc3339(),
            git_commit: git_commit(),
            settings,
            ceilings,
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// The row of `implementation`/`kind`/`op` at `shape`, if measured.
    pub fn find(
        &self,
        implementation: &str,
        kind: LayerKind,
        op: Op,
        shape: Shape,
    ) -> Option<&Row> {
        self.rows.iter().find(|r| {
            r.implementation == implementation && r.kind == kind && r.op == op && r.shape() == shape
        })
    }

    /// Appends the rows of `other` (another run on the same machine, e.g. PEFT's), after
    /// checking it is the same schema and the same kind of device, and that no row of it is
    /// already here. A device of another name adds a note.
    ///
    /// # Errors
    /// A different schema, version or device kind, or a row measured in both.
    pub fn merge(&mut self, other: Report) -> Result<()> {
        ensure!(
            other.schema == SCHEMA && other.version == self.version,
            "cannot merge a {} v{} document into {SCHEMA} v{VERSION}",
            other.schema,
            other.version
        );
        let (a, b) = (&self.device, &other.device);
        ensure!(
            a.kind == b.kind,
            "rows measured on {} ({}) cannot join a table of {} ({})",
            b.kind,
            b.name,
            a.kind,
            a.name
        );
        if a.name != b.name {
            let note = format!(
                "rows of {} were measured on {} (this table: {})",
                other.producer, b.name, a.name
            );
            self.notes.push(note);
        }
        for r in &other.rows {
            let twice = (self.rows.iter()).any(|x| {
                (&x.implementation, x.kind, x.op, x.shape(), &x.dtype)
                    == (&r.implementation, r.kind, r.op, r.shape(), &r.dtype)
            });
            ensure!(
                !twice,
                "the row {} {} {} {} is in both documents",
                r.series(),
                r.op.name(),
                r.shape(),
                r.dtype
            );
        }
        self.rows.extend(other.rows);
        for n in other.notes {
            if !self.notes.contains(&n) {
                self.notes.push(n);
            }
        }
        Ok(())
    }

    /// Serialises to pretty JSON.
    ///
    /// # Errors
    /// A non-finite number somewhere (JSON has none).
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).context("serialising the benchmark report")
    }

    /// Parses a document, checking its schema and version.
    ///
    /// # Errors
    /// Malformed JSON, another schema, or an unsupported version.
    pub fn from_json(s: &str) -> Result<Report> {
        // Check the header first, so a document of another kind gets a clear message
        // rather than a missing-field error.
        let head: serde_json::Value = serde_json::from_str(s).context("not JSON")?;
        let schema = head.get("schema").and_then(|v| v.as_str()).unwrap_or("");
        ensure!(
            schema == SCHEMA,
            "not a dorafuse benchmark document (schema {schema:?}, expected {SCHEMA:?})"
        );
        let version = head.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        ensure!(
            (1..=VERSION as u64).contains(&version),
            "benchmark document version {version} is not supported (this build reads 1 to {VERSION})"
        );
        let mut rep: Report =
            serde_json::from_value(head).context("benchmark document does not match the schema")?;
        // Version 1 differs only in the name of compose, which `Op` reads under both names.
        rep.version = VERSION;
        for r in &rep.rows {
            let t = &r.time;
            let times = [t.median_s, t.p10_s, t.p90_s, t.mad_s, t.min_s];
            ensure!(
                t.runs > 0 && times.iter().all(|v| v.is_finite() && *v >= 0.0),
                "row {} {} {}: its times are not those of timed runs ({t:?})",
                r.series(),
                r.op.name(),
                r.shape()
            );
        }
        rep.fill_derived()?;
        Ok(rep)
    }

    /// Fills bytes, FLOPs, rates and fractions from the formulas and this document's ceilings
    /// for rows that lack them (benches/peft_bench.py leaves them to dorafuse, so the formulas
    /// stay in one place).
    ///
    /// # Errors
    /// A row with an unknown dtype or an operation its layer kind does not have.
    pub fn fill_derived(&mut self) -> Result<()> {
        for row in self
            .rows
            .iter_mut()
            .filter(|r| r.bytes == 0.0 && r.flops == 0.0)
        {
            let what = || format!("row {} {}", row.series(), row.op.name());
            let dt = DType::parse(&row.dtype).with_context(what)?;
            let (im, shape, c) = (&row.implementation, row.shape(), self.ceilings.as_ref());
            let filled = Row::new(im, row.kind, row.op, shape, dt, row.time, c)?;
            *row = Row {
                extra_mem_bytes: row.extra_mem_bytes,
                extra_mem_source: row.extra_mem_source.take(),
                note: row.note.take(),
                ..filled
            };
        }
        Ok(())
    }

    /// Writes the JSON atomically to `path`.
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn write(&self, path: &Path) -> Result<()> {
        let json = self.to_json()?;
        crate::fsutil::write_atomic(path, |f| {
            f.write_all(json.as_bytes())?;
            f.write_all(b"\n")?;
            Ok(())
        })
    }

    /// Reads a JSON document from `path`.
    ///
    /// # Errors
    /// Unreadable file or invalid document, naming the path.
    pub fn read(path: &Path) -> Result<Report> {
        let s = std::fs::read_to_string(path)
            .with_context(|| format!("reading benchmark results {}", path.display()))?;
        Report::from_json(&s).with_context(|| format!("benchmark results {}", path.display()))
    }
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ` (RFC 3339, whole seconds).
pub fn utc_now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "unknown".into())
}

/// The commit the binary was built from (`git rev-parse HEAD` at build time, stamped by
/// build.rs), or `DORAFUSE_GIT_COMMIT` when set (a bundle built elsewhere); `None` when
/// neither is known.
pub fn git_commit() -> Option<String> {
    let set = std::env::var("DORAFUSE_GIT_COMMIT").ok();
    let c = set.as_deref().map(str::trim).filter(|v| !v.is_empty());
    let c = c.unwrap_or(env!("DORAFUSE_BUILD_COMMIT"));
    (c != "unknown").then(|| c.to_string())
}

/// The host: CPU model, logical cores and memory (from `sysinfo`).
pub fn host_cpu() -> DeviceInfo {
    let refresh = sysinfo::RefreshKind::nothing()
        .with_cpu(sysinfo::CpuRefreshKind::nothing())
        .with_memory(sysinfo::MemoryRefreshKind::nothing().with_ram());
    let sys = sysinfo::System::new_with_specifics(refresh);
    let brand = sys.cpus().first().map(|c| c.brand().trim().to_string());
    DeviceInfo {
        kind: "cpu".into(),
        name: brand
            .filter(|b| !b.is_empty())
            .unwrap_or_else(|| "unknown CPU".into()),
        units: std::thread::available_parallelism()
            .ok()
            .map(|n| n.get() as u64),
        memory_bytes: Some(sys.total_memory()).filter(|&m| m > 0),
    }
}

/// The 1-minute load average, when the system reports one.
pub fn load_average() -> Option<f64> {
    Some(sysinfo::System::load_average().one).filter(|l| l.is_finite() && *l >= 0.0)
}

/// A note of the load average before (`before`) and now, warning when other processes
/// competed for the cores.
pub fn load_note(before: Option<f64>) -> Option<String> {
    let (a, b) = (before?, load_average()?);
    let cores = host_cpu().units.unwrap_or(1);
    let busy = a.max(b) > 0.5 * cores as f64 + 1.0;
    Some(format!(
        "load average {a:.1} before and {b:.1} after the run on {cores} cores{}",
        if busy {
            ": other processes competed for the cores, so spreads are wide and single rows \
             can be off by tens of percent"
        } else {
            ""
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::table::tests::report;

    #[test]
    fn json_round_trip_and_version_1() {
        let r = report();
        let s = r.to_json().unwrap();
        for field in [
            "\"impl\": \"dorafuse\"",
            "\"op\": \"forward\"",
            "\"kind\": \"dora\"",
        ] {
            assert!(s.contains(field), "{s}");
        }
        let back = Report::from_json(&s).unwrap();
        assert_eq!((&back.device, &back.settings), (&r.device, &r.settings));
        assert_eq!((&back.date, &back.git_commit), (&r.date, &r.git_commit));
        assert_eq!(back.rows.len(), r.rows.len());
        for (a, b) in back.rows.iter().zip(&r.rows) {
            assert_eq!(
                (&a.implementation, a.kind, a.op),
                (&b.implementation, b.kind, b.op)
            );
            assert_eq!(
                (a.shape(), a.frac_floor.is_some()),
                (b.shape(), b.frac_floor.is_some())
            );
            assert!((a.time.p10_s - b.time.p10_s).abs() <= 1e-15 * b.time.p10_s);
        }
        // A version 1 document, where compose was called epilogue, is read as this version.
        let mut v: serde_json::Value = serde_json::from_str(&s).unwrap();
        v["version"] = 1.into();
        v["rows"][0]["op"] = "epilogue".into();
        v["rows"][0]["kind"] = "dora".into();
        let old = Report::from_json(&v.to_string()).unwrap();
        assert_eq!((old.version, old.rows[0].op), (VERSION, Op::Compose));
        // Other documents are refused, naming what is wrong.
        let e = Report::from_json("{\"schema\": \"other\"}").unwrap_err();
        assert!(e.to_string().contains("not a dorafuse benchmark"), "{e}");
        v["version"] = 99.into();
        let e = Report::from_json(&v.to_string()).unwrap_err();
        assert!(e.to_string().contains("version 99"), "{e}");
        v["version"] = 2.into();
        v["rows"][0]["op"] = "fwd".into();
        assert!(Report::from_json(&v.to_string()).is_err());
        v["rows"][0]["op"] = "forward".into();
        v["rows"][0]["time"]["median_s"] = (-1.0).into();
        let e = Report::from_json(&v.to_string()).unwrap_err();
        assert!(e.to_string().contains("not those of timed runs"), "{e}");
    }

    #[test]
    fn rates_follow_the_formulas_and_are_filled_when_absent() {
        let r = report();
        let row = &r.rows[3];
        assert_eq!((row.kind, row.op), (LayerKind::Dora, Op::Forward));
        let c = cost(LayerKind::Dora, Op::Forward, row.shape(), DType::F32).unwrap();
        let med = row.time.median_s;
        assert_eq!((row.bytes, row.flops), (c.bytes, c.flops));
        assert!((row.gbps - c.bytes / med / 1e9).abs() < 1e-9);
        assert!((row.frac_copy.unwrap() - row.gbps / 10.0).abs() < 1e-12);
        assert!((row.frac_floor.unwrap() - floor_s(c, 10e9, 0.1e12) / med).abs() < 1e-12);
        let no_norm = Row::new(
            imp::BASE,
            LayerKind::Base,
            Op::Norm,
            row.shape(),
            DType::F32,
            row.time,
            None,
        );
        assert!(no_norm.is_err());
        // What benches/peft_bench.py writes: no bytes, FLOPs or rates.
        let mut v: serde_json::Value = serde_json::from_str(&r.to_json().unwrap()).unwrap();
        for row in v["rows"].as_array_mut().unwrap() {
            for k in [
                "bytes",
                "flops",
                "gbps",
                "tflops",
                "frac_copy",
                "frac_gemm",
                "frac_floor",
            ] {
                row.as_object_mut().unwrap().remove(k);
            }
        }
        let back = Report::from_json(&v.to_string()).unwrap();
        for (a, b) in back.rows.iter().zip(&r.rows) {
            assert_eq!((a.bytes, a.flops), (b.bytes, b.flops));
            assert!((a.gbps - b.gbps).abs() <= 1e-12 * b.gbps);
            assert!(a.frac_floor.is_some());
        }
    }

    #[test]
    fn merge_find_and_labels() {
        let mut a = report();
        a.notes.push("a note".into());
        let n = a.rows.len();
        // Rows measured twice, or on another kind of device, are refused.
        let e = a.clone().merge(a.clone()).unwrap_err();
        assert!(e.to_string().contains("is in both documents"), "{e}");
        let mut emu = a.clone();
        emu.device.kind = "emu".into();
        let e = a.clone().merge(emu).unwrap_err();
        assert!(e.to_string().contains("cannot join a table of cpu"), "{e}");
        let mut peft = a.clone();
        for r in &mut peft.rows {
            r.implementation = imp::PEFT_EAGER.into();
        }
        a.merge(peft).unwrap();
        assert_eq!((a.rows.len(), a.notes.len()), (2 * n, 1));
        let shape = a.rows[0].shape();
        assert!(a
            .find(imp::BASE, LayerKind::Base, Op::Forward, shape)
            .is_some());
        assert!(a
            .find(imp::UNFUSED, LayerKind::Dora, Op::Backward, shape)
            .is_none());
        assert_eq!(series_label(imp::DORAFUSE, LayerKind::Dora), "DoRA fused");
        assert_eq!(series_label(imp::DORAFUSE, LayerKind::Lora), "LoRA");
        assert_eq!(series_label(imp::UNFUSED, LayerKind::Dora), "DoRA unfused");
        assert_eq!(
            series_label(imp::PEFT_COMPILE, LayerKind::Dora),
            "PEFT DoRA (compile)"
        );
    }

    #[test]
    fn dates_commits_and_host_facts() {
        let d = utc_now_rfc3339();
        assert_eq!((d.len(), &d[10..11], &d[19..]), (20, "T", "Z"), "{d}");
        let c = git_commit();
        assert!(c.is_none_or(|c| c.len() >= 7 && !c.contains(char::is_whitespace)));
        let h = host_cpu();
        assert!(
            h.units.unwrap() >= 1 && h.memory_bytes.unwrap() > 1 << 20,
            "{h:?}"
        );
        assert!(load_note(Some(0.0))
            .unwrap()
            .starts_with("load average 0.0 before"));
    }
}
