//! A local stack of one test's own: `scripts/stack.sh` (PostgreSQL,
//! PgBouncer, web, worker) in a state folder and on ports no other test
//! uses, with the binary and settings the test chooses; stopped and removed
//! when dropped. The one way tests run the local stack.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{ensure, Context, Result};

use crate::repo_root;

/// The stack's four ports, in the order of its variables.
const PORT_VARIABLES: [&str; 4] =
    ["TIDEPOOL_PG_PORT", "TIDEPOOL_POOLER_PORT", "TIDEPOOL_WEB_PORT", "TIDEPOOL_WORKER_PORT"];

pub struct LocalStack {
    state: PathBuf,
    ports: [u16; 4],
    binary: PathBuf,
    settings: Vec<(String, String)>,
}

impl LocalStack {
    /// A stack named `name` (its folder under the tests' state folder) that
    /// runs `binary` (`tidepool` or an application's); nothing started yet.
    pub fn new(name: &str, binary: impl AsRef<Path>) -> Result<LocalStack> {
        let state = crate::scratch_dir(name)?;
        let mut ports = [0; 4];
        for port in &mut ports {
            *port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        }
        Ok(LocalStack { state, ports, binary: binary.as_ref().to_owned(), settings: Vec::new() })
    }

    /// A variable every run of the script gets (`TIDEPOOL_MAX_BODY_BYTES`…).
    pub fn with(mut self, name: &str, value: impl ToString) -> LocalStack {
        self.settings.push((name.to_owned(), value.to_string()));
        self
    }

    /// `scripts/stack.sh ARGS…`, with the stack's folder, ports, binary and
    /// settings.
    pub fn run(&self, args: &[&str]) -> Result<Output> {
        let mut command = Command::new("bash");
        command
            .arg(repo_root()?.join("scripts/stack.sh"))
            .args(args)
            .env("TIDEPOOL_STATE_DIR", &self.state)
            .env("TIDEPOOL_BIN", &self.binary);
        for (variable, port) in PORT_VARIABLES.iter().zip(self.ports) {
            command.env(variable, port.to_string());
        }
        command.envs(self.settings.iter().map(|(k, v)| (k, v)));
        Ok(command.output()?)
    }

    /// `stack.sh up ARGS…` (every piece when empty), which must succeed.
    pub fn up(&self, pieces: &[&str]) -> Result<()> {
        self.must("up", pieces)
    }

    /// `stack.sh down ARGS…` (every piece when empty), which must succeed.
    pub fn down(&self, pieces: &[&str]) -> Result<()> {
        self.must("down", pieces)
    }

    /// `stack.sh VERB ARGS…`, which must succeed.
    fn must(&self, verb: &str, pieces: &[&str]) -> Result<()> {
        let run = self.run(&[&[verb], pieces].concat())?;
        ensure!(
            run.status.success(),
            "stack.sh {verb} {} failed:\n{}",
            pieces.join(" "),
            String::from_utf8_lossy(&run.stderr)
        );
        Ok(())
    }

    /// The state folder.
    pub fn state(&self) -> &Path {
        &self.state
    }

    /// The web tier's port.
    pub fn web_port(&self) -> u16 {
        self.ports[2]
    }

    /// The worker's port (its probes and metrics).
    pub fn worker_port(&self) -> u16 {
        self.ports[3]
    }

    /// `http://127.0.0.1:<web port><path>`.
    pub fn web(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.web_port())
    }

    /// The pooled URL the stack wrote for shells (`$STATE/env`): through
    /// its PgBouncer, with the password.
    pub fn pooled_url(&self) -> Result<String> {
        let env = std::fs::read_to_string(self.state.join("env"))?;
        env.lines()
            .find_map(|line| line.strip_prefix("export DATABASE_URL="))
            .map(|url| url.trim_matches('\'').to_owned())
            .context("the stack's env file has no DATABASE_URL")
    }
}

impl Drop for LocalStack {
    fn drop(&mut self) {
        let _ = self.run(&["down"]);
        let _ = std::fs::remove_dir_all(&self.state);
    }
}
