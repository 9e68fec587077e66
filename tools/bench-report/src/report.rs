//! `docs/benchmarks.md` is written a section at a time, each by its own
//! script: a section starts with its marker comment and ends with its end
//! marker, and a new run replaces the old one in place.

use std::path::Path;

use crate::ReportError;

/// `report` with `section` (which starts with `start` and ends with `end`)
/// in place of the section between those markers, or at the end when there
/// is none.
pub fn splice(report: &str, start: &str, end: &str, section: &str) -> String {
    match report.find(start) {
        None => format!("{}\n\n{section}", report.trim_end_matches('\n')),
        Some(at) => {
            let tail = report[at..].find(end).map_or("", |stop| &report[at + stop + end.len()..]);
            format!("{}{section}{}", &report[..at], tail.trim_start_matches('\n'))
        }
    }
}

/// [`splice`] on the report file at `path` (a new report when there is
/// none yet), written in place.
pub fn splice_file(path: &Path, start: &str, end: &str, section: &str) -> Result<(), ReportError> {
    let report = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "# Benchmarks\n".to_owned(),
        Err(source) => return Err(ReportError::Read { path: path.to_owned(), source }),
    };
    let spliced = splice(&report, start, end, section);
    std::fs::write(path, spliced).map_err(|source| ReportError::Write { path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_section_replaces_its_last_run_in_place() {
        let report = "# B\n\n<!-- a -->\nold\n<!-- end a -->\n\n\n<!-- b -->\nkept\n";
        let spliced = splice(report, "<!-- a -->", "<!-- end a -->", "<!-- a -->\nnew\n<!-- end a -->\n\n");
        assert_eq!(spliced, "# B\n\n<!-- a -->\nnew\n<!-- end a -->\n\n<!-- b -->\nkept\n");
    }

    #[test]
    fn a_new_section_goes_at_the_end_and_a_missing_end_marker_drops_the_rest() {
        assert_eq!(
            splice("# B\n\n\n", "<!-- a -->", "<!-- end -->", "<!-- a -->\nx\n"),
            "# B\n\n<!-- a -->\nx\n"
        );
        assert_eq!(splice("<!-- a -->\nold, no end\n", "<!-- a -->", "<!-- end -->", "new\n"), "new\n");
    }

    #[test]
    fn a_missing_report_is_started() -> Result<(), ReportError> {
        let dir = std::env::temp_dir().join(format!("bench-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|source| ReportError::Write { path: dir.clone(), source })?;
        let path = dir.join("benchmarks.md");
        let _ = std::fs::remove_file(&path);
        splice_file(&path, "<!-- a -->", "<!-- end -->", "<!-- a -->\n<!-- end -->\n")?;
        assert_eq!(crate::read(&path)?, "# Benchmarks\n\n<!-- a -->\n<!-- end -->\n");
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
