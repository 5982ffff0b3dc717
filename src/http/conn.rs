//! Connections: accepting them (at most `server.max_connections` open at once), serving
//! each with hyper's HTTP/1 (`server.header_read_timeout_secs`), draining them on
//! shutdown, and giving hyper's own error answers (400, 414, 431, written before any
//! route runs) the API's JSON error body.
//!
//! Why these bounds: without them, sockets that never send a request (or send it a byte
//! at a time) are held forever, each with a task, buffers and a file descriptor; about
//! 20,000 from one client exhausted the file limit and took `/healthz` down. hyper's
//! header-read timer starts whenever a connection waits for a request head, on opening
//! and after each response on a kept-alive connection, so the one timeout closes
//! slowloris sockets and idle keep-alive sockets alike. At the cap, a new connection
//! makes the one idle longest close (idle: no request being served and no response being
//! written), so idle sockets cannot keep a probe or a client out; only when every
//! connection is busy does the accept loop wait, new connections queuing in the kernel's
//! listen backlog. HTTP/1 only: hyper's HTTP/2 has no header-read timer.

use std::collections::HashMap;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::Router;
use http_body_util::BodyExt;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, Semaphore};
use tower::ServiceExt;

use super::error::AppError;

/// How connections are bounded (from `server.*`).
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Longest wait for a complete request head: from the connection opening, or from
    /// the previous response on a kept-alive connection.
    pub header_read_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
}

/// Serves `router` on `listener` until `stop` resolves, then stops accepting and waits
/// until every open connection has finished its in-flight request and closed (the caller
/// bounds that wait).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    stop: impl Future<Output = ()>,
) {
    let room = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let open = Arc::new(Open::default());
    let (stopping_tx, stopping_rx) = watch::channel(false);
    // Every connection task holds a receiver; `closed` resolves when the last one ends.
    let (drained_tx, drained_rx) = watch::channel(());
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut stop = pin!(stop);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    if !is_connection_error(&err) {
                        // Out of file descriptors, most likely: wait rather than spin.
                        tracing::error!(error = %err, "accept failed");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = &mut stop => break,
                        }
                    }
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let permit = match Arc::clone(&room).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                // Full: close the connection that has been idle longest (it sends nothing,
                // or trickles a request head), so idle sockets cannot keep anyone else out;
                // when every connection is busy, wait for one to finish.
                open.evict_longest_idle();
                tokio::select! {
                    permit = Arc::clone(&room).acquire_owned() => permit.expect("never closed"),
                    _ = &mut stop => break,
                }
            }
        };
        let (id, evict) = open.add();
        let service = {
            let (router, open) = (router.clone(), Arc::clone(&open));
            hyper::service::service_fn(move |request| {
                let busy = Busy::begin(Arc::clone(&open), id);
                let router = router.clone();
                async move {
                    let response = router.oneshot(request).await?;
                    // The connection is busy until hyper has written (and dropped) the body.
                    Ok::<_, std::convert::Infallible>(response.map(|body| {
                        Body::new(body.map_frame(move |frame| {
                            let _ = &busy;
                            frame
                        }))
                    }))
                }
            })
        };
        let io = JsonParseErrors::new(TokioIo::new(stream));
        let conn = http.serve_connection(io, service);
        let (open, mut stopping, drained) =
            (Arc::clone(&open), stopping_rx.clone(), drained_rx.clone());
        tokio::spawn(async move {
            let mut conn = pin!(conn);
            let mut draining = false;
            loop {
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(err) = result {
                            tracing::debug!(error = %err, "connection ended with an error");
                        }
                        break;
                    }
                    _ = evict.notified() => {
                        if !open.is_busy(id) {
                            break;
                        }
                        // A request arrived meanwhile: answer it, then close.
                        conn.as_mut().graceful_shutdown();
                    }
                    _ = stopping.wait_for(|s| *s), if !draining => {
                        draining = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
            if open.remove(id) {
                // glibc keeps what the flood's connections freed; hand it back.
                crate::embed::release_freed_memory();
            }
            drop((permit, drained));
        });
    }
    drop(listener);
    let _ = stopping_tx.send(true);
    drop(drained_rx);
    drained_tx.closed().await;
}

/// The open connections: whether each is serving a request (or writing its response),
/// and since when it is idle.
#[derive(Default)]
struct Open {
    // A std mutex: held for a few map operations, never across an await.
    conns: Mutex<Conns>,
}

#[derive(Default)]
struct Conns {
    next: u64,
    by_id: HashMap<u64, Conn>,
    /// Most connections open at once since memory was last released.
    peak: usize,
}

/// Open connections count as a flood worth releasing memory after.
const FLOOD: usize = 256;

struct Conn {
    busy: usize,
    idle_since: Instant,
    evict: Arc<Notify>,
    evicting: bool,
}

impl Open {
    fn add(&self) -> (u64, Arc<Notify>) {
        let evict = Arc::new(Notify::new());
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.next += 1;
        let id = conns.next;
        let conn = Conn {
            busy: 0,
            idle_since: Instant::now(),
            evict: Arc::clone(&evict),
            evicting: false,
        };
        conns.by_id.insert(id, conn);
        conns.peak = conns.peak.max(conns.by_id.len());
        (id, evict)
    }

    /// Forgets a closed connection; true when a flood of connections has receded (at
    /// least `FLOOD` were open, now at most a quarter of that peak).
    fn remove(&self, id: u64) -> bool {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.by_id.remove(&id);
        let receded = conns.peak >= FLOOD && conns.by_id.len() * 4 <= conns.peak;
        if receded {
            conns.peak = conns.by_id.len();
        }
        receded
    }

    fn is_busy(&self, id: u64) -> bool {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.by_id.get(&id).is_some_and(|c| c.busy > 0)
    }

    fn set_busy(&self, id: u64, begin: bool) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(conn) = conns.by_id.get_mut(&id) {
            if begin {
                conn.busy += 1;
            } else {
                conn.busy -= 1;
                conn.idle_since = Instant::now();
            }
        }
    }

    /// Asks the connection idle longest to close (none when every one is busy).
    fn evict_longest_idle(&self) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let oldest = conns
            .by_id
            .values_mut()
            .filter(|c| c.busy == 0 && !c.evicting)
            .min_by_key(|c| c.idle_since);
        if let Some(conn) = oldest {
            conn.evicting = true;
            conn.evict.notify_one();
        }
    }
}

/// A request being served on a connection, until its response body is dropped.
struct Busy {
    open: Arc<Open>,
    id: u64,
}

impl Busy {
    fn begin(open: Arc<Open>, id: u64) -> Self {
        open.set_busy(id, true);
        Self { open, id }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.open.set_busy(self.id, false);
    }
}

/// Errors of one connection, not of the listener: accept the next.
fn is_connection_error(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// A connection whose writes pass through unchanged, except hyper's automatic answer to
/// a request it could not parse (a bodiless 400, 414 or 431 followed by closing the
/// connection), which is replaced by the same status with the API's JSON error body.
/// hyper writes such an answer in place of any response, as the connection's last bytes,
/// and offers no hook to give it a body.
struct JsonParseErrors<T> {
    inner: T,
    /// The replacement being written: its bytes, how many are written, and how many bytes
    /// of hyper's answer it stands for.
    replacing: Option<(Vec<u8>, usize, usize)>,
}

impl<T> JsonParseErrors<T> {
    fn new(inner: T) -> Self {
        Self {
            inner,
            replacing: None,
        }
    }
}

/// The replacement for hyper's automatic answer in `buf`, if `buf` is one.
fn shaped_parse_error(buf: &[u8]) -> Option<Vec<u8>> {
    // Every write passes here: reject anything that is not a short 4xx head cheaply.
    if buf.len() > 512 || !buf.starts_with(b"HTTP/1.1 4") {
        return None;
    }
    let head = std::str::from_utf8(buf).ok()?;
    if !head.ends_with("\r\n\r\n") {
        return None;
    }
    let mut lines = head.split("\r\n");
    let status = lines.next()?.strip_prefix("HTTP/1.1 ")?;
    let headers: Vec<&str> = lines.filter(|l| !l.is_empty()).collect();
    if !(headers.contains(&"content-length: 0") && headers.contains(&"connection: close")) {
        return None;
    }
    let error = match status.get(..3)? {
        "400" => AppError::MalformedRequest,
        "414" => AppError::UriTooLong,
        "431" => AppError::HeadersTooLarge,
        _ => return None,
    };
    let body = error.json_body();
    let mut out = format!(
        "HTTP/1.1 {status}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    )
    .into_bytes();
    for header in headers.iter().filter(|h| h.starts_with("date: ")) {
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    Some(out)
}

impl<T: Read + Unpin> Read for JsonParseErrors<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for JsonParseErrors<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.replacing.is_none() {
            match shaped_parse_error(buf) {
                Some(replacement) => this.replacing = Some((replacement, 0, buf.len())),
                None => return Pin::new(&mut this.inner).poll_write(cx, buf),
            }
        }
        let (bytes, written, stands_for) = this.replacing.as_mut().expect("set above");
        while *written < bytes.len() {
            match Pin::new(&mut this.inner).poll_write(cx, &bytes[*written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => *written += n,
                other => return other,
            }
        }
        // hyper closes the connection after this answer; nothing else is written.
        Poll::Ready(Ok(*stands_for))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        // hyper's automatic answer is a head alone, so one buffer.
        let first = bufs.iter().find(|b| !b.is_empty());
        if self.replacing.is_some() || first.is_some_and(|b| shaped_parse_error(b).is_some()) {
            let first = first.map_or(&[][..], |b| &b[..]);
            return self.poll_write(cx, first);
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hyper_automatic_answers_get_a_json_body() {
        let hyper_414 = b"HTTP/1.1 414 URI Too Long\r\nconnection: close\r\ncontent-length: 0\r\ndate: Fri, 04 Dec 2026 17:54:06 GMT\r\n\r\n";
        let shaped = String::from_utf8(shaped_parse_error(hyper_414).unwrap()).unwrap();
        let (head, body) = shaped.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{head}");
        assert!(head.contains("content-type: application/json"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(head.contains("date: Fri, 04 Dec 2026"));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["type"], "uri_too_long");
    }

    #[test]
    fn ordinary_responses_pass_unchanged() {
        for buf in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"[..],
            b"HTTP/1.1 414 URI Too Long\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n",
            b"{\"error\": \"HTTP/1.1 400 \"}",
        ] {
            assert!(shaped_parse_error(buf).is_none(), "{buf:?}");
        }
    }
}
