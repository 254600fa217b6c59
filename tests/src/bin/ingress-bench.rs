//! `ingress-bench`: the KIngress path end to end — files on disk → `knarr serve` (a separate
//! process, so its memory and CPU are its own) → a real Envoy.
//!
//! For each N (existing ingresses, each a Knative-shaped KIngress with an external and three
//! cluster-local hosts, plus its Service and Endpoints) it reports:
//! - startup: from spawning `knarr serve` to its first complete config being published, and
//!   from starting Envoy to every ingress reporting `Ready` (Envoy ACKed all of it);
//! - new-ingress propagation: from the rename of a new file into the watched folder to the
//!   first 200 through Envoy (p50/p99 over the samples);
//! - the control plane's RSS and CPU seconds at the end;
//! - with `--churn`, 100 weight changes and backend swaps under continuous load, and the count
//!   of non-2xx answers.
//!
//! Usage: `ingress-bench [--sizes 0,1000,5000] [--samples 30] [--churn 100] [--verbose]`
//! (build `knarr` in the same profile first: `cargo build --release -p knarr -p knarr-tests`).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use knarr::bootstrap::{self, BootstrapOptions};
use knarr_tests::conformance::LoadGenerator;
use knarr_tests::{http_get, Envoy, HttpClient, Upstream};

fn objects(i: &str, backend: SocketAddr, weights: Option<(u32, u32)>) -> String {
    let splits = match weights {
        None => format!(
            "        - {{serviceName: svc-{i}, servicePort: 80, percent: 100, appendHeaders: {{Knative-Serving-Revision: svc-{i}, Knative-Serving-Namespace: bench}}}}\n"
        ),
        Some((a, b)) => format!(
            "        - {{serviceName: svc-{i}, servicePort: 80, percent: {a}, appendHeaders: {{Knative-Serving-Revision: svc-{i}}}}}\n        - {{serviceName: svc-{i}-b, servicePort: 80, percent: {b}, appendHeaders: {{Knative-Serving-Revision: svc-{i}-b}}}}\n"
        ),
    };
    let mut text = format!(
        r#"apiVersion: networking.internal.knative.dev/v1alpha1
kind: Ingress
metadata: {{name: ing-{i}, namespace: bench, annotations: {{networking.knative.dev/ingress.class: knarr.ingress.networking.knative.dev}}}}
spec:
  rules:
  - hosts: [ing-{i}.bench.example.com]
    visibility: ExternalIP
    http:
      paths:
      - splits:
{splits}  - hosts: [ing-{i}.bench, ing-{i}.bench.svc, ing-{i}.bench.svc.cluster.local]
    visibility: ClusterLocal
    http:
      paths:
      - splits:
{splits}"#
    );
    for svc in [format!("svc-{i}"), format!("svc-{i}-b")] {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {svc}, namespace: bench}}\nspec: {{ports: [{{name: http, port: 80, targetPort: {port}}}]}}\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: {svc}, namespace: bench}}\nsubsets: [{{addresses: [{{ip: \"{ip}\"}}], ports: [{{name: http, port: {port}}}]}}]\n",
            ip = backend.ip(),
            port = backend.port()
        ));
    }
    text
}

fn write_atomic(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

struct Args {
    sizes: Vec<usize>,
    samples: usize,
    churn: usize,
    verbose: bool,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        sizes: vec![0, 1000, 5000],
        samples: 30,
        churn: 100,
        verbose: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--sizes" => {
                a.sizes = value()?
                    .split(',')
                    .map(|s| s.parse().with_context(|| format!("--sizes: {s:?}")))
                    .collect::<anyhow::Result<_>>()?
            }
            "--samples" => a.samples = value()?.parse()?,
            "--churn" => a.churn = value()?.parse()?,
            "--verbose" => a.verbose = true,
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(a)
}

struct Row {
    n: usize,
    published: Duration,
    all_ready: Duration,
    p50: Duration,
    p99: Duration,
    rss_mib: f64,
    cpu_s: f64,
    churn_non2xx: Option<(usize, usize)>,
}

async fn run(n: usize, a: &Args, upstream: SocketAddr, knarr_bin: &Path) -> anyhow::Result<Row> {
    let dir = tempfile::tempdir()?;
    // 100 ingresses per file, as a GitOps folder might hold them.
    let mut chunk = String::new();
    for i in 0..n {
        if !chunk.is_empty() {
            chunk.push_str("---\n");
        }
        chunk.push_str(&objects(&i.to_string(), upstream, None));
        if (i + 1) % 100 == 0 || i + 1 == n {
            write_atomic(dir.path(), &format!("ingresses-{i:05}.yaml"), &chunk)?;
            chunk.clear();
        }
    }
    write_atomic(
        dir.path(),
        "churn.yaml",
        &objects("churn", upstream, Some((100, 0))),
    )?;

    let (xds, admin, api) = (
        knarr_tests::free_port()?,
        knarr_tests::free_port()?,
        knarr_tests::free_port()?,
    );
    let started = Instant::now();
    let mut knarr = tokio::process::Command::new(knarr_bin)
        .args(["serve", "--source"])
        .arg(format!("file:{}", dir.path().display()))
        .args(["--xds-addr", &format!("127.0.0.1:{xds}")])
        .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
        .args(["--api-addr", &format!("127.0.0.1:{api}")])
        .args([
            "--external-port",
            "0",
            "--internal-port",
            "0",
            "--https-port",
            "0",
            "--internal-https-port",
            "0",
        ])
        .env("KNARR_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", knarr_bin.display()))?;
    let pid = knarr.id().context("knarr pid")?;
    let api_addr = SocketAddr::from(([127, 0, 0, 1], api));
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin));
    loop {
        if let Ok(r) = http_get(admin_addr, "localhost", "/readyz").await {
            if r.status == 200 {
                break;
            }
        }
        if let Some(status) = knarr.try_wait()? {
            bail!("knarr serve exited: {status}");
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("knarr serve not ready after 120 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let published = started.elapsed();
    let envoy_started = Instant::now();
    let envoy = Envoy::builder()
        .log_level("warning")
        .startup_timeout(Duration::from_secs(120))
        .start(
            &bootstrap::render(&BootstrapOptions {
                xds_addr: format!("127.0.0.1:{xds}"),
                delta: true,
                admin_port: 0,
                ..Default::default()
            })
            .map_err(anyhow::Error::msg)?,
        )
        .await?;
    envoy.wait_ready(Duration::from_secs(300)).await?;
    let port = envoy
        .wait_listener_port("knarr-external-http", Duration::from_secs(60))
        .await?;
    let client = HttpClient::new(SocketAddr::from(([127, 0, 0, 1], port)));
    // Complete: every ingress Ready, i.e. Envoy ACKed every resource of every ingress.
    loop {
        let r = http_get(api_addr, "localhost", "/api/v1/ingresses").await?;
        let v: serde_json::Value = serde_json::from_str(&r.body)?;
        let items = v["items"].as_array().map(Vec::as_slice).unwrap_or_default();
        let ready = items
            .iter()
            .filter(|i| {
                i["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
            })
            .count();
        if ready == n + 1 {
            break;
        }
        if envoy_started.elapsed() > Duration::from_secs(300) {
            bail!("only {ready} of {} ingresses Ready after 300 s", n + 1);
        }
        // Not too often: each answer is a large document the control plane must build.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_ready = envoy_started.elapsed();
    let host = "ing-churn.bench.example.com";
    if client.get(host, "/").await?.status != 200 {
        bail!("{host} is Ready but does not answer 200");
    }

    let mut times = Vec::new();
    for k in 0..a.samples {
        let name = format!("new{k}");
        let host = format!("ing-{name}.bench.example.com");
        let text = objects(&name, upstream, None);
        let t0 = Instant::now();
        write_atomic(dir.path(), &format!("{name}.yaml"), &text)?;
        loop {
            if client.get(&host, "/").await?.status == 200 {
                break;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("{host} not served 60 s after its file was written");
            }
        }
        times.push(t0.elapsed());
        if a.verbose {
            eprintln!("n={n} sample {k}: {} ms", ms(t0.elapsed()));
        }
    }
    times.sort();

    let churn_non2xx = if a.churn > 0 {
        let load = LoadGenerator::start(client.clone(), "ing-churn.bench.example.com", "/", 4);
        for step in 0..a.churn {
            // Alternate weight changes and full backend swaps.
            let weights = match step % 4 {
                0 => (50, 50),
                1 => (0, 100),
                2 => (30, 70),
                _ => (100, 0),
            };
            write_atomic(
                dir.path(),
                "churn.yaml",
                &objects("churn", upstream, Some(weights)),
            )?;
            // Let each version reach Envoy before the next (observed through traffic).
            let want = if weights.1 == 100 { "svc-churn-b" } else { "" };
            if !want.is_empty() {
                let t0 = Instant::now();
                loop {
                    let r = client
                        .send(
                            http::Request::get("/")
                                .header("host", "ing-churn.bench.example.com")
                                .body(bytes::Bytes::new())?,
                        )
                        .await?;
                    if r.header("x-echo-knative-serving-revision") == Some(want)
                        || t0.elapsed() > Duration::from_secs(10)
                    {
                        break;
                    }
                }
            }
        }
        let summary = load.stop().await;
        let bad = summary
            .requests
            .iter()
            .filter(|r| r.error.is_some() || !matches!(r.status, Some(200..=299)))
            .count();
        Some((bad, summary.requests.len()))
    } else {
        None
    };

    let (rss_mib, cpu_s) = knarr_tests::proc_usage(pid)?;
    envoy.stop().await;
    knarr.kill().await.ok();
    Ok(Row {
        n,
        published,
        all_ready,
        p50: percentile(&times, 0.5),
        p99: percentile(&times, 0.99),
        rss_mib,
        cpu_s,
        churn_non2xx,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let knarr_bin = std::env::current_exe()?
        .parent()
        .map(|d| d.join("knarr"))
        .filter(|p| p.exists())
        .context("build the knarr binary next to ingress-bench first: cargo build --release -p knarr -p knarr-tests")?;
    let upstream = Upstream::start("bench").await?;
    println!(
        "KIngress end to end: files → knarr serve ({}) → Envoy {} (delta ADS); {} new ingresses per row",
        knarr_bin.display(),
        knarr_tests::ENVOY_VERSION,
        a.samples
    );
    println!();
    println!("| ingresses | knarr start → config published s | Envoy start → all Ready s | new ingress p50 ms | p99 ms | knarr RSS MiB | knarr CPU s | churn non-2xx / requests |");
    println!("|----------:|---------------------------------:|--------------------------:|-------------------:|-------:|--------------:|------------:|-------------------------:|");
    for &n in &a.sizes {
        let row = run(n, &a, upstream.addr(), &knarr_bin).await?;
        let churn = row
            .churn_non2xx
            .map(|(bad, total)| format!("{bad} / {total}"))
            .unwrap_or_else(|| "-".into());
        println!(
            "| {:>9} | {:>32.2} | {:>25.2} | {:>18} | {:>6} | {:>13.1} | {:>11.2} | {:>24} |",
            row.n,
            row.published.as_secs_f64(),
            row.all_ready.as_secs_f64(),
            ms(row.p50),
            ms(row.p99),
            row.rss_mib,
            row.cpu_s,
            churn
        );
    }
    Ok(())
}
