//! `tidepool-operator`: runs Tidepool on Kubernetes within a database's
//! connection budget.
//!
//! Data flows one way: a `Tidepool` resource ([`crd`]) is checked and turned
//! into the planner's plain input ([`validate`]), sized by the pure planner
//! ([`plan`], no Kubernetes types), and rendered into the child objects
//! ([`render`], pure as well). The offline commands `plan` and `render` run
//! exactly that code; the controller only adds reading and applying. While a
//! change rolls, the pure [`plan::next_step`] paces the Deployments and
//! [`admission`] lets each new pod start only when the budget has room.
//! The worker tier follows its queues: the pure [`scaler`] decides, the
//! [`autoscaler`] reads PostgreSQL and sets the replicas.

pub mod admission;
pub mod autoscaler;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod credentials;
pub mod http;
pub mod index;
pub mod leader;
pub mod metrics;
pub mod plan;
pub mod render;
pub mod scaler;
pub mod signal;
pub mod status;
pub mod validate;

/// A count as Kubernetes' `int32` fields take it, saturating (no count
/// planned here comes near `i32::MAX`, but none may wrap).
pub fn to_i32(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}
