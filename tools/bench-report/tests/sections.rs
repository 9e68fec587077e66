//! Each section rendered from the files its script leaves (fixtures under
//! `tests/fixtures/<section>/`) is the Markdown in
//! `tests/fixtures/<section>.md`, which the scripts' earlier Python wrote
//! from the same files; and the binary puts it into a report in place.

use std::path::{Path, PathBuf};
use std::process::Command;

use tidepool_bench_report::sections::{self, Provenance};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn expected(name: &str) -> String {
    std::fs::read_to_string(fixtures().join(format!("{name}.md"))).expect("the expected section")
}

fn provenance() -> Provenance {
    Provenance { date: "2026-12-02 10:00 UTC".into(), commit: "abc1234".into() }
}

#[test]
fn the_router_section() {
    let runs = sections::router::load(&fixtures().join("router")).expect("the rounds");
    let setup = sections::router::Setup {
        provenance: provenance(),
        base: "266fa53".into(),
        rounds: 3,
        seconds: 10,
        rate: 3000,
    };
    assert_eq!(sections::router::render(&setup, &runs), expected("router"));
}

#[test]
fn the_shop_section() {
    let runs = sections::shop::load(&fixtures().join("shop")).expect("the rounds");
    let setup = sections::shop::Setup { provenance: provenance(), rounds: 3, seconds: 10 };
    assert_eq!(sections::shop::render(&setup, &runs), expected("shop"));
}

#[test]
fn the_operator_section() {
    let json = std::fs::read_to_string(fixtures().join("operator/result.json")).expect("the report");
    let scale = sections::operator::load(&json).expect("the scale benchmark's report");
    let setup =
        sections::operator::Setup { provenance: provenance(), elapsed_seconds: 1234, pods: 412, cores: 2 };
    assert_eq!(sections::operator::render(&setup, &scale), expected("operator"));
    assert!(sections::operator::load("{}").is_err(), "a report without its figures");
    // An operator that wrote nothing at rest has no entry: 0.0, not -0.0.
    let mut quiet = scale.clone();
    quiet.writes_per_minute_at_rest.retain(|client, _| !client.starts_with("tidepool-operator/"));
    let text = sections::operator::render(&setup, &quiet);
    assert!(text.contains("| the operator's writes at rest | 0.0 per minute |"), "{text}");
}

#[test]
fn the_node_section() {
    let runs = sections::node::load(&fixtures().join("node")).expect("the runs");
    assert_eq!(sections::node::render(&provenance(), &runs), expected("node"));
}

#[test]
fn the_end_to_end_section() {
    let dir = fixtures().join("e2e");
    let runs = sections::e2e::load(&dir.join("figures.jsonl"), &dir.join("local")).expect("the runs");
    assert_eq!(sections::e2e::render(&provenance(), &runs), expected("e2e"));
    let error = sections::e2e::load(&fixtures().join("autoscaling/e2e.jsonl"), &dir.join("local"))
        .expect_err("not the end-to-end tests' figures")
        .to_string();
    assert!(error.ends_with("has no figures of seed"), "{error}");
}

#[test]
fn the_django_section() {
    let dir = fixtures().join("django");
    let runs = sections::django::load(&dir.join("figures.jsonl")).expect("the runs");
    assert_eq!(sections::django::render(&provenance(), &runs), expected("django"));
    let error = sections::django::load(&fixtures().join("e2e/figures.jsonl"))
        .expect_err("not the Django benchmark's figures")
        .to_string();
    assert!(error.ends_with("has no figures of django_seed"), "{error}");
}

#[test]
fn the_scaling_section() {
    let dir = fixtures().join("autoscaling");
    let runs =
        sections::autoscaling::load(&dir.join("scaling.jsonl"), &dir.join("e2e.jsonl")).expect("the runs");
    let setup = sections::autoscaling::Setup {
        provenance: provenance(),
        trials: 20,
        steady_seconds: 600,
        repeats: 3,
    };
    assert_eq!(sections::autoscaling::render(&setup, &runs), expected("autoscaling"));
}

#[test]
fn a_missing_round_file_is_named() {
    let error =
        sections::shop::load(&fixtures().join("router")).expect_err("not the shop's files").to_string();
    assert!(error.starts_with("cannot read ") && error.contains("router/write"), "{error}");
}

#[test]
fn the_binary_puts_a_section_into_the_report_in_place() {
    let dir = std::env::temp_dir().join(format!("bench-report-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a folder");
    let report = dir.join("benchmarks.md");
    let start = sections::shop::SECTION.start;
    let end = sections::shop::SECTION.end;
    std::fs::write(&report, format!("# Benchmarks\n\n{start}\nold\n{end}\n\n<!-- next -->\nkept\n"))
        .expect("a report");
    let status = Command::new(env!("CARGO_BIN_EXE_tidepool-bench-report"))
        .args([
            "shop",
            "--rounds",
            "3",
            "--seconds",
            "10",
            "--date",
            "2026-12-02 10:00 UTC",
            "--commit",
            "abc1234",
        ])
        .arg("--work")
        .arg(fixtures().join("shop"))
        .arg("--report")
        .arg(&report)
        .status()
        .expect("the binary runs");
    assert!(status.success());
    let written = std::fs::read_to_string(&report).expect("the report");
    assert_eq!(written, format!("# Benchmarks\n\n{}<!-- next -->\nkept\n", expected("shop")));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn figures_for_the_scripts() {
    let run = |args: &[&str]| {
        let output =
            Command::new(env!("CARGO_BIN_EXE_tidepool-bench-report")).args(args).output().expect("runs");
        (output.status.success(), String::from_utf8_lossy(&output.stdout).into_owned())
    };
    assert_eq!(run(&["median", "--", "3", "1", "2.5"]), (true, "2.50\n".into()));
    assert_eq!(
        run(&["median", "--decimals", "0", "--thousands", "--", "41000", "-5", "52000.4"]),
        (true, "41,000\n".into())
    );
    assert_eq!(run(&["runs", "--decimals", "1", "--", "1", "2.25"]), (true, "1.0, 2.2\n".into()));
    let (ok, _) = run(&["median", "--", "x"]);
    assert!(!ok, "a word is not a figure");
}
