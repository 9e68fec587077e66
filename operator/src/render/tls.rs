//! `database.tls` in the pods: the one TLS setting of every connection to
//! PostgreSQL, rendered for each client that makes one.
//!
//! - the CA Secret is mounted with its key `ca.crt` only (CloudNativePG's
//!   `<cluster>-ca` also holds the CA's private key, which no pod needs),
//!   the client certificate Secret with `tls.crt` and `tls.key`;
//! - PgBouncer (the sidecar): `pooler-config --server-tls-*`, which writes
//!   `server_tls_sslmode`, `server_tls_ca_file` and the client certificate
//!   into `pgbouncer.ini` with libpq's meanings;
//! - Tidepool's direct connections (the worker's LISTEN session, `tidepool
//!   migrate`): libpq's `sslmode`, `sslrootcert`, `sslcert` and `sslkey` in
//!   the URL, which the runtime reads ([`tidepool::tls`]);
//! - an application's migration (libpq: psycopg2, Rails, node-postgres):
//!   `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`.

use k8s_openapi::api::core::v1::{EnvVar, KeyToPath, SecretVolumeSource, Volume, VolumeMount};
use tidepool_contract::env as pod;

use super::deployment::{env, mount};
use crate::crd::DatabaseTls;

const CA_VOLUME: &str = "database-ca";
const CA_DIR: &str = "/etc/tidepool/database-ca";
/// The key of the CA Secret that is mounted, and the file it becomes.
pub const CA_KEY: &str = "ca.crt";
const CLIENT_VOLUME: &str = "database-client-cert";
const CLIENT_DIR: &str = "/etc/tidepool/database-client";
/// The keys of a `kubernetes.io/tls` Secret.
pub const CLIENT_CERT_KEY: &str = "tls.crt";
pub const CLIENT_KEY_KEY: &str = "tls.key";

fn ca_file() -> String {
    format!("{CA_DIR}/{CA_KEY}")
}

fn client_files() -> (String, String) {
    (format!("{CLIENT_DIR}/{CLIENT_CERT_KEY}"), format!("{CLIENT_DIR}/{CLIENT_KEY_KEY}"))
}

/// The volumes of the Secrets `tls` names (none when it names none).
pub fn volumes(tls: &DatabaseTls) -> Vec<Volume> {
    let secret = |volume: &str, name: &str, keys: &[&str]| Volume {
        name: volume.to_owned(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(name.to_owned()),
            items: Some(
                keys.iter()
                    .map(|key| KeyToPath { key: (*key).to_owned(), path: (*key).to_owned(), mode: None })
                    .collect(),
            ),
            // Readable by the pod's group only; files owned by root with
            // group read are what libpq accepts for a key.
            default_mode: Some(0o440),
            optional: Some(false),
        }),
        ..Volume::default()
    };
    let mut volumes = Vec::new();
    if let Some(ca) = &tls.ca_secret_ref {
        volumes.push(secret(CA_VOLUME, &ca.name, &[CA_KEY]));
    }
    if let Some(client) = &tls.client_certificate_secret_ref {
        volumes.push(secret(CLIENT_VOLUME, &client.name, &[CLIENT_CERT_KEY, CLIENT_KEY_KEY]));
    }
    volumes
}

/// The mounts of those volumes, for a container that connects to
/// PostgreSQL.
pub fn mounts(tls: &DatabaseTls) -> Vec<VolumeMount> {
    let mut mounts = Vec::new();
    if tls.ca_secret_ref.is_some() {
        mounts.push(mount(CA_VOLUME, CA_DIR));
    }
    if tls.client_certificate_secret_ref.is_some() {
        mounts.push(mount(CLIENT_VOLUME, CLIENT_DIR));
    }
    mounts
}

/// `pooler-config`'s flags for PgBouncer's TLS to PostgreSQL.
pub fn pooler_args(tls: &DatabaseTls) -> Vec<String> {
    let mut args = vec![format!("--server-tls-sslmode={}", tls.mode.ssl_mode().name())];
    if tls.ca_secret_ref.is_some() {
        args.push(format!("--server-tls-ca-file={}", ca_file()));
    }
    if tls.client_certificate_secret_ref.is_some() {
        let (cert, key) = client_files();
        args.push(format!("--server-tls-cert-file={cert}"));
        args.push(format!("--server-tls-key-file={key}"));
    }
    args
}

/// libpq's URL parameters (`?sslmode=…&sslrootcert=…`), for a direct
/// connection's URL. The paths are the operator's own, with no character a
/// URL must escape. The default setting (`prefer`, libpq's and the
/// runtime's default too) adds none, so the migration Job of a spec without
/// `database.tls` keeps its template (a Job's cannot change).
pub fn url_query(tls: &DatabaseTls) -> String {
    if *tls == DatabaseTls::default() {
        return String::new();
    }
    let mut query = format!("?sslmode={}", tls.mode.ssl_mode().name());
    if tls.ca_secret_ref.is_some() {
        query.push_str(&format!("&sslrootcert={}", ca_file()));
    }
    if tls.client_certificate_secret_ref.is_some() {
        let (cert, key) = client_files();
        query.push_str(&format!("&sslcert={cert}&sslkey={key}"));
    }
    query
}

/// libpq's variables for a direct connection of an application's process.
pub fn libpq_env(tls: &DatabaseTls) -> Vec<EnvVar> {
    let mut environment = vec![env(pod::plan::SSLMODE, tls.mode.ssl_mode().name())];
    if tls.ca_secret_ref.is_some() {
        environment.push(env(pod::direct::SSLROOTCERT, ca_file()));
    }
    if tls.client_certificate_secret_ref.is_some() {
        let (cert, key) = client_files();
        environment.push(env(pod::direct::SSLCERT, cert));
        environment.push(env(pod::direct::SSLKEY, key));
    }
    environment
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{DatabaseTlsMode, SecretRef};
    use tidepool::tls::TlsSettings;

    fn every_setting() -> Vec<DatabaseTls> {
        let modes = [
            DatabaseTlsMode::Disable,
            DatabaseTlsMode::Prefer,
            DatabaseTlsMode::Require,
            DatabaseTlsMode::VerifyCa,
            DatabaseTlsMode::VerifyFull,
        ];
        let mut all = Vec::new();
        for mode in modes {
            for ca in [None, Some(SecretRef { name: "db-ca".into() })] {
                for client in [None, Some(SecretRef { name: "db-client".into() })] {
                    all.push(DatabaseTls {
                        mode,
                        ca_secret_ref: ca.clone(),
                        client_certificate_secret_ref: client,
                    });
                }
            }
        }
        all
    }

    /// The URL the runtime reads back gives the mode and files the pooler
    /// and libpq get, and every file named is mounted.
    #[test]
    fn every_client_gets_the_same_setting() {
        for tls in every_setting() {
            let (rest, read) =
                TlsSettings::split_url(&format!("postgres://u@db:5432/app{}", url_query(&tls)))
                    .expect("parses");
            assert_eq!(rest, "postgres://u@db:5432/app", "{tls:?}");
            assert_eq!(read.mode, tls.mode.ssl_mode(), "{tls:?}");
            let args = pooler_args(&tls);
            let flag = |name: &str| {
                args.iter().find_map(|a| a.strip_prefix(&format!("--{name}="))).map(std::path::PathBuf::from)
            };
            assert_eq!(flag("server-tls-ca-file"), read.root_cert, "{tls:?}");
            assert_eq!(flag("server-tls-cert-file"), read.cert, "{tls:?}");
            assert_eq!(flag("server-tls-key-file"), read.key, "{tls:?}");
            let environment = libpq_env(&tls);
            let value =
                |name: &str| environment.iter().find(|e| e.name == name).and_then(|e| e.value.clone());
            let var = |name: &str| value(name).map(std::path::PathBuf::from);
            assert_eq!(value("PGSSLMODE").as_deref(), Some(read.mode.name()), "{tls:?}");
            assert_eq!(var("PGSSLROOTCERT"), read.root_cert, "{tls:?}");
            assert_eq!((var("PGSSLCERT"), var("PGSSLKEY")), (read.cert.clone(), read.key.clone()), "{tls:?}");
            let mounted: Vec<String> = mounts(&tls).into_iter().map(|m| m.mount_path).collect();
            for file in [&read.root_cert, &read.cert, &read.key].into_iter().flatten() {
                let dir = file.parent().map(|d| d.display().to_string()).unwrap_or_default();
                assert!(mounted.contains(&dir), "{} is not mounted: {mounted:?}", file.display());
            }
            assert_eq!(mounts(&tls).len(), volumes(&tls).len());
        }
    }

    /// Only the CA's certificate leaves its Secret, never a key beside it.
    #[test]
    fn only_the_ca_certificate_is_mounted_from_the_ca_secret() {
        let tls = DatabaseTls {
            mode: DatabaseTlsMode::VerifyFull,
            ca_secret_ref: Some(SecretRef { name: "pg-ca".into() }),
            client_certificate_secret_ref: None,
        };
        let volumes = volumes(&tls);
        let items = volumes[0].secret.as_ref().and_then(|s| s.items.clone()).unwrap_or_default();
        assert_eq!(items.iter().map(|i| i.key.as_str()).collect::<Vec<_>>(), [CA_KEY]);
    }
}
