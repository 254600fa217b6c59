//! `idle-bench`: many idle Knative Services on one `knarr up` — the real binary, its Envoy, its
//! activator — while one unrelated Service serves steady traffic through Envoy.
//!
//! For each step (default 0, 1,000, 5,000 idle Services; each step adds to the previous one):
//! - apply: the new Services (`autoscaling.knative.dev/initial-scale: "0"`, so no pod ever
//!   starts) through `knarr apply`'s API in batches, until every Service is `Ready`;
//! - idle: `knarr up`'s CPU (share of one core) over `--idle-seconds` with nothing changing, and
//!   its RSS (and the RSS per idle Service against the step with none);
//! - API: `GET /api/v1/services` (every Service with its status) and `knarr get ksvc` (the CLI,
//!   rendering the table), p50 and max of 5;
//! - delete: one idle Service deleted through the API, until its URL answers 404 at Envoy;
//! - lost: requests of the steady Service (a serve-mode revision, `min-scale: "1"`,
//!   `target-burst-capacity: "0"`) that did not get 200, out of how many were sent during
//!   the step.
//!
//! At the end every idle Service is deleted at once (time until the last is gone from the API).
//!
//! Usage: `idle-bench [--steps 0,1000,5000] [--idle-seconds 10] [--batch 500]` (build first:
//! `cargo build --release -p knarr -p knarr-queue-proxy -p knarr-activator -p knarr-tests`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use bytes::Bytes;
use knarr_tests::up::{hello_service, KnarrUp};
use knarr_tests::{http_get, http_send, poll_until, proc_usage};

const WAIT: Duration = Duration::from_secs(600);
/// Zero initial scale is Knative's opt-in (`allow-zero-initial-scale`).
const AUTOSCALER: &str = "allow-zero-initial-scale: true\n";

struct Params {
    steps: Vec<usize>,
    idle_seconds: u64,
    batch: usize,
}

impl Params {
    fn parse() -> anyhow::Result<Params> {
        let mut p = Params {
            steps: vec![0, 1_000, 5_000],
            idle_seconds: 10,
            batch: 500,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--steps" => {
                    p.steps = value()?
                        .split(',')
                        .map(|s| s.trim().parse().with_context(|| format!("--steps: {s:?}")))
                        .collect::<anyhow::Result<_>>()?;
                }
                "--idle-seconds" => p.idle_seconds = value()?.parse()?,
                "--batch" => p.batch = value()?.parse()?,
                other => bail!(
                    "unknown argument {other:?}; usage: idle-bench [--steps 0,1000,5000] \
                     [--idle-seconds 10] [--batch 500]"
                ),
            }
        }
        ensure!(
            p.steps.windows(2).all(|w| w[0] <= w[1]),
            "--steps must not decrease"
        );
        ensure!(p.batch > 0, "--batch must be at least 1");
        Ok(p)
    }
}

fn idle_service(i: usize) -> String {
    format!(
        "apiVersion: serving.knative.dev/v1\nkind: Service\n\
         metadata: {{name: idle-{i}, namespace: default}}\n\
         spec:\n  template:\n    metadata:\n      annotations: {{autoscaling.knative.dev/initial-scale: \"0\"}}\n    \
         spec:\n      containers:\n      - image: example.com/idle\n        command: [sleep, \"3600\"]\n"
    )
}

async fn api(
    up: &KnarrUp,
    method: &str,
    path: &str,
    body: String,
) -> anyhow::Result<(u16, String)> {
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", up.api.to_string())
        .body(Bytes::from(body))?;
    let reply = http_send(up.api, request).await?;
    Ok((reply.status, reply.body))
}

/// Services Ready / all, from the list the API answers.
async fn ready_count(up: &KnarrUp) -> anyhow::Result<(usize, usize)> {
    let list = up.api_json("/api/v1/services").await?;
    let items = list["items"].as_array().context("items")?;
    let ready = items
        .iter()
        .filter(|s| {
            s["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
        .count();
    Ok((ready, items.len()))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn p50_max(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    (ms(samples[samples.len() / 2]), ms(*samples.last().unwrap()))
}

/// Steady traffic to one Service: requests sent and how many did not get a 200.
struct Steady {
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    /// What the failures were (status and body, or the error), with counts.
    why: Arc<Mutex<BTreeMap<String, u64>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Steady {
    fn start(up: &KnarrUp, host: &str, clients: usize) -> Steady {
        let sent = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let why = Arc::new(Mutex::new(BTreeMap::new()));
        let tasks = (0..clients)
            .map(|_| {
                let (sent, failed, stop, why) =
                    (sent.clone(), failed.clone(), stop.clone(), why.clone());
                let (gateway, host) = (up.gateway, host.to_owned());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let failure = match http_get(gateway, &host, "/").await {
                            Ok(r) if r.status == 200 => None,
                            Ok(r) => Some(format!("{} {}", r.status, r.body.trim())),
                            Err(e) => Some(format!("{e:#}")),
                        };
                        sent.fetch_add(1, Ordering::Relaxed);
                        if let Some(failure) = failure {
                            failed.fetch_add(1, Ordering::Relaxed);
                            *why.lock().unwrap().entry(failure).or_default() += 1;
                        }
                        // A steady ~100 requests per second per client, not a flood.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
            })
            .collect();
        Steady {
            sent,
            failed,
            why,
            stop,
            tasks,
        }
    }

    /// The failures since the last call, most frequent first.
    fn take_failures(&self) -> Vec<(String, u64)> {
        let mut all: Vec<_> = std::mem::take(&mut *self.why.lock().unwrap())
            .into_iter()
            .collect();
        all.sort_by(|a, b| b.1.cmp(&a.1));
        all
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let params = Params::parse()?;
    let steady = hello_service("steady", "steady", "", "")
        .replace(
            "  template:\n    spec:",
            "  template:\n    metadata:\n      annotations: {autoscaling.knative.dev/min-scale: \"1\", \
             autoscaling.knative.dev/target-burst-capacity: \"0\"}\n    spec:",
        );
    let up = KnarrUp::start_with(&[("steady.yaml", &steady)], Some(AUTOSCALER), &[]).await?;
    up.wait_service("steady", "steady-00001", WAIT).await;
    let pid = up.pid().context("knarr up's pid")?;
    poll_until("steady to be served directly", WAIT, || async {
        up.api_json("/api/v1/revisions/default/steady-00001")
            .await
            .is_ok_and(|r| r["status"]["servingMode"] == "Serve")
    })
    .await?;
    let load = Steady::start(&up, "steady.default.example.com", 4);

    println!(
        "{:>7} {:>9} {:>10} {:>9} {:>13} {:>16} {:>16} {:>11} {:>12}",
        "idle",
        "apply s",
        "idle CPU%",
        "RSS MiB",
        "KiB/service",
        "GET ksvc p50/max",
        "get ksvc p50/max",
        "delete ms",
        "lost/sent"
    );
    let mut applied = 0;
    let mut base_rss = None;
    for &target in &params.steps {
        let (sent_before, failed_before) = load.counts();
        // Apply.
        let started = Instant::now();
        while applied < target {
            let upto = (applied + params.batch).min(target);
            let manifest: Vec<String> = (applied..upto).map(idle_service).collect();
            let (status, body) = api(&up, "POST", "/api/v1/apply", manifest.join("---\n")).await?;
            ensure!(status == 200, "apply: {status} {body}");
            applied = upto;
        }
        let want = target + 1;
        poll_until(&format!("{want} Services Ready"), WAIT, || async {
            ready_count(&up)
                .await
                .is_ok_and(|(ready, all)| ready == want && all == want)
        })
        .await?;
        let apply_s = started.elapsed().as_secs_f64();

        // Idle.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (_, cpu_before) = proc_usage(pid)?;
        let idle_started = Instant::now();
        tokio::time::sleep(Duration::from_secs(params.idle_seconds)).await;
        let (rss, cpu_after) = proc_usage(pid)?;
        let cpu = 100.0 * (cpu_after - cpu_before) / idle_started.elapsed().as_secs_f64();
        let per_service = match base_rss {
            None => {
                base_rss = Some(rss);
                String::from("-")
            }
            Some(base) if target > 0 => format!("{:.1}", (rss - base) * 1024.0 / target as f64),
            Some(_) => String::from("-"),
        };

        // API.
        let mut gets = Vec::new();
        let mut clis = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let list = up.api_json("/api/v1/services").await?;
            gets.push(t.elapsed());
            ensure!(list["items"].as_array().map(Vec::len) == Some(want));
            let t = Instant::now();
            let (ok, out, err) = up.knarr(&["get", "ksvc"]).await?;
            clis.push(t.elapsed());
            ensure!(
                ok && out.lines().count() == want + 1,
                "knarr get ksvc: {err}"
            );
        }
        let (get_p50, get_max) = p50_max(gets);
        let (cli_p50, cli_max) = p50_max(clis);

        // Delete one (the last applied), until Envoy answers 404 for it.
        let delete = if target > 0 {
            let name = format!("idle-{}", target - 1);
            let host = format!("{name}.default.example.com");
            let t = Instant::now();
            let (status, body) = api(
                &up,
                "DELETE",
                &format!("/api/v1/services/default/{name}"),
                String::new(),
            )
            .await?;
            ensure!(status == 200, "delete: {status} {body}");
            poll_until(&format!("{host} to answer 404"), WAIT, || async {
                http_get(up.gateway, &host, "/")
                    .await
                    .is_ok_and(|r| r.status == 404)
            })
            .await?;
            let took = ms(t.elapsed());
            // Put it back so that the next step starts from `target` Services.
            let (status, body) =
                api(&up, "POST", "/api/v1/apply", idle_service(target - 1)).await?;
            ensure!(status == 200, "re-apply: {status} {body}");
            format!("{took:.1}")
        } else {
            String::from("-")
        };
        let (sent, failed) = load.counts();
        println!(
            "{:>7} {:>9.2} {:>10.1} {:>9.1} {:>13} {:>16} {:>16} {:>11} {:>12}",
            target,
            apply_s,
            cpu,
            rss,
            per_service,
            format!("{get_p50:.1}/{get_max:.1} ms"),
            format!("{cli_p50:.1}/{cli_max:.1} ms"),
            delete,
            format!("{}/{}", failed - failed_before, sent - sent_before),
        );
        let failures = load.take_failures();
        for (why, n) in &failures {
            println!("        lost {n}: {why}");
        }
        if !failures.is_empty() {
            // What knarr up said of the steady Service's pod meanwhile.
            for line in up
                .log()
                .lines()
                .filter(|l| l.contains("steady"))
                .rev()
                .take(10)
            {
                println!("        log: {line}");
            }
        }
    }

    // Delete every idle Service at once.
    let (sent_before, failed_before) = load.counts();
    let t = Instant::now();
    for i in 0..applied {
        let (status, body) = api(
            &up,
            "DELETE",
            &format!("/api/v1/services/default/idle-{i}"),
            String::new(),
        )
        .await?;
        ensure!(status == 200, "delete idle-{i}: {status} {body}");
    }
    let deleted_in = t.elapsed();
    poll_until("only steady left", WAIT, || async {
        ready_count(&up).await.is_ok_and(|(_, all)| all == 1)
    })
    .await?;
    let (sent, failed) = load.counts();
    println!(
        "deleting all {applied}: {:.2} s of API calls, {:.2} s until gone; steady lost {}/{}",
        deleted_in.as_secs_f64(),
        t.elapsed().as_secs_f64(),
        failed - failed_before,
        sent - sent_before
    );
    load.stop().await;
    let (status, _) = up.stop().await?;
    ensure!(status.success(), "knarr up exited with {status}");
    Ok(())
}
