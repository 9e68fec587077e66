//! The offline commands against files kept in the repository: the CRD in
//! `manifests/` and in the chart's `crds/` is what `tidepool-operator crd` prints, and the plans and
//! rendered children of the examples match their golden files under
//! `tests/golden/` (`TIDEPOOL_UPDATE_GOLDEN=1 cargo test -p tidepool-operator
//! --test offline` rewrites them, for review in the diff).

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn operator(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_tidepool-operator"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("tidepool-operator runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Compares `actual` with the golden file `name`, or rewrites it.
fn golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name);
    if std::env::var_os("TIDEPOOL_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).expect("write golden");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        expected == actual,
        "{} is stale; rerun with TIDEPOOL_UPDATE_GOLDEN=1 and review the diff:\n{actual}",
        path.display()
    );
}

#[test]
fn the_checked_in_crd_is_what_the_crd_command_prints() {
    let (ok, printed, stderr) = operator(&["crd"]);
    assert!(ok, "{stderr}");
    for copy in ["manifests/crd.yaml", "charts/tidepool/crds/tidepools.tidepool.dev.yaml"] {
        let checked_in = std::fs::read_to_string(repo().join(copy)).expect(copy);
        assert!(checked_in == printed, "{copy} is stale: run `tidepool-operator crd > {copy}`");
    }
}

#[test]
fn examples_plan_and_render_as_their_golden_files() {
    for example in ["minimal", "production", "shop", "django-celery"] {
        let file = format!("manifests/examples/{example}.yaml");
        let (ok, plan, stderr) = operator(&["plan", "-f", &file]);
        assert!(ok, "{example}: {stderr}");
        golden(&format!("{example}.plan.txt"), &plan);
        let (ok, rendered, stderr) = operator(&["render", "-f", &file]);
        assert!(ok, "{example}: {stderr}");
        golden(&format!("{example}.render.yaml"), &rendered);
        assert!(!rendered.contains("change-me"), "{example}: a Secret value was rendered");
    }
}

#[test]
fn the_readme_quotes_the_plan_command_as_it_prints() {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let command = "$ tidepool-operator plan -f manifests/examples/production.yaml";
    let quoted = readme.split_once(&format!("{command}\n")).expect("the README quotes the command").1;
    let quoted = quoted.split_once("```").expect("the quote ends its block").0;
    let (ok, printed, stderr) = operator(&["plan", "-f", "manifests/examples/production.yaml"]);
    assert!(ok, "{stderr}");
    // The README quotes the table, not the notes under it.
    let table: String =
        printed.split_inclusive('\n').take_while(|line| !line.starts_with("pods =")).collect();
    assert_eq!(quoted.trim_end(), table.trim_end(), "README.md quotes another plan than the command prints");
}

#[test]
fn the_local_stack_is_sized_by_the_same_plan() {
    let (ok, env, stderr) = operator(&["plan", "-f", "scripts/local-tidepool.yaml", "-o", "env"]);
    assert!(ok, "{stderr}");
    golden("local.env", &env);
}

#[test]
fn a_budget_that_cannot_fit_is_refused_with_its_numbers() {
    let spec = "apiVersion: tidepool.dev/v1alpha1\nkind: Tidepool\nmetadata: {name: tight}\n\
                spec: {database: {secretRef: {name: db}, maxConnections: 15, reservedConnections: 10}}\n";
    let dir = std::env::temp_dir().join(format!("tidepool-operator-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("tight.yaml");
    std::fs::write(&file, spec).expect("write");
    let (ok, stdout, stderr) = operator(&["plan", "-f", file.to_str().expect("utf-8")]);
    assert!(!ok && stdout.is_empty());
    assert!(
        stderr.contains("web 3 pods × (1) + worker 2 pods × (5) = 13 connections, but only 5 are available (maxConnections 15 − reservedConnections 10)"),
        "{stderr}"
    );
    std::fs::write(&file, spec.replace("reservedConnections: 10", "reservedConnections: 20")).expect("write");
    let (ok, _, stderr) = operator(&["plan", "-f", file.to_str().expect("utf-8")]);
    assert!(!ok);
    assert!(stderr.contains("reservedConnections must be below maxConnections"), "{stderr}");
    let (ok, _, stderr) = operator(&["render", "-f", "no/such/file.yaml"]);
    assert!(!ok && stderr.contains("cannot read no/such/file.yaml"), "{stderr}");
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

/// Every field path docs/operator.md names (`spec.…`) is a field of the
/// CRD's schema, as `tidepool-operator crd` prints it.
#[test]
fn the_reference_names_fields_the_crd_has() {
    let (ok, crd, stderr) = operator(&["crd"]);
    assert!(ok, "{stderr}");
    let crd: serde_json::Value = serde_norway::from_str(&crd).expect("the CRD is YAML");
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let docs = std::fs::read_to_string(repo().join("docs/operator.md")).expect("docs/operator.md");
    let paths: Vec<&str> = docs
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|quoted| {
            quoted.starts_with("spec.") && quoted.chars().all(|c| c.is_ascii_alphanumeric() || c == '.')
        })
        .collect();
    assert!(paths.len() >= 5, "the reference names fields: {paths:?}");
    for path in paths {
        let mut node = schema;
        for field in path.split('.') {
            node = &node["properties"][field];
            assert!(!node.is_null(), "docs/operator.md names {path}, which the CRD does not have");
        }
    }
}
