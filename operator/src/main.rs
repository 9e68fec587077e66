//! `tidepool-operator`: the command line.
//!
//! - `run` runs the controller (in a pod, or against the current kubeconfig);
//! - `crd` prints the CustomResourceDefinition (`manifests/crd.yaml` is this);
//! - `plan -f FILE` prints the connection budget of the Tidepools in a file
//!   and exits 1 with the refusal when one cannot fit;
//! - `render -f FILE` prints every child object, offline, for review and
//!   GitOps.
//!
//! Exit codes: 0 success, 1 a refused or invalid Tidepool or an unreadable
//! file, 2 a bad command line.

use std::path::PathBuf;
use std::process::ExitCode;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use tidepool_operator::cli::{self, Format};
use tidepool_operator::http::Endpoints;
use tidepool_operator::leader::Lease;

#[derive(Debug, Parser)]
#[command(
    name = "tidepool-operator",
    version,
    about = "Runs Tidepool on Kubernetes within a database's connection budget"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller until SIGTERM or SIGINT.
    Run {
        /// Watch only this namespace (the operator then needs rights there
        /// only); all namespaces when unset.
        #[arg(long, env = "TIDEPOOL_OPERATOR_NAMESPACE")]
        namespace: Option<String>,
        /// Log filter in tracing's EnvFilter syntax.
        #[arg(long, env = "TIDEPOOL_OPERATOR_LOG", default_value = "info")]
        log: String,
        /// Where /metrics, /healthz and /readyz are served.
        #[arg(long, env = "TIDEPOOL_OPERATOR_LISTEN", default_value = "0.0.0.0:8080")]
        listen: std::net::SocketAddr,
        #[command(flatten)]
        election: Election,
    },
    /// Print the Tidepool CustomResourceDefinition as YAML.
    Crd,
    /// Print the connection budget of every Tidepool in a file.
    Plan {
        /// A YAML file with one or more Tidepools (other kinds, such as a
        /// Secret, are skipped); `-` reads standard input.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// The namespace of Tidepools that name none.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// `table` for people; `env` prints the local stack's settings as
        /// shell assignments (one process per tier, one PgBouncer for both).
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Print every child object of every Tidepool in a file, as YAML.
    Render {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
}

/// Leader election: only the replica holding the Lease writes.
#[derive(Debug, clap::Args)]
struct Election {
    /// Run the controller without a Lease (a single replica only).
    #[arg(long)]
    no_leader_election: bool,
    /// The Lease's name.
    #[arg(long, env = "TIDEPOOL_OPERATOR_LEASE", default_value = "tidepool-operator")]
    lease_name: String,
    /// The Lease's namespace: the operator's own (POD_NAMESPACE in a pod);
    /// else --namespace, else `default`.
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// This replica's name in the Lease (POD_NAME in a pod); else
    /// `<host>-<pid>`.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds a Lease holds without renewal; a new leader takes over
    /// within this long of the old one's end.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=300))]
    lease_duration: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Env,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { namespace, log, listen, election } => return run(namespace, &log, listen, election),
        Command::Crd => cli::crd_yaml(),
        Command::Plan { file, namespace, output } => {
            let format = match output {
                Output::Table => Format::Table,
                Output::Env => Format::LocalEnv,
            };
            cli::read(&file).and_then(|text| cli::plan(&text, &namespace, format))
        }
        Command::Render { file, namespace } => {
            cli::read(&file).and_then(|text| cli::render(&text, &namespace))
        }
    };
    match result {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tidepool-operator: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(namespace: Option<String>, log: &str, listen: std::net::SocketAddr, election: Election) -> ExitCode {
    let filter = match tracing_subscriber::EnvFilter::try_new(log) {
        Ok(filter) => filter,
        Err(e) => {
            eprintln!("tidepool-operator: --log {log:?} is not a valid filter: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt().json().with_env_filter(filter).init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let client = match tidepool_operator::controller::client().await {
            Ok(client) => client,
            Err(e) => {
                tracing::error!(error = %e, "cannot reach the Kubernetes API (no in-cluster config or kubeconfig)");
                return ExitCode::FAILURE;
            }
        };
        let metrics = match tidepool_operator::metrics::Metrics::new() {
            Ok(metrics) => metrics,
            Err(e) => {
                tracing::error!(error = %e, "cannot set up metrics");
                return ExitCode::FAILURE;
            }
        };
        let listener = match tidepool_operator::http::bind(listen).await {
            Ok(listener) => listener,
            Err(e) => {
                tracing::error!(error = %e, "cannot serve /metrics");
                return ExitCode::FAILURE;
            }
        };
        let endpoints = Arc::new(Endpoints { metrics, ready: AtomicBool::new(false) });
        let server = tokio::spawn(tidepool_operator::http::serve(listener, endpoints.clone()));
        tracing::info!(namespace = namespace.as_deref().unwrap_or("(all)"), %listen, "tidepool-operator is running");
        let outcome = if election.no_leader_election {
            endpoints.metrics.leader.set(1);
            tidepool_operator::controller::run(client, namespace, endpoints, shutdown_signal()).await;
            Ok(())
        } else {
            let lease = Lease {
                namespace: election.lease_namespace.or_else(|| namespace.clone()).unwrap_or_else(|| "default".into()),
                name: election.lease_name,
                identity: election.identity.unwrap_or_else(default_identity),
                duration_seconds: election.lease_duration,
                grace_seconds: (election.lease_duration / 3).max(1),
            };
            tidepool_operator::leader::run(client, namespace, endpoints, lease, shutdown_signal()).await
        };
        server.abort();
        if let Err(e) = outcome {
            tracing::error!(error = %e, "tidepool-operator stopped");
            return ExitCode::FAILURE;
        }
        tracing::info!("tidepool-operator stopped");
        ExitCode::SUCCESS
    })
}

/// SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `<host>-<pid>`: unique among replicas outside a pod.
fn default_identity() -> String {
    let host =
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "tidepool-operator".into());
    format!("{}-{}", host.trim(), std::process::id())
}
