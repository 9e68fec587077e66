//! What can make a reconcile fail: one variant per step, each with the
//! object it was working on, so the log line and the `kind` label of
//! `tidepool_operator_reconcile_errors_total` say where it stopped.
//!
//! A spec that cannot be applied (a missing Secret, an invalid spec, a
//! budget that cannot fit) is not an error: it is a [`Blocked`] pass that
//! status reports. These are the failures worth a retry.
//!
//! [`Blocked`]: crate::status::Blocked

use crate::metrics::ErrorKind;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the Tidepool has no namespace")]
    NoNamespace,
    #[error("could not read the database Secret {secret}: {source}")]
    ReadSecret { secret: String, source: kube::Error },
    #[error("could not read the Tidepool's {what} objects: {source}")]
    ReadChildren { what: &'static str, source: kube::Error },
    #[error("could not apply {kind} {name}: {source}")]
    ApplyChild { kind: &'static str, name: String, source: kube::Error },
    #[error("could not delete {kind} {name}, which the spec no longer has: {source}")]
    DeleteOrphan { kind: &'static str, name: String, source: kube::Error },
    #[error("could not admit pod {pod}: {source}")]
    AdmitPod { pod: String, source: kube::Error },
    #[error("could not write the status: {source}")]
    WriteStatus { source: kube::Error },
}

impl Error {
    /// The `kind` label of `tidepool_operator_reconcile_errors_total`.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NoNamespace => ErrorKind::NoNamespace,
            Error::ReadSecret { .. } => ErrorKind::ReadSecret,
            Error::ReadChildren { .. } => ErrorKind::ReadChildren,
            Error::ApplyChild { .. } => ErrorKind::ApplyChild,
            Error::DeleteOrphan { .. } => ErrorKind::DeleteOrphan,
            Error::AdmitPod { .. } => ErrorKind::AdmitPod,
            Error::WriteStatus { .. } => ErrorKind::WriteStatus,
        }
    }

    fn api_error(&self) -> Option<&kube::Error> {
        match self {
            Error::NoNamespace => None,
            Error::ReadSecret { source, .. }
            | Error::ReadChildren { source, .. }
            | Error::ApplyChild { source, .. }
            | Error::DeleteOrphan { source, .. }
            | Error::AdmitPod { source, .. }
            | Error::WriteStatus { source } => Some(source),
        }
    }

    /// A write refused because the namespace is being deleted: nothing more
    /// is applied there, and it is no failure.
    pub fn namespace_terminating(&self) -> bool {
        let Some(kube::Error::Api(status)) = self.api_error() else {
            return false;
        };
        status.is_forbidden()
            && status
                .details
                .as_ref()
                .is_some_and(|d| d.causes.iter().any(|c| c.reason == "NamespaceTerminating"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An API answer as the API server sends it.
    fn refused(reason: &str, cause: &str) -> kube::Error {
        let status = serde_json::json!({
            "status": "Failure", "message": "refused", "reason": reason, "code": 403,
            "details": {"causes": [{"reason": cause}]},
        });
        kube::Error::Api(Box::new(serde_json::from_value(status).unwrap_or_else(|e| panic!("a Status: {e}"))))
    }

    #[test]
    fn every_variant_has_its_own_kind() {
        let api = || refused("Forbidden", "x");
        let errors = [
            Error::NoNamespace,
            Error::ReadSecret { secret: "db".into(), source: api() },
            Error::ReadChildren { what: "pods", source: api() },
            Error::ApplyChild { kind: "Deployment", name: "shop-web".into(), source: api() },
            Error::DeleteOrphan { kind: "Service", name: "shop".into(), source: api() },
            Error::AdmitPod { pod: "shop-web-1".into(), source: api() },
            Error::WriteStatus { source: api() },
        ];
        let kinds: Vec<ErrorKind> = errors.iter().map(Error::kind).collect();
        assert_eq!(kinds, ErrorKind::ALL);
    }

    #[test]
    fn a_write_into_a_terminating_namespace_is_no_failure() {
        let terminating = Error::ApplyChild {
            kind: "Deployment",
            name: "shop-web".into(),
            source: refused("Forbidden", "NamespaceTerminating"),
        };
        assert!(terminating.namespace_terminating());
        let forbidden =
            Error::AdmitPod { pod: "p".into(), source: refused("Forbidden", "FieldValueForbidden") };
        assert!(!forbidden.namespace_terminating());
        assert!(!Error::NoNamespace.namespace_terminating());
    }

    #[test]
    fn the_message_names_the_object() {
        let error = Error::ApplyChild {
            kind: "Deployment",
            name: "shop-web".into(),
            source: refused("Forbidden", "x"),
        };
        assert!(error.to_string().starts_with("could not apply Deployment shop-web: "), "{error}");
    }
}
