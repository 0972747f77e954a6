//! Tables (aligned text for a terminal, or GitHub-flavoured Markdown, both laid out by
//! comfy-table) and the generated sections of the repository's Markdown files: the bench's
//! tables in BENCHMARKS.md and README.md, the profiler's in kernels/README.md. A generated
//! section sits between two HTML comments and is replaced in place, so no number is typed
//! into a document by hand and the text around it is kept byte for byte.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// A table of text cells.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    /// Column titles.
    pub header: Vec<String>,
    /// Cells, one `Vec` per row, as wide as the header.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with the `|`-separated column titles `titles` and no rows.
    pub fn new(titles: &str) -> Table {
        Table {
            header: columns(titles),
            rows: Vec::new(),
        }
    }

    fn layout(&self, preset: &str) -> String {
        let mut t = comfy_table::Table::new();
        t.load_preset(preset)
            .set_header(&self.header)
            .add_rows(&self.rows);
        // The first column (a label) left; the others right when most of their cells are
        // numbers (they start with a digit), else left; text columns two spaces apart, with
        // no margin.
        for (i, c) in t.column_iter_mut().enumerate() {
            let cells = self
                .rows
                .iter()
                .filter_map(|r| r.get(i))
                .filter(|c| !c.is_empty());
            let (numbers, all) = cells.fold((0, 0), |(n, a), c| {
                let digit = c.starts_with(|ch: char| ch.is_ascii_digit());
                (n + usize::from(digit), a + 1)
            });
            if i > 0 && 2 * numbers > all {
                c.set_cell_alignment(comfy_table::CellAlignment::Right);
            }
            if preset == comfy_table::presets::NOTHING {
                c.set_padding((0, 2));
            }
        }
        format!("{}\n", t.trim_fmt())
    }

    /// Aligned text, columns apart by spaces.
    pub fn to_text(&self) -> String {
        self.layout(comfy_table::presets::NOTHING)
    }

    /// A GitHub-flavoured Markdown table.
    pub fn to_markdown(&self) -> String {
        self.layout(comfy_table::presets::ASCII_MARKDOWN)
    }
}

/// Column titles from one `|`-separated line.
pub fn columns(titles: &str) -> Vec<String> {
    titles.split('|').map(String::from).collect()
}

/// What follows a section's name in its begin marker.
const BEGIN_TAIL: &str = ":begin (generated; do not edit by hand) -->";

/// The HTML comments around the generated section `name` (e.g. `dorafuse-bench:cpu`).
pub fn section_markers(name: &str) -> (String, String) {
    (
        format!("<!-- {name}{BEGIN_TAIL}"),
        format!("<!-- {name}:end -->"),
    )
}

/// Refuses a section name that could break its HTML comment: only ASCII letters, digits and
/// `_ . : -` are allowed.
fn check_name(name: &str) -> Result<()> {
    let ok = |c: char| c.is_ascii_alphanumeric() || "_.:-".contains(c);
    anyhow::ensure!(
        !name.is_empty() && name.chars().all(ok),
        "section name {name:?}: use ASCII letters, digits and _ . : - only"
    );
    Ok(())
}

/// Checks that every generated section of `doc` is closed: each begin marker has its own end
/// marker after it, before any other begin marker.
///
/// # Errors
/// The first section that is not closed, by name.
pub fn check_sections(doc: &str) -> Result<()> {
    let mut rest = doc;
    while let Some(tail) = rest.find(BEGIN_TAIL) {
        let name = rest[..tail].rsplit("<!-- ").next().unwrap_or_default();
        let after = &rest[tail + BEGIN_TAIL.len()..];
        let end = after.find(&section_markers(name).1);
        let next = after.find(BEGIN_TAIL);
        let closed = match (end, next) {
            (Some(e), Some(n)) => e < n,
            (end, _) => end.is_some(),
        };
        anyhow::ensure!(
            closed,
            "generated section {name:?}: begin marker without end marker"
        );
        rest = after;
    }
    Ok(())
}

/// The body of the generated section `name` of `doc`, without the newlines next to its
/// markers.
///
/// # Errors
/// No such section, or a begin marker without its end marker.
pub fn section<'a>(doc: &'a str, name: &str) -> Result<&'a str> {
    check_name(name)?;
    let (begin, end) = section_markers(name);
    let b = doc
        .find(&begin)
        .with_context(|| format!("no generated section {name:?} (no {begin})"))?
        + begin.len();
    let e = (doc[b..].find(&end))
        .with_context(|| format!("section {name:?}: begin marker without end marker"))?;
    Ok(doc[b..b + e].trim_matches('\n'))
}

/// Replaces the generated section `name` of `doc` with `body`, or appends it when `doc` has
/// no such section. Text outside the markers is kept byte for byte.
///
/// # Errors
/// A bad name, or a section of `doc` (any) that is not closed ([`check_sections`]).
pub fn replace_section(doc: &str, name: &str, body: &str) -> Result<String> {
    check_name(name)?;
    check_sections(doc)?;
    let (begin, end) = section_markers(name);
    let block = format!("{begin}\n{}\n{end}", body.trim_end());
    let Some(b) = doc.find(&begin) else {
        let sep = match doc {
            "" => "",
            d if d.ends_with("\n\n") => "",
            d if d.ends_with('\n') => "\n",
            _ => "\n\n",
        };
        return Ok(format!("{doc}{sep}{block}\n"));
    };
    let e = (doc[b..].find(&end))
        .with_context(|| format!("section {name:?}: begin marker without end marker"))?;
    Ok(format!("{}{block}{}", &doc[..b], &doc[b + e + end.len()..]))
}

/// Writes `body` as the generated section `name` of the Markdown file at `path` (created when
/// missing), atomically.
///
/// # Errors
/// The file cannot be read or written, or has a broken section.
pub fn write_section(path: &Path, name: &str, body: &str) -> Result<()> {
    let doc = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let new = replace_section(&doc, name, body).with_context(|| path.display().to_string())?;
    crate::fsutil::write_atomic(path, |f| Ok(f.write_all(new.as_bytes())?))
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_markdown_layouts() {
        let mut t = Table::new("name|value|kind");
        t.rows.push(vec!["a".into(), "1.50×".into(), "load".into()]);
        t.rows
            .push(vec!["longer".into(), "2".into(), "shared".into()]);
        let (text, md) = (t.to_text(), t.to_markdown());
        assert!(md.contains("|---") && !text.contains("|---"), "{md}");
        // Numbers right-aligned, text left-aligned (trailing spaces trimmed).
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "name    value  kind",
                "a       1.50×  load",
                "longer      2  shared"
            ]
        );
    }

    #[test]
    fn sections_are_read_and_replaced_in_place() {
        let doc = "# Title\n\nhand-written intro\n";
        let once = replace_section(doc, "x:cpu", "table 1").unwrap();
        assert!(once.starts_with(doc) && once.contains("table 1"));
        assert_eq!(section(&once, "x:cpu").unwrap(), "table 1");
        let twice = replace_section(&once, "x:cpu", "table 2\n").unwrap();
        assert!(!twice.contains("table 1") && twice.contains("table 2"));
        // Another section is left alone.
        let both = replace_section(&twice, "x:cuda", "gpu").unwrap();
        let again = replace_section(&both, "x:cpu", "table 3").unwrap();
        assert!(again.starts_with(doc) && again.contains("gpu") && again.contains("table 3"));
        assert_eq!(section(&again, "x:cuda").unwrap(), "gpu");
        assert!(section(&again, "x:emu").is_err());
        let (b, _) = section_markers("y");
        assert!(replace_section(&format!("{b}\nno end"), "y", "z").is_err());
        assert!(section(&format!("{b}\nno end"), "y").is_err());
        // A broken section elsewhere is refused too, not written around.
        let broken = format!("{again}{b}\nno end\n");
        let e = replace_section(&broken, "x:cpu", "table 4").unwrap_err();
        assert!(
            e.to_string().contains("\"y\": begin marker without end"),
            "{e}"
        );
        assert!(check_sections(&again).is_ok());
        // Names that would close the comment early are refused.
        assert!(replace_section(doc, "a -->", "z").is_err());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("B.md");
        write_section(&p, "x:cpu", "one").unwrap();
        write_section(&p, "x:cpu", "two").unwrap();
        let s = std::fs::read_to_string(&p).unwrap();
        assert!(s.contains("two") && !s.contains("one"), "{s}");
    }
}
