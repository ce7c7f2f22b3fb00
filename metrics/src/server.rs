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
        .ok_or_else(|| ServeError::Bind {
            addr: addr.to_string(),
            reason: "not an IP socket".into(),
        })?;
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
                    tiny_http::Response::from_string("lexflow: see /metrics\n")
                        .with_status_code(404)
                };
                let _ = req.respond(resp);
            }
        })
        .expect("spawn metrics thread");
    tracing::info!(%local, "serving Prometheus metrics on /metrics");
    Ok(MetricsServer {
        server,
        thread: Some(thread),
        addr: local,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).expect("connect to exporter");
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("write request");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read response");
        out
    }

    #[test]
    fn serves_text_exposition_on_an_ephemeral_port() {
        crate::actor("test_server_actor").items_out.inc_by(3);
        let server = serve("127.0.0.1:0").expect("bind an ephemeral port");
        assert_ne!(server.addr.port(), 0);
        let resp = get(server.addr, "/metrics");
        assert!(
            resp.starts_with("HTTP/1.1 200") || resp.starts_with("HTTP/1.0 200"),
            "{resp}"
        );
        assert!(
            resp.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{resp}"
        );
        assert!(
            resp.contains("# TYPE lexflow_actor_items_out_total counter"),
            "{resp}"
        );
        assert!(
            resp.contains(r#"lexflow_actor_items_out_total{actor="test_server_actor"} 3"#),
            "{resp}"
        );
        assert!(get(server.addr, "/nope").contains(" 404"));
    }

    #[test]
    fn stops_when_dropped() {
        let server = serve("127.0.0.1:0").expect("bind");
        let addr = server.addr;
        drop(server);
        // The port is free again: a new listener can take it. tiny_http's accept thread lets go of its listener
        // asynchronously after the drop, so allow it a moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match std::net::TcpListener::bind(addr) {
                Ok(_) => break,
                Err(e) if std::time::Instant::now() > deadline => {
                    panic!("port not released after drop: {e}")
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
    }

    #[test]
    fn bind_error_names_the_address() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr").to_string();
        let err = serve(&addr).err().expect("the port is taken");
        let msg = err.to_string();
        assert!(msg.contains(&addr), "{msg}");
        let err = serve("not-an-address").err().expect("unparsable address");
        assert!(err.to_string().contains("not-an-address"), "{err}");
    }
}
