//! The database Secret: CloudNativePG's application Secret shape, so a
//! CloudNativePG user points `spec.database.secretRef` at `<cluster>-app`.
//!
//! Five keys, all required: [`KEYS`]. The operator reads them from the
//! Secret (to refuse an incomplete one in status before any pod fails, and
//! for the queue scaler's connection), PgBouncer's config is written from
//! them mounted as files (`tidepool pooler-config --upstream-from-dir`), and
//! every one of those readers parses with [`DatabaseSecret::parse`], so they
//! agree on what a valid Secret is. Other keys (`uri`, `jdbc-uri`, …) are
//! ignored. A value may end with a newline (`kubectl create secret
//! --from-file` keeps one): trailing `\n` and `\r` are dropped.

use std::fmt;

/// The keys a database Secret must have.
pub const KEYS: [&str; 5] = ["username", "password", "host", "port", "dbname"];

/// What the Secret says, values in memory only (`Debug` hides the password).
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseSecret {
    pub username: String,
    pub password: String,
    pub host: String,
    pub port: u16,
    pub dbname: String,
}

/// Why a Secret is not a database Secret. Never holds a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("it lacks the keys {} (it needs {})", .0.join(", "), KEYS.join(", "))]
    Missing(Vec<&'static str>),
    #[error("its key {0} is not UTF-8 text")]
    NotText(&'static str),
    #[error("its port is not a port number (1 to 65535)")]
    BadPort,
}

impl DatabaseSecret {
    /// Parses the Secret whose key `key` holds `value(key)` (`None` when
    /// absent). An empty value counts as absent.
    pub fn parse<V: AsRef<[u8]>>(value: impl Fn(&str) -> Option<V>) -> Result<Self, SecretError> {
        let mut texts = Vec::with_capacity(KEYS.len());
        let mut missing = Vec::new();
        for key in KEYS {
            match value(key) {
                Some(bytes) => {
                    let text = std::str::from_utf8(bytes.as_ref()).map_err(|_| SecretError::NotText(key))?;
                    let text = text.trim_end_matches(['\n', '\r']);
                    if text.is_empty() {
                        missing.push(key);
                    }
                    texts.push(text.to_owned());
                }
                None => {
                    missing.push(key);
                    texts.push(String::new());
                }
            }
        }
        if !missing.is_empty() {
            return Err(SecretError::Missing(missing));
        }
        let [username, password, host, port, dbname]: [String; 5] =
            texts.try_into().map_err(|_| SecretError::Missing(KEYS.to_vec()))?;
        let port = port.trim().parse().ok().filter(|&p| p > 0).ok_or(SecretError::BadPort)?;
        Ok(DatabaseSecret { username, password, host, port, dbname })
    }

    /// The database server, `host:port`.
    pub fn server(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

impl fmt::Debug for DatabaseSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseSecret")
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("dbname", &self.dbname)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn secret(pairs: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect()
    }

    fn parse(data: &BTreeMap<String, Vec<u8>>) -> Result<DatabaseSecret, SecretError> {
        DatabaseSecret::parse(|key| data.get(key))
    }

    const FULL: [(&str, &str); 6] = [
        ("username", "app"),
        ("password", "s3cret\n"),
        ("host", "shop-rw.db.svc"),
        ("port", "5432"),
        ("dbname", "shop"),
        ("uri", "postgresql://ignored"),
    ];

    #[test]
    fn a_cloudnativepg_app_secret_parses() {
        let parsed = parse(&secret(&FULL)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.password, "s3cret", "a trailing newline is dropped");
        assert_eq!(parsed.server(), "shop-rw.db.svc:5432");
        assert!(!format!("{parsed:?}").contains("s3cret"), "Debug hides the password");
    }

    #[test]
    fn missing_and_empty_keys_are_named_together() {
        let mut data = secret(&FULL);
        data.remove("port");
        data.insert("dbname".into(), b"\n".to_vec());
        let error = parse(&data).err();
        assert_eq!(error, Some(SecretError::Missing(vec!["port", "dbname"])));
        assert_eq!(
            error.map(|e| e.to_string()).unwrap_or_default(),
            "it lacks the keys port, dbname (it needs username, password, host, port, dbname)"
        );
    }

    #[test]
    fn a_port_must_be_a_port_and_values_text() {
        for port in ["0", "65536", "five", "-1"] {
            let mut data = secret(&FULL);
            data.insert("port".into(), port.as_bytes().to_vec());
            assert_eq!(parse(&data).err(), Some(SecretError::BadPort), "{port}");
        }
        let mut data = secret(&FULL);
        data.insert("password".into(), vec![0xff, 0xfe]);
        let error = parse(&data).err();
        assert_eq!(error, Some(SecretError::NotText("password")));
        assert!(!format!("{error:?}").contains('\u{fffd}'), "no value in the error");
    }
}
