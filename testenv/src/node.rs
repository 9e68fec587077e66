//! The test cluster's real node (scripts/kube-node.sh) and the test
//! PostgreSQL its pods use, as tests see them: commands run inside the
//! node's network namespace or a pod's, the processes of a pod's
//! containers, `psql` as the superuser, a PostgreSQL of a test's own (to
//! restart, or to size `max_connections`), a database and role per test,
//! and a sampler of PostgreSQL's connections.
//!
//! Every client here talks to loopback, to the veth's two addresses, or to
//! pod and Service addresses from inside the node's namespace: nothing
//! leaves the machine.

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};

use crate::{env_path, repo_root};

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

    /// `tidepool-loadgen` (the release build) in the node's namespace,
    /// allowed to target the cluster's pod and Service ranges; add its
    /// subcommand and arguments.
    pub fn loadgen(&self) -> Result<Command> {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg("--")
            .arg(release_binary("tidepool-loadgen")?);
        for var in ["TIDEPOOL_POD_CIDR", "TIDEPOOL_SERVICE_CIDR"] {
            let cidr = std::env::var(var).with_context(|| format!("{var} is not set"))?;
            command.args(["--cluster-cidr", &cidr]);
        }
        Ok(command)
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

/// A binary of the workspace's release build (scripts/test.sh builds it,
/// the images carry it), from the folder test-env exports.
pub fn release_binary(name: &str) -> Result<PathBuf> {
    let path = env_path("TIDEPOOL_TEST_BIN_DIR")?.join(name);
    ensure!(path.exists(), "{} does not exist: build the release binaries", path.display());
    Ok(path)
}

/// The test PostgreSQL (or a [`PrivatePostgres`]) as its superuser, over
/// loopback.
#[derive(Clone)]
pub struct Postgres {
    pub port: u16,
    password: String,
    /// The scripts/stack.sh state folder it runs from.
    state_dir: PathBuf,
}

impl Postgres {
    pub fn from_env() -> Result<Postgres> {
        let port = std::env::var("TIDEPOOL_TEST_PG_PORT")
            .context("TIDEPOOL_TEST_PG_PORT is not set")?
            .parse()
            .context("TIDEPOOL_TEST_PG_PORT")?;
        Postgres::at(env_path("TIDEPOOL_TEST_STATE_DIR")?, port)
    }

    fn at(state_dir: PathBuf, port: u16) -> Result<Postgres> {
        let file = state_dir.join("secrets/postgres.password");
        let password = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?
            .trim()
            .to_owned();
        Ok(Postgres { port, password, state_dir })
    }

    /// What the server has logged so far.
    pub fn log(&self) -> Result<String> {
        let path = self.state_dir.join("log/postgres.log");
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
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

/// A PostgreSQL of one test's own, started by scripts/stack.sh like the
/// test PostgreSQL (on loopback, and with [`PrivatePostgres::start`] on the
/// veth's host end too, for pods), with a `max_connections` of the test's
/// choosing and the test PostgreSQL's passwords (so what connects to one
/// connects to the other); it can be stopped and restarted. Deleted when
/// dropped. The one private PostgreSQL of the tests.
pub struct PrivatePostgres {
    pub postgres: Postgres,
    max_connections: u32,
    for_node: bool,
    /// The folder with its `server.crt`, `server.key` and the `ca.crt`
    /// that issued them, when it takes TLS connections only.
    tls: Option<PathBuf>,
}

impl PrivatePostgres {
    /// One that pods on the real node reach too.
    pub fn start(name: &str, max_connections: u32) -> Result<PrivatePostgres> {
        Self::start_on(name, max_connections, true, None)
    }

    /// One on loopback only, for tests without the node.
    pub fn on_loopback(name: &str, max_connections: u32) -> Result<PrivatePostgres> {
        Self::start_on(name, max_connections, false, None)
    }

    /// One on loopback that takes TLS connections only (`hostssl`), with
    /// the certificate and key `server.crt` and `server.key` of `tls_dir`
    /// (and its `ca.crt`: scripts/stack.sh's `TIDEPOOL_PG_TLS_DIR`).
    pub fn tls_only(name: &str, max_connections: u32, tls_dir: &Path) -> Result<PrivatePostgres> {
        Self::start_on(name, max_connections, false, Some(tls_dir.to_owned()))
    }

    /// [`PrivatePostgres::tls_only`] that pods on the real node reach too
    /// (its certificate must name the veth's host end:
    /// [`TestCertificates::issue`]).
    pub fn tls_only_for_node(name: &str, max_connections: u32, tls_dir: &Path) -> Result<PrivatePostgres> {
        Self::start_on(name, max_connections, true, Some(tls_dir.to_owned()))
    }

    fn start_on(
        name: &str,
        max_connections: u32,
        for_node: bool,
        tls: Option<PathBuf>,
    ) -> Result<PrivatePostgres> {
        static NEXT: AtomicU16 = AtomicU16::new(0);
        let test_state = env_path("TIDEPOOL_TEST_STATE_DIR")?;
        let index = NEXT.fetch_add(1, Ordering::Relaxed);
        let state_dir = test_state.join(format!("private-{name}-{}-{index}", std::process::id()));
        // The test PostgreSQL's passwords (stack.sh makes new ones only
        // where there are none).
        let secrets = state_dir.join("secrets");
        std::fs::create_dir_all(&secrets)?;
        std::fs::set_permissions(&secrets, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        for file in ["postgres.password", "app.password"] {
            std::fs::copy(test_state.join("secrets").join(file), secrets.join(file))
                .with_context(|| format!("copying the test PostgreSQL's {file}"))?;
        }
        let mut addresses = vec![Ipv4Addr::LOCALHOST];
        if for_node {
            addresses.push(Node::from_env()?.host_ip.parse().context("TIDEPOOL_NODE_HOST_IP")?);
        }
        // Below the kernel's ephemeral range, away from the test
        // PostgreSQL's 15432, free on every address it listens on; each
        // process and each of its clusters starts looking at a port of its
        // own (two tests of one binary that start one at once would
        // otherwise both find the same port free).
        let first = 15500 + ((std::process::id() % 50) as u16 * 10 + index) % 500;
        let port = (first..first + 400)
            .map(|p| 15500 + (p - 15500) % 500)
            .find(|p| addresses.iter().all(|ip| TcpListener::bind(SocketAddrV4::new(*ip, *p)).is_ok()))
            .context("no free port for a private PostgreSQL in 15500-15999")?;
        let postgres = Postgres { port, password: String::new(), state_dir };
        let mut private = PrivatePostgres { postgres, max_connections, for_node, tls };
        private.stack(&["up", "postgres"])?;
        private.postgres = Postgres::at(private.postgres.state_dir.clone(), port)?;
        Ok(private)
    }

    fn stack(&self, args: &[&str]) -> Result<()> {
        let result = output(
            Command::new(repo_root()?.join("scripts/stack.sh"))
                .args(args)
                .env("TIDEPOOL_STATE_DIR", &self.postgres.state_dir)
                .env("TIDEPOOL_PG_PORT", self.postgres.port.to_string())
                .env("TIDEPOOL_PG_MAX_CONNECTIONS", self.max_connections.to_string())
                .env("TIDEPOOL_PG_FOR_NODE", if self.for_node { "1" } else { "0" })
                .env("TIDEPOOL_PG_TLS_DIR", self.tls.as_deref().unwrap_or(Path::new(""))),
        )?;
        ensure!(
            result.status.success(),
            "scripts/stack.sh {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&result.stdout),
            String::from_utf8_lossy(&result.stderr)
        );
        Ok(())
    }

    /// A fast shutdown (every session ends), then a start.
    pub fn restart(&self) -> Result<()> {
        self.stop()?;
        self.start_again()
    }

    /// A fast shutdown: every session ends, and nothing connects until
    /// [`PrivatePostgres::start_again`].
    pub fn stop(&self) -> Result<()> {
        self.stack(&["down", "postgres"])
    }

    /// Starts it again after [`PrivatePostgres::stop`].
    pub fn start_again(&self) -> Result<()> {
        self.stack(&["up", "postgres"])
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.stack(&["clean"]).is_err() {
            let _ = std::fs::remove_dir_all(&self.postgres.state_dir);
        }
    }
}

/// A CA and a server certificate of one test's own, made with openssl in
/// a folder of the test state: `ca.crt`, `server.crt` and `server.key`
/// (the shape [`PrivatePostgres::tls_only`] takes), for names only known
/// at run time (the node's host address). Deleted when dropped.
pub struct TestCertificates {
    pub dir: PathBuf,
}

impl TestCertificates {
    /// A new CA and a certificate it issued for the `names` (IP addresses
    /// or DNS names, in subjectAltName).
    pub fn issue(label: &str, names: &[&str]) -> Result<TestCertificates> {
        let dir = env_path("TIDEPOOL_TEST_STATE_DIR")?.join(format!("certs-{label}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let certificates = TestCertificates { dir };
        let san: Vec<String> =
            names
                .iter()
                .map(|n| {
                    if n.parse::<std::net::IpAddr>().is_ok() {
                        format!("IP:{n}")
                    } else {
                        format!("DNS:{n}")
                    }
                })
                .collect();
        let dir = certificates.dir.to_string_lossy().into_owned();
        let openssl = |args: &[&str]| -> Result<()> {
            let result = output(Command::new("openssl").args(args).current_dir(&dir))?;
            ensure!(
                result.status.success(),
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&result.stderr)
            );
            Ok(())
        };
        // Both keys: P-256, unencrypted.
        let new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        let ca_subject = format!("/CN=tidepool test CA {label}");
        openssl(
            &[
                &["req", "-x509"][..],
                &new_key,
                &["-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", &ca_subject],
                &[
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
            ]
            .concat(),
        )?;
        openssl(
            &[
                &["req"][..],
                &new_key,
                &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=tidepool test server"],
            ]
            .concat(),
        )?;
        std::fs::write(
            certificates.dir.join("server.ext"),
            format!(
                "subjectAltName={}\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
                san.join(",")
            ),
        )?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ])?;
        Ok(certificates)
    }

    /// The CA's certificate, as PEM.
    pub fn ca_pem(&self) -> Result<String> {
        Ok(std::fs::read_to_string(self.dir.join("ca.crt"))?)
    }
}

impl Drop for TestCertificates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A database and a role of one test's own, with a password no other test
/// uses (so finding it anywhere is this test's leak).
pub struct AppDatabase {
    pub name: String,
    pub password: String,
}

impl AppDatabase {
    pub fn create(pg: &Postgres, name: &str) -> Result<AppDatabase> {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
        let password = format!("sekret-{nanos:x}-{}", std::process::id());
        pg.psql("postgres", &format!("CREATE ROLE {name} LOGIN PASSWORD '{password}'"))?;
        pg.psql("postgres", &format!("CREATE DATABASE {name} OWNER {name}"))?;
        Ok(AppDatabase { name: name.to_owned(), password })
    }

    /// The Secret `secret_name`, in CloudNativePG's application Secret shape.
    pub fn secret(&self, secret_name: &str, host: &str, port: u16) -> String {
        let AppDatabase { name, password } = self;
        serde_json::json!({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/basic-auth",
            "metadata": {"name": secret_name},
            "stringData": {
                "username": name, "user": name, "password": password, "dbname": name,
                "host": host, "port": port.to_string(),
                "uri": format!("postgresql://{name}:{password}@{host}:{port}/{name}"),
                "pgpass": format!("{host}:{port}:{name}:{name}:{password}"),
            }
        })
        .to_string()
    }

    /// Its URL on `pg`'s loopback address (for clients on the host).
    pub fn url(&self, pg: &Postgres) -> String {
        format!("postgresql://{0}:{1}@127.0.0.1:{2}/{0}", self.name, self.password, pg.port)
    }

    /// Server connections of this role, by `pg_stat_activity`.
    pub fn connections_sql(&self) -> String {
        format!("SELECT count(*) FROM pg_stat_activity WHERE usename = '{}'", self.name)
    }

    /// This role's backends running `pg_sleep` right now.
    pub fn sleeping_sql(&self) -> String {
        format!(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = '{}' AND state = 'active' \
             AND query ILIKE '%pg_sleep%'",
            self.name
        )
    }
}

/// Samples a count (`SELECT count(*) ...`) every 100 ms in a thread, until
/// dropped or [`Sampler::finish`]ed: every sample.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<(Duration, i64)>>>,
    thread: Option<JoinHandle<Result<()>>>,
}

/// The largest count among `samples` (0 for none): the most a [`Sampler`]
/// saw at once.
pub fn peak(samples: &[(Duration, i64)]) -> i64 {
    samples.iter().map(|(_, n)| *n).max().unwrap_or(0)
}

impl Sampler {
    /// Samples `sql` run on `pg` in database `db`.
    pub fn start(pg: &Postgres, db: &str, sql: &str) -> Sampler {
        let (pg, db, sql) = (pg.clone(), db.to_owned(), sql.to_owned());
        Self::counting(move || pg.psql(&db, &sql)?.parse().context("a count"))
    }

    /// Samples what `count` returns (a count read elsewhere: another
    /// server's `psql`).
    pub fn counting(mut count: impl FnMut() -> Result<i64> + Send + 'static) -> Sampler {
        let (stop, samples) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Vec::new())));
        let (stopping, recording) = (stop.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            while !stopping.load(Ordering::Relaxed) {
                let count = count()?;
                recording.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.push((started.elapsed(), count));
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        });
        Sampler { stop, samples, thread: Some(thread) }
    }

    /// Stops; every sample (time since the start, count). Fails if a
    /// sample failed.
    pub fn finish(mut self) -> Result<Vec<(Duration, i64)>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().map_err(|_| anyhow::anyhow!("the sampler panicked"))??;
        }
        let samples = self.samples.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        ensure!(!samples.is_empty(), "no sample was taken");
        Ok(samples.clone())
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The path as text, for a command's argument.
pub fn path_arg(path: &Path) -> Result<&str> {
    path.to_str().with_context(|| format!("{} is not UTF-8", path.display()))
}

/// Runs `command`; errors name its program only (a command's Debug form
/// would show its environment, a password among it).
pub fn output(command: &mut Command) -> Result<Output> {
    let program = command.get_program().to_string_lossy().into_owned();
    command.output().with_context(|| format!("running {program}"))
}
