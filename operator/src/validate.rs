//! A `Tidepool` object, checked, turned into the planner's plain input and
//! the identity its children are owned by. Pure: the same checks run in the
//! controller and in the offline `plan` and `render` commands.
//!
//! The CRD's own CEL rules are evaluated here too ([`Tidepool::validate_cel`]),
//! so a file refused by the API server is refused offline with the same
//! messages.

use crate::crd::{ProcessSpec, Tidepool, TidepoolSpec};
use crate::plan::{Input, Process, TierInput};

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
    /// The fingerprint of the Secrets' values the pods read
    /// ([`crate::credentials`]): set by the controller from the Secrets it
    /// read, `None` where none were read (`tidepool-operator render`).
    pub credentials: Option<String>,
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
    let surge = count(spec.rollout.max_surge);
    let tier = |replicas: i32,
                autoscaling: Option<(i32, i32)>,
                process: Process,
                how: &ProcessSpec,
                clients: i32| {
        let (min, max) = autoscaling.unwrap_or((replicas, replicas));
        TierInput {
            replicas: count(replicas),
            min_replicas: count(min),
            max_replicas: count(max),
            surge,
            process,
            // An application's process opens a client connection per
            // request or job it runs at once; Tidepool's own, its pools.
            client_connections: how.run.is_foreign().then(|| count(clients)),
            query_wait_timeout_seconds: count(how.query_wait_timeout_seconds),
        }
    };
    let worker = if spec.worker.process.run.is_foreign() {
        Process::ForeignWorker { concurrency: count(spec.worker.concurrency) }
    } else {
        Process::Worker { concurrency: count(spec.worker.concurrency), listen: spec.worker.listen }
    };
    let mut tiers = vec![
        tier(
            spec.web.replicas,
            spec.web.autoscaling.as_ref().map(|a| (a.min_replicas, a.max_replicas)),
            Process::Web { database_pool: count(spec.web.database_pool) },
            &spec.web.process,
            spec.web.concurrency,
        ),
        tier(
            spec.worker.replicas,
            spec.worker.autoscaling.as_ref().map(|a| (a.min_replicas, a.max_replicas)),
            worker,
            &spec.worker.process,
            spec.worker.concurrency,
        ),
    ];
    let clock = &spec.clock;
    if clock.runs() {
        // One pod, and never a second beside it: no surge.
        let pool = count(clock.database_pool);
        tiers.push(TierInput {
            surge: 0,
            ..tier(1, None, Process::Clock { database_pool: pool }, &clock.process, clock.database_pool)
        });
    }
    let input = Input {
        max_connections: count(spec.database.max_connections),
        reserved_connections: count(spec.database.reserved_connections),
        tiers,
    };
    Ok(Validated { owner: Owner { name, namespace, uid }, spec, input, credentials: None })
}
