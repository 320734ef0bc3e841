//! The small HTTP server plumbing shared by the notification listener, the
//! admin listener and the demo's stand-in MDM: one accept loop over hyper,
//! bodies read with a size cap, JSON answers, and graceful shutdown that lets
//! in-flight requests finish.
//!
//! Every connection costs a file descriptor, so a server bounds them: at most
//! [`ConnectionLimits::max_connections`] at once (more wait in the kernel's
//! backlog until one closes), a connection that sends nothing is closed after
//! `idle_timeout`, a request head must arrive within `header_read_timeout` of
//! its first byte and a body within `body_read_timeout` of the handler asking
//! for it. Accept errors (EMFILE when the process is out of descriptors) back
//! off instead of spinning.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};

pub type Body = Full<Bytes>;

/// A request handler: everything a server needs from its owner.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: Request<Incoming>) -> impl Future<Output = Response<Body>> + Send;
}

/// What one listener lets its clients hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// A connection with no request under way (new, or between keep-alive
    /// requests) is closed after this long.
    pub idle_timeout: Duration,
    /// From the first byte of a request to the end of its head.
    pub header_read_timeout: Duration,
    /// From the handler asking for a body to its last byte.
    pub body_read_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 1024,
            idle_timeout: Duration::from_secs(75),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
        }
    }
}

/// A running server; dropping the handle does not stop it, `shutdown` does.
pub struct Server {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Serves `handler` on an already bound listener, with default limits.
    pub fn start<H: Handler>(listener: TcpListener, handler: Arc<H>) -> io::Result<Server> {
        Server::start_with(listener, handler, ConnectionLimits::default())
    }

    /// Serves `handler` on an already bound listener.
    pub fn start_with<H: Handler>(
        listener: TcpListener,
        handler: Arc<H>,
        limits: ConnectionLimits,
    ) -> io::Result<Server> {
        let local_addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, handler, limits, stopped));
        Ok(Server {
            local_addr,
            stop,
            task,
        })
    }

    pub async fn bind<H: Handler>(addr: &str, handler: Arc<H>) -> io::Result<Server> {
        let listener = TcpListener::bind(addr).await?;
        Server::start(listener, handler)
    }

    /// Serves on `given` when the caller bound it already, else binds `addr`.
    pub async fn serve<H: Handler>(
        given: Option<TcpListener>,
        addr: &str,
        handler: Arc<H>,
        limits: ConnectionLimits,
    ) -> io::Result<Server> {
        let listener = match given {
            Some(listener) => listener,
            None => TcpListener::bind(addr).await?,
        };
        Server::start_with(listener, handler, limits)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets in-flight requests finish, and waits for them.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn wait_stopped(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|s| *s).await;
}

async fn accept_loop<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    limits: ConnectionLimits,
    mut stopped: watch::Receiver<bool>,
) {
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut backoff = AcceptBackoff::default();
    let mut connections = JoinSet::new();
    loop {
        // A slot first, then accept: at the bound, new connections wait in
        // the kernel's backlog instead of taking a descriptor each.
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = wait_stopped(&mut stopped) => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = wait_stopped(&mut stopped) => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                if let Some(failures) = backoff.succeeded() {
                    tracing::info!(listener = %local, failures, "accepting connections again");
                }
                stream
            }
            Err(error) => {
                let now = Instant::now();
                let (delay, log) = backoff.failed(now);
                if let Some(suppressed) = log {
                    tracing::warn!(listener = %local, %error, retry_in = ?delay, suppressed, "cannot accept a connection; backing off");
                }
                drop(permit);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => continue,
                    _ = wait_stopped(&mut stopped) => break,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        connections.spawn(serve_connection(
            stream,
            handler.clone(),
            limits,
            stopped.clone(),
            permit,
        ));
        // Reap finished connections so the set does not grow.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

async fn serve_connection<H: Handler>(
    stream: tokio::net::TcpStream,
    handler: Arc<H>,
    limits: ConnectionLimits,
    mut stopped: watch::Receiver<bool>,
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    let phase = Arc::new(Mutex::new(PhaseCell {
        phase: Phase::Idle {
            since: Instant::now(),
        },
        reader: None,
    }));
    let io = Guarded {
        inner: stream,
        phase: phase.clone(),
        limits,
        timer: Box::pin(tokio::time::sleep(limits.idle_timeout)),
    };
    let service = hyper::service::service_fn(move |req| {
        let handler = handler.clone();
        let phase = phase.clone();
        set_phase(&phase, Phase::Busy);
        async move {
            let response = handler.handle(req).await;
            set_phase(
                &phase,
                Phase::Idle {
                    since: Instant::now(),
                },
            );
            Ok::<_, Infallible>(response)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service);
    let driven = async move {
        tokio::pin!(conn);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "connection closed");
                }
            }
            _ = wait_stopped(&mut stopped) => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    };
    BODY_READ_TIMEOUT
        .scope(limits.body_read_timeout, driven)
        .await;
}

tokio::task_local! {
    // Set for the connection task, so that `read_body` and `drain` (called
    // by handlers, which only see the body) know the listener's limit.
    static BODY_READ_TIMEOUT: Duration;
}

/// Where a connection is between requests; the service moves it to `Busy`
/// when a head is complete and back to `Idle` once the answer is ready.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// No byte of a request yet.
    Idle { since: Instant },
    /// Some of a request head arrived.
    Head { deadline: Instant },
    /// A handler owns the request; its body has its own deadline.
    Busy,
}

/// A connection's phase, and the read that waited while a handler had the
/// request.
struct PhaseCell {
    phase: Phase,
    /// hyper also reads while a request is being handled (to notice a
    /// client that hung up), and that read, taken while `Busy`, arms no
    /// timer. Once the answer is ready the connection is idle, but nothing
    /// may read again until the client sends a byte: without a wake-up
    /// here, the idle timeout never started and the connection held its
    /// slot for good.
    reader: Option<Waker>,
}

fn set_phase(cell: &Mutex<PhaseCell>, to: Phase) {
    let reader = {
        let mut cell = cell.lock().unwrap_or_else(|e| e.into_inner());
        cell.phase = to;
        match to {
            Phase::Idle { .. } => cell.reader.take(),
            _ => None,
        }
    };
    if let Some(reader) = reader {
        reader.wake();
    }
}

/// The socket as hyper sees it, with the idle and header deadlines enforced
/// on reads: hyper reads only when it wants the next request, so a read that
/// waits past the deadline is a client that has not sent one.
struct Guarded<S> {
    inner: S,
    phase: Arc<Mutex<PhaseCell>>,
    limits: ConnectionLimits,
    timer: Pin<Box<Sleep>>,
}

impl<S> Guarded<S> {
    /// The deadline of the read under way; `waiting`, the reader to wake
    /// when a handler's answer leaves the connection idle.
    fn deadline(
        &self,
        got_bytes: bool,
        waiting: Option<&Waker>,
    ) -> Option<(Instant, &'static str)> {
        let mut cell = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        if got_bytes && matches!(cell.phase, Phase::Idle { .. }) {
            cell.phase = Phase::Head {
                deadline: Instant::now() + self.limits.header_read_timeout,
            };
        }
        match cell.phase {
            Phase::Idle { since } => Some((since + self.limits.idle_timeout, "idle timeout")),
            Phase::Head { deadline } => Some((deadline, "request head timeout")),
            Phase::Busy => {
                if let Some(waker) = waiting {
                    cell.reader = Some(waker.clone());
                }
                None
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.deadline(true, None);
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        let Some((deadline, what)) = this.deadline(false, Some(cx.waker())) else {
            return Poll::Pending;
        };
        if this.timer.deadline() != deadline {
            this.timer.as_mut().reset(deadline);
        }
        match this.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// How the accept loop waits after failures: doubling from 10 ms to 1 s, so
/// that running out of descriptors neither spins a core nor stalls accepts
/// for long once one is free; and one log line per 10 s at most.
#[derive(Debug, Default)]
struct AcceptBackoff {
    /// Failures in a row.
    failures: u64,
    delay: Duration,
    last_log: Option<Instant>,
    /// Failures since the last line logged.
    unlogged: u64,
}

const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

impl AcceptBackoff {
    /// The pause before the next accept, and `Some(failures not logged
    /// before this one)` when this failure should be logged.
    fn failed(&mut self, now: Instant) -> (Duration, Option<u64>) {
        self.failures += 1;
        self.delay = if self.delay.is_zero() {
            ACCEPT_BACKOFF_MIN
        } else {
            (self.delay * 2).min(ACCEPT_BACKOFF_MAX)
        };
        let log = match self.last_log {
            Some(at) if now.duration_since(at) < ACCEPT_LOG_EVERY => {
                self.unlogged += 1;
                None
            }
            _ => {
                self.last_log = Some(now);
                Some(std::mem::take(&mut self.unlogged))
            }
        };
        (self.delay, log)
    }

    /// Resets after an accept; the failures in a row, if there were any.
    fn succeeded(&mut self) -> Option<u64> {
        let failures = std::mem::take(&mut self.failures);
        self.delay = Duration::ZERO;
        self.unlogged = 0;
        self.last_log = None;
        (failures > 0).then_some(failures)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("body larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("body not received within {}", humanize(*.after))]
    TimedOut { after: Duration },
    #[error("body could not be read: {0}")]
    Read(String),
}

impl BodyError {
    /// The answer a handler gives for it.
    pub fn status(&self) -> StatusCode {
        match self {
            BodyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::TimedOut { .. } => StatusCode::REQUEST_TIMEOUT,
            BodyError::Read(_) => StatusCode::BAD_REQUEST,
        }
    }
}

fn humanize(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// Reads a whole body, refusing it once it passes `limit` bytes or when it
/// is not complete within the listener's body read timeout.
pub async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, BodyError> {
    let collected = match BODY_READ_TIMEOUT.try_with(|t| *t) {
        Ok(after) => tokio::time::timeout(after, Limited::new(body, limit).collect())
            .await
            .map_err(|_| BodyError::TimedOut { after })?,
        Err(_) => Limited::new(body, limit).collect().await,
    };
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) => {
            if error
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(BodyError::TooLarge { limit })
            } else {
                Err(BodyError::Read(error.to_string()))
            }
        }
    }
}

/// Reads and discards up to `max` bytes of a body we refuse, so that the
/// client finishes sending and reads our answer (instead of a reset
/// connection and no status at all). Gives up at the body read timeout.
pub async fn drain(body: Incoming, max: usize) {
    match BODY_READ_TIMEOUT.try_with(|t| *t) {
        Ok(after) => {
            let _ = tokio::time::timeout(after, drain_all(body, max)).await;
        }
        Err(_) => drain_all(body, max).await,
    }
}

async fn drain_all(mut body: Incoming, max: usize) {
    let mut seen = 0usize;
    while seen <= max {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    seen += data.len();
                }
            }
            _ => return,
        }
    }
}

/// Bodies up to this size are drained before a 413; larger ones are cut off.
pub const DRAIN_LIMIT: usize = 16 << 20;

/// The declared length, where the client sent one: lets a server refuse an
/// oversized body before reading it.
pub fn content_length<B>(req: &Request<B>) -> Option<u64> {
    req.headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Whether the request declares a JSON body (`application/json`, any parameters).
pub fn is_json<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/json")
        })
        .unwrap_or(false)
}

/// The bearer value of an `Authorization` header, if it has that form.
pub fn bearer<B>(req: &Request<B>) -> Option<&str> {
    let value = req
        .headers()
        .get(hyper::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        Some(rest.trim())
    } else {
        None
    }
}

/// Constant-time equality of a presented secret with the expected one.
pub fn secret_matches(presented: Option<&str>, expected: &str) -> bool {
    use subtle::ConstantTimeEq;
    match presented {
        Some(p) => p.as_bytes().ct_eq(expected.as_bytes()).into(),
        None => false,
    }
}

/// How long a client told `503` waits before it tries again.
pub const RETRY_AFTER_SECS: u32 = 5;

/// A `503` carries `Retry-After`, so Apple and MDMs retry (rather than
/// give up) what vppd could not make durable now.
pub fn unavailable_retry(mut response: Response<Body>) -> Response<Body> {
    if response.status() == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(
            hyper::header::RETRY_AFTER,
            hyper::header::HeaderValue::from(RETRY_AFTER_SECS),
        );
    }
    response
}

pub fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(bytes) => bytes_response(status, "application/json", bytes.into()),
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "serialization failed\n"),
    }
}

pub fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    bytes_response(
        status,
        "text/plain; charset=utf-8",
        Bytes::from_static(body.as_bytes()),
    )
}

pub fn bytes_response(
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
) -> Response<Body> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}

/// Parses the query string into pairs, percent-decoded.
pub fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    let Some(q) = query else { return Vec::new() };
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Percent-encodes a query value (RFC 3986 unreserved characters pass).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_round_trip() {
        for s in ["a b", "x&y=z", "100%", "ünï", "plain-._~"] {
            assert_eq!(percent_decode(&percent_encode(s)), s);
        }
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn accept_failures_back_off_to_a_ceiling_and_log_rarely() {
        let mut b = AcceptBackoff::default();
        let t0 = Instant::now();
        let mut delays = Vec::new();
        let mut logged = Vec::new();
        for i in 0..200u32 {
            // 200 failures over 20 s.
            let (delay, log) = b.failed(t0 + Duration::from_millis(100) * i);
            delays.push(delay);
            logged.extend(log);
        }
        assert_eq!(delays[0], ACCEPT_BACKOFF_MIN);
        assert_eq!(delays[1], ACCEPT_BACKOFF_MIN * 2);
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*delays.last().unwrap(), ACCEPT_BACKOFF_MAX);
        // One line at once, then one per 10 s carrying what it left out.
        assert_eq!(logged, vec![0, 99]);
        assert_eq!(b.succeeded(), Some(200));
        assert_eq!(b.succeeded(), None);
        assert_eq!(b.failed(t0).0, ACCEPT_BACKOFF_MIN);
    }

    #[test]
    fn secrets_compare() {
        assert!(secret_matches(Some("abc"), "abc"));
        assert!(!secret_matches(Some("abd"), "abc"));
        assert!(!secret_matches(Some("ab"), "abc"));
        assert!(!secret_matches(None, "abc"));
    }
}
