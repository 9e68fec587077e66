//! One module per report section: what its script measured (the files it
//! leaves in its work folder, loaded by `load`), and the Markdown `render`
//! writes from them. Each section starts with its [`Section::start`] marker
//! and ends with its [`Section::end`] marker, as [`crate::report::splice`]
//! finds them.

pub mod autoscaling;
pub mod django;
pub mod e2e;
pub mod node;
pub mod operator;
pub mod router;
pub mod shop;

/// Where a section is in the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Section<'a> {
    pub start: &'a str,
    pub end: &'a str,
    /// Its heading, where it stands before the start marker (written with
    /// the section's first run, and left alone after).
    pub heading: Option<&'a str>,
}

/// When and from what a section was measured, as its first line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provenance {
    /// `2026-12-02 07:24 UTC`.
    pub date: String,
    /// The short commit measured.
    pub commit: String,
}
