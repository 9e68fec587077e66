//! The real Kubernetes control plane that `make test` starts
//! (`scripts/kube.sh`: etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler and kwok, built from the upstream modules pinned in
//! `tools/kube/*/go.mod`), as tests see it.
//!
//! scripts/test.sh exports `KUBECONFIG` and `TIDEPOOL_KUBE_BIN` (the folder
//! of kubectl and the control plane binaries). Each test works in a
//! namespace of its own ([`Kube::namespace`]), so tests run in parallel.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub mod cloudnative_pg;
pub mod node;
pub mod prometheus;
pub mod stack;

pub struct Kube {
    pub kubeconfig: PathBuf,
    pub bin: PathBuf,
}

impl Kube {
    /// The control plane of this test run; fails with a clear message when
    /// the tests were not started by `make test`.
    pub fn from_env() -> Result<Kube> {
        Ok(Kube { kubeconfig: env_path("KUBECONFIG")?, bin: env_path("TIDEPOOL_KUBE_BIN")? })
    }

    /// Runs kubectl with `args`, feeding `stdin`; returns its output whether
    /// or not it succeeded.
    pub fn kubectl_output(&self, args: &[&str], stdin: Option<&str>) -> Result<Output> {
        let mut child = Command::new(self.bin.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running kubectl")?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes())?;
        }
        Ok(child.wait_with_output()?)
    }

    /// Runs kubectl and returns its standard output; fails with its
    /// standard error when it fails.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let output = self.kubectl_output(args, stdin)?;
        if !output.status.success() {
            bail!("kubectl {} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `kubectl get -o json`, parsed.
    pub fn get_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut full = vec!["get", "-o", "json"];
        full.extend_from_slice(args);
        Ok(serde_json::from_str(&self.kubectl(&full, None)?)?)
    }

    /// Waits until the CustomResourceDefinition `name` is established.
    /// Polled: `kubectl wait` fails at once on a CRD whose status has no
    /// conditions yet ("accessor error: <nil>"), as a fresh one may not.
    pub fn wait_established(&self, name: &str) -> Result<()> {
        wait_for(&format!("CRD {name} to be established"), Duration::from_secs(30), || {
            let output = self.kubectl_output(
                &[
                    "get",
                    &format!("crd/{name}"),
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Established\")].status}",
                ],
                None,
            )?;
            Ok((String::from_utf8_lossy(&output.stdout).trim() == "True").then_some(()))
        })
    }

    /// A fresh namespace for one test, deleted when the guard drops.
    pub fn namespace(&self, prefix: &str) -> Result<Namespace<'_>> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!("{prefix}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        self.kubectl(&["create", "namespace", &name], None)?;
        Ok(Namespace { kube: self, name })
    }
}

/// Helm 3 (`helm`) or Helm 4 (`helm4`) from `TIDEPOOL_HELM_BIN`, with its
/// cache, configuration and data in a folder of this process's own (never
/// the user's), talking to `kube` when given. Add the arguments and run it.
pub fn helm(which: &str, kube: Option<&Kube>) -> Result<Command> {
    let home = std::env::temp_dir().join(format!("tidepool-helm-{}", std::process::id()));
    let mut command = Command::new(env_path("TIDEPOOL_HELM_BIN")?.join(which));
    command
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    match kube {
        Some(kube) => command.env("KUBECONFIG", &kube.kubeconfig),
        None => command.env_remove("KUBECONFIG"),
    };
    Ok(command)
}

/// A path from the environment scripts/test.sh prepares (`KUBECONFIG`, and
/// `TIDEPOOL_{KUBE,ETCD,KWOK,HELM}_BIN`, the tools' bin folders).
pub fn env_path(name: &str) -> Result<PathBuf> {
    std::env::var_os(name).map(PathBuf::from).with_context(|| {
        format!("{name} is not set: these tests need the control plane that `make test` starts")
    })
}

/// A new, empty folder of a test's own under the tests' state folder
/// (`TIDEPOOL_TEST_STATE_DIR`/scratch), given to the service user, which
/// runs PostgreSQL and PgBouncer in it.
pub fn scratch_dir(kind: &str) -> Result<PathBuf> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = env_path("TIDEPOOL_TEST_STATE_DIR")?.join("scratch").join(format!(
        "{kind}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    chown_to_service_user(&dir)?;
    Ok(dir)
}

/// Gives `path` to the service user (`TIDEPOOL_RUN_AS`, when the tests
/// run as another: PostgreSQL and PgBouncer refuse root).
pub fn chown_to_service_user(path: &Path) -> Result<()> {
    let Ok(user) = std::env::var("TIDEPOOL_RUN_AS") else { return Ok(()) };
    let chown = Command::new("chown").arg(format!("{user}:")).arg(path).output()?;
    anyhow::ensure!(
        chown.status.success(),
        "chown {user}: {}: {}",
        path.display(),
        String::from_utf8_lossy(&chown.stderr)
    );
    Ok(())
}

pub struct Namespace<'a> {
    kube: &'a Kube,
    pub name: String,
}

impl Drop for Namespace<'_> {
    fn drop(&mut self) {
        let _ = self.kube.kubectl_output(&["delete", "namespace", &self.name, "--wait=false"], None);
    }
}

/// Awaits `check` every 20 ms until it gives `Some`, failing after `limit`:
/// [`wait_for`] for async tests.
pub async fn wait_for_async<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `check` every 100 ms until it returns `Some`, failing after `limit`
/// with the last error, if any.
pub fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + limit;
    let mut last_error = None;
    loop {
        match check() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() >= deadline {
            match last_error {
                Some(e) => bail!("timed out after {limit:?} waiting for {what}; last error: {e:#}"),
                None => bail!("timed out after {limit:?} waiting for {what}"),
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The checkout under test: the nearest folder above the running test's
/// package (CARGO_MANIFEST_DIR, set by cargo when it runs tests) that holds
/// tools/kube. Read at run time: a test binary reused from a shared target
/// folder may have been compiled in another checkout.
pub fn repo_root() -> Result<PathBuf> {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .context("CARGO_MANIFEST_DIR is not set: run the tests with cargo")?;
    Path::new(&manifest_dir)
        .ancestors()
        .find(|dir| dir.join("tools/kube").is_dir())
        .map(Path::to_path_buf)
        .context("no folder above CARGO_MANIFEST_DIR holds tools/kube")
}

/// The version `module` is pinned to in tools/kube/<tool>/go.mod.
pub fn pinned_version(tool: &str, module: &str) -> Result<String> {
    let path = repo_root()?.join("tools/kube").join(tool).join("go.mod");
    let go_mod = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    go_mod
        .lines()
        .map(str::trim)
        .filter_map(|line| line.strip_prefix("require ").or(Some(line)))
        .find_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some(module)).then(|| words.next().map(str::to_owned)).flatten()
        })
        .with_context(|| format!("{module} is not required in {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pinned_versions_from_go_mod() {
        let version = pinned_version("kubernetes", "k8s.io/kubernetes").expect("pinned");
        assert!(version.starts_with("v1."), "{version}");
        assert!(pinned_version("kubernetes", "example.com/absent").is_err());
    }
}
