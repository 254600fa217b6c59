//! `qp-bench`: what knarr-queue-proxy adds to a request, against a direct connection and against
//! Envoy as a plain HTTP proxy, measured in one run on the same machine.
//!
//! The app is `knarr-echo` (its own process); `knarr-queue-proxy` and Envoy run as processes too.
//! For each path: latency p50/p99 at a fixed rate (open loop, default 1,000 rps for 5 s) and the
//! throughput at saturation (closed loop, 32 connections, 5 s). Then the queue-proxy's idle RSS
//! and CPU over an idle period.
//!
//! Usage: `qp-bench [--rate 1000] [--seconds 5] [--connections 32]`
//! (build first: `cargo build --release -p knarr-queue-proxy -p knarr-tests`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use knarr_tests::bench::{fixed_rate, saturation};
use knarr_tests::{http_get, Envoy, HttpClient};
use tokio::process::{Child, Command};

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let p = std::env::current_exe()?
        .parent()
        .map(|d| d.join(name))
        .context("exe dir")?;
    if !p.exists() {
        bail!(
            "{} not found: cargo build --release -p knarr-queue-proxy -p knarr-tests",
            p.display()
        );
    }
    Ok(p)
}

async fn wait_200(addr: SocketAddr, host: &str) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        if let Ok(r) = http_get(addr, host, "/").await {
            if r.status == 200 {
                return Ok(());
            }
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("{addr} did not answer 200 within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn spawn(bin: &Path, args: &[&str], env: &[(&str, String)]) -> anyhow::Result<Child> {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env("KNARR_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut rate = 1000u64;
    let mut seconds = 5u64;
    let mut connections = 32usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut v = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--rate" => rate = v()?.parse()?,
            "--seconds" => seconds = v()?.parse()?,
            "--connections" => connections = v()?.parse()?,
            other => bail!("unknown argument {other:?}"),
        }
    }
    let duration = Duration::from_secs(seconds);

    let app_port = knarr_tests::free_port()?;
    let _app = spawn(
        &sibling("knarr-echo")?,
        &[
            "--listen",
            &format!("127.0.0.1:{app_port}"),
            "--name",
            "app",
        ],
        &[],
    )?;
    let app = SocketAddr::from(([127, 0, 0, 1], app_port));
    wait_200(app, "bench").await?;

    let qp_port = knarr_tests::free_port()?;
    let qp_env = vec![
        ("SERVING_NAMESPACE", "bench".to_string()),
        ("SERVING_CONFIGURATION", "app".into()),
        ("SERVING_REVISION", "app-00001".into()),
        ("SERVING_POD", "app-00001-pod".into()),
        ("SERVING_POD_IP", "127.0.0.1".into()),
        ("QUEUE_SERVING_PORT", qp_port.to_string()),
        ("USER_PORT", app_port.to_string()),
        ("CONTAINER_CONCURRENCY", "0".into()),
        ("REVISION_TIMEOUT_SECONDS", "300".into()),
        ("KNARR_QUEUE_BIND", "127.0.0.1".into()),
        (
            "KNARR_QUEUE_ADMIN_PORT",
            knarr_tests::free_port()?.to_string(),
        ),
        (
            "KNARR_QUEUE_METRICS_PORT",
            knarr_tests::free_port()?.to_string(),
        ),
        (
            "KNARR_QUEUE_USER_METRICS_PORT",
            knarr_tests::free_port()?.to_string(),
        ),
    ];
    let qp = spawn(&sibling("knarr-queue-proxy")?, &[], &qp_env)?;
    let qp_pid = qp.id().context("pid")?;
    let qp_addr = SocketAddr::from(([127, 0, 0, 1], qp_port));
    wait_200(qp_addr, "bench").await?;

    let envoy_port = knarr_tests::free_port()?;
    let envoy = Envoy::builder()
        .log_level("error")
        .start(&format!(
            r#"
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
static_resources:
  listeners:
  - name: proxy
    address: {{socket_address: {{address: 127.0.0.1, port_value: {envoy_port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: proxy
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{{match: {{prefix: /}}, route: {{cluster: app, timeout: 0s}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: app
    type: STATIC
    load_assignment:
      cluster_name: app
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {app_port}}}}}}}}}]}}]
"#
        ))
        .await?;
    envoy.wait_ready(Duration::from_secs(30)).await?;
    let envoy_addr = SocketAddr::from(([127, 0, 0, 1], envoy_port));
    wait_200(envoy_addr, "bench").await?;

    println!(
        "knarr-queue-proxy vs direct vs Envoy {} (plain HTTP proxy, 1 worker): {rate} rps for {seconds} s, then saturation with {connections} connections",
        knarr_tests::ENVOY_VERSION
    );
    println!();
    println!(
        "| path | p50 µs @ {rate} rps | p99 µs | added p50 µs | added p99 µs | saturation rps |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let mut direct = (0.0, 0.0);
    for (name, addr) in [
        ("client → app", app),
        ("client → Envoy → app", envoy_addr),
        ("client → knarr-queue-proxy → app", qp_addr),
    ] {
        let client = HttpClient::new(addr);
        // Warm up connections.
        fixed_rate(&client, "bench", rate, Duration::from_millis(500)).await?;
        let lat = fixed_rate(&client, "bench", rate, duration).await?;
        let p50 = us(lat[lat.len() / 2]);
        let p99 = us(lat[lat.len() * 99 / 100]);
        if name == "client → app" {
            direct = (p50, p99);
        }
        let sat = saturation(addr, "bench", connections, duration).await?;
        println!(
            "| {name} | {p50:.0} | {p99:.0} | {:.0} | {:.0} | {sat:.0} |",
            p50 - direct.0,
            p99 - direct.1
        );
    }

    // Idle: after a quiet period, the queue-proxy's memory and the CPU it burns doing nothing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, cpu0) = knarr_tests::proc_usage(qp_pid)?;
    let idle = Duration::from_secs(5);
    tokio::time::sleep(idle).await;
    let (rss, cpu1) = knarr_tests::proc_usage(qp_pid)?;
    println!();
    println!(
        "knarr-queue-proxy idle: RSS {rss:.1} MiB (after the load above), CPU {:.1} ms over {} s idle",
        (cpu1 - cpu0) * 1000.0,
        idle.as_secs()
    );
    // A fresh queue-proxy that has served nothing: the per-pod floor.
    let fresh_port = knarr_tests::free_port()?;
    let mut fresh_env = qp_env.clone();
    for (k, v) in fresh_env.iter_mut() {
        match *k {
            "QUEUE_SERVING_PORT" => *v = fresh_port.to_string(),
            "KNARR_QUEUE_ADMIN_PORT"
            | "KNARR_QUEUE_METRICS_PORT"
            | "KNARR_QUEUE_USER_METRICS_PORT" => *v = knarr_tests::free_port()?.to_string(),
            _ => {}
        }
    }
    let fresh = spawn(&sibling("knarr-queue-proxy")?, &[], &fresh_env)?;
    wait_200(SocketAddr::from(([127, 0, 0, 1], fresh_port)), "bench").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (fresh_rss, _) = knarr_tests::proc_usage(fresh.id().context("pid")?)?;
    println!("knarr-queue-proxy fresh (one request served): RSS {fresh_rss:.1} MiB");
    envoy.stop().await;
    Ok(())
}
