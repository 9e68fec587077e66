//! Test harness: real PostgreSQL, real PgBouncer in transaction mode, and
//! real `tidepool` processes, all on loopback.
//!
//! `make test` (scripts/test.sh) starts one PostgreSQL cluster for the whole
//! run and exports where it is (`TIDEPOOL_TEST_*`). Each test then creates
//! what it needs of its own, so tests run in parallel without sharing state:
//! a database ([`TestDb`]), a PgBouncer in front of it ([`PgBouncer`]),
//! `tidepool web` and `tidepool worker` processes ([`Service`]), or a private PostgreSQL cluster it may
//! stop and start ([`PrivatePostgres`]). Processes are killed when their
//! handle drops. Waits poll a condition with a deadline ([`wait_for`]).

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use tidepool::pooler::{self, LocalUser, PoolerConfig, Upstream};
use tokio_postgres::NoTls;

pub mod queue;

/// Where the run's shared PostgreSQL is, from scripts/test.sh.
pub struct TestEnv {
    pub pg_port: u16,
    pub state_dir: PathBuf,
    pub superuser_password: String,
    pub app_user: String,
    pub app_password: String,
    /// The uid/gid PostgreSQL and PgBouncer run as when the tests run as root.
    pub run_as: Option<(u32, u32)>,
}

pub fn env() -> &'static TestEnv {
    static ENV: OnceLock<TestEnv> = OnceLock::new();
    ENV.get_or_init(|| match load_env() {
        Ok(env) => env,
        Err(e) => panic!("{e:#}\nThese tests need the test PostgreSQL: run them with `make test`."),
    })
}

fn load_env() -> Result<TestEnv> {
    let var = |name: &str| std::env::var(name).with_context(|| format!("{name} is not set"));
    let state_dir = PathBuf::from(var("TIDEPOOL_TEST_STATE_DIR")?);
    let secret = |name: &str| -> Result<String> {
        let path = state_dir.join("secrets").join(name);
        Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_owned())
    };
    let run_as =
        if unsafe { libc::geteuid() } == 0 { Some(lookup_user(&var("TIDEPOOL_RUN_AS")?)?) } else { None };
    Ok(TestEnv {
        pg_port: var("TIDEPOOL_TEST_PG_PORT")?.parse().context("TIDEPOOL_TEST_PG_PORT")?,
        superuser_password: secret("postgres.password")?,
        app_user: "tidepool".into(),
        app_password: secret("app.password")?,
        state_dir,
        run_as,
    })
}

fn lookup_user(name: &str) -> Result<(u32, u32)> {
    let c_name = std::ffi::CString::new(name)?;
    // SAFETY: getpwnam returns a pointer to static storage or null; it is
    // read at once, before any other call could overwrite it.
    let entry = unsafe { libc::getpwnam(c_name.as_ptr()) };
    if entry.is_null() {
        bail!("user {name} does not exist (run `make deps`)");
    }
    // SAFETY: checked non-null above.
    let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
    Ok((uid, gid))
}

/// A command that runs as the service user when the tests run as root.
fn service_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(program);
    if let Some((uid, gid)) = env().run_as {
        command.uid(uid).gid(gid);
    }
    command
}

pub use tidepool_testenv::{chown_to_service_user, scratch_dir};

/// A script of the checkout under test. The path comes from the
/// CARGO_MANIFEST_DIR cargo sets when it runs the test, not the one compiled
/// in: a test binary reused from a shared target folder may have been built
/// in another checkout.
pub fn script(name: &str) -> Result<PathBuf> {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .context("CARGO_MANIFEST_DIR is not set: run the tests with cargo")?;
    let path = Path::new(&manifest_dir).join("../scripts").join(name);
    if !path.exists() {
        bail!("{} does not exist", path.display());
    }
    Ok(path)
}

/// Starts `command` with no input and its output appended to `log`.
fn spawn_logged(command: &mut Command, log: &Path) -> Result<Child> {
    let file = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    command
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("starting {:?}", command.get_program()))
}

/// Kills a child, if there is one, and reaps it.
fn kill_child(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A free loopback port (bound, then released for the caller to bind).
/// The value of the first sample in a metrics text whose line starts with
/// `series`: a whole series (`name` or `name{labels}`), or a name and a
/// label prefix ending in `,`.
pub fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        let value = if series.ends_with(',') { rest.split_once("} ")?.1 } else { rest.strip_prefix(' ')? };
        value.trim().parse().ok()
    })
}

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn port_accepts(port: u16) -> bool {
    TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_millis(200)).is_ok()
}

/// The tests' one wait for a condition, with a deadline.
pub use tidepool_testenv::wait_for_async as wait_for;

pub fn url(user: &str, password: &str, port: u16, db: &str) -> String {
    format!("postgres://{user}:{password}@127.0.0.1:{port}/{db}")
}

pub async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// A database of this test's own on the shared cluster, migrated.
pub struct TestDb {
    pub name: String,
    pub port: u16,
}

impl TestDb {
    pub async fn create() -> Result<TestDb> {
        Self::create_on(env().pg_port).await
    }

    /// Creates and migrates a database on the cluster at `port`.
    pub async fn create_on(port: u16) -> Result<TestDb> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!("t{}_{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let db = TestDb { name, port };
        let admin = connect(&url("postgres", &env().superuser_password, port, "postgres")).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {} OWNER {}", db.name, env().app_user))
            .await
            .context("CREATE DATABASE")?;
        let output = Command::new(env!("CARGO_BIN_EXE_tidepool"))
            .arg("migrate")
            .env("TIDEPOOL_DIRECT_DATABASE_URL", db.direct_url())
            .env_remove("DATABASE_URL")
            .output()?;
        if !output.status.success() {
            bail!("tidepool migrate failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(db)
    }

    pub fn direct_url(&self) -> String {
        url(&env().app_user, &env().app_password, self.port, &self.name)
    }

    /// A superuser connection to this database, for inspecting the server.
    pub async fn admin(&self) -> Result<tokio_postgres::Client> {
        connect(&url("postgres", &env().superuser_password, self.port, &self.name)).await
    }

    /// Backends of this database running `pg_sleep` right now.
    pub async fn active_sleeps(&self, admin: &tokio_postgres::Client) -> Result<i64> {
        let row = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = $1 AND state = 'active' AND query ILIKE '%pg_sleep%' AND pid <> pg_backend_pid()",
                &[&self.name],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Server connections the application role holds on this database.
    pub async fn server_connections(&self, admin: &tokio_postgres::Client) -> Result<i64> {
        let row = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND usename = $2",
                &[&self.name, &env().app_user],
            )
            .await?;
        Ok(row.get(0))
    }
}

/// A real PgBouncer, transaction mode, configured by `tidepool::pooler`.
pub struct PgBouncer {
    child: Option<Child>,
    dir: PathBuf,
    pub port: u16,
    /// Where it connects, as whom: its clients log in as the same user.
    upstream: Upstream,
}

impl PgBouncer {
    pub async fn start(db: &TestDb, pool_size: u32) -> Result<PgBouncer> {
        Self::start_with_query_wait(db, pool_size, Duration::from_secs(30)).await
    }

    /// With PgBouncer's `query_wait_timeout` set to `query_wait`.
    pub async fn start_with_query_wait(
        db: &TestDb,
        pool_size: u32,
        query_wait: Duration,
    ) -> Result<PgBouncer> {
        Self::start_with(db, pool_size, query_wait, None).await
    }

    /// With a stats user `name` ([`PgBouncer::STATS_USER`]) that may read
    /// the admin console; its password is in [`PgBouncer::stats_password_file`].
    pub async fn start_with_stats_user(db: &TestDb, pool_size: u32) -> Result<PgBouncer> {
        let stats = LocalUser::generate(Self::STATS_USER.to_owned());
        Self::start_with(db, pool_size, Duration::from_secs(30), Some(stats)).await
    }

    pub const STATS_USER: &str = "tidepool_stats";

    async fn start_with(
        db: &TestDb,
        pool_size: u32,
        query_wait: Duration,
        stats_user: Option<LocalUser>,
    ) -> Result<PgBouncer> {
        Self::launch(&db.direct_url(), pool_size, query_wait, stats_user).await
    }

    /// In front of the PostgreSQL of `direct_url`, whose user clients log
    /// in as, with its TLS from the URL's libpq parameters (`sslmode`,
    /// `sslrootcert`, ...).
    pub async fn in_front_of(direct_url: &str, pool_size: u32) -> Result<PgBouncer> {
        Self::launch(direct_url, pool_size, Duration::from_secs(30), None).await
    }

    async fn launch(
        direct_url: &str,
        pool_size: u32,
        query_wait: Duration,
        stats_user: Option<LocalUser>,
    ) -> Result<PgBouncer> {
        let dir = scratch_dir("pgbouncer")?;
        let target = direct_url.parse::<tidepool::db::Target>()?;
        let upstream = Upstream::from_pg_config(&target.pg)?;
        let config = PoolerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
            upstream: upstream.clone(),
            pool_size,
            min_pool_size: 0,
            max_db_connections: pool_size,
            max_client_conn: 1000,
            query_wait_timeout: query_wait,
            stats_user,
            client_user: None,
            server_tls: target.tls,
            settings: Vec::new(),
            pidfile: None,
            logfile: None,
        };
        let (ini, auth) = pooler::write(&config, &dir)?;
        chown_to_service_user(&ini)?;
        chown_to_service_user(&auth)?;
        let mut bouncer = PgBouncer { child: None, dir, port: config.listen.port(), upstream };
        bouncer.run().await?;
        Ok(bouncer)
    }

    async fn run(&mut self) -> Result<()> {
        let mut command = service_command(pgbouncer_binary());
        command.arg(self.dir.join(pooler::INI_FILE)).current_dir(&self.dir);
        self.child = Some(spawn_logged(&mut command, &self.dir.join("pgbouncer.log"))?);
        let port = self.port;
        wait_for("PgBouncer to listen", Duration::from_secs(10), || async move {
            port_accepts(port).then_some(())
        })
        .await
        .with_context(|| self.log())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        url(&self.upstream.user, &self.upstream.password, self.port, &self.upstream.dbname)
    }

    /// The admin console's URL for the stats user (no password: see
    /// [`PgBouncer::stats_password_file`]).
    pub fn stats_url(&self) -> String {
        format!("postgres://{}@127.0.0.1:{}/pgbouncer", Self::STATS_USER, self.port)
    }

    pub fn stats_password_file(&self) -> PathBuf {
        self.dir.join(tidepool::pooler::STATS_PASSWORD_FILE)
    }

    pub fn stop(&mut self) {
        kill_child(&mut self.child);
    }

    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        self.run().await
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn pgbouncer_binary() -> PathBuf {
    ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("pgbouncer"))
}

pub fn signal(pid: u32, signal: i32) -> Result<()> {
    let pid = i32::try_from(pid)?;
    // SAFETY: kill has no memory effects; the pid is our own child's.
    if unsafe { libc::kill(pid, signal) } != 0 {
        bail!("kill({pid}, {signal}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// A `tidepool web` or `tidepool worker` process, its HTTP server on a
/// port of its own.
pub struct Service {
    /// `Some` until the process has been reaped.
    child: Option<Child>,
    pub port: u16,
    log: PathBuf,
    kind: &'static str,
}

/// The web tests' name for it.
pub type Web = Service;

impl Service {
    /// Starts `tidepool web` against `database_url` with extra environment
    /// (`TIDEPOOL_*` knobs), waiting until `/healthz` answers and the
    /// process has logged that it is ready (its pool's connections are open,
    /// or could not be within the connect timeout).
    pub async fn start(database_url: &str, extra_env: &[(&str, &str)]) -> Result<Service> {
        Self::start_kind("web", "TIDEPOOL_LISTEN", database_url, extra_env).await
    }

    /// Starts `tidepool worker` the same way.
    pub async fn worker(database_url: &str, extra_env: &[(&str, &str)]) -> Result<Service> {
        Self::start_kind("worker", "TIDEPOOL_WORKER_LISTEN", database_url, extra_env).await
    }

    /// Starts `tidepool pooler-exporter` for `bouncer`'s admin console,
    /// waiting until it serves.
    pub async fn exporter(bouncer: &PgBouncer) -> Result<Service> {
        let password_file = bouncer.stats_password_file();
        let password_file = password_file.to_str().context("a UTF-8 path")?;
        let stats_url = bouncer.stats_url();
        let env = [
            ("TIDEPOOL_POOLER_STATS_URL", stats_url.as_str()),
            ("TIDEPOOL_POOLER_STATS_PASSWORD_FILE", password_file),
        ];
        Self::start_kind("pooler-exporter", "TIDEPOOL_POOLER_EXPORTER_LISTEN", "", &env).await
    }

    async fn start_kind(
        kind: &'static str,
        listen_var: &str,
        database_url: &str,
        extra_env: &[(&str, &str)],
    ) -> Result<Service> {
        let port = free_port()?;
        let log = scratch_dir(kind)?.join(format!("{kind}.log"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_tidepool"));
        command
            .arg(kind)
            .env("DATABASE_URL", database_url)
            .env_remove("TIDEPOOL_DIRECT_DATABASE_URL")
            .env(listen_var, format!("127.0.0.1:{port}"))
            .env("TIDEPOOL_LOG", "info")
            .envs(extra_env.iter().copied());
        let child = spawn_logged(&mut command, &log)?;
        let mut service = Service { child: Some(child), port, log, kind };
        let health = service.url("/healthz");
        let started =
            wait_for(&format!("tidepool {kind} to answer /healthz"), Duration::from_secs(15), || {
                let health = health.clone();
                async move { get(&health).await.ok().filter(|r| r.status == 200).map(drop) }
            })
            .await;
        let ready_line = match kind {
            "pooler-exporter" => "serving PgBouncer's figures on /metrics".to_owned(),
            _ => format!("tidepool {kind} is ready"),
        };
        let ready = match started {
            Ok(()) => {
                wait_for(&format!("tidepool {kind} to log that it is ready"), Duration::from_secs(30), || {
                    std::future::ready(service.log().contains(&ready_line).then_some(()))
                })
                .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = ready {
            let exited = service.child.as_mut().map(Child::try_wait).transpose()?;
            bail!("{e}; exited: {exited:?}; log:\n{}", service.log());
        }
        Ok(service)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn pid(&self) -> Result<u32> {
        Ok(self.child.as_ref().with_context(|| format!("tidepool {} has exited", self.kind))?.id())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, signal: i32) -> Result<()> {
        self::signal(self.pid()?, signal)
    }

    /// Waits for the process to exit, at most `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Result<ExitStatus> {
        let what = format!("tidepool {} to exit", self.kind);
        let child = self.child.as_mut().with_context(|| format!("tidepool {} has exited", self.kind))?;
        let status = wait_for(&what, limit, || std::future::ready(child.try_wait().ok().flatten())).await?;
        self.child = None;
        Ok(status)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// The usual set-up of a web test: a migrated database, a PgBouncer with
/// `server_connections` in front of it, a `tidepool web` with `web_env`, and
/// a superuser connection for watching the server. Fields drop in order, so
/// the web process stops before its pooler.
pub struct Stack {
    pub web: Web,
    pub bouncer: PgBouncer,
    pub db: TestDb,
    pub admin: tokio_postgres::Client,
}

impl Stack {
    pub async fn start(server_connections: u32, web_env: &[(&str, &str)]) -> Result<Stack> {
        let db = TestDb::create().await?;
        let bouncer = PgBouncer::start(&db, server_connections).await?;
        let web = Web::start(&bouncer.url(), web_env).await?;
        let admin = db.admin().await?;
        Ok(Stack { web, bouncer, db, admin })
    }
}

/// Waits until exactly `n` backends of `db` run `pg_sleep`.
pub async fn wait_for_sleeps(db: &TestDb, admin: &tokio_postgres::Client, n: i64) -> Result<()> {
    wait_for(&format!("{n} pg_sleep backends active together"), Duration::from_secs(10), || async {
        db.active_sleeps(admin).await.ok().filter(|active| *active == n).map(drop)
    })
    .await
}

/// Polls `url` until it answers `status`.
pub async fn wait_for_status(url: &str, status: u16, limit: Duration) -> Result<HttpResponse> {
    wait_for(&format!("GET {url} to answer {status}"), limit, || async {
        get(url).await.ok().filter(|r| r.status == status)
    })
    .await
}

pub struct HttpResponse {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl HttpResponse {
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.body).with_context(|| format!("not JSON: {}", self.body))
    }
}

/// A GET on a new connection, bounded to 90 s.
pub async fn get(url: &str) -> Result<HttpResponse> {
    request(http::Method::GET, url, "").await
}

/// A request with a body on a new connection, bounded to 90 s.
pub async fn request(method: http::Method, url: &str, body: impl Into<Bytes>) -> Result<HttpResponse> {
    static CLIENT: OnceLock<HttpClient<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>> =
        OnceLock::new();
    let client = CLIENT
        .get_or_init(|| HttpClient::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build_http());
    let request = http::Request::builder()
        .method(method)
        .uri(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body.into()))?;
    let response = tokio::time::timeout(Duration::from_secs(90), client.request(request))
        .await
        .with_context(|| format!("request to {url} timed out"))??;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await?.to_bytes();
    Ok(HttpResponse { status, headers, body: String::from_utf8_lossy(&body).into_owned() })
}

/// Sends a GET on a new connection and returns the connection without
/// reading the answer: dropping it hangs up on the server mid-request.
pub async fn start_request(addr: SocketAddr, path: &str) -> Result<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes()).await?;
    Ok(stream)
}

/// Sends raw bytes on a new connection and returns everything the server
/// sends back until it closes or 10 s pass.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(request).await?;
    let mut response = Vec::new();
    let mut buf = [0u8; 8192];
    let read = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    response.extend_from_slice(&buf[..n]);
                    // One response is enough: stop at the end of a JSON body.
                    if response.ends_with(b"}") {
                        break;
                    }
                }
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

/// One thread per core spinning at normal priority until dropped: a busy
/// machine, for tests of what must hold under load.
pub struct BusyCores {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl BusyCores {
    pub fn start() -> BusyCores {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        let threads = (0..cores)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        BusyCores { stop, threads }
    }
}

impl Drop for BusyCores {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
