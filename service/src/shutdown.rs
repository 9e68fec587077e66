//! Termination signals. The first SIGTERM or SIGINT starts a graceful
//! shutdown; a second one ends the process at once, for an operator who
//! does not want to wait.

use tokio::signal::unix::{signal, SignalKind};

/// Exit code when a second signal cut a graceful shutdown short.
pub const EXIT_FORCED: i32 = 130;

/// Resolves at the first SIGTERM or SIGINT, then arms the second-signal
/// escape hatch. If the handlers cannot be installed, it never resolves and
/// logs why: the process then stops only by SIGKILL, as before.
pub async fn first_signal() {
    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot install signal handlers; graceful shutdown is disabled");
            return std::future::pending().await;
        }
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutdown requested; a second signal exits at once");
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::warn!("second signal: exiting without waiting for work in flight");
        std::process::exit(EXIT_FORCED);
    });
}
