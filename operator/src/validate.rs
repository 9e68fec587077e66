//! A `Tidepool` object, checked, turned into the planner's plain input and
//! the identity its children are owned by. Pure: the same checks run in the
//! controller and in the offline `plan` and `render` commands.
//!
//! The CRD's own CEL rules are evaluated here too ([`Tidepool::validate_cel`]),
//! so a file refused by the API server is refused offline with the same
//! messages.

use crate::crd::{Tidepool, TidepoolSpec};
use crate::plan::{Input, WebInput, WorkerInput};

/// Who owns the children: captured once, so rendering is stable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub name: String,
    pub namespace: String,
    /// Empty offline (no API server assigned one): the children then carry
    /// no owner reference.
    pub uid: String,
}

/// A Tidepool that passed every check of its own.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    pub owner: Owner,
    pub spec: TidepoolSpec,
    pub input: Input,
}

#[derive(Debug, thiserror::Error)]
pub enum InvalidTidepool {
    #[error("the Tidepool has no {0}")]
    Missing(&'static str),
    #[error("the Tidepool is invalid: {}", .0.join("; "))]
    Rules(Vec<String>),
}

/// Checks `tidepool` and builds the planner's input. `default_namespace`
/// stands in for a missing namespace (a file applied with `kubectl -n`).
pub fn validate(tidepool: &Tidepool, default_namespace: &str) -> Result<Validated, InvalidTidepool> {
    let name = tidepool.metadata.name.clone().ok_or(InvalidTidepool::Missing("metadata.name"))?;
    let namespace = tidepool.metadata.namespace.clone().unwrap_or_else(|| default_namespace.to_owned());
    let uid = tidepool.metadata.uid.clone().unwrap_or_default();
    if let Err(errors) = tidepool.validate_cel() {
        return Err(InvalidTidepool::Rules(errors.iter().map(|e| e.to_string()).collect()));
    }
    let spec = tidepool.spec.clone();
    let count = |n: i32| u32::try_from(n).unwrap_or(0);
    let (web_min, web_max) = spec
        .web
        .autoscaling
        .as_ref()
        .map_or((spec.web.replicas, spec.web.replicas), |a| (a.min_replicas, a.max_replicas));
    let (worker_min, worker_max) = spec
        .worker
        .autoscaling
        .as_ref()
        .map_or((spec.worker.replicas, spec.worker.replicas), |a| (a.min_replicas, a.max_replicas));
    let input = Input {
        max_connections: count(spec.database.max_connections),
        reserved_connections: count(spec.database.reserved_connections),
        surge: count(spec.rollout.max_surge),
        web: WebInput {
            replicas: count(spec.web.replicas),
            min_replicas: count(web_min),
            max_replicas: count(web_max),
            database_pool: count(spec.web.database_pool),
        },
        worker: WorkerInput {
            replicas: count(spec.worker.replicas),
            min_replicas: count(worker_min),
            max_replicas: count(worker_max),
            concurrency: count(spec.worker.concurrency),
            listen: spec.worker.listen,
        },
    };
    Ok(Validated { owner: Owner { name, namespace, uid }, spec, input })
}
