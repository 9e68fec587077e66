//! Which credentials a Tidepool's pods run with, as a fingerprint.
//!
//! A pod's PgBouncer reads the database Secret, the CA and the client
//! certificate once, when its sidecar starts: a Secret volume's files are
//! refreshed by the kubelet only at its next sync of the pod (a minute or
//! more later, never for a subPath), and PgBouncer would not notice them
//! anyway. So a rotated password (or CA, or client certificate) reaches the
//! pods by a roll: the fingerprint of every value they read is the pod
//! template's annotation [`ANNOTATION`], a new value is a new template, and
//! the Deployments roll through the paced rollout, each new pod Ready (its
//! PgBouncer logged in with the new password) before an old one goes.
//!
//! The annotation is readable by whoever may read a Deployment, which in
//! Kubernetes' `view` role does not include Secrets: so it is no plain hash
//! of the password but PBKDF2-HMAC-SHA-256 over every value, salted with the
//! Tidepool's uid, [`ROUNDS`] rounds: a guess costs as much to test as
//! against PostgreSQL's own SCRAM verifier, and one Tidepool's fingerprint
//! says nothing about another's. Pure: the controller reads the Secrets
//! and hands their values here.

use sha2::Sha256;

/// The pod template annotation with the fingerprint.
pub const ANNOTATION: &str = "tidepool.dev/credentials";
/// PBKDF2's rounds: SCRAM-SHA-256's, as PostgreSQL stores a password.
pub const ROUNDS: u32 = 4096;

/// One value the pods read: where it comes from (`<secret>/<key>`) and
/// its bytes.
pub struct Part<'a> {
    pub origin: String,
    pub value: &'a [u8],
}

/// The fingerprint of `parts` for the Tidepool of uid `uid`: 16 bytes of
/// PBKDF2, in hex. Any value, or where it comes from, changing changes it.
pub fn fingerprint<'a>(uid: &str, parts: impl IntoIterator<Item = Part<'a>>) -> String {
    // Each field length-prefixed, so no two lists of parts read alike.
    let mut input = Vec::new();
    for part in parts {
        for field in [part.origin.as_bytes(), part.value] {
            input.extend_from_slice(&(field.len() as u64).to_be_bytes());
            input.extend_from_slice(field);
        }
    }
    let salt = format!("{ANNOTATION}:{uid}");
    let mut key = [0u8; 16];
    pbkdf2::pbkdf2_hmac::<Sha256>(&input, salt.as_bytes(), ROUNDS, &mut key);
    key.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(uid: &str, parts: &[(&str, &str)]) -> String {
        fingerprint(
            uid,
            parts.iter().map(|(origin, value)| Part { origin: (*origin).into(), value: value.as_bytes() }),
        )
    }

    const SECRET: [(&str, &str); 2] = [("db/username", "shop"), ("db/password", "hunter2")];

    #[test]
    fn the_same_values_give_the_same_fingerprint() {
        assert_eq!(of("u1", &SECRET), of("u1", &SECRET));
        assert_eq!(of("u1", &SECRET).len(), 32);
    }

    #[test]
    fn any_value_its_origin_or_the_tidepool_changes_it() {
        let base = of("u1", &SECRET);
        let others = [
            of("u1", &[("db/username", "shop"), ("db/password", "hunter3")]),
            of("u1", &[("db/username", "shop"), ("other/password", "hunter2")]),
            of("u2", &SECRET),
            of("u1", &SECRET[..1]),
            // The boundary between fields is part of the input.
            of("u1", &[("db/username", "shopdb/password"), ("", "hunter2")]),
        ];
        for other in others {
            assert_ne!(other, base);
        }
    }

    #[test]
    fn the_password_does_not_show() {
        let print = of("u1", &SECRET);
        assert!(!print.contains("hunter2"));
        assert!(print.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
