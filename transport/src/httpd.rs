//! A small HTTP/1.1 server for one read-only page: the OpenMetrics text a Prometheus server
//! scrapes (`GET /metrics`). The only module naming hyper.
//!
//! It serves nothing else and reads no request body: any other path is 404, any other method
//! 405. At most [`MAX_CONNECTIONS`] are served at once, one request each; headers must come
//! within [`HEADER_TIMEOUT`], and a connection is cut after [`CONNECTION_LIMIT`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info};

/// What Prometheus asks for and OpenMetrics 1.0 names.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Longest a client may hold a connection open.
const CONNECTION_LIMIT: Duration = Duration::from_secs(30);
/// Longest a client may take to send its request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Most connections served at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 8;

/// Renders the page at scrape time.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Binds `addr` (TCP) and logs the address it got (`metrics listening addr=...`).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await?;
    info!(addr = %listener.local_addr()?, "metrics listening");
    Ok(listener)
}

/// Serves `render()` at `/metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, render: Render) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: wait rather than spin.
                debug!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let render = render.clone();
                async move { Ok::<_, Infallible>(answer(&req, &render)) }
            });
            // One request per connection (what Prometheus needs), headers within a few
            // seconds: a slow or idle client holds one of the few slots only briefly.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .max_buf_size(64 << 10)
                .serve_connection(TokioIo::new(stream), svc);
            match tokio::time::timeout(CONNECTION_LIMIT, conn).await {
                Ok(Err(e)) => debug!(%peer, "metrics: connection: {e}"),
                Err(_) => debug!(%peer, "metrics: connection held too long, closed"),
                Ok(Ok(())) => {}
            }
        });
    }
}

fn answer(req: &Request<Incoming>, render: &Render) -> Response<Full<Bytes>> {
    let (status, body, content_type) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => (StatusCode::OK, render(), OPENMETRICS),
        (_, "/metrics") => (StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into(), "text/plain"),
        _ => (StatusCode::NOT_FOUND, "metrics are at /metrics\n".into(), "text/plain"),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_the_page_at_metrics_and_nothing_else() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let n = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let seen = n.clone();
        let render: Render = Arc::new(move || {
            let i = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            format!("# TYPE x gauge\nx {i}\n# EOF\n")
        });
        let task = tokio::spawn(serve(listener, render));
        let close = "Connection: close\r\n\r\n";
        let a = get(addr, &format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{close}")).await;
        assert!(a.starts_with("HTTP/1.1 200"), "{a}");
        assert!(a.contains("application/openmetrics-text"), "{a}");
        assert!(a.ends_with("x 0\n# EOF\n"), "{a}");
        let b = get(addr, &format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{close}")).await;
        assert!(b.ends_with("x 1\n# EOF\n"), "rendered at each scrape: {b}");
        let c = get(addr, &format!("GET /etc/passwd HTTP/1.1\r\nHost: x\r\n{close}")).await;
        assert!(c.starts_with("HTTP/1.1 404"), "{c}");
        let d =
            get(addr, &format!("POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n{close}")).await;
        assert!(d.starts_with("HTTP/1.1 405"), "{d}");
        let e = get(addr, "NOT HTTP AT ALL\r\n\r\n").await;
        assert!(e.is_empty() || e.starts_with("HTTP/1.1 400"), "{e}");
        task.abort();
    }
}
