//! The CRD, the examples and the rendered children against the real API
//! server of `make test` (scripts/test-env.sh): the CRD installs, every
//! example and every rendered child is accepted by a server-side dry run,
//! and each of the CRD's CEL rules refuses a bad Tidepool with its message
//! (the cases of `rule_cases.json`, also checked offline).

mod common;

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use common::{kube_with_crd, merge};
use serde_json::{json, Value};
use tidepool_testenv::{repo_root, wait_for};

fn operator(args: &[&str], stdin: &str) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidepool-operator"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child.stdin.take().context("stdin")?.write_all(stdin.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!("tidepool-operator {} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8(output.stdout)?)
}

/// An example's text in namespace `namespace` instead of its own.
fn example(name: &str, namespace: &str) -> Result<String> {
    let text = std::fs::read_to_string(repo_root()?.join("manifests/examples").join(format!("{name}.yaml")))?;
    Ok(text.replace("  namespace: shop\n", &format!("  namespace: {namespace}\n")))
}

#[test]
fn examples_and_their_children_are_accepted_by_the_api_server() -> Result<()> {
    let kube = kube_with_crd()?;
    let ns = kube.namespace("render")?;
    for name in ["minimal", "production"] {
        let text = example(name, &ns.name)?;
        let accepted =
            kube.kubectl(&["apply", "--dry-run=server", "-n", &ns.name, "-f", "-"], Some(&text))?;
        assert!(
            accepted.contains("tidepool.tidepool.dev/shop created (server dry run)"),
            "{name}: {accepted}"
        );
        let children = operator(&["render", "-f", "-", "-n", &ns.name], &text)?;
        let accepted =
            kube.kubectl(&["apply", "--dry-run=server", "-n", &ns.name, "-f", "-"], Some(&children))?;
        for object in [
            "deployment.apps/shop-web",
            "deployment.apps/shop-worker",
            "service/shop-web",
            "poddisruptionbudget.policy/shop-web",
        ] {
            assert!(
                accepted.contains(&format!("{object} created (server dry run)")),
                "{name}: {object} in {accepted}"
            );
        }
        if name == "production" {
            assert!(accepted.contains("horizontalpodautoscaler.autoscaling/shop-web created"), "{accepted}");
        }
    }
    // An application's image: its tiers' commands, probes and env, its
    // migration Job with the password file's init container, the exporter.
    let text = example("django-celery", &ns.name)?;
    let accepted = kube.kubectl(&["apply", "--dry-run=server", "-n", &ns.name, "-f", "-"], Some(&text))?;
    assert!(accepted.contains("tidepool.tidepool.dev/django-shop created (server dry run)"), "{accepted}");
    let tidepool_only: String = text
        .split("\n---\n")
        .filter(|doc| doc.contains("kind: Tidepool"))
        .collect::<Vec<_>>()
        .join("\n---\n");
    let children = operator(&["render", "-f", "-", "-n", &ns.name], &tidepool_only)?;
    let accepted =
        kube.kubectl(&["apply", "--dry-run=server", "-n", &ns.name, "-f", "-"], Some(&children))?;
    for object in
        ["deployment.apps/django-shop-web", "deployment.apps/django-shop-worker", "service/django-shop-web"]
    {
        assert!(accepted.contains(&format!("{object} created (server dry run)")), "{object} in {accepted}");
    }
    assert!(accepted.contains("job.batch/django-shop-migrate-"), "{accepted}");
    Ok(())
}

#[test]
fn each_cel_rule_refuses_a_bad_tidepool_with_its_message() -> Result<()> {
    let kube = kube_with_crd()?;
    let ns = kube.namespace("cel")?;
    let cases: Vec<Value> = serde_json::from_str(include_str!("rule_cases.json"))?;
    for case in &cases {
        let mut object = json!({
            "apiVersion": "tidepool.dev/v1alpha1", "kind": "Tidepool", "metadata": {"name": "bad"},
            "spec": {"database": {"secretRef": {"name": "db"}, "maxConnections": 100}},
        });
        merge(&mut object["spec"], &case["patch"]);
        let refused = kube.kubectl_output(
            &["apply", "--dry-run=server", "-n", &ns.name, "-f", "-"],
            Some(&object.to_string()),
        )?;
        let stderr = String::from_utf8_lossy(&refused.stderr);
        let message = case["message"].as_str().unwrap_or_default();
        assert!(!refused.status.success(), "{}: accepted", case["patch"]);
        assert!(stderr.contains(message), "{}: expected {message:?} in {stderr}", case["patch"]);
    }
    Ok(())
}

#[test]
fn explain_teaches_the_spec() -> Result<()> {
    let kube = kube_with_crd()?;
    let explained = wait_for("kubectl explain to know Tidepools", Duration::from_secs(30), || {
        let output = kube.kubectl_output(&["explain", "tidepool.spec.database"], None)?;
        Ok(output.status.success().then(|| String::from_utf8_lossy(&output.stdout).into_owned()))
    })?;
    for words in ["CloudNativePG", "maxConnections", "reservedConnections", "secretRef"] {
        assert!(explained.contains(words), "{words} missing from:\n{explained}");
    }
    Ok(())
}
