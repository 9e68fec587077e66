//! One module per report section: what its script measured (the files it
//! leaves in its work folder, loaded by `load`), and the Markdown `render`
//! writes from them. Each section starts with its [`Section::start`] marker
//! and ends with its [`Section::end`] marker, as [`crate::report::splice`]
//! finds them.

pub mod router;
pub mod shop;

/// Where a section is in the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Section {
    pub start: &'static str,
    pub end: &'static str,
}

/// When and from what a section was measured, as its first line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provenance {
    /// `2026-12-02 07:24 UTC`.
    pub date: String,
    /// The short commit measured.
    pub commit: String,
}
