//! `docs/benchmarks.md` is written a section at a time, each by its own
//! script: a section starts with its marker comment and ends with its end
//! marker, and a new run replaces the old one in place, leaving what is
//! around it (hand-measured notes, other sections) as it is.

use std::path::Path;

use crate::sections::Section;
use crate::ReportError;

/// `report` with `text` (which starts with the section's start marker and
/// ends with its end marker) in place of the section's last run, one blank
/// line before what follows; or at the end, after the section's heading
/// when it has one outside its markers, when the report has no run of it.
pub fn splice(report: &str, section: &Section, text: &str) -> String {
    let text = text.trim_end_matches('\n');
    match report.find(section.start) {
        None => {
            let heading = section.heading.map(|h| format!("{h}\n\n")).unwrap_or_default();
            format!("{}\n\n{heading}{text}\n", report.trim_end_matches('\n'))
        }
        Some(at) => {
            let tail =
                report[at..].find(section.end).map_or("", |stop| &report[at + stop + section.end.len()..]);
            match tail.trim_start_matches('\n') {
                "" => format!("{}{text}\n", &report[..at]),
                tail => format!("{}{text}\n\n{tail}", &report[..at]),
            }
        }
    }
}

/// [`splice`] on the report file at `path` (a new report when there is
/// none yet), written in place.
pub fn splice_file(path: &Path, section: &Section, text: &str) -> Result<(), ReportError> {
    let report = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "# Benchmarks\n".to_owned(),
        Err(source) => return Err(ReportError::Read { path: path.to_owned(), source }),
    };
    let spliced = splice(&report, section, text);
    std::fs::write(path, spliced).map_err(|source| ReportError::Write { path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Section = Section { start: "<!-- a -->", end: "<!-- end a -->", heading: None };

    #[test]
    fn a_section_replaces_its_last_run_in_place() {
        let report = "# B\n\n<!-- a -->\nold\n<!-- end a -->\n### by hand\n\n<!-- b -->\nkept\n";
        let spliced = splice(report, &A, "<!-- a -->\nnew\n<!-- end a -->\n\n\n");
        assert_eq!(spliced, "# B\n\n<!-- a -->\nnew\n<!-- end a -->\n\n### by hand\n\n<!-- b -->\nkept\n");
        let last =
            splice("# B\n\n<!-- a -->\nold\n<!-- end a -->\n\n", &A, "<!-- a -->\nnew\n<!-- end a -->");
        assert_eq!(last, "# B\n\n<!-- a -->\nnew\n<!-- end a -->\n");
    }

    #[test]
    fn a_new_section_goes_at_the_end_after_its_heading() {
        assert_eq!(
            splice("# B\n\n\n", &A, "<!-- a -->\nx\n<!-- end a -->\n"),
            "# B\n\n<!-- a -->\nx\n<!-- end a -->\n"
        );
        let headed = Section { heading: Some("## 13. Scaling"), ..A };
        assert_eq!(
            splice("# B\n", &headed, "<!-- a -->\n<!-- end a -->"),
            "# B\n\n## 13. Scaling\n\n<!-- a -->\n<!-- end a -->\n"
        );
        // A heading outside the markers stays where it is.
        let report = "# B\n\n## 13. Scaling\n\n<!-- a -->\nold\n<!-- end a -->\n";
        assert_eq!(
            splice(report, &headed, "<!-- a -->\nnew\n<!-- end a -->"),
            "# B\n\n## 13. Scaling\n\n<!-- a -->\nnew\n<!-- end a -->\n"
        );
    }

    #[test]
    fn a_missing_end_marker_drops_the_rest() {
        assert_eq!(splice("<!-- a -->\nold, no end\n", &A, "new\n"), "new\n");
    }

    #[test]
    fn a_missing_report_is_started() -> Result<(), ReportError> {
        let dir = std::env::temp_dir().join(format!("bench-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|source| ReportError::Write { path: dir.clone(), source })?;
        let path = dir.join("benchmarks.md");
        let _ = std::fs::remove_file(&path);
        splice_file(&path, &A, "<!-- a -->\n<!-- end a -->\n")?;
        assert_eq!(crate::read(&path)?, "# Benchmarks\n\n<!-- a -->\n<!-- end a -->\n");
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
