//! The test cluster's real node (scripts/kube-node.sh) and the test
//! PostgreSQL its pods use, as tests see them: commands run inside the
//! node's network namespace or a pod's, the processes of a pod's
//! containers, and `psql` as the superuser.
//!
//! Every client here talks to loopback, to the veth's two addresses, or to
//! pod and Service addresses from inside the node's namespace: nothing
//! leaves the machine.

use std::path::PathBuf;
use std::process::{Command, Output};

use anyhow::{bail, Context, Result};

use crate::env_path;

/// The node: its network namespace and the veth's two ends.
pub struct Node {
    pub netns: String,
    /// The host end: the API server and the test PostgreSQL listen here.
    pub host_ip: String,
    pub node_ip: String,
}

impl Node {
    pub const NAME: &'static str = "tidepool-node";
    /// The taint only pods meant for the real node tolerate.
    pub const TAINT: &'static str = "tidepool.dev/real-node";

    pub fn from_env() -> Result<Node> {
        let var = |name: &str| {
            std::env::var(name).with_context(|| {
                format!("{name} is not set: these tests need the cluster that `make test` starts")
            })
        };
        Ok(Node {
            netns: var("TIDEPOOL_NODE_NETNS")?,
            host_ip: var("TIDEPOOL_NODE_HOST_IP")?,
            node_ip: var("TIDEPOOL_NODE_IP")?,
        })
    }

    /// Runs `program args` in the node's network namespace.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<Output> {
        let netns = format!("--net=/run/netns/{}", self.netns);
        output(Command::new("nsenter").arg(netns).arg("--").arg(program).args(args))
    }

    /// `curl` from inside the node's namespace (where pod and Service
    /// addresses route), bounded to 10 s: the status code and the body.
    pub fn curl(&self, args: &[&str]) -> Result<(u16, String)> {
        let mut full = vec!["-sS", "--max-time", "10", "-w", "\n%{http_code}"];
        full.extend_from_slice(args);
        let output = self.run("curl", &full)?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
        let code = code.trim().parse().with_context(|| {
            format!("curl {}: no status ({})", args.join(" "), String::from_utf8_lossy(&output.stderr))
        })?;
        Ok((code, body.to_owned()))
    }
}

/// The processes of a pod's containers on this machine, found by the pod's
/// UID in their cgroup paths (the kubelet's cgroupfs driver names each
/// pod's folder `pod<uid>`).
pub fn pod_processes(pod_uid: &str) -> Result<Vec<Process>> {
    let marker = format!("/pod{pod_uid}/");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        // A process may exit while we look: skip what cannot be read.
        let Ok(cgroup) = std::fs::read_to_string(entry.path().join("cgroup")) else { continue };
        if !cgroup.lines().any(|line| line.contains(&marker)) {
            continue;
        }
        let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else { continue };
        found.push(Process { pid, comm: comm.trim().to_owned() });
    }
    Ok(found)
}

#[derive(Debug, Clone)]
pub struct Process {
    pub pid: u32,
    /// The executable's name, as the kernel keeps it (15 bytes at most).
    pub comm: String,
}

impl Process {
    fn proc_file(&self, name: &str) -> Result<String> {
        let path = PathBuf::from(format!("/proc/{}/{name}", self.pid));
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    }

    /// The real, effective, saved and file-system uids.
    pub fn uids(&self) -> Result<Vec<u32>> {
        let status = self.proc_file("status")?;
        let line = status.lines().find(|l| l.starts_with("Uid:")).context("no Uid line")?;
        line.split_whitespace().skip(1).map(|n| n.parse().context("a uid")).collect()
    }

    /// Whether the process's root file system is mounted read-only.
    pub fn root_is_read_only(&self) -> Result<bool> {
        let mountinfo = self.proc_file("mountinfo")?;
        let root = mountinfo
            .lines()
            .find(|line| line.split_whitespace().nth(4) == Some("/"))
            .context("no mount at / in mountinfo")?;
        let options = root.split_whitespace().nth(5).unwrap_or_default();
        Ok(options.split(',').any(|o| o == "ro"))
    }

    /// `program` to run in this process's network namespace (add its
    /// arguments and environment, then run it with [`output`]).
    pub fn in_netns(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command.arg(format!("--net=/proc/{}/ns/net", self.pid)).arg("--").arg(program);
        command
    }
}

/// The test PostgreSQL as its superuser, over loopback.
pub struct Postgres {
    pub port: u16,
    password: String,
}

impl Postgres {
    pub fn from_env() -> Result<Postgres> {
        let port = std::env::var("TIDEPOOL_TEST_PG_PORT")
            .context("TIDEPOOL_TEST_PG_PORT is not set")?
            .parse()
            .context("TIDEPOOL_TEST_PG_PORT")?;
        let file = env_path("TIDEPOOL_TEST_STATE_DIR")?.join("secrets/postgres.password");
        let password = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?
            .trim()
            .to_owned();
        Ok(Postgres { port, password })
    }

    /// Runs `sql` in database `db`; the rows, unaligned, `|`-separated.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        let output = output(
            Command::new("psql")
                .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres"])
                .arg("-p")
                .arg(self.port.to_string())
                .args(["-d", db, "-c", sql])
                .env("PGPASSWORD", &self.password),
        )?;
        if !output.status.success() {
            bail!("psql failed on {sql:?}: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }
}

/// Runs `command`; errors name its program only (a command's Debug form
/// would show its environment, a password among it).
pub fn output(command: &mut Command) -> Result<Output> {
    let program = command.get_program().to_string_lossy().into_owned();
    command.output().with_context(|| format!("running {program}"))
}
