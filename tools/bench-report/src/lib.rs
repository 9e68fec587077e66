//! What the benchmark scripts (`scripts/bench-*.sh`) compute and write,
//! as a library their one binary, `tidepool-bench-report`, runs. Bash keeps
//! the host's plumbing (namespaces, containerd, the kubelet, the local
//! stack) and the runs themselves; everything between a tool's output and
//! the report's Markdown is here, tested:
//!
//! - [`parse`]: the figures in what wrk, pgbench and kubectl print;
//! - [`stats`]: medians, spreads and paired ratios, formatted as the
//!   report writes numbers;
//! - [`report`]: a section put into `docs/benchmarks.md` in place of its
//!   earlier run;
//! - [`sections`]: one module per report section, from the files its
//!   script leaves in its work folder to the section's Markdown.

pub mod parse;
pub mod report;
pub mod sections;
pub mod stats;

use std::path::{Path, PathBuf};

/// What keeps a figure or a section from being written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path}, line {line}: {message}")]
    Line { path: PathBuf, line: usize, message: String },
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
}

impl ReportError {
    pub fn invalid(what: impl Into<String>, message: impl Into<String>) -> Self {
        ReportError::Invalid { what: what.into(), message: message.into() }
    }
}

/// The text of `path`.
pub fn read(path: &Path) -> Result<String, ReportError> {
    std::fs::read_to_string(path).map_err(|source| ReportError::Read { path: path.to_owned(), source })
}

/// The rows of numbers in `path`, one row a line, separated by blanks
/// (what the scripts append round by round).
pub fn rows(path: &Path) -> Result<Vec<Vec<f64>>, ReportError> {
    read(path)?
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| {
            line.split_whitespace()
                .map(|field| {
                    field.parse::<f64>().map_err(|e| ReportError::Line {
                        path: path.to_owned(),
                        line: index + 1,
                        message: format!("{field:?} is not a number: {e}"),
                    })
                })
                .collect()
        })
        .collect()
}

/// Column `index` of `rows` (a row too short for it gives NaN, which the
/// report shows rather than hides).
pub fn column(rows: &[Vec<f64>], index: usize) -> Vec<f64> {
    rows.iter().map(|row| row.get(index).copied().unwrap_or(f64::NAN)).collect()
}

/// The one number of each line of `path`.
pub fn numbers(path: &Path) -> Result<Vec<f64>, ReportError> {
    Ok(column(&rows(path)?, 0))
}
