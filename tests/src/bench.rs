//! Load shapes the benchmarks share: an open loop at a fixed rate (latency of every request)
//! and a closed loop at saturation (requests per second).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};

use crate::HttpClient;

/// Open loop at `rate` for `duration`: the latency of every request, from when it was sent,
/// sorted. (Tokio's timer has millisecond granularity, so send times are paced per millisecond;
/// counting from the scheduled time would measure the timer, not the path.) Any answer but 200
/// fails the run.
pub async fn fixed_rate(
    client: &HttpClient,
    host: &str,
    rate: u64,
    duration: Duration,
) -> anyhow::Result<Vec<Duration>> {
    ensure!(rate > 0, "the rate must be positive");
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    let total = (duration.as_secs_f64() * rate as f64) as u64;
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        tokio::time::sleep_until(start + interval * i as u32).await;
        let (client, host) = (client.clone(), host.to_owned());
        tasks.spawn(async move {
            let sent = Instant::now();
            let r = client.get(&host, "/").await;
            (sent.elapsed(), r.map(|r| r.status))
        });
    }
    let mut out = Vec::with_capacity(total as usize);
    while let Some(done) = tasks.join_next().await {
        let (latency, status) = done?;
        if status.as_ref().ok() != Some(&200) {
            bail!("a request failed: {status:?}");
        }
        out.push(latency);
    }
    out.sort();
    Ok(out)
}

/// Closed loop with `connections` workers for `duration`: requests per second answered 200. Any
/// other answer fails the run.
pub async fn saturation(
    addr: SocketAddr,
    host: &str,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let client = HttpClient::new(addr);
        let (stop, done, failed, host) =
            (stop.clone(), done.clone(), failed.clone(), host.to_owned());
        tasks.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if matches!(client.get(&host, "/").await, Ok(r) if r.status == 200) {
                    done.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    let t0 = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let n = done.load(Ordering::Relaxed);
    let elapsed = t0.elapsed();
    while tasks.join_next().await.is_some() {}
    let failed = failed.load(Ordering::Relaxed);
    ensure!(failed == 0, "{failed} requests failed at saturation");
    Ok(n as f64 / elapsed.as_secs_f64())
}
