//! How the postgres target reaches the server: TLS (rustls) or a plain
//! socket, and which password exchanges it accepts.
//!
//! - `sslmode = "verify-full"`: TLS, the server's certificate checked against
//!   `ssl_root_cert` and the host name (or IP address) the DSN names.
//! - `sslmode = "require"`: TLS, the certificate not checked.
//! - `sslmode = "disable"`: no TLS (a Unix socket, or a trusted loopback).
//!
//! Over TLS, SCRAM channel binding is required (`SCRAM-SHA-256-PLUS`,
//! `tls-server-end-point`): the server proves it holds the verifier *and* the
//! certificate the client saw, so a man in the middle that terminates TLS
//! cannot relay the login, and a server that asks for the password in clear
//! text or as MD5 (or lets anyone in) is refused by tokio-postgres itself.
//!
//! Without TLS there is no channel to bind to, and tokio-postgres answers
//! whatever method the server asks for. So keyturn opens the socket itself and
//! watches the server's first messages ([`AuthGuard`], parsed with
//! `postgres-protocol`, the driver's own parser): a request for the password
//! in clear text (pg_hba `password`) or as MD5 fails the connection before a
//! byte of the password is sent, unless `allow_weak_auth` names that method.

use std::fmt;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::message::backend::Message;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::task::JoinHandle;
use tokio_postgres::config::{ChannelBinding, Host, SslMode};
use tokio_postgres::{Client, Config, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::model::{ErrorKind, PluginError};

/// `sslmode`: how the connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PgTls {
    Disable,
    Require,
    VerifyFull,
}

impl PgTls {
    const ALL: [Self; 3] = [Self::Disable, Self::Require, Self::VerifyFull];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.as_str() == s)
    }

    /// The setting's value, as libpq spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Require => "require",
            Self::VerifyFull => "verify-full",
        }
    }
}

/// The weak password exchanges a server may ask for (`allow_weak_auth`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct WeakAuth {
    /// pg_hba `password`: the password itself, in clear text.
    pub password: bool,
    /// pg_hba `md5` with a password stored as MD5: a replayable hash.
    pub md5: bool,
}

impl WeakAuth {
    /// The pg_hba method names keyturn accepts in `allow_weak_auth`.
    pub const NAMES: [&str; 2] = ["password", "md5"];

    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a String>) -> Self {
        let mut w = Self::default();
        for n in names {
            match n.as_str() {
                "password" => w.password = true,
                "md5" => w.md5 = true,
                _ => {}
            }
        }
        w
    }

    fn any(self) -> bool {
        self.password || self.md5
    }
}

/// How one target connects. Built once per pool ([`super::pool`]), whose key
/// holds the CA file's content: a replaced CA file makes a new pool, like a
/// changed DSN file.
#[derive(Clone)]
pub(super) struct Transport {
    /// `None`: no TLS.
    tls: Option<MakeRustlsConnect>,
    weak: WeakAuth,
    connect_timeout: Duration,
}

impl Transport {
    /// `ca` is the `ssl_root_cert` file and its content ([`read_ca`];
    /// required by `verify-full`).
    pub(super) fn new(
        mode: PgTls,
        ca: Option<(&Path, &[u8])>,
        weak: WeakAuth,
        connect_timeout: Duration,
        what: &str,
    ) -> Result<Self, PluginError> {
        let invalid = |m: String| PluginError::new(ErrorKind::Invalid, format!("{what}: {m}"));
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(format!("TLS setup: {e}")))?;
        let tls = match (mode, ca) {
            (PgTls::Disable, _) => None,
            (PgTls::VerifyFull, None) => {
                return Err(invalid(
                    "sslmode = \"verify-full\" needs ssl_root_cert (the CA's PEM file)".into(),
                ));
            }
            (PgTls::VerifyFull, Some((ca, pem))) => {
                Some(builder.with_root_certificates(root_store(ca, pem, what)?))
            }
            (PgTls::Require, _) => Some(
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider))),
            ),
        };
        Ok(Self {
            tls: tls.map(|c| MakeRustlsConnect::new(c.with_no_client_auth())),
            weak,
            connect_timeout,
        })
    }

    /// [`Self::connect`] on the blocking pool: logging in costs the client a
    /// SCRAM key derivation (PBKDF2, 4096 rounds of HMAC-SHA-256), CPU work
    /// that must not hold an async worker (the scheduler, the control socket
    /// and the HTTP listener share them). The connection's I/O still runs on
    /// the runtime: `Handle::block_on` only polls the login future there,
    /// and the runtime's own threads (or, on a current-thread runtime, the
    /// thread blocked in `Runtime::block_on` awaiting this) drive the I/O.
    pub(super) async fn connect_off_worker(
        &self,
        cfg: Config,
        what: String,
    ) -> Result<(Client, JoinHandle<()>), PluginError> {
        use tracing::Instrument;
        let this = self.clone();
        let handle = tokio::runtime::Handle::current();
        // The blocking thread logs where the caller does, in its span.
        let dispatch = tracing::dispatcher::get_default(|d| d.clone());
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            tracing::dispatcher::with_default(&dispatch, || {
                handle.block_on(this.connect(&cfg, &what).instrument(span))
            })
        })
        .await
        .unwrap_or_else(|e| {
            Err(PluginError::new(
                ErrorKind::Fatal,
                format!("postgres login task failed: {e}"),
            ))
        })
    }

    /// Connects and drives the connection on its own task (tokio-postgres'
    /// split design), whose handle is returned; it ends when the client is
    /// dropped.
    pub(super) async fn connect(
        &self,
        cfg: &Config,
        what: &str,
    ) -> Result<(Client, JoinHandle<()>), PluginError> {
        // tokio-postgres' own timeout covers opening the socket only: a
        // server (or a proxy) that accepts and then never answers would hold
        // the login, and the step, for ever.
        tokio::time::timeout(self.connect_timeout, self.connect_unbounded(cfg, what))
            .await
            .unwrap_or_else(|_| {
                Err(PluginError::new(
                    ErrorKind::Transient,
                    format!(
                        "{what}: no answer within connect_timeout ({}): the server accepted the connection but did not complete the login",
                        humantime::format_duration(self.connect_timeout)
                    ),
                ))
            })
    }

    /// The bound on one step's statements on a connection: the server ends
    /// each statement at `statement_timeout` (the connect timeout), so a
    /// step with no answer for twice that has lost its server.
    pub(super) fn answer_within(&self) -> Duration {
        self.connect_timeout * 2
    }

    async fn connect_unbounded(
        &self,
        cfg: &Config,
        what: &str,
    ) -> Result<(Client, JoinHandle<()>), PluginError> {
        let mut cfg = cfg.clone();
        cfg.connect_timeout(self.connect_timeout);
        let client = match &self.tls {
            Some(tls) => {
                // Allowing a weak method means the server may skip SCRAM, and
                // with it the binding; it is still inside TLS.
                let binding = if self.weak.any() {
                    ChannelBinding::Prefer
                } else {
                    ChannelBinding::Require
                };
                cfg.ssl_mode(SslMode::Require).channel_binding(binding);
                let (client, conn) = cfg
                    .connect(tls.clone())
                    .await
                    .map_err(|e| refusal(what, &e, self.weak))?;
                (client, spawn(conn))
            }
            None => {
                cfg.ssl_mode(SslMode::Disable);
                let socket = open_socket(&cfg, self.connect_timeout, what).await?;
                let guard = AuthGuard {
                    inner: socket,
                    seen: BytesMut::new(),
                    weak: self.weak,
                    decided: false,
                };
                let (client, conn) = cfg
                    .connect_raw(guard, NoTls)
                    .await
                    .map_err(|e| refusal(what, &e, self.weak))?;
                (client, spawn(conn))
            }
        };
        Ok(client)
    }
}

fn spawn<F>(conn: F) -> JoinHandle<()>
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "postgres connection ended");
        }
    })
}

/// The content of the `ssl_root_cert` file `ca`; messages name the file.
pub(super) async fn read_ca(ca: &Path, what: &str) -> Result<Vec<u8>, PluginError> {
    tokio::fs::read(ca).await.map_err(|e| {
        PluginError::io(
            format!("{what}: reading ssl_root_cert {}", ca.display()),
            &e,
        )
    })
}

/// The CAs in `pem`, the content of the file `ca`; messages name the file.
fn root_store(ca: &Path, pem: &[u8], what: &str) -> Result<RootCertStore, PluginError> {
    let bad = |m: String| {
        PluginError::new(
            ErrorKind::Invalid,
            format!("{what}: ssl_root_cert {}: {m}", ca.display()),
        )
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| bad(format!("not PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad(
            "holds no certificate (expected one or more PEM `CERTIFICATE` blocks)".into(),
        ));
    }
    Ok(roots)
}

/// `sslmode = "require"`: encryption without knowing who is at the other end
/// (libpq's meaning). The handshake's signatures are still checked, so the
/// peer holds the key of the certificate it showed, which is what channel
/// binding then ties the SCRAM login to.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A socket of either kind, for [`Config::connect_raw`].
trait Socket: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Socket for T {}

/// Opens a socket to the first of the DSN's hosts that answers, in order, as
/// libpq and tokio-postgres try them (a `hostaddr` replaces its host's name;
/// one port may serve every host).
async fn open_socket(
    cfg: &Config,
    timeout: Duration,
    what: &str,
) -> Result<Box<dyn Socket>, PluginError> {
    let ports = cfg.get_ports();
    let port = |i: usize| ports.get(i).or(ports.first()).copied().unwrap_or(5432);
    let addrs = cfg.get_hostaddrs();
    let mut last = None;
    let hosts = cfg.get_hosts();
    let count = hosts.len().max(addrs.len());
    if count == 0 {
        return Err(PluginError::new(
            ErrorKind::Invalid,
            format!("{what}: the DSN names no host (host=... or hostaddr=...)"),
        ));
    }
    for i in 0..count {
        let opened: io::Result<Box<dyn Socket>> = async {
            match (addrs.get(i), hosts.get(i)) {
                (Some(ip), _) => tcp((*ip, port(i)), timeout).await,
                (None, Some(Host::Tcp(name))) => tcp((name.as_str(), port(i)), timeout).await,
                (None, Some(Host::Unix(dir))) => {
                    let path = dir.join(format!(".s.PGSQL.{}", port(i)));
                    let s = tokio::time::timeout(timeout, UnixStream::connect(path))
                        .await
                        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "timed out"))??;
                    Ok(Box::new(s) as Box<dyn Socket>)
                }
                (None, None) => unreachable!("i < max(hosts, addrs)"),
            }
        }
        .await;
        match opened {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    let e = last.expect("at least one host was tried");
    Err(PluginError::new(
        ErrorKind::Transient,
        format!("{what}: error connecting to server: {e}"),
    ))
}

async fn tcp(
    addr: impl tokio::net::ToSocketAddrs,
    timeout: Duration,
) -> io::Result<Box<dyn Socket>> {
    let s = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "timed out"))??;
    s.set_nodelay(true)?;
    Ok(Box::new(s))
}

/// Why [`AuthGuard`] stopped a connection: the pg_hba method the server asked for.
#[derive(Debug)]
struct WeakAuthRefused(&'static str);

impl fmt::Display for WeakAuthRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the server asked for `{}` authentication", self.0)
    }
}

impl std::error::Error for WeakAuthRefused {}

/// A plain connection's socket, watched until the server says how the client
/// must authenticate. A request for the password in clear text or as MD5
/// fails the read that carries it, so tokio-postgres never answers it.
struct AuthGuard<S> {
    inner: S,
    /// What the server sent so far, until `decided`.
    seen: BytesMut,
    weak: WeakAuth,
    decided: bool,
}

impl<S> AuthGuard<S> {
    /// Looks at the server's first message once it is complete: it says
    /// how to authenticate (or that no password is needed, or an error), and
    /// the method cannot change after it.
    fn inspect(&mut self) -> io::Result<()> {
        let Some(message) = Message::parse(&mut self.seen)? else {
            return Ok(()); // wait for the rest of the message
        };
        self.decided = true;
        self.seen = BytesMut::new();
        let refused = match message {
            Message::AuthenticationCleartextPassword if !self.weak.password => "password",
            Message::AuthenticationMd5Password(_) if !self.weak.md5 => "md5",
            _ => return Ok(()),
        };
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            WeakAuthRefused(refused),
        ))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if !this.decided {
            this.seen.extend_from_slice(&buf.filled()[before..]);
            this.inspect()?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthGuard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A connection error, with a refused password exchange explained: what the
/// server asked for, why keyturn did not answer, and what to change.
fn refusal(what: &str, e: &tokio_postgres::Error, weak: WeakAuth) -> PluginError {
    let refused = std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<io::Error>())
        .and_then(|io| io.get_ref())
        .and_then(|c| c.downcast_ref::<WeakAuthRefused>());
    let text = format!("{e}{}", super::cause(e));
    let why = match refused {
        Some(WeakAuthRefused("password")) => {
            "the server asked for the password in clear text (pg_hba.conf method `password`)"
        }
        Some(_) => {
            "the server asked for an MD5 password hash (pg_hba.conf method `md5` with the \
             role's password stored as MD5), which anyone who sees it can replay"
        }
        // Over TLS with the binding required, tokio-postgres refuses every
        // method but SCRAM-SHA-256-PLUS with these words.
        None if !weak.any() && text.contains("channel binding") => {
            "the server did not use SCRAM with channel binding over TLS (it asked for a \
             clear-text or MD5 password, or skipped authentication)"
        }
        None => return super::pg_error(what, e, &[]),
    };
    PluginError::new(
        ErrorKind::Invalid,
        format!(
            "{what}: {why}; keyturn refused to send the password. Use `scram-sha-256` in \
             pg_hba.conf (with the password stored as SCRAM), or accept the risk with \
             allow_weak_auth = [\"password\", \"md5\"] in the target"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server's messages, framed as on the wire.
    fn frames(messages: &[(u8, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (tag, body) in messages {
            out.push(*tag);
            out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
            out.extend_from_slice(body);
        }
        out
    }

    /// Feeds `wire` to a guard one byte at a time (a message may arrive in
    /// pieces) and returns the refusal, if any.
    fn guard(wire: &[u8], weak: WeakAuth) -> Option<&'static str> {
        let mut g = AuthGuard {
            inner: (),
            seen: BytesMut::new(),
            weak,
            decided: false,
        };
        for b in wire {
            if g.decided {
                break;
            }
            g.seen.extend_from_slice(&[*b]);
            if let Err(e) = g.inspect() {
                let r = e
                    .get_ref()
                    .and_then(|c| c.downcast_ref::<WeakAuthRefused>());
                return Some(r.expect("a refusal").0);
            }
        }
        None
    }

    #[test]
    fn guard_refuses_clear_text_and_md5_unless_allowed() {
        let cleartext = frames(&[(b'R', &3i32.to_be_bytes())]);
        let md5 = frames(&[(b'R', &[0, 0, 0, 5, 1, 2, 3, 4])]);
        let sasl = frames(&[
            (b'R', b"\0\0\0\x0aSCRAM-SHA-256\0\0"),
            (b'R', &3i32.to_be_bytes()),
        ]);
        let none = WeakAuth::default();
        assert_eq!(guard(&cleartext, none), Some("password"));
        assert_eq!(guard(&md5, none), Some("md5"));
        // SASL settles the method: later bytes are not inspected.
        assert_eq!(guard(&sasl, none), None);
        let both = WeakAuth::from_names(&["password".to_owned(), "md5".to_owned()]);
        assert_eq!(guard(&cleartext, both), None);
        assert_eq!(guard(&md5, both), None);
        let md5_only = WeakAuth::from_names(&["md5".to_owned()]);
        assert_eq!(guard(&cleartext, md5_only), Some("password"));
    }
}
