use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

/// Errors starting the exporter.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen for /metrics on {addr}: {reason} (is another run using this port? set [metrics] listen)")]
    Bind { addr: String, reason: String },
}

/// A running `/metrics` endpoint; stops when dropped.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    pub addr: SocketAddr,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves the global registry on `http://{addr}/metrics`.
pub fn serve(addr: &str) -> Result<MetricsServer, ServeError> {
    let server = tiny_http::Server::http(addr).map_err(|e| ServeError::Bind {
        addr: addr.to_string(),
        reason: e.to_string(),
    })?;
    let local = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| ServeError::Bind { addr: addr.to_string(), reason: "not an IP socket".into() })?;
    let server = Arc::new(server);
    let s2 = server.clone();
    let thread = std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for req in s2.incoming_requests() {
                let resp = if req.url().starts_with("/metrics") {
                    let body = crate::global().encode();
                    let header = tiny_http::Header::from_bytes(
                        &b"Content-Type"[..],
                        &b"text/plain; version=0.0.4; charset=utf-8"[..],
                    )
                    .expect("static header is valid");
                    tiny_http::Response::from_string(body).with_header(header)
                } else {
                    tiny_http::Response::from_string("lexflow: see /metrics\n").with_status_code(404)
                };
                let _ = req.respond(resp);
            }
        })
        .expect("spawn metrics thread");
    tracing::info!(%local, "serving Prometheus metrics on /metrics");
    Ok(MetricsServer { server, thread: Some(thread), addr: local })
}
