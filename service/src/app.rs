//! An application on Tidepool: its routes, its tasks, its migrations and
//! its state, and [`run`], which gives its binary the whole command line.
//!
//! ```no_run
//! use std::process::ExitCode;
//! use tidepool::axum::{routing::get, Router};
//! use tidepool::Application;
//!
//! fn main() -> ExitCode {
//!     let routes = Router::new().route("/hello", get(|| async { "hello" }));
//!     tidepool::run(Application::new("hello").routes(routes))
//! }
//! ```
//!
//! The binary then has every subcommand and knob of `tidepool`, with the
//! same exit codes: `web` serves the routes, `worker` runs the tasks,
//! `migrate` applies Tidepool's migrations and then the application's,
//! `enqueue` enqueues any of its tasks, `pooler-config` writes a PgBouncer
//! configuration. So the operator runs an application's image exactly as it
//! runs the default one.
//!
//! Exit codes: 0 success; 1 error (the message says what, invalid settings
//! included); 2 invalid command line; 3 `web` shut down with requests still
//! in flight at the deadline, or `worker` handed running jobs back at its
//! deadline; 130 a second signal cut a shutdown short.

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRef;
use axum::Router;
use clap::{CommandFactory, FromArgMatches};

use crate::cli::{Cli, Command, EnqueueArgs, MigrateArgs, PoolerConfigArgs};
use crate::migrate::{self, Migration, Track};
use crate::queue::periodic::Periodic;
use crate::queue::rate_limit::RateLimit;
use crate::queue::ShutdownReport;
use crate::settings::{apply_password_file, WebSettings, WorkerSettings};
use crate::task::{Registry, RegistryError, Task};
use crate::tls::TlsSettings;
use crate::web::{self, Server};
use crate::{db, enqueue, pooler, shutdown, telemetry, StartError};

const EXIT_SHUTDOWN_DEADLINE: u8 = 3;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Registration<S> = fn(&S, &mut Registry) -> Result<(), RegistryError>;

/// What an application is made of. `S` is its state: handlers read it with
/// axum's `State`, tasks with [`Task::State`].
pub struct Application<S = ()> {
    name: &'static str,
    version: &'static str,
    state: S,
    router: Router<S>,
    tasks: Vec<Registration<S>>,
    schedules: Vec<Periodic>,
    queue_limits: Vec<(String, RateLimit)>,
    migrations: &'static [Migration],
}

impl Application<()> {
    /// An application without state. `name` is its migration track's name
    /// and its name in logs: 1 to 64 of a-z, 0-9, '_' and '-', not
    /// `tidepool`.
    pub fn new(name: &'static str) -> Self {
        Self::with_state(name, ())
    }
}

fn register<S, T>(state: &S, registry: &mut Registry) -> Result<(), RegistryError>
where
    T: Task,
    T::State: FromRef<S>,
{
    registry.register::<T>(T::State::from_ref(state)).map(|_| ())
}

impl<S: Clone + Send + Sync + 'static> Application<S> {
    /// An application whose handlers and tasks share `state`.
    pub fn with_state(name: &'static str, state: S) -> Self {
        Self {
            name,
            version: env!("CARGO_PKG_VERSION"),
            state,
            router: Router::new(),
            tasks: Vec::new(),
            schedules: Vec::new(),
            queue_limits: Vec::new(),
            migrations: &[],
        }
    }

    /// The version `--version` prints (Tidepool's by default): pass your
    /// crate's `env!("CARGO_PKG_VERSION")`.
    pub fn version(mut self, version: &'static str) -> Self {
        self.version = version;
        self
    }

    /// The routes `web` serves (replacing any given before). Merge
    /// [`web::tasks_api`] into them to offer the queue's JSON API.
    pub fn routes(mut self, router: Router<S>) -> Self {
        self.router = router;
        self
    }

    /// Adds task `T`. Its state is taken from the application's; a task
    /// that needs a state the application cannot give does not compile.
    pub fn task<T>(mut self) -> Self
    where
        T: Task,
        T::State: FromRef<S>,
    {
        self.tasks.push(register::<S, T>);
        self
    }

    /// Adds a schedule of one of its tasks ([`crate::queue::periodic`]):
    /// every worker enqueues its occurrences, each exactly once. Checked
    /// with the tasks, by [`Application::registry`].
    pub fn periodic(mut self, periodic: Periodic) -> Self {
        self.schedules.push(periodic);
        self
    }

    /// Limits how often jobs are claimed from `queue`, across every worker
    /// ([`crate::queue::rate_limit`]); a task's own limit is its
    /// [`Task::RATE_LIMIT`]. Checked by [`Application::registry`].
    pub fn rate_limit_queue(mut self, queue: &str, limit: RateLimit) -> Self {
        self.queue_limits.push((queue.to_owned(), limit));
        self
    }

    /// The application's own migrations, its track named after it, applied
    /// after Tidepool's.
    pub fn migrations(mut self, migrations: &'static [Migration]) -> Self {
        self.migrations = migrations;
        self
    }

    /// Its name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Its tasks, each with its state, and its schedules. Refused if two
    /// tasks or two schedules share a name, or a schedule's task is not
    /// among the tasks.
    pub fn registry(&self) -> Result<Registry, RegistryError> {
        let mut registry = self.tasks_only()?;
        for periodic in &self.schedules {
            registry.periodic(periodic.clone())?;
        }
        Ok(registry)
    }

    /// Its tasks without its schedules: what [`crate::testing::drain`]
    /// runs (a drain works off what is due; it does not enqueue more).
    pub(crate) fn tasks_only(&self) -> Result<Registry, RegistryError> {
        let mut registry = Registry::new();
        for register in &self.tasks {
            register(&self.state, &mut registry)?;
        }
        for (queue, limit) in &self.queue_limits {
            registry.rate_limit_queue(queue, *limit)?;
        }
        Ok(registry)
    }

    /// Every migration track, in the order they are applied: Tidepool's,
    /// then the application's.
    pub fn tracks(&self) -> Vec<Track> {
        vec![migrate::TIDEPOOL, Track { name: self.name, migrations: self.migrations }]
    }

    /// Its router with its state, as the web server serves it.
    pub fn router(&self) -> Router {
        self.router.clone().with_state(self.state.clone())
    }

    /// A web server for it with `settings`: validated, the routes checked,
    /// the pool built. Serve it with [`web::serve`] (and [`web::warm_up`]).
    pub async fn web_server(&self, settings: WebSettings) -> Result<Arc<Server>, StartError> {
        Ok(Arc::new(Server::new(self.router(), self.registry()?, settings).await?))
    }

    /// Serves it on `settings.listen` until `shutdown` resolves and the
    /// server has drained.
    pub async fn serve(
        &self,
        settings: WebSettings,
        shutdown: impl Future<Output = ()>,
    ) -> Result<web::Shutdown, StartError> {
        crate::raise_open_files_limit();
        let server = self.web_server(settings).await?;
        let listener = crate::bind(server.listen()).await?;
        tracing::info!(app = self.name, listen = %server.listen(), "web is listening; opening its database connections");
        tokio::spawn(web::warm_up(server.clone()));
        Ok(web::serve(listener, server, shutdown).await)
    }

    /// Runs a worker for its tasks until `shutdown` resolves.
    pub async fn work(
        &self,
        settings: WorkerSettings,
        shutdown: impl Future<Output = ()>,
    ) -> Result<ShutdownReport, StartError> {
        crate::worker::run(settings, self.registry()?, shutdown).await
    }

    /// Applies the missing migrations of every track over `client`.
    pub async fn migrate(
        &self,
        client: &mut tokio_postgres::Client,
        lock_timeout: Duration,
    ) -> Result<migrate::Report, migrate::MigrateError> {
        migrate::run(client, &self.tracks(), lock_timeout).await
    }
}

/// Parses the command line (exiting with 2 and a usage message when it
/// does not parse), sets up logging and runs one subcommand for `app`.
pub fn run<S: Clone + Send + Sync + 'static>(app: Application<S>) -> ExitCode {
    // Named as the binary is (`tidepool`, `tidepool-shop`), as people call it.
    let binary = std::env::args_os()
        .next()
        .and_then(|arg| {
            std::path::Path::new(&arg).file_name().map(|name| name.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| app.name.to_owned());
    let matches = Cli::command().name(binary).version(app.version).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let Err(e) = telemetry::init(&cli.log) {
        eprintln!("{}: {e}", app.name);
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Web(args) => match app.serve(args.into_settings(), shutdown::first_signal()).await? {
                web::Shutdown::Clean => Ok(ExitCode::SUCCESS),
                web::Shutdown::DeadlineExceeded => Ok(ExitCode::from(EXIT_SHUTDOWN_DEADLINE)),
            },
            Command::Worker(args) => {
                let report = app.work(args.into_settings(), shutdown::first_signal()).await?;
                Ok(if report.handed_back == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(EXIT_SHUTDOWN_DEADLINE)
                })
            }
            Command::Enqueue(args) => run_enqueue(&app, args).await.map(|()| ExitCode::SUCCESS),
            Command::Migrate(args) => run_migrate(&app, args).await.map(|()| ExitCode::SUCCESS),
            Command::PoolerConfig(args) => run_pooler_config(args).map(|()| ExitCode::SUCCESS),
            Command::PoolerExporter(args) => {
                let listen = args.listen;
                let stats = args.stats().ok_or("set --pooler-stats-url: the admin console to read")?;
                let listener = crate::bind(listen).await?;
                tracing::info!(%listen, "serving PgBouncer's figures on /metrics");
                crate::pooler_metrics::export(listener, stats.admin_console()?, shutdown::first_signal())
                    .await;
                Ok(ExitCode::SUCCESS)
            }
            Command::Pgpass(args) => pooler::Upstream::from_dir(&args.from_dir)
                .and_then(|upstream| pooler::write_passfile(&upstream, &args.out))
                .map(|()| ExitCode::SUCCESS)
                .map_err(Into::into),
        }
    });
    match outcome {
        Ok(code) => code,
        Err(e) => {
            let error = crate::error_chain(e.as_ref());
            tracing::error!(error = %error, "{} failed", app.name);
            write_termination_message(&format!("{} failed: {error}", app.name));
            ExitCode::FAILURE
        }
    }
}

/// Where Kubernetes reads a container's termination message from (its
/// default `terminationMessagePath`): the kubelet puts it in the pod's
/// status, where the operator quotes a failed migration's error.
const TERMINATION_LOG: &str = "/dev/termination-log";
/// What the kubelet keeps of it.
const TERMINATION_MESSAGE_MAX: usize = 4096;

/// Writes `message` as the container's termination message, when the
/// process runs in a container that has the file (it is never created).
fn write_termination_message(message: &str) {
    let Ok(mut file) = std::fs::OpenOptions::new().write(true).truncate(true).open(TERMINATION_LOG) else {
        return;
    };
    let mut end = message.len().min(TERMINATION_MESSAGE_MAX);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    if let Err(e) = std::io::Write::write_all(&mut file, &message.as_bytes()[..end]) {
        tracing::debug!(error = %e, "could not write the termination message");
    }
}

async fn run_enqueue<S: Clone + Send + Sync + 'static>(
    app: &Application<S>,
    args: EnqueueArgs,
) -> Result<(), BoxError> {
    let registry = app.registry()?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let summary = enqueue::run(&args, &registry, &mut out).await?;
    let seconds = summary.elapsed.as_secs_f64();
    let total = summary.created + summary.duplicates;
    eprintln!(
        "enqueued {} jobs ({} duplicates) in {seconds:.3} s: {:.0} jobs/s",
        summary.created,
        summary.duplicates,
        total as f64 / seconds.max(1e-9)
    );
    Ok(())
}

async fn run_migrate<S: Clone + Send + Sync + 'static>(
    app: &Application<S>,
    args: MigrateArgs,
) -> Result<(), BoxError> {
    let (url, what) = match (&args.direct_database_url, &args.database_url) {
        (Some(direct), _) => (direct, "TIDEPOOL_DIRECT_DATABASE_URL"),
        (None, Some(pooled)) => (pooled, "DATABASE_URL"),
        (None, None) => {
            return Err("set TIDEPOOL_DIRECT_DATABASE_URL or DATABASE_URL (or --database-url)".into())
        }
    };
    let mut target = url.to_connection(what)?;
    target.pg = apply_password_file(target.pg, args.password_file.as_deref())?;
    let mut client = db::connect(target, args.db_connect_timeout).await?;
    let report = app.migrate(&mut client, args.lock_timeout).await?;
    if !report.upgraded.is_empty() {
        let moved: Vec<String> = report.upgraded.iter().map(|(old, new)| format!("{old} -> {new}")).collect();
        tracing::info!(moved = %moved.join(", "), "upgraded the migrations table to tracks");
    }
    tracing::info!(
        applied = %migrate::list(&report.applied),
        already_applied = %migrate::list(&report.already_applied),
        "migrations complete"
    );
    if !report.unknown.is_empty() {
        tracing::warn!(
            versions = %migrate::list(&report.unknown),
            "the database has migrations this binary does not know (a newer release, or another application, ran)"
        );
    }
    Ok(())
}

fn run_pooler_config(args: PoolerConfigArgs) -> Result<(), BoxError> {
    let (upstream, server_tls) = match (&args.upstream_url, &args.upstream_from_dir) {
        (Some(url), _) => {
            let target = url.to_connection("TIDEPOOL_POOLER_UPSTREAM_URL")?;
            (pooler::Upstream::from_pg_config(&target.pg)?, target.tls)
        }
        (None, Some(dir)) => (
            pooler::Upstream::from_dir(dir)?,
            TlsSettings {
                mode: args.server_tls_sslmode,
                root_cert: args.server_tls_ca_file,
                cert: args.server_tls_cert_file,
                key: args.server_tls_key_file,
            },
        ),
        (None, None) => return Err("set --upstream-url or --upstream-from-dir".into()),
    };
    let settings = args.settings.iter().map(|s| pooler::Setting::parse(s)).collect::<Result<Vec<_>, _>>()?;
    let config = pooler::PoolerConfig {
        listen: args.listen,
        upstream,
        pool_size: args.pool_size,
        min_pool_size: args.min_pool_size,
        max_db_connections: args.max_db_connections.unwrap_or(args.pool_size),
        max_client_conn: args.max_client_conn,
        query_wait_timeout: args.query_wait_timeout,
        stats_user: args.stats_user.map(pooler::LocalUser::generate),
        client_user: args.client_user.map(pooler::LocalUser::generate),
        server_tls,
        settings,
        pidfile: args.pidfile,
        logfile: args.logfile,
    };
    let (ini, _auth) = pooler::write(&config, &args.out_dir)?;
    println!("{}", ini.display());
    Ok(())
}
