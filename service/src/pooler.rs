//! PgBouncer's configuration, rendered from an upstream URL and pool sizes.
//!
//! Rendering is pure ([`render_ini`], [`render_auth_file`]); [`write()`] only
//! puts the two files in place. The password goes into the auth file alone
//! (mode 0600); `pgbouncer.ini` holds no secret, so it could live in a
//! ConfigMap. PgBouncer runs in transaction mode: a server connection is lent
//! to a client for one transaction, which is what lets a few server
//! connections serve many clients, and why the application must not rely on
//! session state (see [`crate::db`]).
//!
//! The same renderer serves the local stack (`scripts/stack.sh` calls
//! `tidepool pooler-config`), the tests, and pods, where the sidecar's start-up
//! writes the files from the database Secret into an in-memory volume.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tidepool_contract::secret::{DatabaseSecret, SecretError, KEYS};
use tokio_postgres::config::Host;

use crate::tls::{TlsError, TlsSettings};

/// Settings written here as defaults of Tidepool's own that a
/// [`PoolerConfig::settings`] entry replaces (every other written setting
/// is refused there).
pub const OVERRIDABLE_DEFAULTS: [&str; 2] = ["server_connect_timeout", "server_login_retry"];

/// PgBouncer's settings for TLS to the upstream: [`PoolerConfig::server_tls`]
/// owns them all, so none can be set again.
pub const SERVER_TLS_KEYS: [&str; 4] =
    ["server_tls_sslmode", "server_tls_ca_file", "server_tls_cert_file", "server_tls_key_file"];

/// PgBouncer's configuration file, in the output folder.
pub const INI_FILE: &str = "pgbouncer.ini";
/// Its auth file (0600): the upstream credentials and the stats user's.
pub const AUTH_FILE: &str = "userlist.txt";
/// The stats user's password, for a metrics collector (0600).
pub use tidepool_contract::STATS_PASSWORD_FILE;
/// The client user's password (0600), and the same as a libpq password file.
pub use tidepool_contract::{CLIENT_PASSFILE, CLIENT_PASSWORD_FILE};

/// Where PgBouncer connects to, and as whom.
#[derive(Clone)]
pub struct Upstream {
    /// The server's host.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// The database.
    pub dbname: String,
    /// The role PgBouncer logs in as.
    pub user: String,
    /// Its password (never printed).
    pub password: String,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("dbname", &self.dbname)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// What `pooler-config` writes.
#[derive(Debug, Clone)]
pub struct PoolerConfig {
    /// Where PgBouncer listens.
    pub listen: SocketAddr,
    /// Where it connects.
    pub upstream: Upstream,
    /// Server connections per (database, user) pair: `default_pool_size`.
    pub pool_size: u32,
    /// Server connections kept open while idle: `min_pool_size`.
    pub min_pool_size: u32,
    /// Hard cap of server connections to the database: `max_db_connections`.
    pub max_db_connections: u32,
    /// Client connections accepted: `max_client_conn`.
    pub max_client_conn: u32,
    /// How long a query may wait for a server connection inside PgBouncer.
    pub query_wait_timeout: Duration,
    /// A user that may read `SHOW` statistics on the admin console.
    pub stats_user: Option<LocalUser>,
    /// The user clients log in as, when not the upstream's: its password is
    /// written to [`CLIENT_PASSWORD_FILE`] and [`CLIENT_PASSFILE`], and
    /// every server connection is the upstream user's (PgBouncer's forced
    /// user), so the clients never hold the upstream password.
    pub client_user: Option<LocalUser>,
    /// TLS to the upstream, with libpq's meanings: PgBouncer's
    /// `server_tls_sslmode`, `server_tls_ca_file`, `server_tls_cert_file`
    /// and `server_tls_key_file`, written here only (refused in
    /// [`PoolerConfig::settings`]).
    pub server_tls: TlsSettings,
    /// More settings, each checked by [`Setting::parse`].
    pub settings: Vec<Setting>,
    /// Where PgBouncer writes its pid, if anywhere.
    pub pidfile: Option<PathBuf>,
    /// Where it logs; standard error if unset.
    pub logfile: Option<PathBuf>,
}

/// A PgBouncer user that exists only in this PgBouncer's auth file, with a
/// password generated here: the stats user, and the pod's client user that
/// the app logs in as (PgBouncer logs in upstream as the upstream's user).
#[derive(Clone)]
pub struct LocalUser {
    /// Its name.
    pub name: String,
    password: String,
}

impl std::fmt::Debug for LocalUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalUser").field("name", &self.name).field("password", &"<redacted>").finish()
    }
}

impl LocalUser {
    /// `name` with a fresh random password (128 bits, hex).
    pub fn generate(name: String) -> Self {
        let password: String = (0..16).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
        Self { name, password }
    }
}

/// One more PgBouncer setting, `key = value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// The key.
    pub key: String,
    /// The value.
    pub value: String,
}

impl Setting {
    /// Parses `KEY=VALUE`: a key of lowercase letters and '_', a value of up
    /// to 256 of letters, digits, space and `_ . , : / = -`, so no setting
    /// can carry a second line into the file.
    pub fn parse(text: &str) -> Result<Self, PoolerError> {
        let invalid = || PoolerError::InvalidSetting(text.chars().take(80).collect());
        let (key, value) = text.split_once('=').ok_or_else(invalid)?;
        let key_ok = !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_');
        let value_ok =
            value.len() <= 256 && value.chars().all(|c| c.is_ascii_alphanumeric() || " _.,:/=-".contains(c));
        if key_ok && value_ok {
            Ok(Self { key: key.to_owned(), value: value.to_owned() })
        } else {
            Err(invalid())
        }
    }
}

/// Why no configuration was written.
#[derive(Debug, thiserror::Error)]
pub enum PoolerError {
    /// A `--set` is malformed.
    #[error("setting {0:?} is not KEY=VALUE with a lowercase key and a value of letters, digits, space and _ . , : / = - (at most 256)")]
    InvalidSetting(String),
    /// A `--set` names a setting written here.
    #[error("setting {0} is written by tidepool pooler-config itself and cannot be set again")]
    ReservedSetting(String),
    #[error("cannot read {path}: {source}")]
    /// A file of the upstream folder cannot be read.
    Read {
        /// The file.
        path: PathBuf,
        #[source]
        /// Why.
        source: std::io::Error,
    },
    #[error("the database Secret in {dir} is not usable: {source}")]
    /// The upstream folder is not a complete database Secret.
    Secret {
        /// The folder.
        dir: PathBuf,
        #[source]
        /// What is wrong with it.
        source: SecretError,
    },
    #[error("the upstream URL has no {0}")]
    /// The upstream lacks a part.
    Missing(&'static str),
    #[error("the upstream URL's {field} must be letters, digits, '_', '-' or '.', so PgBouncer's configuration cannot be misread")]
    /// A part of the upstream has characters the ini file could misread.
    Unsafe {
        /// The part.
        field: &'static str,
    },
    #[error("the upstream must be reached over TCP (a Unix socket path is not supported)")]
    /// The upstream is a Unix socket.
    NotTcp,
    #[error("TLS to the upstream: {0}")]
    /// The upstream's TLS settings cannot work.
    Tls(#[from] TlsError),
    #[error("the TLS file {0:?} must be an absolute path of letters, digits, '_', '-', '.' and '/', so PgBouncer's configuration cannot be misread")]
    /// A TLS file's path the ini file could misread.
    UnsafePath(String),
    #[error("{0} must be at least 1")]
    /// A size is zero.
    Zero(&'static str),
    #[error("pool size {pool_size} is above max_db_connections {max_db_connections}: PgBouncer would never open the extra connections")]
    /// The pool is above the database cap.
    PoolAboveCap {
        /// The pool size.
        pool_size: u32,
        /// The cap.
        max_db_connections: u32,
    },
    #[error("min_pool_size {min_pool_size} is above the pool size {pool_size}")]
    /// The idle minimum is above the pool.
    MinAbovePool {
        /// The minimum.
        min_pool_size: u32,
        /// The pool size.
        pool_size: u32,
    },
    #[error("{what} is not valid UTF-8")]
    /// A part is not UTF-8.
    NotUtf8 {
        /// The part.
        what: &'static str,
    },
    #[error("could not write {path}: {source}")]
    /// A file cannot be written.
    Write {
        /// The file.
        path: PathBuf,
        #[source]
        /// Why.
        source: std::io::Error,
    },
}

impl Upstream {
    /// Reads the upstream from a folder of one file per key, as a mounted
    /// database Secret has them ([`tidepool_contract::secret`]: CloudNativePG's
    /// application shape, `username`, `password`, `host`, `port`, `dbname`,
    /// parsed as the operator parses the Secret itself).
    pub fn from_dir(dir: &Path) -> Result<Self, PoolerError> {
        let mut files = Vec::with_capacity(KEYS.len());
        for key in KEYS {
            let path = dir.join(key);
            match fs::read(&path) {
                Ok(bytes) => files.push((key, bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(PoolerError::Read { path, source }),
            }
        }
        let value = |key: &str| files.iter().find(|(k, _)| *k == key).map(|(_, bytes)| bytes.as_slice());
        let secret = DatabaseSecret::parse(value)
            .map_err(|source| PoolerError::Secret { dir: dir.to_owned(), source })?;
        Ok(Self {
            host: secret.host,
            port: secret.port,
            dbname: secret.dbname,
            user: secret.username,
            password: secret.password,
        })
    }

    /// Extracts the upstream from a parsed connection URL.
    pub fn from_pg_config(pg: &tokio_postgres::Config) -> Result<Self, PoolerError> {
        let host = match pg.get_hosts().first() {
            Some(Host::Tcp(host)) => host.clone(),
            Some(_) => return Err(PoolerError::NotTcp),
            None => return Err(PoolerError::Missing("host")),
        };
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        let user = pg.get_user().ok_or(PoolerError::Missing("user"))?.to_owned();
        let dbname = pg.get_dbname().map_or_else(|| user.clone(), str::to_owned);
        let password = match pg.get_password() {
            Some(p) => {
                String::from_utf8(p.to_vec()).map_err(|_| PoolerError::NotUtf8 { what: "password" })?
            }
            None => return Err(PoolerError::Missing("password")),
        };
        Ok(Self { host, port, dbname, user, password })
    }
}

fn check_safe(field: &'static str, value: &str) -> Result<(), PoolerError> {
    let safe = !value.is_empty()
        && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'));
    if safe {
        Ok(())
    } else {
        Err(PoolerError::Unsafe { field })
    }
}

impl PoolerConfig {
    fn validate(&self) -> Result<(), PoolerError> {
        check_safe("host", &self.upstream.host)?;
        check_safe("database name", &self.upstream.dbname)?;
        check_safe("user", &self.upstream.user)?;
        for (name, value) in [
            ("pool size", self.pool_size),
            ("max_db_connections", self.max_db_connections),
            ("max_client_conn", self.max_client_conn),
        ] {
            if value == 0 {
                return Err(PoolerError::Zero(name));
            }
        }
        if let Some(stats) = &self.stats_user {
            check_safe("stats user", &stats.name)?;
        }
        if let Some(client) = &self.client_user {
            check_safe("client user", &client.name)?;
        }
        let written = rendered_settings(self, Path::new(""));
        if let Some(setting) = self.settings.iter().find(|s| {
            let key = s.key.as_str();
            (written.iter().any(|(written, _)| *written == key) && !OVERRIDABLE_DEFAULTS.contains(&key))
                || SERVER_TLS_KEYS.contains(&key)
        }) {
            return Err(PoolerError::ReservedSetting(setting.key.clone()));
        }
        validate_server_tls(&self.server_tls)?;
        if self.pool_size > self.max_db_connections {
            return Err(PoolerError::PoolAboveCap {
                pool_size: self.pool_size,
                max_db_connections: self.max_db_connections,
            });
        }
        if self.min_pool_size > self.pool_size {
            return Err(PoolerError::MinAbovePool {
                min_pool_size: self.min_pool_size,
                pool_size: self.pool_size,
            });
        }
        Ok(())
    }
}

/// The upstream TLS settings PgBouncer can take as libpq means them
/// ([`TlsSettings::check`]), every file a path the ini file cannot misread.
fn validate_server_tls(tls: &TlsSettings) -> Result<(), PoolerError> {
    tls.check()?;
    for path in [&tls.root_cert, &tls.cert, &tls.key].into_iter().flatten() {
        let text = path.to_str().unwrap_or_default();
        let safe = path.is_absolute()
            && text.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'));
        if !safe {
            return Err(PoolerError::UnsafePath(path.display().to_string()));
        }
    }
    Ok(())
}

/// The settings `pgbouncer.ini` gets from `config` itself, in order, with
/// the auth file in `dir`.
fn rendered_settings(config: &PoolerConfig, dir: &Path) -> Vec<(&'static str, String)> {
    let mut settings: Vec<(&'static str, String)> = vec![
        ("listen_addr", config.listen.ip().to_string()),
        ("listen_port", config.listen.port().to_string()),
        // No Unix socket: its default folder is not writable by an unprivileged user.
        ("unix_socket_dir", String::new()),
        ("auth_type", "scram-sha-256".into()),
        ("auth_file", dir.join(AUTH_FILE).display().to_string()),
        ("pool_mode", "transaction".into()),
        ("default_pool_size", config.pool_size.to_string()),
        ("min_pool_size", config.min_pool_size.to_string()),
        ("reserve_pool_size", "0".into()),
        ("max_db_connections", config.max_db_connections.to_string()),
        ("max_client_conn", config.max_client_conn.to_string()),
        ("query_wait_timeout", config.query_wait_timeout.as_secs().max(1).to_string()),
        ("server_connect_timeout", "5".into()),
        // Retry a failed server login after 1 s rather than 15 s, so the pool
        // recovers by itself soon after PostgreSQL comes back.
        ("server_login_retry", "1".into()),
        // Transaction mode: no session state is left to reset.
        ("server_reset_query", String::new()),
        ("ignore_startup_parameters", "extra_float_digits".into()),
        ("log_connections", "0".into()),
        ("log_disconnections", "0".into()),
    ];
    // Always written, so the mode in force is the one in the file. libpq's
    // `require` with roots checks the chain; PgBouncer's never does, so
    // the mode written is the one libpq applies.
    let tls = &config.server_tls;
    settings.push(("server_tls_sslmode", tls.effective_mode().name().into()));
    for (key, path) in [
        ("server_tls_ca_file", &tls.root_cert),
        ("server_tls_cert_file", &tls.cert),
        ("server_tls_key_file", &tls.key),
    ] {
        if let Some(path) = path {
            settings.push((key, path.display().to_string()));
        }
    }
    if let Some(stats) = &config.stats_user {
        settings.push(("stats_users", stats.name.clone()));
    }
    if let Some(pidfile) = &config.pidfile {
        settings.push(("pidfile", pidfile.display().to_string()));
    }
    if let Some(logfile) = &config.logfile {
        settings.push(("logfile", logfile.display().to_string()));
    }
    settings
}

/// `pgbouncer.ini` for `config`, pointing at an auth file in `dir`. Extra
/// settings override PgBouncer's defaults and Tidepool's
/// [`OVERRIDABLE_DEFAULTS`], never the rest of Tidepool's own (they are
/// refused), and come last.
pub fn render_ini(config: &PoolerConfig, dir: &Path) -> Result<String, PoolerError> {
    config.validate()?;
    let u = &config.upstream;
    let mut ini = String::new();
    let _ = writeln!(
        ini,
        "; Written by `tidepool pooler-config`. No secrets here: the password is in {AUTH_FILE}."
    );
    let _ = writeln!(ini, "[databases]");
    let forced_user = match &config.client_user {
        // Every client's server connection logs in as the upstream user,
        // with its password from the auth file.
        Some(_) => format!(" user={}", u.user),
        None => String::new(),
    };
    let _ = writeln!(ini, "{} = host={} port={} dbname={}{forced_user}", u.dbname, u.host, u.port, u.dbname);
    let _ = writeln!(ini);
    let _ = writeln!(ini, "[pgbouncer]");
    for (key, value) in rendered_settings(config, dir) {
        if !config.settings.iter().any(|s| s.key == key) {
            let _ = writeln!(ini, "{key} = {value}");
        }
    }
    for setting in &config.settings {
        let _ = writeln!(ini, "{} = {}", setting.key, setting.value);
    }
    Ok(ini)
}

/// The auth file: one `"user" "password"` line per user (the upstream's,
/// then the stats user's and the client user's), quotes doubled.
pub fn render_auth_file(config: &PoolerConfig) -> String {
    let quote = |s: &str| s.replace('"', "\"\"");
    let upstream = &config.upstream;
    let mut file = format!("\"{}\" \"{}\"\n", quote(&upstream.user), quote(&upstream.password));
    for local in config.stats_user.iter().chain(&config.client_user) {
        file.push_str(&format!("\"{}\" \"{}\"\n", quote(&local.name), quote(&local.password)));
    }
    file
}

/// A libpq password file of one line, `host:port:dbname:user:password`,
/// with `:` and `\` escaped as libpq reads them.
pub fn render_passfile(host: &str, port: u16, dbname: &str, user: &str, password: &str) -> String {
    let escape = |s: &str| s.replace('\\', "\\\\").replace(':', "\\:");
    format!("{}:{port}:{}:{}:{}\n", escape(host), escape(dbname), escape(user), escape(password))
}

/// Writes `upstream`'s password file to `path` (0600, atomically): the
/// direct connection of a process that reads libpq's `PGPASSFILE` (an
/// application's migration).
pub fn write_passfile(upstream: &Upstream, path: &Path) -> Result<(), PoolerError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|source| PoolerError::Write { path: dir.to_owned(), source })?;
    }
    let line = render_passfile(&upstream.host, upstream.port, "*", &upstream.user, &upstream.password);
    write_atomic(path, line.as_bytes(), 0o600)
}

/// Writes both files into `dir` (created if missing), each atomically; the
/// auth file is readable by its owner only.
pub fn write(config: &PoolerConfig, dir: &Path) -> Result<(PathBuf, PathBuf), PoolerError> {
    let ini = render_ini(config, dir)?;
    fs::create_dir_all(dir).map_err(|source| PoolerError::Write { path: dir.to_owned(), source })?;
    let auth_path = dir.join(AUTH_FILE);
    let ini_path = dir.join(INI_FILE);
    write_atomic(&auth_path, render_auth_file(config).as_bytes(), 0o600)?;
    if let Some(stats) = &config.stats_user {
        write_atomic(&dir.join(STATS_PASSWORD_FILE), stats.password.as_bytes(), 0o600)?;
    }
    if let Some(client) = &config.client_user {
        write_atomic(&dir.join(CLIENT_PASSWORD_FILE), client.password.as_bytes(), 0o600)?;
        let host = config.listen.ip().to_string();
        let passfile = render_passfile(&host, config.listen.port(), "*", &client.name, &client.password);
        write_atomic(&dir.join(CLIENT_PASSFILE), passfile.as_bytes(), 0o600)?;
    }
    write_atomic(&ini_path, ini.as_bytes(), 0o644)?;
    Ok((ini_path, auth_path))
}

fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), PoolerError> {
    let tmp = path.with_extension("tmp");
    let err = |source| PoolerError::Write { path: path.to_owned(), source };
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(err)?;
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::SslMode;
    use std::str::FromStr;

    fn config() -> PoolerConfig {
        let pg = tokio_postgres::Config::from_str("postgres://shop:s3cr\"et@db.internal:5433/shopdb")
            .expect("valid url");
        PoolerConfig {
            listen: "127.0.0.1:6432".parse().expect("valid addr"),
            upstream: Upstream::from_pg_config(&pg).expect("complete upstream"),
            pool_size: 20,
            min_pool_size: 5,
            max_db_connections: 20,
            max_client_conn: 500,
            query_wait_timeout: Duration::from_secs(30),
            stats_user: None,
            client_user: None,
            server_tls: TlsSettings::default(),
            settings: Vec::new(),
            pidfile: None,
            logfile: None,
        }
    }

    fn tls(mode: SslMode, root_cert: Option<&str>) -> TlsSettings {
        TlsSettings { mode, root_cert: root_cert.map(PathBuf::from), ..TlsSettings::default() }
    }

    /// The value of `key` in the ini, if written.
    fn ini_value(ini: &str, key: &str) -> Option<String> {
        ini.lines().find_map(|line| line.strip_prefix(&format!("{key} = ")).map(str::to_owned))
    }

    #[test]
    fn server_tls_is_written_with_libpq_meanings() {
        let ca = Some("/etc/db-ca/ca.crt");
        for (mode, roots, written) in [
            (SslMode::Disable, None, "disable"),
            (SslMode::Prefer, None, "prefer"),
            (SslMode::Require, None, "require"),
            // libpq checks the chain under require when given roots;
            // PgBouncer's require never does.
            (SslMode::Require, ca, "verify-ca"),
            (SslMode::VerifyCa, ca, "verify-ca"),
            (SslMode::VerifyFull, ca, "verify-full"),
        ] {
            let mut c = config();
            c.server_tls = tls(mode, roots);
            let ini = render_ini(&c, Path::new("/run/pgb")).expect("valid");
            assert_eq!(ini_value(&ini, "server_tls_sslmode").as_deref(), Some(written), "{mode:?}");
            assert_eq!(ini_value(&ini, "server_tls_ca_file").as_deref(), roots, "{mode:?}");
        }
        let mut c = config();
        c.server_tls = TlsSettings {
            cert: Some("/etc/db-client/tls.crt".into()),
            key: Some("/etc/db-client/tls.key".into()),
            ..tls(SslMode::VerifyFull, ca)
        };
        let ini = render_ini(&c, Path::new("/run/pgb")).expect("valid");
        assert_eq!(ini_value(&ini, "server_tls_cert_file").as_deref(), Some("/etc/db-client/tls.crt"));
        assert_eq!(ini_value(&ini, "server_tls_key_file").as_deref(), Some("/etc/db-client/tls.key"));
    }

    #[test]
    fn server_tls_that_cannot_work_is_refused() {
        let refused = |server_tls: TlsSettings| {
            let mut c = config();
            c.server_tls = server_tls;
            render_ini(&c, Path::new("/run/pgb")).expect_err("refused")
        };
        assert!(matches!(refused(tls(SslMode::VerifyFull, None)), PoolerError::Tls(TlsError::NoRoots(_))));
        assert!(matches!(refused(tls(SslMode::VerifyCa, None)), PoolerError::Tls(TlsError::NoRoots(_))));
        let half = TlsSettings { cert: Some("/c.crt".into()), ..tls(SslMode::Require, None) };
        assert!(matches!(refused(half), PoolerError::Tls(TlsError::HalfClientCert("sslkey"))));
        for path in ["relative/ca.crt", "/etc/ca.crt\nadmin_users = x", "/etc/my ca.crt"] {
            assert!(
                matches!(refused(tls(SslMode::VerifyCa, Some(path))), PoolerError::UnsafePath(_)),
                "{path}"
            );
        }
    }

    #[test]
    fn a_setting_replaces_an_overridable_default_once() {
        let mut c = config();
        c.settings = vec![Setting::parse("server_login_retry=15").expect("well formed")];
        let ini = render_ini(&c, Path::new("/run/pgb")).expect("valid");
        let lines: Vec<&str> = ini.lines().filter(|l| l.starts_with("server_login_retry ")).collect();
        assert_eq!(lines, ["server_login_retry = 15"]);
        assert_eq!(ini_value(&ini, "server_connect_timeout").as_deref(), Some("5"));
    }

    #[test]
    fn server_tls_keys_have_one_owner() {
        for key in SERVER_TLS_KEYS {
            let mut c = config();
            c.settings = vec![Setting::parse(&format!("{key}=/x")).expect("well formed")];
            let refused = render_ini(&c, Path::new("/run/pgb")).expect_err("refused");
            assert_eq!(
                refused.to_string(),
                format!("setting {key} is written by tidepool pooler-config itself and cannot be set again")
            );
        }
    }

    #[test]
    fn ini_is_transaction_mode_and_holds_no_secret() {
        let ini = render_ini(&config(), Path::new("/run/pgb")).expect("valid");
        assert!(ini.contains("pool_mode = transaction\n"));
        assert!(ini.contains("shopdb = host=db.internal port=5433 dbname=shopdb\n"));
        assert!(ini.contains("max_db_connections = 20\n"));
        assert!(ini.contains("default_pool_size = 20\n"));
        assert!(ini.contains("min_pool_size = 5\n"));
        assert!(ini.contains("max_client_conn = 500\n"));
        assert!(ini.contains("auth_file = /run/pgb/userlist.txt\n"));
        assert!(!ini.contains("s3cr"), "{ini}");
    }

    #[test]
    fn auth_file_doubles_quotes() {
        assert_eq!(render_auth_file(&config()), "\"shop\" \"s3cr\"\"et\"\n");
    }

    #[test]
    fn debug_of_upstream_is_redacted() {
        assert!(!format!("{:?}", config()).contains("s3cr"));
    }

    #[test]
    fn rejects_values_that_could_break_the_ini() {
        let mut c = config();
        c.upstream.dbname = "shop host=evil".into();
        assert!(matches!(
            render_ini(&c, Path::new("/x")),
            Err(PoolerError::Unsafe { field: "database name" })
        ));
    }

    #[test]
    fn rejects_inconsistent_sizes() {
        let mut c = config();
        c.pool_size = 30;
        assert!(matches!(render_ini(&c, Path::new("/x")), Err(PoolerError::PoolAboveCap { .. })));
        c.pool_size = 0;
        assert!(matches!(render_ini(&c, Path::new("/x")), Err(PoolerError::Zero("pool size"))));
        let mut c = config();
        c.min_pool_size = 21;
        assert!(matches!(render_ini(&c, Path::new("/x")), Err(PoolerError::MinAbovePool { .. })));
    }

    #[test]
    fn extra_settings_come_last_and_never_replace_tidepools_own() {
        let mut c = config();
        c.settings = vec![Setting::parse("server_idle_timeout=300").expect("valid")];
        let ini = render_ini(&c, Path::new("/x")).expect("valid");
        assert!(ini.ends_with("server_idle_timeout = 300\n"), "{ini}");
        c.settings = vec![Setting::parse("max_db_connections=500").expect("well-formed")];
        assert!(
            matches!(render_ini(&c, Path::new("/x")), Err(PoolerError::ReservedSetting(k)) if k == "max_db_connections")
        );
        for bad in ["no_equals", "Key=1", "k=line\nbreak", "k=semi;colon", ""] {
            assert!(Setting::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_stats_user_gets_a_generated_password_of_its_own() {
        let mut c = config();
        c.stats_user = Some(LocalUser::generate("tidepool_stats".into()));
        let ini = render_ini(&c, Path::new("/x")).expect("valid");
        assert!(ini.contains("stats_users = tidepool_stats\n"));
        let auth = render_auth_file(&c);
        assert_eq!(auth.lines().count(), 2);
        assert!(auth.lines().nth(1).is_some_and(|l| l.starts_with("\"tidepool_stats\" \"") && l.len() > 40));
        assert!(!format!("{:?}", c.stats_user).contains(&auth[auth.len() - 10..auth.len() - 2]));
    }

    /// The client user logs in to PgBouncer with a password of its own, and
    /// every server connection is the upstream user's.
    #[test]
    fn a_client_user_of_its_own_gets_a_password_file_and_the_upstream_user_is_forced() {
        use std::os::unix::fs::PermissionsExt;
        let mut c = config();
        c.client_user = Some(LocalUser::generate("tidepool_app".into()));
        let ini = render_ini(&c, Path::new("/x")).expect("valid");
        assert!(ini.contains("shopdb = host=db.internal port=5433 dbname=shopdb user=shop\n"), "{ini}");
        assert!(!ini.contains("s3cr"), "{ini}");
        let dir = std::env::temp_dir().join(format!("tidepool-client-user-test-{}", std::process::id()));
        write(&c, &dir).expect("writes");
        let password = fs::read_to_string(dir.join(CLIENT_PASSWORD_FILE)).expect("the password");
        assert_eq!(password.len(), 32);
        let passfile = fs::read_to_string(dir.join(CLIENT_PASSFILE)).expect("the passfile");
        assert_eq!(passfile, format!("127.0.0.1:6432:*:tidepool_app:{password}\n"));
        for file in [CLIENT_PASSWORD_FILE, CLIENT_PASSFILE, AUTH_FILE] {
            let mode = fs::metadata(dir.join(file)).expect("exists").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{file}");
        }
        let auth = fs::read_to_string(dir.join(AUTH_FILE)).expect("auth file");
        assert!(auth.contains(&format!("\"tidepool_app\" \"{password}\"")));
        assert!(!passfile.contains("s3cr"));
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_passfile_escapes_what_libpq_would_split_on() {
        assert_eq!(render_passfile("db", 5432, "*", "u:1", "p\\w:d"), "db:5432:*:u\\:1:p\\\\w\\:d\n");
    }

    #[test]
    fn upstream_from_a_mounted_secret_folder() {
        let dir = std::env::temp_dir().join(format!("tidepool-upstream-test-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        for (key, value) in [
            ("username", "shop"),
            ("password", "pw\n"),
            ("host", "db.internal"),
            ("port", "5433"),
            ("dbname", "orders"),
            ("uri", "ignored"),
        ] {
            fs::write(dir.join(key), value).expect("write");
        }
        let upstream = Upstream::from_dir(&dir).expect("complete");
        assert_eq!(
            (upstream.port, upstream.dbname.as_str(), upstream.password.as_str()),
            (5433, "orders", "pw")
        );
        fs::write(dir.join("port"), "x").expect("write");
        assert!(matches!(
            Upstream::from_dir(&dir),
            Err(PoolerError::Secret { source: SecretError::BadPort, .. })
        ));
        fs::write(dir.join("port"), "5433").expect("write");
        fs::remove_file(dir.join("password")).expect("remove");
        let missing = Upstream::from_dir(&dir).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            missing.ends_with("it lacks the keys password (it needs username, password, host, port, dbname)"),
            "{missing}"
        );
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn upstream_needs_a_password() {
        let pg = tokio_postgres::Config::from_str("postgres://shop@db/shop").expect("valid url");
        assert!(matches!(Upstream::from_pg_config(&pg), Err(PoolerError::Missing("password"))));
    }

    #[test]
    fn write_puts_the_secret_in_a_private_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("tidepool-pooler-test-{}", std::process::id()));
        let (ini, auth) = write(&config(), &dir).expect("writes");
        let mode = fs::metadata(&auth).expect("exists").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(fs::read_to_string(&ini).expect("readable").contains("pool_mode = transaction"));
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
