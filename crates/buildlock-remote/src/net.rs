//! Reaching the server: the socket (with keepalives and `TCP_USER_TIMEOUT` sized from the
//! remote timeout), TLS by `sslmode`, the startup and authentication, within `connect_timeout`.

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::sync::watch;
use tokio_postgres::tls::MakeTlsConnect;

use crate::settings::{Host, Settings, SslMode};
use crate::Error;

/// A connected, authenticated session's client, and what tells when its connection ends.
pub(crate) struct Connected {
    pub client: tokio_postgres::Client,
    /// `Some(why)` once the connection has ended.
    pub closed: watch::Receiver<Option<String>>,
    /// A duplicate of the socket, for a command to inherit (the session then lasts while it
    /// lives, as a lock file's descriptor does).
    pub socket: File,
    /// Ends the task that drives the connection, closing the socket at once (even while a
    /// query waits in the server's lock queue).
    pub abort: tokio::task::AbortHandle,
}

pub(crate) async fn connect(s: &Settings) -> Result<Connected, Error> {
    match tokio::time::timeout(s.connect_timeout, connect_inner(s)).await {
        Ok(r) => r,
        Err(_) => Err(Error::Unreachable {
            server: s.server(),
            why: format!(
                "no answer within the connect timeout ({}s); check the host and port, and that no firewall drops the \
                 packets (connect_timeout=SECS in the URL changes the wait)",
                s.connect_timeout.as_secs()
            ),
        }),
    }
}

async fn connect_inner(s: &Settings) -> Result<Connected, Error> {
    let mut config = tokio_postgres::Config::new();
    config.user(&s.user).dbname(&s.dbname).application_name(&s.application_name);
    if let Some(p) = &s.password {
        config.password(p);
    }
    let unreachable = |e: std::io::Error| Error::Unreachable { server: s.server(), why: io_why(&e) };
    let (tx, closed) = watch::channel(None);
    match &s.host {
        #[cfg(unix)]
        Host::Unix(dir) => {
            let path = dir.join(format!(".s.PGSQL.{}", s.port));
            let stream = tokio::net::UnixStream::connect(&path).await.map_err(unreachable)?;
            let socket = dup(&stream)?;
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
            let (client, conn) =
                config.connect_raw(stream, tokio_postgres::NoTls).await.map_err(|e| Error::from_connect(s, e))?;
            let abort = spawn_connection(conn, tx);
            Ok(Connected { client, closed, socket, abort })
        }
        #[cfg(not(unix))]
        Host::Unix(_) => Err(Error::Settings("Unix sockets are not supported on this platform".into())),
        Host::Tcp(host) => {
            let stream = tcp_connect(host, s.port, s.remote_timeout).await.map_err(unreachable)?;
            let socket = dup(&stream)?;
            if s.sslmode == SslMode::Disable {
                config.ssl_mode(tokio_postgres::config::SslMode::Disable);
                let (client, conn) =
                    config.connect_raw(stream, tokio_postgres::NoTls).await.map_err(|e| Error::from_connect(s, e))?;
                let abort = spawn_connection(conn, tx);
                return Ok(Connected { client, closed, socket, abort });
            }
            config.ssl_mode(match s.sslmode {
                SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                _ => tokio_postgres::config::SslMode::Require,
            });
            let mut make = tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(s)?);
            let tls =
                <tokio_postgres_rustls::MakeRustlsConnect as MakeTlsConnect<tokio::net::TcpStream>>::make_tls_connect(
                    &mut make, host,
                )
                .map_err(|e| Error::Settings(format!("host {host:?} cannot be checked against a certificate: {e}")))?;
            let (client, conn) = config.connect_raw(stream, tls).await.map_err(|e| Error::from_connect(s, e))?;
            let abort = spawn_connection(conn, tx);
            Ok(Connected { client, closed, socket, abort })
        }
    }
}

fn spawn_connection<F>(conn: F, tx: watch::Sender<Option<String>>) -> tokio::task::AbortHandle
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        let why = match conn.await {
            Ok(()) => "the server closed the connection".to_owned(),
            Err(e) => crate::error::describe(&e),
        };
        let _ = tx.send(Some(why));
    })
    .abort_handle()
}

/// A TCP connection with the client side's liveness settings: keepalives after a quarter of the
/// remote timeout, and `TCP_USER_TIMEOUT` (unacknowledged data) of a quarter too, so the socket
/// itself fails well before the server gives up on us (see `crate::Bounds`).
async fn tcp_connect(host: &str, port: u16, remote_timeout: Duration) -> std::io::Result<tokio::net::TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(stream) => {
                let sock = socket2::SockRef::from(&stream);
                let quarter = crate::Bounds { remote_timeout }.user_timeout();
                let ka = socket2::TcpKeepalive::new()
                    .with_time(quarter)
                    .with_interval((remote_timeout / 16).max(Duration::from_secs(1)));
                sock.set_tcp_keepalive(&ka)?;
                #[cfg(any(target_os = "linux", target_os = "android"))]
                sock.set_tcp_user_timeout(Some(quarter))?;
                sock.set_tcp_nodelay(true)?;
                return Ok(stream);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "the host name has no address")))
}

#[cfg(unix)]
fn dup<S: std::os::fd::AsFd>(s: &S) -> Result<File, Error> {
    s.as_fd()
        .try_clone_to_owned()
        .map(File::from)
        .map_err(|e| Error::Settings(format!("cannot duplicate the server connection's socket: {e}")))
}

#[cfg(not(unix))]
fn dup<S>(_s: &S) -> Result<File, Error> {
    Err(Error::Settings("remote locks need a Unix platform for now".into()))
}

fn io_why(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => {
            "connection refused: no server listens there; check the host and port, and that PostgreSQL runs".into()
        }
        std::io::ErrorKind::NotFound => format!("{e}: check the host name (or the socket directory)"),
        _ => format!("{e}"),
    }
}

/// The rustls configuration for `sslmode`: verify-full checks the chain and the name,
/// verify-ca the chain only; prefer and require check the chain only if `sslrootcert` is given
/// (as libpq does), else accept any certificate (encryption without authentication).
fn tls_config(s: &Settings) -> Result<rustls::ClientConfig, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Settings(format!("TLS setup: {e}")))?;
    let roots = match &s.sslrootcert {
        Some(path) => Some(load_roots(path)?),
        None => None,
    };
    let config = match (s.sslmode, roots) {
        (SslMode::VerifyFull, Some(roots)) => builder.with_root_certificates(roots).with_no_client_auth(),
        (_, Some(roots)) => {
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| Error::Settings(format!("TLS setup: {e}")))?;
            builder.dangerous().with_custom_certificate_verifier(Arc::new(ChainOnly(inner))).with_no_client_auth()
        }
        (_, None) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth(),
    };
    Ok(config)
}

fn load_roots(path: &std::path::Path) -> Result<rustls::RootCertStore, Error> {
    use rustls::pki_types::pem::PemObject;
    let bad = |why: String| Error::Settings(format!("sslrootcert {}: {why}", path.display()));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(format!("cannot read it: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(format!("not a PEM certificate file: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(bad("holds no usable certificate".into()));
    }
    Ok(roots)
}

/// `verify-ca`: the certificate must chain to the roots; the name it carries is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
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

/// `prefer`/`require` without `sslrootcert`: encryption, no authentication of the server (as
/// libpq). The handshake's signatures are still checked.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
