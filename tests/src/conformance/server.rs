//! What every conformance backend shares: a name, an address on `127.0.0.1:0`, a counter, and an
//! accept loop that hands each connection to the backend's own handler and stops (taking its
//! connections with it) when the backend is dropped.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use http::HeaderValue;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// A running test backend.
#[derive(Debug)]
pub struct TestServer {
    name: String,
    addr: SocketAddr,
    count: Arc<AtomicU64>,
    server: JoinHandle<()>,
}

impl TestServer {
    /// Binds `127.0.0.1:0` and serves every connection with `serve_one(stream, name, counter)`.
    pub(crate) async fn start<F, Fut>(name: &str, what: &str, serve_one: F) -> anyhow::Result<Self>
    where
        F: Fn(TcpStream, HeaderValue, Arc<AtomicU64>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let name_header = HeaderValue::from_str(name)
            .with_context(|| format!("{what} name {name:?} is not a valid header value"))?;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .with_context(|| format!("binding {what}"))?;
        let addr = listener.local_addr()?;
        let count = Arc::new(AtomicU64::new(0));
        let server = tokio::spawn(accept_loop(listener, name_header, count.clone(), serve_one));
        Ok(TestServer {
            name: name.to_owned(),
            addr,
            count,
            server,
        })
    }

    /// Its name, as sent in `x-upstream`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The backend's own counter (streams, connections, ...).
    pub(crate) fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection.
        self.server.abort();
    }
}

async fn accept_loop<F, Fut>(
    listener: TcpListener,
    name: HeaderValue,
    count: Arc<AtomicU64>,
    serve_one: F,
) where
    F: Fn(TcpStream, HeaderValue, Arc<AtomicU64>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of file descriptors and the like: back off briefly.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                connections.spawn(serve_one(stream, name.clone(), count.clone()));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}
