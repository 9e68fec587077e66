//! TLS to PostgreSQL with libpq's meanings, for the connections Tidepool
//! opens itself (not through the pod's PgBouncer): rustls under
//! tokio-postgres.
//!
//! tokio-postgres knows `sslmode=disable|prefer|require` only, and verifies
//! nothing itself; libpq's `verify-ca` and `verify-full` and the files
//! `sslrootcert`, `sslcert` and `sslkey` are refused in its URLs. So
//! [`TlsSettings::split_url`] takes libpq's parameters out of a URL first,
//! and [`TlsSettings::connector`] builds what tokio-postgres connects with:
//!
//! | `sslmode` | encrypted | falls back to plaintext | chain checked | host name checked |
//! |---|---|---|---|---|
//! | `disable` | no | – | – | – |
//! | `prefer` (libpq's default) | if the server offers it | yes | no | no |
//! | `require` | yes | no | only with `sslrootcert` (as libpq) | no |
//! | `verify-ca` | yes | no | yes | no |
//! | `verify-full` | yes | no | yes | yes |
//!
//! `sslrootcert` may hold several roots (a provider's bundle while it
//! rotates its CA): any of them may be the issuer. `sslcert` and `sslkey`
//! give a client certificate. Where rustls differs from libpq: a server
//! certificate must name its host in `subjectAltName` (rustls, like
//! browsers, ignores the subject's CN), and `sslmode=allow` (plaintext
//! first) is refused: use `prefer`.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// libpq's `sslmode`, the modes Tidepool honours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Plaintext only.
    Disable,
    /// libpq's default: TLS when the server offers it, verifying nothing.
    #[default]
    Prefer,
    /// TLS or no connection; the certificate checked only against
    /// `sslrootcert` when it is given (as libpq does).
    Require,
    /// TLS, the chain checked against `sslrootcert`, not the host name.
    VerifyCa,
    /// TLS, the chain and the host name checked.
    VerifyFull,
}

impl SslMode {
    /// The mode named `name` as libpq spells it.
    pub fn parse(name: &str) -> Result<SslMode, TlsError> {
        match name {
            "disable" => Ok(SslMode::Disable),
            "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            "allow" => Err(TlsError::Allow),
            other => Err(TlsError::UnknownMode(other.chars().take(32).collect())),
        }
    }

    /// Its name as libpq spells it.
    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether a server that offers no TLS is refused.
    pub fn requires_tls(self) -> bool {
        matches!(self, SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull)
    }

    /// The mode as libpq applies it with roots given or not: `require`
    /// with roots checks the chain, as `verify-ca` does.
    pub fn with_roots(self, roots: bool) -> SslMode {
        match self {
            SslMode::Require if roots => SslMode::VerifyCa,
            mode => mode,
        }
    }

    /// The mode tokio-postgres negotiates with (it knows three).
    fn negotiation(self) -> tokio_postgres::config::SslMode {
        match self {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        }
    }
}

/// What a connection's TLS is to be: the mode and the files.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsSettings {
    /// libpq's `sslmode`.
    pub mode: SslMode,
    /// The roots the server's chain must lead to (PEM, one or more).
    pub root_cert: Option<PathBuf>,
    /// A client certificate (PEM, the chain), with `key`.
    pub cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    pub key: Option<PathBuf>,
}

/// Why TLS settings are unusable.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TlsError {
    /// libpq's `allow`, which tries plaintext first.
    #[error("sslmode=allow (plaintext first) is not supported: use prefer")]
    Allow,
    /// A mode libpq does not have.
    #[error("sslmode={0:?} is not one of disable, prefer, require, verify-ca, verify-full")]
    UnknownMode(String),
    /// A verifying mode without roots to verify against.
    #[error("sslmode={0} verifies the server's certificate: give the roots in sslrootcert")]
    NoRoots(&'static str),
    /// One of a client certificate and its key.
    #[error("sslcert and sslkey go together: {0} is missing")]
    HalfClientCert(&'static str),
    /// A file that cannot be read.
    #[error("{param}={path}: {reason}")]
    File {
        /// The URL parameter that named it.
        param: &'static str,
        /// Its path.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Certificates or a key that do not parse.
    #[error("{origin}: {reason}")]
    Pem {
        /// Where they came from.
        origin: String,
        /// What is wrong with them.
        reason: String,
    },
    /// A query value that does not decode.
    #[error("the URL is not valid: {0}")]
    Url(String),
    /// What rustls refused (a host that is no name, a key that does not
    /// match its certificate).
    #[error("TLS could not be set up: {0}")]
    Rustls(String),
}

impl TlsSettings {
    /// Takes libpq's `sslmode`, `sslrootcert`, `sslcert` and `sslkey` out
    /// of the query of the `postgres://` or `postgresql://` URL `url`: the
    /// URL left for tokio-postgres, and the settings. A key=value
    /// connection string is left as it is, with the default settings.
    pub fn split_url(url: &str) -> Result<(String, TlsSettings), TlsError> {
        if !is_url(url) {
            return Ok((url.to_owned(), TlsSettings::default()));
        }
        let (base, query) = match url.split_once('?') {
            Some((base, query)) => (base, query),
            None => return Ok((url.to_owned(), TlsSettings::default())),
        };
        let mut settings = TlsSettings::default();
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value)?;
            match key {
                "sslmode" => settings.mode = SslMode::parse(&value)?,
                "sslrootcert" => settings.root_cert = Some(PathBuf::from(value)),
                "sslcert" => settings.cert = Some(PathBuf::from(value)),
                "sslkey" => settings.key = Some(PathBuf::from(value)),
                _ => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) };
        Ok((rest, settings))
    }

    /// The mode as libpq applies it: `require` with roots checks the
    /// chain, as `verify-ca` does.
    pub fn effective_mode(&self) -> SslMode {
        self.mode.with_roots(self.root_cert.is_some())
    }

    /// Whether the settings can work, reading no file: a verifying mode
    /// has its roots, a client certificate its key.
    pub fn check(&self) -> Result<(), TlsError> {
        match (self.mode, &self.root_cert, &self.cert, &self.key) {
            (mode @ (SslMode::VerifyCa | SslMode::VerifyFull), None, _, _) => {
                Err(TlsError::NoRoots(mode.name()))
            }
            (_, _, Some(_), None) => Err(TlsError::HalfClientCert("sslkey")),
            (_, _, None, Some(_)) => Err(TlsError::HalfClientCert("sslcert")),
            _ => Ok(()),
        }
    }

    /// Sets the negotiation on `config` and builds the connector, reading
    /// the files now: a missing or unreadable one is an error here, not at
    /// the first connection.
    pub fn connector(&self, config: &mut tokio_postgres::Config) -> Result<MakeRustlsConnect, TlsError> {
        self.check()?;
        let read = |param: &'static str, path: &Path| {
            std::fs::read(path)
                .map(|bytes| Pem { origin: format!("{param}={}", path.display()), bytes })
                .map_err(|e| file_error(param, path, e))
        };
        let client_cert = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some((read("sslcert", cert)?, read("sslkey", key)?)),
            _ => None,
        };
        let material = TlsMaterial {
            mode: self.mode,
            roots: self.root_cert.as_deref().map(|path| read("sslrootcert", path)).transpose()?,
            client_cert,
        };
        material.connector(config)
    }
}

/// PEM text and where it came from (`sslrootcert=/path`, `Secret db-ca,
/// key ca.crt`), for the messages about it.
#[derive(Clone, PartialEq, Eq)]
pub struct Pem {
    /// Where it was read from, as a message names it.
    pub origin: String,
    /// The PEM text.
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for Pem {
    /// The origin only: a key's text never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pem({})", self.origin)
    }
}

/// TLS settings with their certificates in memory: what
/// [`TlsSettings::connector`] reads from files, or what a caller holds
/// already (the operator reads its CA from a Secret).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsMaterial {
    /// libpq's `sslmode`.
    pub mode: SslMode,
    /// The roots (one or more certificates).
    pub roots: Option<Pem>,
    /// A client certificate chain and its key.
    pub client_cert: Option<(Pem, Pem)>,
}

impl TlsMaterial {
    /// Sets the negotiation on `config` and builds the connector, with
    /// libpq's meanings of the mode (`require` with roots checks the chain).
    pub fn connector(&self, config: &mut tokio_postgres::Config) -> Result<MakeRustlsConnect, TlsError> {
        config.ssl_mode(self.mode.negotiation());
        let roots = self.roots.as_ref().map(read_roots).transpose()?;
        let verify = match (self.mode.with_roots(roots.is_some()), roots) {
            (SslMode::Disable | SslMode::Prefer | SslMode::Require, _) => Verify::Nothing,
            (SslMode::VerifyCa, Some(roots)) => Verify::Chain(roots),
            (SslMode::VerifyFull, Some(roots)) => Verify::ChainAndName(roots),
            (mode, None) => return Err(TlsError::NoRoots(mode.name())),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let rustls = |e: rustls::Error| TlsError::Rustls(e.to_string());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(rustls)?;
        let builder = match verify {
            Verify::ChainAndName(roots) => builder.with_root_certificates(roots),
            Verify::Chain(roots) => {
                let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| TlsError::Rustls(e.to_string()))?;
                builder.dangerous().with_custom_certificate_verifier(Arc::new(ChainOnly(inner)))
            }
            Verify::Nothing => {
                builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
            }
        };
        let config = match &self.client_cert {
            Some((cert, key)) => {
                let chain = read_certs(cert)?;
                let key = PrivateKeyDer::from_pem_slice(&key.bytes).map_err(|e| pem_error(key, e))?;
                builder.with_client_auth_cert(chain, key).map_err(rustls)?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(MakeRustlsConnect { config: Arc::new(config) })
    }
}

/// Whether `s` is a `postgres://` or `postgresql://` URL (else a libpq
/// key=value string).
pub fn is_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

enum Verify {
    Nothing,
    Chain(RootCertStore),
    ChainAndName(RootCertStore),
}

fn file_error(param: &'static str, path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File { param, path: path.display().to_string(), reason: reason.to_string() }
}

fn pem_error(pem: &Pem, reason: impl std::fmt::Display) -> TlsError {
    TlsError::Pem { origin: pem.origin.clone(), reason: reason.to_string() }
}

fn read_certs(pem: &Pem) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(&pem.bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(pem, e))?;
    if certs.is_empty() {
        return Err(pem_error(pem, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// Every root of the bundle `pem`.
fn read_roots(pem: &Pem) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(pem)? {
        roots.add(cert).map_err(|e| pem_error(pem, e))?;
    }
    Ok(roots)
}

fn percent_decode(value: &str) -> Result<String, TlsError> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = value
                    .get(i + 1..i + 3)
                    .ok_or_else(|| TlsError::Url(format!("a cut %-escape in {value:?}")))?;
                out.push(
                    u8::from_str_radix(hex, 16)
                        .map_err(|_| TlsError::Url(format!("%{hex} is not an escape")))?,
                );
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| TlsError::Url(format!("{value:?} is not UTF-8 once decoded")))
}

/// `verify-ca`: the chain must lead to a root; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain before the name: a name error means the
        // chain held.
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer`, and `require` without roots: encrypted, the certificate
/// unchecked (the handshake's signatures still are).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What tokio-postgres connects with: one rustls configuration, a
/// handshake per connection to the host it names.
#[derive(Clone)]
pub struct MakeRustlsConnect {
    config: Arc<ClientConfig>,
}

impl<S> MakeTlsConnect<S> for MakeRustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = TlsError;

    fn make_tls_connect(&mut self, host: &str) -> Result<RustlsConnect, TlsError> {
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| TlsError::Rustls(format!("{host} is not a host name TLS can check: {e}")))?;
        Ok(RustlsConnect { config: self.config.clone(), host: host.to_owned(), name })
    }
}

/// One connection's handshake.
pub struct RustlsConnect {
    config: Arc<ClientConfig>,
    host: String,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let RustlsConnect { config, host, name } = self;
        Box::pin(async move {
            tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await
                .map(RustlsStream)
                .map_err(|e| io::Error::new(e.kind(), format!("TLS to {host}: {e}")))
        })
    }
}

/// A TLS stream to PostgreSQL.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls").join(name)
    }

    fn settings(mode: SslMode, roots: Option<&str>) -> TlsSettings {
        TlsSettings { mode, root_cert: roots.map(fixture), ..TlsSettings::default() }
    }

    #[test]
    fn libpq_parameters_leave_the_url() {
        let (rest, tls) = TlsSettings::split_url(
            "postgresql://app:pw@db:5432/app?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.crt",
        )
        .expect("parsed");
        assert_eq!(rest, "postgresql://app:pw@db:5432/app?application_name=x");
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.root_cert, Some(PathBuf::from("/etc/ca.crt")));
        let (rest, tls) =
            TlsSettings::split_url("postgres://db/app?sslmode=require&sslcert=c.pem&sslkey=k.pem")
                .expect("parsed");
        assert_eq!((rest.as_str(), tls.mode), ("postgres://db/app", SslMode::Require));
        assert_eq!((tls.cert, tls.key), (Some(PathBuf::from("c.pem")), Some(PathBuf::from("k.pem"))));
        assert_eq!(
            TlsSettings::split_url("postgres://db/app").expect("parsed"),
            ("postgres://db/app".into(), TlsSettings::default())
        );
        assert_eq!(TlsSettings::default().mode, SslMode::Prefer, "libpq's default");
        assert_eq!(TlsSettings::split_url("postgres://db/app?sslmode=allow"), Err(TlsError::Allow));
        assert_eq!(
            TlsSettings::split_url("postgres://db/app?sslmode=verify").map(|_| ()),
            Err(TlsError::UnknownMode("verify".into()))
        );
        assert!(TlsSettings::split_url("postgres://db/app?sslrootcert=%zz").is_err());
    }

    #[test]
    fn settings_that_cannot_work_are_refused_before_connecting() {
        let mut config = tokio_postgres::Config::new();
        let error = |tls: TlsSettings, config: &mut tokio_postgres::Config| tls.connector(config).err();
        assert_eq!(
            error(settings(SslMode::VerifyFull, None), &mut config),
            Some(TlsError::NoRoots("verify-full"))
        );
        assert_eq!(
            error(settings(SslMode::VerifyCa, None), &mut config),
            Some(TlsError::NoRoots("verify-ca"))
        );
        let missing = error(settings(SslMode::VerifyFull, Some("absent.crt")), &mut config);
        assert!(matches!(&missing, Some(TlsError::File { param: "sslrootcert", .. })), "{missing:?}");
        let not_pem = error(settings(SslMode::VerifyCa, Some("server.key")), &mut config);
        assert!(
            not_pem.as_ref().is_some_and(|e| e.to_string().ends_with("no PEM certificate in it")),
            "{not_pem:?}"
        );
        let half = TlsSettings { cert: Some(fixture("server.crt")), ..TlsSettings::default() };
        assert_eq!(error(half, &mut config), Some(TlsError::HalfClientCert("sslkey")));
    }

    #[test]
    fn require_and_stricter_never_fall_back_to_plaintext() {
        for (mode, expected) in [
            (SslMode::Disable, tokio_postgres::config::SslMode::Disable),
            (SslMode::Prefer, tokio_postgres::config::SslMode::Prefer),
            (SslMode::Require, tokio_postgres::config::SslMode::Require),
            (SslMode::VerifyCa, tokio_postgres::config::SslMode::Require),
            (SslMode::VerifyFull, tokio_postgres::config::SslMode::Require),
        ] {
            let mut config = tokio_postgres::Config::new();
            settings(mode, Some("ca-a.crt")).connector(&mut config).expect("a connector");
            assert_eq!(config.get_ssl_mode(), expected, "{mode:?}");
            assert_eq!(mode.requires_tls(), expected == tokio_postgres::config::SslMode::Require);
        }
    }

    /// A TLS handshake to `host` over an in-memory pipe, against a server
    /// presenting `cert`: whether the client accepted it.
    async fn handshake(tls: TlsSettings, host: &str, cert: &str) -> Result<(), String> {
        let mut config = tokio_postgres::Config::new();
        let mut make = tls.connector(&mut config).map_err(|e| e.to_string())?;
        let chain = CertificateDer::pem_file_iter(fixture(&format!("{cert}.crt")))
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| e.to_string())?;
        let key = PrivateKeyDer::from_pem_file(fixture(&format!("{cert}.key"))).map_err(|e| e.to_string())?;
        let server =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
                .map_err(|e| e.to_string())?;
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let served = tokio::spawn(async move {
            let mut stream = acceptor.accept(server_io).await?;
            stream.write_all(b"ok").await?;
            stream.flush().await?;
            io::Result::Ok(stream)
        });
        let connect =
            MakeTlsConnect::<DuplexStream>::make_tls_connect(&mut make, host).map_err(|e| e.to_string())?;
        let mut stream = connect.connect(client_io).await.map_err(|e| e.to_string())?;
        let mut answer = [0u8; 2];
        stream.read_exact(&mut answer).await.map_err(|e| e.to_string())?;
        assert_eq!(&answer, b"ok");
        drop(served);
        Ok(())
    }

    #[tokio::test]
    async fn each_mode_checks_what_libpq_checks() {
        use SslMode::*;
        // (mode, sslrootcert, host, the server's certificate, what happens)
        type Case = (SslMode, Option<&'static str>, &'static str, &'static str, Result<(), &'static str>);
        let cases: [Case; 12] = [
            (VerifyFull, Some("ca-a.crt"), "localhost", "server", Ok(())),
            (VerifyFull, Some("ca-a.crt"), "127.0.0.1", "server", Ok(())),
            (
                VerifyFull,
                Some("ca-a.crt"),
                "db.example",
                "server",
                Err("TLS to db.example: invalid peer certificate: certificate not valid for name"),
            ),
            (VerifyCa, Some("ca-a.crt"), "db.example", "server", Ok(())),
            (
                VerifyFull,
                Some("ca-b.crt"),
                "localhost",
                "server",
                Err("TLS to localhost: invalid peer certificate: UnknownIssuer"),
            ),
            (
                VerifyCa,
                Some("ca-b.crt"),
                "localhost",
                "server",
                Err("TLS to localhost: invalid peer certificate: UnknownIssuer"),
            ),
            (VerifyFull, Some("bundle-b-then-a.crt"), "localhost", "server", Ok(())),
            (Require, None, "db.example", "server", Ok(())),
            (
                Require,
                Some("ca-b.crt"),
                "localhost",
                "server",
                Err("TLS to localhost: invalid peer certificate: UnknownIssuer"),
            ),
            (Prefer, Some("ca-b.crt"), "db.example", "server", Ok(())),
            (
                VerifyFull,
                Some("ca-a.crt"),
                "localhost",
                "cn-only",
                Err("TLS to localhost: invalid peer certificate: certificate not valid for name"),
            ),
            (VerifyCa, Some("ca-a.crt"), "localhost", "cn-only", Ok(())),
        ];
        for (mode, roots, host, cert, expected) in cases {
            let got = handshake(settings(mode, roots), host, cert).await;
            match expected {
                Ok(()) => assert_eq!(got, Ok(()), "{mode:?} {roots:?} {host} {cert}"),
                Err(start) => assert!(
                    got.as_ref().is_err_and(|e| e.starts_with(start)),
                    "{mode:?} {roots:?} {host} {cert}: {got:?}"
                ),
            }
        }
    }
}
