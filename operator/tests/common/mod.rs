//! What the operator's real-API-server tests share: the CRD installed once
//! per test binary, and a JSON merge for building specs.

#![allow(dead_code)]

use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use tidepool_testenv::{repo_root, wait_for, Kube};

/// The control plane of `make test`, with the Tidepool CRD installed and
/// served.
pub fn kube_with_crd() -> Result<&'static Kube> {
    static INSTALLED: OnceLock<Kube> = OnceLock::new();
    if let Some(kube) = INSTALLED.get() {
        return Ok(kube);
    }
    let kube = Kube::from_env()?;
    let crd = repo_root()?.join("manifests/crd.yaml");
    kube.kubectl(
        &["apply", "--server-side", "--force-conflicts", "-f", crd.to_str().context("utf-8 path")?],
        None,
    )?;
    kube.kubectl(
        &["wait", "--for=condition=Established", "crd/tidepools.tidepool.dev", "--timeout=30s"],
        None,
    )?;
    wait_for("Tidepools to be served", Duration::from_secs(30), || {
        Ok(kube.kubectl_output(&["get", "tidepools", "-A"], None)?.status.success().then_some(()))
    })?;
    Ok(INSTALLED.get_or_init(|| kube))
}

/// `patch` merged into `target`, objects key by key.
pub fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                merge(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}
