//! `knarr-echo --listen ADDR --name NAME`: a tiny backend for demos. Answers every request with
//! 200 and its name, and echoes `x-*`, `knative-*` and `k-*` request headers as `x-echo-*`.

use std::net::SocketAddr;

use anyhow::Context as _;
use knarr_tests::Upstream;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut listen: Option<SocketAddr> = None;
    let mut name = String::from("echo");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                let value = args.next().context("--listen needs an address")?;
                listen = Some(
                    value
                        .parse()
                        .with_context(|| format!("--listen {value:?}: not an ip:port"))?,
                );
            }
            "--name" => name = args.next().context("--name needs a value")?,
            other => anyhow::bail!(
                "unknown argument {other:?}; usage: knarr-echo --listen ADDR --name NAME"
            ),
        }
    }
    let listen = listen.context("usage: knarr-echo --listen ADDR --name NAME")?;
    let upstream = Upstream::builder(&name).listen(listen).start().await?;
    eprintln!("knarr-echo {name} listening on {}", upstream.addr());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
