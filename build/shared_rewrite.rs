//! The emulator's one source rewrite: each `__shared__` declaration of a CUDA source becomes a
//! reference to per-block storage of the emulator runtime (`kernels/emu/`), the one thing plain
//! C++ cannot express. A small lexer skips comments, strings, character literals and
//! preprocessor lines, and keeps every other byte and the line count, so diagnostics and
//! `__FILE__` still point at the original lines.
//!
//! Used by build.rs (through `build/emu.rs`); the unit tests below run in `cargo test` through
//! a test target that includes this file by path.

/// Rewrites each `__shared__` declaration of CUDA source `src` (outside comments, strings and
/// preprocessor lines) for the emulator, keeping every other byte and the line count:
///
/// - `[static] __shared__ [__align__(N)] T name[d1]...;` becomes
///   `T (&name)[d1]... = *::dfemu::shared_static<T[d1]..., N>([] {}, "name");`
/// - `extern __shared__ [__align__(N)] T name[];` becomes
///   `T* const name = ::dfemu::shared_dynamic<T>("name");`
///
/// Errors (line, message) on a form the emulator does not take: several declarators, an
/// initializer, a dynamic array with a size.
pub fn rewrite_shared(src: &str) -> Result<String, (usize, String)> {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len() + 256);
    let mut i = 0;
    let mut copied = 0; // bytes of src already in out
    let mut stmt_start = 0; // byte after the last `;`, `{` or `}` in code
    let mut line_start = true; // only whitespace since the last newline
    let line_of = |pos: usize| src[..pos].matches('\n').count() + 1;
    while i < b.len() {
        let c = b[i];
        if c == b'\n' {
            line_start = true;
            i += 1;
            continue;
        }
        if line_start && c == b'#' {
            // Preprocessor directive, with backslash continuations.
            while i < b.len() && b[i] != b'\n' {
                if b[i] == b'\\' && i + 1 < b.len() && b[i + 1] == b'\n' {
                    i += 1;
                }
                i += 1;
            }
            stmt_start = i;
            continue;
        }
        if !c.is_ascii_whitespace() {
            line_start = false;
        }
        if c == b'/' && i + 1 < b.len() && (b[i + 1] == b'/' || b[i + 1] == b'*') {
            let comment_start = i;
            if b[i + 1] == b'/' {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            } else {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i = (i + 2).min(b.len());
            }
            // A comment before a declaration is not part of it.
            if src[stmt_start..comment_start].trim().is_empty() {
                stmt_start = i;
            }
            continue;
        }
        if c == b'"' || c == b'\'' {
            i += 1;
            while i < b.len() && b[i] != c {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            continue;
        }
        if c == b';' || c == b'{' || c == b'}' {
            i += 1;
            stmt_start = i;
            continue;
        }
        if c.is_ascii_alphabetic() || c == b'_' {
            let s = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            if &src[s..i] != "__shared__" {
                continue;
            }
            // The declaration runs from the statement start to the next `;` at depth 0.
            let mut j = i;
            let mut depth = 0i32;
            while j < b.len() && !(b[j] == b';' && depth == 0) {
                match b[j] {
                    b'(' | b'[' | b'{' => depth += 1,
                    b')' | b']' | b'}' => depth -= 1,
                    _ => {}
                }
                j += 1;
            }
            if j >= b.len() {
                return Err((line_of(s), "`__shared__` declaration without `;`".into()));
            }
            let decl_start = stmt_start;
            let prefix = &src[decl_start..s];
            let rest = &src[i..j];
            let repl = shared_decl(prefix, rest).map_err(|m| (line_of(s), m))?;
            // Keep the leading whitespace/comments of the statement and the line count.
            let lead_len = prefix.len() - prefix.trim_start().len();
            out.push_str(&src[copied..decl_start + lead_len]);
            out.push_str(&repl);
            out.push_str(&"\n".repeat(src[decl_start + lead_len..=j].matches('\n').count()));
            copied = j + 1;
            i = j + 1;
            stmt_start = i;
            continue;
        }
        i += 1;
    }
    out.push_str(&src[copied..]);
    Ok(out)
}

/// Builds the replacement of one declaration from the text before `__shared__` (storage
/// class and alignment) and after it (type, alignment, declarator).
fn shared_decl(prefix: &str, rest: &str) -> Result<String, String> {
    let mut text = format!("{} {}", prefix.trim(), rest.trim());
    let mut align = String::from("0");
    // Alignment specifiers, wherever they are.
    for (open, skip) in [
        ("__align__(", 10usize),
        ("alignas(", 8),
        ("__attribute__((aligned(", 23),
    ] {
        while let Some(p) = text.find(open) {
            let mut depth = 1;
            let mut q = p + skip;
            let bytes = text.as_bytes();
            while q < bytes.len() && depth > 0 {
                match bytes[q] {
                    b'(' => depth += 1,
                    b')' => depth -= 1,
                    _ => {}
                }
                q += 1;
            }
            let inner = text[p + skip..q - 1].to_string();
            let mut end = q;
            if open.starts_with("__attribute__") {
                end += 2; // the two closing parentheses of __attribute__((...))
            }
            align = format!("({inner})");
            text.replace_range(p..end.min(text.len()), " ");
        }
    }
    let mut dynamic = false;
    let words: Vec<&str> = text.split_whitespace().collect();
    let mut kept: Vec<&str> = Vec::new();
    for w in words {
        match w {
            "extern" => dynamic = true,
            "static" | "__device__" => {}
            _ => kept.push(w),
        }
    }
    let decl = kept.join(" ");
    if decl.contains('=') {
        return Err("a `__shared__` variable cannot have an initializer".into());
    }
    // Commas outside brackets mean several declarators.
    let mut depth = 0i32;
    for ch in decl.chars() {
        match ch {
            '(' | '[' | '<' => depth += 1,
            ')' | ']' | '>' => depth -= 1,
            ',' if depth == 0 => {
                return Err("declare one `__shared__` variable per declaration".into());
            }
            _ => {}
        }
    }
    // Peel the array dimensions off the end, then the name.
    let mut body = decl.trim_end().to_string();
    let mut dims = String::new();
    while body.ends_with(']') {
        let bytes = body.as_bytes();
        let mut depth = 0i32;
        let mut k = bytes.len();
        loop {
            k -= 1;
            match bytes[k] {
                b']' => depth += 1,
                b'[' => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                _ => {}
            }
            if k == 0 {
                return Err("unbalanced `[` in a `__shared__` declaration".into());
            }
        }
        dims = format!("{}{}", &body[k..], dims);
        body = body[..k].trim_end().to_string();
    }
    let name_start = body
        .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .map_or(0, |p| p + 1);
    let name = body[name_start..].to_string();
    let ty = body[..name_start].trim().to_string();
    if name.is_empty() || ty.is_empty() || name.as_bytes()[0].is_ascii_digit() {
        return Err(format!("cannot read the `__shared__` declaration `{decl}`"));
    }
    if dynamic {
        if dims.replace(' ', "") != "[]" {
            return Err(format!(
                "`extern __shared__` {name} must be declared `{name}[]`"
            ));
        }
        return Ok(format!(
            "{ty}* const {name} = ::dfemu::shared_dynamic<{ty}>(\"{name}\");"
        ));
    }
    Ok(format!(
        "{ty} (&{name}){dims} = *::dfemu::shared_static<{ty}{dims}, {align}>([] {{}}, \"{name}\");"
    ))
}

#[cfg(test)]
mod tests {
    use super::rewrite_shared;

    fn ok(src: &str) -> String {
        rewrite_shared(src).unwrap_or_else(|(line, msg)| panic!("line {line}: {msg}"))
    }

    fn err(src: &str) -> (usize, String) {
        rewrite_shared(src).expect_err("the rewrite should refuse this source")
    }

    #[test]
    fn static_arrays_become_references_to_block_storage() {
        assert_eq!(
            ok("__shared__ float tile[16][64 + 1];"),
            "float (&tile)[16][64 + 1] = *::dfemu::shared_static<float[16][64 + 1], 0>([] {}, \"tile\");"
        );
        assert_eq!(
            ok("    static __shared__ int n;"),
            "    int (&n) = *::dfemu::shared_static<int, 0>([] {}, \"n\");"
        );
    }

    #[test]
    fn alignment_is_kept_in_each_spelling() {
        for (decl, align) in [
            ("__shared__ __align__(16) T buf[N];", "(16)"),
            ("__shared__ alignas(8) T buf[N];", "(8)"),
            (
                "__shared__ T buf[N] __attribute__((aligned(4 * 4)));",
                "(4 * 4)",
            ),
            ("__align__(sizeof(T)) __shared__ T buf[N];", "(sizeof(T))"),
        ] {
            assert_eq!(
                ok(decl),
                format!("T (&buf)[N] = *::dfemu::shared_static<T[N], {align}>([] {{}}, \"buf\");"),
                "{decl}"
            );
        }
    }

    #[test]
    fn extern_arrays_become_the_dynamic_buffer() {
        assert_eq!(
            ok("extern __shared__ __align__(16) unsigned char smem[];"),
            "unsigned char* const smem = ::dfemu::shared_dynamic<unsigned char>(\"smem\");"
        );
    }

    #[test]
    fn comments_strings_and_directives_are_left_alone() {
        let src = "// __shared__ float a[4];\n\
                   /* __shared__ float b[4]; */\n\
                   #define S \"__shared__ float c[4];\" \\\n  __shared__\n\
                   const char* s = \"__shared__ float d[4];\";\n\
                   char q = '_';\n";
        assert_eq!(ok(src), src);
    }

    #[test]
    fn the_line_count_and_surrounding_code_are_kept() {
        let src = "void f() {\n  int x = 0;  // before\n  __shared__ float\n      tile[8]\n      [8];\n  x += 1;\n}\n";
        let out = ok(src);
        assert_eq!(out.matches('\n').count(), src.matches('\n').count());
        assert_eq!(
            out,
            "void f() {\n  int x = 0;  // before\n  float (&tile)[8][8] = *::dfemu::shared_static<float[8][8], 0>([] {}, \"tile\");\n\n\n  x += 1;\n}\n"
        );
    }

    #[test]
    fn a_comment_before_a_declaration_stays_outside_it() {
        let src = "{\n  // the tile\n  __shared__ float t[2];\n}";
        assert_eq!(
            ok(src),
            "{\n  // the tile\n  float (&t)[2] = *::dfemu::shared_static<float[2], 0>([] {}, \"t\");\n}"
        );
    }

    #[test]
    fn forms_the_emulator_does_not_take_are_refused_at_their_line() {
        let (line, msg) = err("int a;\n__shared__ float x[4] = {0};");
        assert_eq!(line, 2);
        assert!(msg.contains("initializer"), "{msg}");
        let (line, msg) = err("\n\n__shared__ float x[4], y[4];");
        assert_eq!(line, 3);
        assert!(msg.contains("one `__shared__` variable"), "{msg}");
        let (_, msg) = err("extern __shared__ float smem[64];");
        assert!(msg.contains("smem[]"), "{msg}");
        let (_, msg) = err("__shared__ float x[4]");
        assert!(msg.contains("without `;`"), "{msg}");
    }

    #[test]
    fn templates_in_the_type_are_not_several_declarators() {
        assert_eq!(
            ok("__shared__ Pair<int, float> p[2];"),
            "Pair<int, float> (&p)[2] = *::dfemu::shared_static<Pair<int, float>[2], 0>([] {}, \"p\");"
        );
    }
}
