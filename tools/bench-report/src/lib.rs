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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

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

/// Each line's JSON object in `path` (what the tests write their figures
/// as, one record a line).
pub fn json_lines(path: &Path) -> Result<Vec<Value>, ReportError> {
    read(path)?
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| {
            serde_json::from_str(line).map_err(|e| ReportError::Line {
                path: path.to_owned(),
                line: index + 1,
                message: e.to_string(),
            })
        })
        .collect()
}

/// What the real-node tests measured, a figure object per run by the
/// test's name: the records `{"test": name, "figures": {...}}` they append
/// one a line to `$TIDEPOOL_E2E_FIGURES` (and a script's own, likewise).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Figures(BTreeMap<String, Vec<Value>>);

impl Figures {
    /// The records of `path`, which must have at least one of each test
    /// in `needed`.
    pub fn load(path: &Path, needed: &[&str]) -> Result<Figures, ReportError> {
        let mut tests: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for record in json_lines(path)? {
            let name = record["test"].as_str().unwrap_or_default().to_owned();
            tests.entry(name).or_default().push(record["figures"].clone());
        }
        if let Some(missing) = needed.iter().find(|name| !tests.contains_key(**name)) {
            return Err(ReportError::invalid(
                path.display().to_string(),
                format!("has no figures of {missing}"),
            ));
        }
        Ok(Figures(tests))
    }

    /// Test `name`'s records, a figure object per run.
    pub fn test(&self, name: &str) -> &[Value] {
        self.0.get(name).map_or(&[], Vec::as_slice)
    }

    /// The figure at `path` of each of test `name`'s runs (NaN where it
    /// has none, which the report shows).
    pub fn of(&self, name: &str, path: &[&str]) -> Vec<f64> {
        self.test(name).iter().map(|f| at(f, path).as_f64().unwrap_or(f64::NAN)).collect()
    }

    /// Test `name`'s last run (null when it has none).
    pub fn last(&self, name: &str) -> Value {
        self.test(name).last().cloned().unwrap_or(Value::Null)
    }
}

/// The value at `path` (its keys, outermost first) of `value`; null where
/// a key is missing.
pub fn at<'a>(value: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(value, |value, key| &value[*key])
}

/// `value[key]` as a number (NaN when it is none, which the report shows).
pub fn figure(value: &Value, key: &str) -> f64 {
    value[key].as_f64().unwrap_or(f64::NAN)
}

/// The one number of each line of `path`.
pub fn numbers(path: &Path) -> Result<Vec<f64>, ReportError> {
    Ok(column(&rows(path)?, 0))
}
