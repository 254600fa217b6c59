//! Test hosts with real, non-loopback addresses: one network namespace each, joined to the
//! root namespace by a veth pair.
//!
//! The API server refuses `127.0.0.0/8` in Endpoints and EndpointSlices, so a backend that a
//! Service's endpoints point at must listen at an address of its own. A [`NetHost`] is that:
//! namespace `knarr-<pid>-<N>`, its end of the veth at `10.244.<N>.2/24` (default route via the
//! root end, `10.244.<N>.1/24`), and [`NetHost::bind`] binds a listener inside it from this
//! process, so the test serves on it with ordinary tokio code (e.g. an
//! [`Upstream`](crate::Upstream) via [`UpstreamBuilder::start_on_std`](crate::UpstreamBuilder::start_on_std)).
//!
//! Traffic never leaves the machine for `10.244.0.0/16`: the first host installs an
//! `unreachable 10.244.0.0/16` route in the root namespace (and refuses to run if something
//! else already routes that range), so only the /24 of a live host is reachable and a dropped
//! host's address fails at once with "no route to host" instead of going to the default
//! gateway.
//!
//! `N` (1..=254) is leased across processes with `flock` on `/run/knarr-netns/<N>.lock`, held
//! for the host's life. Namespaces left by a test process that was killed are swept when a
//! later host is created. Needs root (`CAP_NET_ADMIN` and `CAP_SYS_ADMIN`); without it,
//! creation fails saying so. Uses iproute2's `ip`.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{bail, Context as _};
use nix::fcntl::{Flock, FlockArg};
use nix::sched::CloneFlags;

/// The range every host's /24 comes from.
const RANGE: &str = "10.244.0.0/16";

/// Where the subnet leases live.
const LEASE_DIR: &str = "/run/knarr-netns";

/// Where `ip netns add` mounts a namespace.
const NETNS_DIR: &str = "/var/run/netns";

/// Namespace names: `knarr-<pid>-<N>`.
const PREFIX: &str = "knarr-";

/// How many hosts this process has created: where its next lease search starts, so a subnet
/// just freed is not handed out again at once (a test checking that a dropped host is gone
/// must not find a new one at the same address).
static CREATED: AtomicUsize = AtomicUsize::new(0);

/// A network namespace with its own address, reachable from the root namespace.
///
/// Dropping it deletes the veth pair (at once: the address stops answering even while a
/// listener bound inside is still open) and the namespace, then frees its subnet.
#[derive(Debug)]
pub struct NetHost {
    name: String,
    index: u8,
    root_veth: String,
    // Dropped after the namespace is deleted (see Drop).
    _lease: Flock<File>,
}

impl NetHost {
    /// Creates namespace `knarr-<pid>-<N>` with `lo` up and a veth pair: the root end
    /// `10.244.<N>.1/24`, the namespace end `10.244.<N>.2/24` with the default route via
    /// the root end. Fails, saying so, without the privileges it needs. Blocking (a handful of
    /// `ip` commands, milliseconds).
    pub fn create() -> anyhow::Result<NetHost> {
        std::fs::create_dir_all(LEASE_DIR).with_context(|| {
            format!("creating {LEASE_DIR} (NetHost needs root: CAP_NET_ADMIN and CAP_SYS_ADMIN)")
        })?;
        guard_range()?;
        let start = std::process::id() as usize * 7 + CREATED.fetch_add(1, Ordering::Relaxed);
        let (index, lease) = (0..254)
            .map(|i| ((start + i) % 254 + 1) as u8)
            .find_map(|n| try_lease(n).ok().flatten().map(|lease| (n, lease)))
            .context(
                "all 254 NetHost subnets of 10.244.0.0/16 are leased (see /run/knarr-netns)",
            )?;
        sweep(index);

        let host = NetHost {
            name: format!("{PREFIX}{}-{index}", std::process::id()),
            index,
            root_veth: root_veth(index),
            _lease: lease,
        };
        // From here on a failure drops `host`, which undoes what was done.
        let (ns, root, peer) = (&host.name, &host.root_veth, format!("knarr{index}h"));
        ip(&["netns", "add", ns])?;
        ip(&[
            "link", "add", root, "type", "veth", "peer", "name", &peer, "netns", ns,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", host.gateway_ip()),
            "dev",
            root,
        ])?;
        ip(&["link", "set", root, "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/24", host.ip()),
            "dev",
            &peer,
        ])?;
        ip(&["-n", ns, "link", "set", &peer, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &host.gateway_ip().to_string(),
        ])?;
        tracing::debug!(name = %host.name, ip = %host.ip(), "net host created");
        Ok(host)
    }

    /// The host's address (the namespace end of the veth, `10.244.<N>.2`).
    pub fn ip(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 244, self.index, 2))
    }

    /// The root namespace's address on the host's link (`10.244.<N>.1`): where a process in
    /// the host reaches a server in the root namespace that listens on it (or on `0.0.0.0`).
    pub fn gateway_ip(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 244, self.index, 1))
    }

    /// The namespace's name, `knarr-<pid>-<N>` (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A TCP listener on `ip():port` inside the namespace (port 0: any free port).
    ///
    /// Bound from a short-lived thread that joins the namespace: a socket stays in the
    /// namespace it was created in, so `accept` works from any thread afterwards. For tokio,
    /// `set_nonblocking(true)` then `tokio::net::TcpListener::from_std`.
    pub fn bind(&self, port: u16) -> anyhow::Result<std::net::TcpListener> {
        let addr = SocketAddr::new(self.ip(), port);
        let path = self.netns_path();
        let ns = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        std::thread::spawn(move || -> anyhow::Result<std::net::TcpListener> {
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns into {}", path.display()))?;
            std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread binding {addr} panicked"))?
    }

    /// `ip netns exec <name> <program>`: a command that runs inside the host.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(ip_binary());
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }
}

impl Drop for NetHost {
    fn drop(&mut self) {
        // The veth first: deleting a namespace is asynchronous, and one that still holds a
        // socket (a listener the test kept) lives on; deleting the link removes both ends and
        // the route now.
        if let Err(e) = delete_host(&self.name, &self.root_veth) {
            tracing::warn!(name = %self.name, error = %format!("{e:#}"), "removing a net host");
        }
        // `_lease` is released after this.
    }
}

/// Deletes the root end of the veth (if present) and the namespace (if present).
fn delete_host(name: &str, root_veth: &str) -> anyhow::Result<()> {
    delete_veth(root_veth)?;
    if Path::new(NETNS_DIR).join(name).exists() {
        ip(&["netns", "del", name])?;
    }
    Ok(())
}

fn delete_veth(root_veth: &str) -> anyhow::Result<()> {
    if Path::new("/sys/class/net").join(root_veth).exists() {
        ip(&["link", "del", root_veth])?;
    }
    Ok(())
}

fn root_veth(index: u8) -> String {
    // At most "knarr254r": interface names have 15 characters.
    format!("knarr{index}r")
}

/// Leases subnet `n`: `Ok(None)` if another host (in any process) holds it.
fn try_lease(n: u8) -> anyhow::Result<Option<Flock<File>>> {
    let path = Path::new(LEASE_DIR).join(format!("{n}.lock"));
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lease) => Ok(Some(lease)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e).with_context(|| format!("flock {}", path.display())),
    }
}

/// Removes what dead test processes left: any `knarr-<pid>-<n>` namespace whose pid is gone,
/// and anything still using subnet `ours`, which this process has just leased.
fn sweep(ours: u8) {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some((pid, n)) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, n)| Some((pid.parse::<u32>().ok()?, n.parse::<u8>().ok()?)))
        else {
            continue;
        };
        // Hold the subnet's lease while removing its veth, so a live host is never touched.
        let _lease = if n == ours {
            None // leased already
        } else if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        } else {
            match try_lease(n) {
                Ok(Some(lease)) => Some(lease),
                // A live host of the same subnet will sweep it.
                _ => continue,
            }
        };
        tracing::info!(name, "removing a stale net host");
        if let Err(e) = delete_host(name, &root_veth(n)) {
            tracing::warn!(name, error = %format!("{e:#}"), "removing a stale net host");
        }
    }
    // A veth left behind without its namespace (should not happen, but would block creation).
    let _ = delete_veth(&root_veth(ours));
}

/// Makes sure `10.244.0.0/16` cannot leave the machine: an `unreachable` route under the
/// hosts' /24s. Refuses to go on if the range is routed already by something else.
fn guard_range() -> anyhow::Result<()> {
    let existing = ip(&["route", "show", RANGE])?;
    if existing.trim().is_empty() {
        match ip(&["route", "add", "unreachable", RANGE]) {
            Ok(_) => return Ok(()),
            // Another process added it just now.
            Err(e) if format!("{e:#}").contains("File exists") => {}
            Err(e) => return Err(e),
        }
    }
    let existing = ip(&["route", "show", RANGE])?;
    if !existing.trim_start().starts_with("unreachable") {
        bail!(
            "{RANGE} is already routed on this machine ({}); NetHost uses that range for its \
             test hosts and will not overlay a real network",
            existing.trim()
        );
    }
    Ok(())
}

fn ip_binary() -> &'static str {
    if Path::new("/usr/sbin/ip").exists() {
        "/usr/sbin/ip"
    } else {
        "ip"
    }
}

/// Runs `ip ARGS`; the error names the command and carries its stderr (with a hint when it
/// was refused for want of privileges).
fn ip(args: &[&str]) -> anyhow::Result<String> {
    let what = format!("ip {}", args.join(" "));
    let out = Command::new(ip_binary())
        .args(args)
        .output()
        .with_context(|| format!("running {what} (is iproute2 installed?)"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            stderr.trim(),
            privilege_hint(&stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What to add to an `ip` error whose stderr says the machine refused it.
fn privilege_hint(stderr: &str) -> &'static str {
    if stderr.contains("Operation not permitted") || stderr.contains("Permission denied") {
        " — this machine refused: NetHost needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) to \
         create network namespaces and veth pairs"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_ip_command_is_named_with_its_stderr() {
        let err = format!("{:#}", ip(&["link", "del", "knarr-no-such"]).unwrap_err());
        assert!(err.starts_with("ip link del knarr-no-such failed"), "{err}");
        assert!(err.contains("Cannot find device"), "{err}");
        assert!(!err.contains("NetHost needs root"), "{err}");
    }

    #[test]
    fn a_refusal_says_what_is_missing() {
        // As `ip netns add` prints it without CAP_SYS_ADMIN.
        let hint = privilege_hint("mount --make-shared /run/netns failed: Operation not permitted");
        assert!(
            hint.contains("this machine refused") && hint.contains("CAP_NET_ADMIN"),
            "{hint}"
        );
        assert_eq!(privilege_hint("RTNETLINK answers: File exists"), "");
    }

    #[test]
    fn root_veth_names_fit_in_an_interface_name() {
        assert!(root_veth(254).len() <= 15 && format!("knarr{}h", 254).len() <= 15);
    }
}
