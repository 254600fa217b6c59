//! `xds-bench`: new-route propagation through a real Envoy.
//!
//! For each ADS variant (state-of-the-world, delta), route layout (one routing scope per host,
//! or one route table for everything) and table size N, it starts the control plane in-process
//! and a real Envoy, loads N existing routes (each host with its own cluster and endpoints),
//! then repeatedly publishes one new route and measures the time from publication to the first
//! 200 through Envoy, and the bytes the control plane sent for that change.
//!
//! Usage: `xds-bench [--sizes 0,1000,5000] [--samples 30] [--modes sotw,delta]
//!         [--layouts scoped,single]`

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use knarr::bootstrap::{self, BootstrapOptions};
use knarr::{ControlPlane, ServeConfig};
use knarr_tests::{Envoy, HttpClient, Upstream};
use knarr_translate::{Backend, Endpoint, Gateway, Route, RouteLayout, Split, VirtualHost};
use knarr_xds::{NodeGrouping, SnapshotBuilder, SnapshotCache, DEFAULT_GROUP};

const NODE: &str = "bench-gw";

struct Options {
    sizes: Vec<usize>,
    samples: usize,
    modes: Vec<bool>,
    layouts: Vec<RouteLayout>,
}

fn parse_args() -> anyhow::Result<Options> {
    let mut o = Options {
        sizes: vec![0, 1000, 5000],
        samples: 30,
        modes: vec![false, true],
        layouts: vec![RouteLayout::ScopedByHost, RouteLayout::Single],
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--sizes" => {
                o.sizes = value()?
                    .split(',')
                    .map(|s| {
                        s.trim()
                            .parse()
                            .with_context(|| format!("--sizes: {s:?} is not a number"))
                    })
                    .collect::<anyhow::Result<_>>()?
            }
            "--samples" => o.samples = value()?.parse().context("--samples: not a number")?,
            "--modes" => {
                o.modes = value()?
                    .split(',')
                    .map(|m| match m {
                        "sotw" => Ok(false),
                        "delta" => Ok(true),
                        other => bail!("--modes: unknown mode {other:?} (sotw, delta)"),
                    })
                    .collect::<anyhow::Result<_>>()?
            }
            "--layouts" => {
                o.layouts = value()?
                    .split(',')
                    .map(|m| match m {
                        "scoped" => Ok(RouteLayout::ScopedByHost),
                        "single" => Ok(RouteLayout::Single),
                        other => bail!("--layouts: unknown layout {other:?} (scoped, single)"),
                    })
                    .collect::<anyhow::Result<_>>()?
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(o)
}

fn vhost(host: &str, backend: &str) -> VirtualHost {
    VirtualHost {
        name: host.into(),
        domains: vec![host.into()],
        routes: vec![Route {
            path_prefix: "/".into(),
            splits: vec![Split {
                backend: backend.into(),
                weight: 100,
                set_headers: vec![("knative-serving-revision".into(), backend.into())],
            }],
            ..Default::default()
        }],
    }
}

fn backend(name: &str, upstream: SocketAddr) -> Backend {
    Backend {
        name: name.into(),
        http2: false,
        endpoints: vec![Endpoint {
            address: upstream.ip(),
            port: upstream.port(),
        }],
    }
}

struct Row {
    mode: &'static str,
    layout: &'static str,
    n: usize,
    initial_sync: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
    bytes_per_change: u64,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

async fn run_one(
    delta: bool,
    layout: RouteLayout,
    n: usize,
    samples: usize,
    upstream: SocketAddr,
) -> anyhow::Result<Row> {
    let cache = Arc::new(SnapshotCache::new(NodeGrouping::NodeId));
    let cp = ControlPlane::start_with_cache(
        ServeConfig {
            xds_addr: "127.0.0.1:0".parse()?,
            admin_addr: "127.0.0.1:0".parse()?,
            ..Default::default()
        },
        cache.clone(),
    )
    .await?;

    let mut gateway = Gateway {
        name: "gw".into(),
        address: "127.0.0.1".parse()?,
        port: 0,
        virtual_hosts: (0..n)
            .map(|i| vhost(&format!("r{i}.bench.example"), &format!("b{i}")))
            .collect(),
        layout,
    };
    let backends: Vec<Backend> = (0..n)
        .map(|i| backend(&format!("b{i}"), upstream))
        .collect();
    let started = Instant::now();
    let first = cache.set(
        DEFAULT_GROUP,
        knarr_translate::snapshot(std::slice::from_ref(&gateway), &backends),
    );

    let yaml = bootstrap::render(&BootstrapOptions {
        xds_addr: cp.xds_addr.to_string(),
        delta,
        node_id: NODE.into(),
        admin_port: 0,
        ..Default::default()
    })
    .map_err(anyhow::Error::msg)?;
    let envoy = Envoy::builder()
        .log_level("warning")
        .startup_timeout(Duration::from_secs(120))
        .start(&yaml)
        .await?;
    envoy.wait_ready(Duration::from_secs(300)).await?;
    wait_synced(&cp, first.generation()).await?;
    let initial_sync = started.elapsed();
    let port = envoy
        .wait_listener_port("gw", Duration::from_secs(60))
        .await?;
    let client = HttpClient::new(SocketAddr::from(([127, 0, 0, 1], port)));
    if n > 0 {
        let r = client.get("r0.bench.example", "/").await?;
        if r.status != 200 {
            bail!("existing route answered {}", r.status);
        }
    }

    let mut snapshot = first;
    let mut times = Vec::with_capacity(samples);
    let mut bytes = Vec::with_capacity(samples);
    for k in 0..samples {
        let host = format!("new{k}.bench.example");
        let name = format!("new{k}");
        let vh = vhost(&host, &name);
        let be = backend(&name, upstream);
        // The change itself: one host, its cluster and endpoints, on top of the last snapshot.
        let mut builder: SnapshotBuilder = snapshot.to_builder();
        builder.insert(&knarr_translate::cluster(&be));
        builder.insert(&knarr_translate::load_assignment(&name, &be.endpoints));
        gateway.virtual_hosts.push(vh.clone());
        match layout {
            RouteLayout::ScopedByHost => {
                knarr_translate::add_virtual_host(&mut builder, &gateway, &vh)
            }
            RouteLayout::Single => {
                builder.insert(&knarr_translate::route_configuration(
                    &gateway.route_config_name(),
                    &gateway.virtual_hosts,
                ));
            }
        }
        let next = builder.build();
        let bytes_before = cp.metrics.sent_bytes_all();
        let t0 = Instant::now();
        snapshot = cache.set(DEFAULT_GROUP, next);
        loop {
            let r = client.get(&host, "/").await?;
            if r.status == 200 {
                break;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("{host} not served after 60 s (last status {})", r.status);
            }
        }
        times.push(t0.elapsed());
        wait_synced(&cp, snapshot.generation()).await?;
        bytes.push(cp.metrics.sent_bytes_all() - bytes_before);
    }
    times.sort();
    bytes.sort();
    let row = Row {
        mode: if delta { "delta" } else { "sotw" },
        layout: match layout {
            RouteLayout::ScopedByHost => "scoped",
            RouteLayout::Single => "single",
        },
        n,
        initial_sync,
        p50: percentile(&times, 0.5),
        p99: percentile(&times, 0.99),
        max: times.last().copied().unwrap_or_default(),
        bytes_per_change: bytes[bytes.len() / 2],
    };
    envoy.stop().await;
    cp.shutdown(Duration::from_secs(5)).await;
    Ok(row)
}

async fn wait_synced(cp: &ControlPlane, generation: u64) -> anyhow::Result<()> {
    tokio::time::timeout(
        Duration::from_secs(300),
        cp.clients.wait_for(|cs| {
            cs.iter()
                .any(|c| c.node_id == NODE && c.synced_generation >= Some(generation))
        }),
    )
    .await
    .with_context(|| {
        format!(
            "Envoy did not ACK generation {generation}: {:?}",
            cp.clients.list()
        )
    })
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = parse_args()?;
    let upstream = Upstream::start("bench").await?;
    println!(
        "new-route propagation through Envoy {} ({} samples per row; time = publish → first 200)",
        knarr_tests::ENVOY_VERSION,
        options.samples
    );
    println!();
    println!(
        "| ADS   | layout | existing routes | initial sync s | p50 ms | p99 ms | max ms | bytes per change |"
    );
    println!(
        "|-------|--------|----------------:|---------------:|-------:|-------:|-------:|-----------------:|"
    );
    for &delta in &options.modes {
        for &layout in &options.layouts {
            for &n in &options.sizes {
                let row = run_one(delta, layout, n, options.samples, upstream.addr()).await?;
                println!(
                    "| {:<5} | {:<6} | {:>15} | {:>14.2} | {:>6} | {:>6} | {:>6} | {:>16} |",
                    row.mode,
                    row.layout,
                    row.n,
                    row.initial_sync.as_secs_f64(),
                    ms(row.p50),
                    ms(row.p99),
                    ms(row.max),
                    row.bytes_per_change
                );
            }
        }
    }
    Ok(())
}
