//! Bad layer cases through the built binary: each gets a one-line error that names the
//! tensor (or file/metadata) at fault, a non-zero exit, and no output file.

use dorafuse::case::LayerCase;
use dorafuse::dtype::DType;
use dorafuse::tensor::Tensor;
use safetensors::tensor::TensorView;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A raw safetensors entry: name, dtype, shape, bytes.
type Entry = (String, safetensors::Dtype, Vec<usize>, Vec<u8>);

fn t(dtype: DType, shape: &[usize], seed: u32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| (((i as u32 * 7919 + seed * 104_729) % 1000) as f32 - 500.0) / 700.0)
        .collect();
    Tensor::from_f32(dtype, shape.to_vec(), &v).unwrap()
}

/// A valid DoRA case: T=3, d_in=9, d_out=5, r=2, bf16 activations, f32 adapter.
fn good() -> (Vec<Entry>, HashMap<String, String>) {
    let e = |name: &str, t: Tensor| -> Entry {
        (
            name.to_string(),
            t.dtype().to_safetensors(),
            t.shape().to_vec(),
            t.as_bytes().to_vec(),
        )
    };
    let entries = vec![
        e("x", t(DType::BF16, &[3, 9], 1)),
        e("weight", t(DType::BF16, &[5, 9], 2)),
        e("bias", t(DType::BF16, &[5], 3)),
        e("lora_A", t(DType::F32, &[2, 9], 4)),
        e("lora_B", t(DType::F32, &[5, 2], 5)),
        e("magnitude", t(DType::F32, &[5], 6)),
        e("grad_y", t(DType::BF16, &[3, 5], 7)),
        e("expected.y", t(DType::F32, &[3, 5], 8)),
    ];
    let meta = HashMap::from([
        ("scaling".to_string(), "2.0".to_string()),
        ("fan_in_fan_out".to_string(), "false".to_string()),
    ]);
    (entries, meta)
}

fn write(dir: &Path, name: &str, entries: &[Entry], meta: &HashMap<String, String>) -> PathBuf {
    let views: Vec<(String, TensorView<'_>)> = entries
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let bytes = safetensors::serialize(views, &Some(meta.clone())).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn set(entries: &mut [Entry], name: &str, t: Tensor) {
    let e = entries.iter_mut().find(|e| e.0 == name).unwrap();
    *e = (
        name.to_string(),
        t.dtype().to_safetensors(),
        t.shape().to_vec(),
        t.as_bytes().to_vec(),
    );
}

/// `dorafuse replay <case> --out <out>`.
fn replay(case: &Path, out: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dorafuse"))
        .arg("replay")
        .arg(case)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

/// Runs `replay --out` on `case`; asserts failure, a single `error:` line containing every
/// one of `needles`, and that no output (nor temporary file) was left in the output dir.
fn expect_error(case: &Path, out_dir: &Path, needles: &[&str]) {
    let o = replay(case, &out_dir.join("out.safetensors"));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{}: must fail", case.display());
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected, got:\n{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "{:?} missing from: {stderr}", n);
    }
    let left: Vec<_> = std::fs::read_dir(out_dir).unwrap().collect();
    assert!(left.is_empty(), "output dir not empty: {left:?}");
}

struct Dirs {
    _root: tempfile::TempDir,
    cases: PathBuf,
    out: PathBuf,
}

fn dirs() -> Dirs {
    let root = tempfile::tempdir().unwrap();
    let cases = root.path().join("cases");
    let out = root.path().join("out");
    std::fs::create_dir(&cases).unwrap();
    std::fs::create_dir(&out).unwrap();
    Dirs {
        cases,
        out,
        _root: root,
    }
}

#[test]
fn the_good_case_passes_the_checks_and_writes_outputs() {
    let d = dirs();
    let (e, m) = good();
    let p = write(&d.cases, "good.safetensors", &e, &m);
    let case = LayerCase::read(&p).unwrap();
    assert!(case.layer.is_dora());
    assert_eq!(case.expected.len(), 1);
    let out = d.out.join("o.safetensors");
    let o = replay(&p, &out);
    // expected.y is arbitrary here, so the comparison fails, but the outputs are written.
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("FAIL"));
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<_> = st.names().into_iter().cloned().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "grad_lora_A",
            "grad_lora_B",
            "grad_magnitude",
            "grad_x",
            "y"
        ]
    );
    use safetensors::Dtype as D;
    for (n, dt, shape) in [
        ("y", D::BF16, vec![3, 5]),
        ("grad_x", D::BF16, vec![3, 9]),
        ("grad_lora_A", D::F32, vec![2, 9]),
        ("grad_lora_B", D::F32, vec![5, 2]),
        ("grad_magnitude", D::F32, vec![5]),
    ] {
        let v = st.tensor(n).unwrap();
        assert_eq!((v.dtype(), v.shape().to_vec()), (dt, shape), "{n}");
    }
}

#[test]
fn missing_tensor() {
    let d = dirs();
    let (mut e, m) = good();
    e.retain(|e| e.0 != "lora_B");
    let p = write(&d.cases, "c.safetensors", &e, &m);
    expect_error(&p, &d.out, &["c.safetensors", "missing tensor lora_B"]);
}

#[test]
fn wrong_shape() {
    let d = dirs();
    let (mut e, m) = good();
    set(&mut e, "x", t(DType::BF16, &[3, 8], 1));
    let p = write(&d.cases, "c.safetensors", &e, &m);
    expect_error(&p, &d.out, &["x is [3, 8]", "[T, 9]"]);

    let (mut e, m) = good();
    set(&mut e, "magnitude", t(DType::F32, &[4], 1));
    let p = write(&d.cases, "c.safetensors", &e, &m);
    expect_error(&p, &d.out, &["magnitude is [4]", "[5]"]);

    let (mut e, m) = good();
    set(&mut e, "grad_y", t(DType::BF16, &[3, 4], 1));
    let p = write(&d.cases, "c.safetensors", &e, &m);
    expect_error(&p, &d.out, &["grad_y is [3, 4]"]);

    let (mut e, m) = good();
    set(&mut e, "expected.y", t(DType::F32, &[3, 4], 1));
    let p = write(&d.cases, "c.safetensors", &e, &m);
    expect_error(&p, &d.out, &["expected.y is [3, 4]"]);
}

#[test]
fn rank_mismatch_between_a_and_b() {
    let d = dirs();
    let (mut e, m) = good();
    set(&mut e, "lora_B", t(DType::F32, &[5, 3], 1));
    let p = write(&d.cases, "c.safetensors", &e, &m);
    expect_error(&p, &d.out, &["lora_B", "rank 3", "rank 2"]);
}

#[test]
fn unknown_dtype() {
    let d = dirs();
    let (mut e, m) = good();
    let w = e.iter_mut().find(|e| e.0 == "weight").unwrap();
    w.1 = safetensors::Dtype::F64;
    w.3 = vec![0u8; 5 * 9 * 8];
    let p = write(&d.cases, "c.safetensors", &e, &m);
    expect_error(&p, &d.out, &["tensor weight", "unsupported dtype F64"]);
}

#[test]
fn truncated_and_corrupt_files() {
    let d = dirs();
    let (e, m) = good();
    let p = write(&d.cases, "c.safetensors", &e, &m);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
    expect_error(&p, &d.out, &["c.safetensors", "truncated or corrupt"]);
    std::fs::write(&p, &bytes[..5]).unwrap();
    expect_error(&p, &d.out, &["c.safetensors", "truncated or corrupt"]);
    let mut bad = bytes.clone();
    bad[8..20].copy_from_slice(b"not json at ");
    std::fs::write(&p, &bad).unwrap();
    expect_error(&p, &d.out, &["c.safetensors", "truncated or corrupt"]);
    let missing = d.cases.join("nope.safetensors");
    expect_error(
        &missing,
        &d.out,
        &["cannot read layer case", "nope.safetensors"],
    );
}

#[test]
fn non_finite_inputs_are_named_with_their_index() {
    let d = dirs();
    let mut v = t(DType::BF16, &[3, 9], 1).to_f32();
    v[13] = f32::NAN;
    let (mut e, m) = good();
    set(
        &mut e,
        "x",
        Tensor::from_f32(DType::BF16, vec![3, 9], &v).unwrap(),
    );
    let p = write(&d.cases, "c.safetensors", &e, &m);
    expect_error(&p, &d.out, &["x: element 13 (index [1, 4]) is NaN"]);

    let mut v = t(DType::F32, &[5], 6).to_f32();
    v[3] = f32::INFINITY;
    let (mut e, m) = good();
    set(
        &mut e,
        "magnitude",
        Tensor::from_f32(DType::F32, vec![5], &v).unwrap(),
    );
    let p = write(&d.cases, "c.safetensors", &e, &m);
    expect_error(&p, &d.out, &["magnitude: element 3", "inf"]);

    let mut v = t(DType::BF16, &[3, 5], 7).to_f32();
    v[0] = f32::NEG_INFINITY;
    let (mut e, m) = good();
    set(
        &mut e,
        "grad_y",
        Tensor::from_f32(DType::BF16, vec![3, 5], &v).unwrap(),
    );
    let p = write(&d.cases, "c.safetensors", &e, &m);
    expect_error(&p, &d.out, &["grad_y: element 0"]);
}

#[test]
fn unknown_tensor_names_are_refused() {
    let d = dirs();
    let (mut e, m) = good();
    e.iter_mut().find(|e| e.0 == "magnitude").unwrap().0 = "magnitudes".into();
    let p = write(&d.cases, "c.safetensors", &e, &m);
    expect_error(&p, &d.out, &["unknown tensor \"magnitudes\""]);
    let (mut e, m) = good();
    e.iter_mut().find(|e| e.0 == "expected.y").unwrap().0 = "expected.z".into();
    let p = write(&d.cases, "c.safetensors", &e, &m);
    expect_error(&p, &d.out, &["unknown tensor \"expected.z\""]);
}

#[test]
fn bad_metadata() {
    let d = dirs();
    let (e, mut m) = good();
    m.remove("scaling");
    let p = write(&d.cases, "c.safetensors", &e, &m);
    expect_error(&p, &d.out, &["metadata scaling is missing"]);
    m.insert("scaling".into(), "two".into());
    let p = write(&d.cases, "c.safetensors", &e, &m);
    expect_error(&p, &d.out, &["metadata scaling is \"two\""]);
    m.insert("scaling".into(), "2".into());
    m.insert("fan_in_fan_out".into(), "yes".into());
    let p = write(&d.cases, "c.safetensors", &e, &m);
    expect_error(&p, &d.out, &["metadata fan_in_fan_out is \"yes\""]);
}

#[test]
fn unwritable_output_path() {
    let d = dirs();
    let (e, m) = good();
    let p = write(&d.cases, "c.safetensors", &e, &m);
    let out = d.out.join("no/such/dir/o.safetensors");
    let o = replay(&p, &out);
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: cannot write ") && stderr.contains("o.safetensors"),
        "{stderr}"
    );
    assert!(std::fs::read_dir(&d.out).unwrap().next().is_none());
}

#[test]
fn write_then_read_round_trips() {
    let d = dirs();
    let (e, m) = good();
    let p = write(&d.cases, "c.safetensors", &e, &m);
    let mut case = LayerCase::read(&p).unwrap();
    case.layer.scaling = 12.0 / 7.0;
    case.layer.fan_in_fan_out = true;
    case.layer.weight = t(DType::BF16, &[9, 5], 2);
    case.metadata.insert("note".into(), "kept".into());
    let q = d.out.join("copy.safetensors");
    case.write(&q).unwrap();
    let back = LayerCase::read(&q).unwrap();
    assert_eq!(back.layer, case.layer, "scaling must round-trip exactly");
    assert_eq!(back.x, case.x);
    assert_eq!(back.grad_y, case.grad_y);
    assert_eq!(back.expected, case.expected);
    assert_eq!(back.metadata["note"], "kept");
    assert_eq!(back.metadata["fan_in_fan_out"], "true");
}
