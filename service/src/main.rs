//! The `tidepool` command: parses the command line, sets up logging and runs
//! one subcommand. Exit codes: 0 success; 1 error (the message says what);
//! 2 invalid command line; 3 `web` shut down with requests still in flight
//! at the deadline, or `worker` handed running jobs back at its deadline;
//! 130 a second signal cut a shutdown short.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tidepool::cli::{Cli, Command, EnqueueArgs, MigrateArgs, PoolerConfigArgs, WebArgs, WorkerArgs};
use tidepool::queue::Registry;
use tidepool::{db, enqueue, migrate, pooler, shutdown, telemetry, web, worker};

const EXIT_SHUTDOWN_DEADLINE: u8 = 3;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = telemetry::init(&cli.log) {
        eprintln!("tidepool: {e}");
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
            Command::Web(args) => run_web(args).await,
            Command::Worker(args) => run_worker(args).await,
            Command::Enqueue(args) => run_enqueue(args).await.map(|()| ExitCode::SUCCESS),
            Command::Migrate(args) => run_migrate(args).await.map(|()| ExitCode::SUCCESS),
            Command::PoolerConfig(args) => run_pooler_config(args).map(|()| ExitCode::SUCCESS),
        }
    });
    match outcome {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = %tidepool::error_chain(e.as_ref()), "tidepool failed");
            ExitCode::FAILURE
        }
    }
}

async fn run_web(args: WebArgs) -> Result<ExitCode, BoxError> {
    raise_open_files_limit();
    let (app, settings) = web::app_from_args(&args)?;
    let app = Arc::new(app);
    let listener = tidepool::bind(args.listen).await?;
    tracing::info!(
        listen = %args.listen,
        db_pool_size = args.database.db_pool_size.unwrap_or(web::DEFAULT_DB_POOL_SIZE),
        max_in_flight = args.max_in_flight,
        "tidepool web is listening; opening its database connections"
    );
    tokio::spawn(web::warm_up(app.clone(), args.database.db_connect_timeout));
    match web::serve(listener, app, settings, shutdown::first_signal()).await {
        web::Shutdown::Clean => Ok(ExitCode::SUCCESS),
        web::Shutdown::DeadlineExceeded => Ok(ExitCode::from(EXIT_SHUTDOWN_DEADLINE)),
    }
}

async fn run_worker(args: WorkerArgs) -> Result<ExitCode, BoxError> {
    let report = worker::run(&args, Registry::with_builtins(), shutdown::first_signal()).await?;
    Ok(if report.handed_back == 0 { ExitCode::SUCCESS } else { ExitCode::from(EXIT_SHUTDOWN_DEADLINE) })
}

async fn run_enqueue(args: EnqueueArgs) -> Result<(), BoxError> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let summary = enqueue::run(&args, &Registry::with_builtins(), &mut out).await?;
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

async fn run_migrate(args: MigrateArgs) -> Result<(), BoxError> {
    let db_args = args.database;
    let (url, what) = match (&db_args.direct_database_url, &db_args.database_url) {
        (Some(direct), _) => (direct, "TIDEPOOL_DIRECT_DATABASE_URL"),
        (None, Some(pooled)) => (pooled, "DATABASE_URL"),
        (None, None) => {
            return Err("set TIDEPOOL_DIRECT_DATABASE_URL or DATABASE_URL (or --database-url)".into())
        }
    };
    let pg = db_args.password_file.apply(url.to_pg_config(what)?)?;
    let mut client = db::connect(pg, db_args.db_connect_timeout).await?;
    let report = migrate::run(&mut client, migrate::MIGRATIONS, db_args.lock_timeout).await?;
    tracing::info!(
        applied = ?report.applied,
        already_applied = ?report.already_applied,
        "migrations complete"
    );
    if !report.unknown.is_empty() {
        tracing::warn!(versions = ?report.unknown, "the database has migrations this release does not know (a newer release ran)");
    }
    Ok(())
}

fn run_pooler_config(args: PoolerConfigArgs) -> Result<(), BoxError> {
    let upstream = match (&args.upstream_url, &args.upstream_from_dir) {
        (Some(url), _) => {
            pooler::Upstream::from_pg_config(&url.to_pg_config("TIDEPOOL_POOLER_UPSTREAM_URL")?)?
        }
        (None, Some(dir)) => pooler::Upstream::from_dir(dir)?,
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
        stats_user: args.stats_user.map(pooler::StatsUser::generate),
        settings,
        pidfile: args.pidfile,
        logfile: args.logfile,
    };
    let (ini, _auth) = pooler::write(&config, &args.out_dir)?;
    println!("{}", ini.display());
    Ok(())
}

/// Raises the soft limit of open files to the hard limit: each client
/// connection is a file descriptor, and the usual soft limit of 1024 is far
/// below what one process can serve.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
        }
    };
    if raised {
        tracing::debug!(open_files = limit.rlim_cur, "raised the open files limit");
    } else {
        tracing::warn!(error = %std::io::Error::last_os_error(), "could not raise the open files limit");
    }
}
