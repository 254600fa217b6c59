//! NetHost: listeners inside network namespaces, reached from the root namespace at the hosts'
//! own (non-loopback) addresses. Needs root; fails, saying so, without it.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use knarr_test_support::{http_get, trace_init, NetHost, Upstream};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Serves one fixed HTTP/1.1 response per connection on `listener`.
fn serve_fixed(listener: std::net::TcpListener, body: &'static str) -> tokio::task::JoinHandle<()> {
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    })
}

/// A connect that must fail at once (no route, or refused), never time out.
async fn connect_fails(addr: SocketAddr) -> ErrorKind {
    let err = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .unwrap_or_else(|_| panic!("connecting to {addr} hung instead of failing"))
        .expect_err("connected to an address that should be unreachable");
    err.kind()
}

#[tokio::test]
async fn a_listener_in_a_host_answers_at_its_address_until_the_host_is_dropped() {
    trace_init();
    let a = NetHost::create().unwrap();
    let b = NetHost::create().unwrap();
    assert_ne!(a.ip(), b.ip());
    for host in [&a, &b] {
        assert!(!host.ip().is_loopback(), "{}", host.ip());
        assert!(host.name().starts_with("knarr-"), "{}", host.name());
    }

    // A fixed port is fine: nothing else lives in the namespace.
    let listener = a.bind(8080).unwrap();
    let addr = SocketAddr::new(a.ip(), 8080);
    assert_eq!(listener.local_addr().unwrap(), addr);
    let server = serve_fixed(listener, "hello from a");

    let reply = http_get(addr, "a.example.com", "/").await.unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, "hello from a"));
    // Host b is up and answering, but nothing listens there.
    assert_eq!(
        connect_fails(SocketAddr::new(b.ip(), 8080)).await,
        ErrorKind::ConnectionRefused
    );

    // The listener is still open (the server task holds it), yet the address goes with the
    // host: its veth is deleted, and 10.244/16 outside live hosts is unreachable.
    drop(a);
    let kind = connect_fails(addr).await;
    assert!(
        matches!(
            kind,
            ErrorKind::HostUnreachable | ErrorKind::ConnectionRefused
        ),
        "{kind:?}"
    );
    server.abort();
}

#[tokio::test]
async fn an_upstream_serves_from_inside_a_host() {
    trace_init();
    let host = NetHost::create().unwrap();
    let up = Upstream::builder("pod-a")
        .start_on_std(host.bind(8012).unwrap())
        .unwrap();
    assert_eq!(up.addr(), SocketAddr::new(host.ip(), 8012));
    let reply = http_get(up.addr(), "svc.example.com", "/x").await.unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, "pod-a"));
    assert_eq!(reply.header("x-upstream-host"), Some("svc.example.com"));
    assert_eq!(up.requests(), 1);

    // Port 0 picks a free port inside the namespace.
    let any = host.bind(0).unwrap().local_addr().unwrap();
    assert_eq!(any.ip(), host.ip());
    assert_ne!(any.port(), 0);
}

#[tokio::test]
async fn a_process_in_the_host_reaches_the_root_namespace_at_the_gateway() {
    trace_init();
    let host = NetHost::create().unwrap();
    // In the root namespace, on the root end of the host's veth.
    let listener = tokio::net::TcpListener::bind((host.gateway_ip(), 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = tokio::spawn(async move {
        let (mut stream, peer) = listener.accept().await.unwrap();
        let mut got = String::new();
        stream.read_to_string(&mut got).await.unwrap();
        (peer, got)
    });
    let gateway = host.gateway_ip();
    let status = tokio::task::spawn_blocking({
        let mut command = host.command("bash");
        command.args([
            "-c",
            &format!("exec 3<>/dev/tcp/{gateway}/{port} && echo -n hi >&3"),
        ]);
        move || command.status().unwrap()
    })
    .await
    .unwrap();
    assert!(status.success(), "{status}");
    let (peer, got) = knarr_test_support::within("the host's connection", accepted)
        .await
        .unwrap();
    assert_eq!((peer.ip(), got.as_str()), (host.ip(), "hi"));
}

#[tokio::test]
async fn a_namespace_left_by_a_dead_process_is_swept() {
    trace_init();
    // A pid that is surely gone: a child that has exited and been reaped.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    // Subnet 0 is never leased, so this cannot be anyone's live host.
    let stale = format!("knarr-{dead}-0");
    let out = Command::new("ip")
        .args(["netns", "add", &stale])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = || {
        let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.split_whitespace().next() == Some(stale.as_str()))
    };
    assert!(listed());
    let _host = NetHost::create().unwrap();
    assert!(!listed(), "{stale} is still there");
}
