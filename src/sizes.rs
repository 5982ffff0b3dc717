//! Files small enough to read: no source file in `src/` over [`MAX_LINES`] lines (a unit
//! test, so CI runs it). Functions have their own bound, clippy's `too_many_lines`
//! (clippy.toml), enabled in lib.rs and main.rs.

use std::path::Path;

/// The most lines a file of `src/` may have (issue 20).
const MAX_LINES: usize = 800;

#[test]
fn no_source_file_is_over_the_bound() {
    let mut files = Vec::new();
    crate::layers::rust_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    let long: Vec<String> = files
        .iter()
        .filter_map(|path| {
            let text = std::fs::read_to_string(path).expect("a source file is readable");
            let lines = text.lines().count();
            (lines > MAX_LINES).then(|| format!("{}: {lines} lines", path.display()))
        })
        .collect();
    assert!(
        long.is_empty(),
        "split these by concern (at most {MAX_LINES} lines):\n{}",
        long.join("\n")
    );
}
