//! Leader election: with several replicas, only the one that holds the
//! Lease runs the controller (and so writes); the others wait, serving
//! `/healthz` and `/metrics` (`tidepool_operator_leader` 0), and take over
//! within the Lease's duration when the leader goes.
//!
//! A replica that loses the Lease after having held it stops its
//! controller and returns, so the process exits and restarts as a follower:
//! it never writes on a stale belief that it leads.

use std::future::Future;
use std::sync::Arc;

use kube::Client;
use kube_lease_manager::{LeaseCreateMode, LeaseManagerBuilder};

use crate::controller;
use crate::http::Endpoints;

/// Which Lease, and who this replica is.
#[derive(Debug, Clone)]
pub struct Lease {
    pub name: String,
    pub namespace: String,
    /// Unique among the replicas: the pod's name in a cluster.
    pub identity: String,
    /// How long a Lease holds without renewal, in seconds.
    pub duration_seconds: u64,
    /// How long before the end of the Lease it is renewed, in seconds.
    pub grace_seconds: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("the Lease {name} in {namespace} cannot be used: {source}")]
    Lease {
        name: String,
        namespace: String,
        #[source]
        source: kube_lease_manager::LeaseManagerError,
    },
    #[error("lost the Lease after leading; exiting so that another replica leads")]
    Lost,
    #[error("the Lease's renewal task ended before this replica led")]
    Ended,
}

/// Waits for the Lease, runs the controller while holding it, and returns
/// at `shutdown` (releasing the Lease) or when the Lease is lost.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    endpoints: Arc<Endpoints>,
    lease: Lease,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), LeaderError> {
    let lease_error =
        |source| LeaderError::Lease { name: lease.name.clone(), namespace: lease.namespace.clone(), source };
    let manager = LeaseManagerBuilder::new(client.clone(), &lease.name)
        .with_namespace(&lease.namespace)
        .with_identity(&lease.identity)
        .with_duration(lease.duration_seconds)
        .with_grace(lease.grace_seconds)
        .with_create_mode(LeaseCreateMode::AutoCreate)
        .build()
        .await
        .map_err(lease_error)?;
    let (mut leading, lease_task) = manager.watch().await;
    endpoints.metrics.leader.set(0);
    // A waiting follower is doing what it should: ready.
    endpoints.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(lease = %lease.name, identity = %lease.identity, "waiting to lead");
    let mut shutdown = Box::pin(shutdown);
    while !*leading.borrow_and_update() {
        tokio::select! {
            () = &mut shutdown => {
                drop(leading);
                let _ = lease_task.await;
                return Ok(());
            }
            changed = leading.changed() => if changed.is_err() {
                return Err(LeaderError::Ended);
            },
        }
    }
    tracing::info!(lease = %lease.name, identity = %lease.identity, "leading: starting the controller");
    endpoints.metrics.leader.set(1);
    // Ready again once the controller's first list has arrived.
    endpoints.ready.store(false, std::sync::atomic::Ordering::Relaxed);
    let (why_tx, why_rx) = tokio::sync::oneshot::channel::<bool>();
    let still_leading = leading.clone();
    let stop = async move {
        let lost = tokio::select! {
            () = shutdown => false,
            () = lease_lost(still_leading) => true,
        };
        let _ = why_tx.send(lost);
    };
    controller::run(client, namespace, endpoints.clone(), stop).await;
    endpoints.metrics.leader.set(0);
    let lost = why_rx.await.unwrap_or(false);
    // Dropping the last receiver makes the Lease's task release it.
    drop(leading);
    let _ = lease_task.await;
    if lost {
        Err(LeaderError::Lost)
    } else {
        Ok(())
    }
}

/// Resolves once this replica no longer holds the Lease.
async fn lease_lost(mut leading: tokio::sync::watch::Receiver<bool>) {
    while leading.changed().await.is_ok() {
        if !*leading.borrow_and_update() {
            return;
        }
    }
}
