//! `adapter_config.json`: PEFT's `LoraConfig` as saved by `save_pretrained`, and PEFT's rules
//! for which modules it targets and which rank and alpha each one gets.
//!
//! The matching rules are PEFT's own (peft 0.21.2, read from its source):
//!
//! - **`target_modules`** (`peft/tuners/tuners_utils.py`, `check_target_module_exists`): a
//!   string is a regular expression that must match the whole module name
//!   (`re.fullmatch`, via `peft/utils/other.py` `match_target_against_key`); a list matches a
//!   module whose name equals an entry or ends with `"." + entry` (plain text, not a regex).
//!   The string `"all-linear"` is expanded by PEFT before saving; if it appears anyway, every
//!   module present in the adapter file is accepted.
//! - **`exclude_modules`**: the same two forms, checked first; a match excludes the module.
//! - **`modules_to_save`**: a module named `m`, or inside `m`
//!   (`re.match(rf"(^|.*\.){m}($|\..*)", key)`), is never adapted.
//! - **`layers_to_transform` / `layers_pattern`** (list form of `target_modules` only, and not
//!   for a name equal to an entry, which PEFT accepts before looking at layers): the
//!   layer index is the first number that follows `<pattern>.` (or, without a pattern, the
//!   first `.<name>.<digits>.` segment), and must be in the list (or equal the integer).
//! - **`rank_pattern` / `alpha_pattern`** (`peft/utils/other.py` `get_pattern_key`): the
//!   first key, in the file's order, for which `re.match(rf"(.*\.)?({key})$", name)` succeeds
//!   gives the module's r (alpha); otherwise `r` (`lora_alpha`). PEFT writes the file with
//!   sorted keys, so file order is the order PEFT itself sees on load.
//!
//! Python's `re` and Rust's `regex` agree on the syntax used in practice (classes,
//! alternation, repetition, groups); a pattern Rust cannot compile (look-around,
//! back-references) is refused with an error naming it instead of being matched differently.

use anyhow::{bail, ensure, Context, Result};
use regex::Regex;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use std::fmt;

/// `target_modules` / `exclude_modules`: a regular expression or a list of name suffixes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModuleSelector {
    /// A regular expression matched against the whole module name (`re.fullmatch`).
    Regex(String),
    /// Module names, each matching the name itself or any name ending in `"." + entry`.
    List(Vec<String>),
}

/// An integer or a list of integers (`layers_to_transform`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IndexSelector {
    /// One layer index.
    One(i64),
    /// Several layer indices.
    Many(Vec<i64>),
}

/// A string or a list of strings (`layers_pattern`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    /// One pattern.
    One(String),
    /// Several patterns, tried in order.
    Many(Vec<String>),
}

/// A JSON object read with its keys in file order (PEFT's `get_pattern_key` takes the first
/// matching key in dictionary order, which is file order).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OrderedMap<V>(pub Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V2<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for V2<V> {
            type Value = OrderedMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_unit<E>(self) -> std::result::Result<Self::Value, E> {
                Ok(OrderedMap(Vec::new()))
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut v = Vec::new();
                while let Some((k, val)) = map.next_entry::<String, V>()? {
                    v.push((k, val));
                }
                Ok(OrderedMap(v))
            }
        }
        d.deserialize_any(V2(std::marker::PhantomData))
    }
}

impl<V: Serialize> Serialize for OrderedMap<V> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// The fields of PEFT's `LoraConfig` that decide how an adapter's tensors are applied.
///
/// Every other field of the file is kept untouched in [`AdapterConfig::raw`], so a saved
/// adapter carries the original configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LoraFields {
    /// `"LORA"` (other PEFT methods are refused).
    #[serde(default)]
    pub peft_type: Option<String>,
    /// Default rank.
    pub r: usize,
    /// Default alpha.
    pub lora_alpha: f64,
    /// DoRA: each module carries a magnitude vector.
    #[serde(default)]
    pub use_dora: bool,
    /// rsLoRA: s = alpha / sqrt(r).
    #[serde(default)]
    pub use_rslora: bool,
    /// Base weights stored `[d_in, d_out]` (GPT-2 `Conv1D`).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Which modules are adapted.
    #[serde(default)]
    pub target_modules: Option<ModuleSelector>,
    /// Which modules are never adapted.
    #[serde(default)]
    pub exclude_modules: Option<ModuleSelector>,
    /// Per-module rank overrides.
    #[serde(default)]
    pub rank_pattern: OrderedMap<usize>,
    /// Per-module alpha overrides.
    #[serde(default)]
    pub alpha_pattern: OrderedMap<f64>,
    /// `"none"`, `"all"` or `"lora_only"`: whether base biases were trained (and saved in
    /// the adapter file, whence they replace the base's when merging).
    #[serde(default)]
    pub bias: Option<String>,
    /// A trainable bias on lora_B.
    #[serde(default)]
    pub lora_bias: bool,
    /// Modules trained in full and saved as a whole.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Only these layer indices are adapted.
    #[serde(default)]
    pub layers_to_transform: Option<IndexSelector>,
    /// The name of the layer list (`layers`, `h`, ...) the indices refer to.
    #[serde(default)]
    pub layers_pattern: Option<StringOrList>,
}

/// What `init_lora_weights` did to the base weights when the adapter was created, and so
/// what PEFT redoes when it loads the adapter onto the original base
/// (`peft/tuners/lora/layer.py`, `LoraLayer.update_layer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// The base is left as it is: `true`, `false`, `"gaussian"`, `"eva"`, `"orthogonal"`,
    /// and `"mica"` (plain LoRA only) initialise A and B alone.
    KeepsBase,
    /// `"pissa"`: W_res = W0 − U_r·S_r·V_rᵀ, the top-r part of W0's SVD (`pissa_init`), in f32
    /// on `[d_out, d_in]` rows, rounded back to the base dtype.
    Pissa,
    /// `"olora"`: W_res = W0 − s·Q_r·R_r, Q_r·R_r the first r columns of W0's QR
    /// decomposition (`olora_init`), in f32 on the weight as stored, rounded back.
    Olora,
}

/// A parsed `adapter_config.json`: the fields dorafuse uses, and the whole file.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// The fields that decide the math.
    pub lora: LoraFields,
    /// The whole JSON object as read (written back by `save`).
    pub raw: serde_json::Map<String, serde_json::Value>,
}

/// Fields that change the math or the file layout in ways dorafuse does not implement;
/// any value other than null/false/empty is refused, naming the field.
const UNSUPPORTED_FIELDS: &[(&str, &str)] = &[
    ("use_qalora", "QA-LoRA (quantized bases) is not supported"),
    ("use_bdlora", "block-diagonal LoRA is not supported"),
    ("layer_replication", "layer replication is not supported"),
    (
        "target_parameters",
        "adapters on nn.Parameter targets are not supported",
    ),
    (
        "trainable_token_indices",
        "trainable token embeddings are not supported",
    ),
    (
        "alora_invocation_tokens",
        "activated LoRA (aLoRA) is not supported",
    ),
    ("arrow_config", "Arrow routing is not supported"),
    ("kasa_config", "KaSA is not supported"),
    ("velora_config", "VeLoRA is not supported"),
    ("monteclora_config", "MonteCLoRA is not supported"),
    (
        "megatron_config",
        "Megatron-parallel layers are not supported",
    ),
];

fn is_unset(v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// Compiles a regex, turning the regex crate's multi-line syntax report into one line that
/// names the pattern and the config field.
fn compile(full: &str, pattern: &str, what: &str) -> Result<Regex> {
    Regex::new(full).map_err(|e| {
        let text = e.to_string();
        let why = text
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .unwrap_or("invalid")
            .trim_start_matches("error: ")
            .to_string();
        anyhow::anyhow!("{what} {pattern:?} is not a regular expression dorafuse can match ({why}; Rust regex syntax has no look-around or back-references)")
    })
}

/// Compiles a Python regular expression for `re.fullmatch` (anchored at both ends).
pub(crate) fn compile_full(pattern: &str, what: &str) -> Result<Regex> {
    compile(&format!("^(?:{pattern})$"), pattern, what)
}

/// Compiles PEFT's `get_pattern_key` test, `re.match(rf"(.*\.)?({key})$", name)`.
fn compile_pattern_key(key: &str, what: &str) -> Result<Regex> {
    compile(
        &format!(r"^(?:.*\.)?(?:{key})$"),
        key,
        &format!("{what} key"),
    )
}

/// Compiled matchers for one config.
#[derive(Debug, Clone)]
pub struct Matcher {
    target: TargetMatch,
    exclude: Option<TargetMatch>,
    modules_to_save: Vec<Regex>,
    layers: Option<Vec<i64>>,
    layer_patterns: Vec<Regex>,
    rank_keys: Vec<(Regex, usize, String)>,
    alpha_keys: Vec<(Regex, f64, String)>,
    default_r: usize,
    default_alpha: f64,
}

#[derive(Debug, Clone)]
enum TargetMatch {
    Any,
    Regex(Regex),
    List(Vec<String>),
}

impl TargetMatch {
    fn matches(&self, key: &str) -> bool {
        match self {
            TargetMatch::Any => true,
            TargetMatch::Regex(r) => r.is_match(key),
            TargetMatch::List(l) => l.iter().any(|t| {
                key == t
                    || (key.len() > t.len()
                        && key.ends_with(t.as_str())
                        && key.as_bytes()[key.len() - t.len() - 1] == b'.')
            }),
        }
    }
}

impl Matcher {
    /// True when PEFT would put an adapter on the module `name` (a name relative to the
    /// model given to `get_peft_model`, e.g. `encoder.layer.0.attention.self.query`).
    pub fn is_target(&self, name: &str) -> bool {
        if let Some(ex) = &self.exclude {
            if ex.matches(name) {
                return false;
            }
        }
        if self.modules_to_save.iter().any(|r| r.is_match(name)) {
            return false;
        }
        if !self.target.matches(name) {
            return false;
        }
        // layers_to_transform only applies to the list form, and only when the name matched
        // by suffix: PEFT's `elif key in config.target_modules` accepts an exact name first.
        if let (TargetMatch::List(list), Some(layers)) = (&self.target, &self.layers) {
            if list.iter().any(|t| t == name) {
                return true;
            }
            return match self.layer_index(name) {
                Some(i) => layers.contains(&i),
                None => false,
            };
        }
        true
    }

    fn layer_index(&self, name: &str) -> Option<i64> {
        let caps = if self.layer_patterns.is_empty() {
            // PEFT: re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
            Regex::new(r"^.*?\.[^.]*\.(?P<idx>\d+)\.")
                .expect("constant regex")
                .captures(name)
                .and_then(|c| c.name("idx").map(|m| m.as_str().to_string()))
        } else {
            self.layer_patterns.iter().find_map(|r| {
                r.captures(name)
                    .and_then(|c| c.name("idx").map(|m| m.as_str().to_string()))
            })
        };
        caps.and_then(|s| s.parse().ok())
    }

    /// True when `module` is one of `modules_to_save` or lies inside one (PEFT's
    /// `re.match(rf"(^|.*\.){m}($|\..*)", key)`): its trained copy is in the adapter file.
    pub fn in_modules_to_save(&self, module: &str) -> bool {
        self.modules_to_save.iter().any(|r| r.is_match(module))
    }

    /// The module's rank: the first matching `rank_pattern` key, else `r`.
    pub fn rank(&self, name: &str) -> usize {
        self.rank_keys
            .iter()
            .find(|(re, _, _)| re.is_match(name))
            .map_or(self.default_r, |(_, r, _)| *r)
    }

    /// The module's alpha: the first matching `alpha_pattern` key, else `lora_alpha`.
    pub fn alpha(&self, name: &str) -> f64 {
        self.alpha_keys
            .iter()
            .find(|(re, _, _)| re.is_match(name))
            .map_or(self.default_alpha, |(_, a, _)| *a)
    }

    /// The `rank_pattern` key that gave the module its rank, if any (for messages).
    pub fn rank_key(&self, name: &str) -> Option<&str> {
        self.rank_keys
            .iter()
            .find(|(re, _, _)| re.is_match(name))
            .map(|(_, _, k)| k.as_str())
    }
}

impl AdapterConfig {
    /// Parses the text of an `adapter_config.json`.
    ///
    /// # Errors
    /// Malformed JSON, missing `r`/`lora_alpha`, a PEFT method other than LoRA, or a field
    /// whose value dorafuse does not implement (named).
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(text).context("adapter_config.json is not a JSON object")?;
        // Parsed from the text, not from `raw`, so that rank_pattern and alpha_pattern keep the
        // file's key order (serde_json's Map may sort them).
        let lora: LoraFields = serde_json::from_str(text)
            .context("adapter_config.json: cannot read the LoRA fields")?;
        let cfg = Self { lora, raw };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads `adapter_config.json` from a file.
    ///
    /// # Errors
    /// I/O errors and everything [`AdapterConfig::from_json`] refuses; the path is named.
    pub fn read(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("{}", path.display()))
    }

    /// What `init_lora_weights` did to the base (see [`Init`]).
    ///
    /// # Errors
    /// An initialisation whose residual base cannot be re-derived from the files, named with
    /// the reason: `"pissa_niter_N"` (randomised SVD), `"corda"` (needs the training
    /// activations), `"loftq"` (needs the quantiser), `"lora_ga"` (needs the training
    /// gradients; PEFT's own reload silently skips the residual), `"mica"` with DoRA (PEFT
    /// has no such variant), and any value PEFT 0.21 does not know.
    pub fn init(&self) -> Result<Init> {
        use serde_json::Value;
        let v = self.raw.get("init_lora_weights").unwrap_or(&Value::Null);
        let s = match v {
            Value::Null | Value::Bool(_) => return Ok(Init::KeepsBase),
            Value::String(s) => s.as_str(),
            other => bail!("init_lora_weights is {other}: PEFT takes true, false or a method name"),
        };
        let lower = s.to_ascii_lowercase();
        Ok(match lower.as_str() {
            "gaussian" | "eva" | "orthogonal" => Init::KeepsBase,
            "mica" if !self.lora.use_dora => Init::KeepsBase,
            "mica" => bail!("init_lora_weights is \"mica\" with use_dora: PEFT has no DoRA variant of MiCA"),
            // PEFT compares the exact string "pissa"; "olora" case-insensitively.
            "pissa" if s == "pissa" => Init::Pissa,
            "olora" => Init::Olora,
            _ if lower.starts_with("pissa_niter_") => bail!("init_lora_weights is {s:?}: the base was rewritten by a randomised SVD that cannot be reproduced; convert the adapter with PEFT (save_pretrained(path_initial_model_for_weight_conversion=...)) first"),
            _ if lower.starts_with("corda") => bail!("init_lora_weights is {s:?}: CorDA rewrote the base from training activations that the files do not hold; convert the adapter with PEFT (path_initial_model_for_weight_conversion) first"),
            "loftq" => bail!("init_lora_weights is \"loftq\": LoftQ replaced the base by a quantised one that the files do not hold"),
            "lora_ga" => bail!("init_lora_weights is \"lora_ga\": LoRA-GA rewrote the base from training gradients that the files do not hold (PEFT's own reload skips it); convert the adapter with PEFT (path_initial_model_for_weight_conversion) first"),
            _ => bail!("init_lora_weights is {s:?}: an initialisation dorafuse does not know, so whether it rewrote the base cannot be told"),
        })
    }

    /// Refuses configurations dorafuse would apply differently from PEFT.
    fn validate(&self) -> Result<()> {
        let l = &self.lora;
        if let Some(t) = &l.peft_type {
            ensure!(
                t == "LORA",
                "peft_type is {t:?}: only LoRA/DoRA adapters (peft_type \"LORA\") are supported"
            );
        }
        ensure!(l.r >= 1, "r is {}: the rank must be at least 1", l.r);
        ensure!(
            l.lora_alpha.is_finite(),
            "lora_alpha is {}: it must be finite",
            l.lora_alpha
        );
        if l.lora_bias && l.use_dora {
            // peft/tuners/lora/config.py: "lora_bias=True is not supported for DoRA".
            bail!("lora_bias is true with use_dora: PEFT itself refuses a trainable lora_B bias with DoRA, so no PEFT model exists to reproduce");
        }
        if let Some(b) = &l.bias {
            ensure!(
                ["none", "all", "lora_only"].contains(&b.as_str()),
                "bias is {b:?}: PEFT takes \"none\", \"all\" or \"lora_only\""
            );
        }
        self.init()?;
        for (field, why) in UNSUPPORTED_FIELDS {
            if let Some(v) = self.raw.get(*field) {
                if !is_unset(v) {
                    bail!("{field} is {v}: {why}");
                }
            }
        }
        for (k, r) in &l.rank_pattern.0 {
            ensure!(
                *r >= 1,
                "rank_pattern[{k:?}] is {r}: ranks must be at least 1"
            );
        }
        for (k, a) in &l.alpha_pattern.0 {
            ensure!(
                a.is_finite(),
                "alpha_pattern[{k:?}] is {a}: it must be finite"
            );
        }
        self.matcher()?;
        Ok(())
    }

    /// Compiles the matching rules.
    ///
    /// # Errors
    /// A pattern that is not a regular expression dorafuse can match, naming it.
    pub fn matcher(&self) -> Result<Matcher> {
        let l = &self.lora;
        let sel = |s: &Option<ModuleSelector>, what: &str| -> Result<Option<TargetMatch>> {
            Ok(match s {
                None => None,
                Some(ModuleSelector::Regex(p)) if p.eq_ignore_ascii_case("all-linear") => {
                    Some(TargetMatch::Any)
                }
                Some(ModuleSelector::Regex(p)) => Some(TargetMatch::Regex(compile_full(p, what)?)),
                Some(ModuleSelector::List(v)) => Some(TargetMatch::List(v.clone())),
            })
        };
        let target = sel(&l.target_modules, "target_modules")?.unwrap_or(TargetMatch::Any);
        let exclude = sel(&l.exclude_modules, "exclude_modules")?;
        let modules_to_save = l
            .modules_to_save
            .iter()
            .flatten()
            .map(|m| {
                compile(
                    &format!(r"^(?:|.*\.)(?:{m})(?:$|\..*)"),
                    m,
                    "modules_to_save entry",
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let layers = match &l.layers_to_transform {
            None => None,
            Some(IndexSelector::One(i)) => Some(vec![*i]),
            Some(IndexSelector::Many(v)) if v.is_empty() => None,
            Some(IndexSelector::Many(v)) => Some(v.clone()),
        };
        let patterns: Vec<String> = match &l.layers_pattern {
            None => vec![],
            Some(StringOrList::One(s)) if s.is_empty() => vec![],
            Some(StringOrList::One(s)) => vec![s.clone()],
            Some(StringOrList::Many(v)) => v.clone(),
        };
        let layer_patterns = patterns
            .iter()
            .map(|p| {
                // PEFT: re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
                compile(
                    &format!(r"^(?:.*?\.)?(?:{p})\.(?P<idx>\d+)\."),
                    p,
                    "layers_pattern",
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let rank_keys = l
            .rank_pattern
            .0
            .iter()
            .map(|(k, r)| Ok((compile_pattern_key(k, "rank_pattern")?, *r, k.clone())))
            .collect::<Result<Vec<_>>>()?;
        let alpha_keys = l
            .alpha_pattern
            .0
            .iter()
            .map(|(k, a)| Ok((compile_pattern_key(k, "alpha_pattern")?, *a, k.clone())))
            .collect::<Result<Vec<_>>>()?;
        Ok(Matcher {
            target,
            exclude,
            modules_to_save,
            layers,
            layer_patterns,
            rank_keys,
            alpha_keys,
            default_r: l.r,
            default_alpha: l.lora_alpha,
        })
    }

    /// The config as PEFT writes it: the original object, keys sorted, two-space indent.
    pub fn to_json(&self) -> String {
        // Python's json.dumps(sort_keys=True) sorts every object, nested ones included.
        fn sorted(v: &serde_json::Value) -> serde_json::Value {
            match v {
                serde_json::Value::Object(m) => {
                    let mut out = serde_json::Map::new();
                    let mut keys: Vec<&String> = m.keys().collect();
                    keys.sort();
                    for k in keys {
                        out.insert(k.clone(), sorted(&m[k]));
                    }
                    serde_json::Value::Object(out)
                }
                serde_json::Value::Array(a) => {
                    serde_json::Value::Array(a.iter().map(sorted).collect())
                }
                other => other.clone(),
            }
        }
        let v = sorted(&serde_json::Value::Object(self.raw.clone()));
        let mut s = serde_json::to_string_pretty(&v).expect("a JSON object always serialises");
        s.push('\n');
        s
    }
}
