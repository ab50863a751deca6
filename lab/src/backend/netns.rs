//! The network the netns backend builds, after Mininet: each peer is a host in a network
//! namespace of its own with its own address on the run's 10.s.0.0/16, linked to the lab's host
//! by a veth pair. The host routes between the links (each namespace's default route goes to
//! the host's end of its link, 10.s.255.254 on every link), rather than switching them on a
//! bridge: on a bridge every ARP request of a 256-peer full mesh reaches all 256 namespaces
//! (about 16 million deliveries, tens of seconds of CPU), while routed each namespace resolves
//! only its gateway. The lab talks to peers through their stdin and stdout only.
//!
//! Cuts are kernel packet drops: iptables rules inside each namespace, as on docker. Creating
//! namespaces, links and rules needs root; without it the backend refuses to start
//! ([`NeedsRoot`]).
//!
//! Everything carries the owner's pid in its name (namespaces `meshlab-PID-RUN-C-D`) or
//! comment (the host's FORWARD rule); a host's end of a link goes with its namespace. All is
//! removed at shutdown, when dropped (also after a panic), and as leftovers of a dead lab when
//! a new one starts. Peer processes die with the lab (PR_SET_PDEATHSIG).

use std::collections::HashMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use super::{Entered, Links, apply_links};

/// Where `ip netns` keeps its namespaces.
const NETNS_DIR: &str = "/run/netns";
/// The prefix of every name and alias this backend gives.
const PREFIX: &str = "meshlab";
/// The port every peer listens on (each namespace has its own ports).
pub const PORT: u16 = 4000;
/// Most peers of one run: the hosts of a /16, less the network and broadcast addresses.
pub const MAX_PEERS: usize = 65_000;

/// The netns backend needs root.
#[derive(Debug, thiserror::Error)]
#[error(
    "the netns backend needs root: it creates network namespaces, veth pairs and routes (run the lab as root, or use --backend process)"
)]
pub struct NeedsRoot;

/// One run's namespaces and the host's rule for them.
pub struct Namespaces {
    /// `meshlab-PID-RUN`: the stem of every name of this run.
    stem: String,
    /// The run's 10.s.0.0/16.
    subnet: u8,
    /// Each peer name's namespace, made at its first start and kept across restarts.
    hosts: HashMap<String, Host>,
    /// Every namespace this run made or began to make.
    made: Vec<String>,
    /// The host's FORWARD rule that lets the run's packets through.
    forward_rule: Vec<String>,
    removed: bool,
}

/// A peer's namespace.
struct Host {
    ns: String,
    ip: Ipv4Addr,
    /// An open handle on the namespace, entered by the peer's process before it runs.
    handle: OwnedFd,
    /// The cuts and conditions its packet filter and queues hold (none in a new namespace).
    links: Links,
}

impl Namespaces {
    /// Removes leftovers of dead labs and lets this run's packets through the host.
    pub fn create() -> anyhow::Result<Namespaces> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(NeedsRoot.into());
        }
        remove_leftovers();
        let id = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
        let stem = format!("{PREFIX}-{}-{id}", std::process::id());
        let forward_rule = forward_rule(&id, &stem);
        anyhow::ensure!(
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|v| v.trim() == "1"),
            "the netns backend routes between namespaces, but this host does not forward IPv4 \
             (run `sysctl -w net.ipv4.ip_forward=1`)"
        );
        let insert: Vec<&str> = std::iter::once("-I").chain(forward_rule.iter().map(String::as_str)).collect();
        run("iptables", &insert).context("cannot let the lab's packets through the host's FORWARD chain")?;
        Ok(Namespaces {
            stem,
            subnet: free_subnet()?,
            hosts: HashMap::new(),
            made: Vec::new(),
            forward_rule,
            removed: false,
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "netns backend: each peer in a network namespace of its own (10.{}.0.0/16, routed by the host), cuts and loss by iptables and rate and delay by tc in each namespace",
            self.subnet
        )
    }

    /// The host's end of every link.
    fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet, 255, 254)
    }

    /// The address of the `n`-th peer name (from 0): 10.s.0.2 onwards.
    pub fn nth(&self, n: usize) -> anyhow::Result<Ipv4Addr> {
        anyhow::ensure!(n < MAX_PEERS, "the netns backend runs at most {MAX_PEERS} peer names");
        let host = n + 2; // 10.s.0.1 is left for a gateway
        Ok(Ipv4Addr::new(10, self.subnet, (host / 256) as u8, (host % 256) as u8))
    }

    /// Makes the namespaces of peers `hosts` (name, address) that do not exist yet: each one's
    /// link to the host, its address, its loopback and its routes. The host's side of all of
    /// them is one `ip -batch`; each namespace's inside is one more, all run at once.
    pub fn make(&mut self, hosts: &[(&str, Ipv4Addr)]) -> anyhow::Result<()> {
        let new: Vec<(&str, Ipv4Addr, String)> = hosts
            .iter()
            .filter(|(name, _)| !self.hosts.contains_key(*name))
            .map(|(name, ip)| {
                let [_, _, c, d] = ip.octets();
                (*name, *ip, format!("{}-{c}-{d}", self.stem))
            })
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        // The host's end of a link is named mlv, the run (6 characters), the host number (at
        // most 5): interface names have at most 15 characters. Made with its other end already
        // in the namespace, since moving a link there costs the kernel about 20 ms.
        let run = self.stem.rsplit('-').next().expect("the stem has parts").to_owned();
        let gateway = self.gateway();
        let mut outside_commands = Vec::new();
        for (_, ip, ns) in &new {
            let [_, _, c, d] = ip.octets();
            let outside = format!("mlv{run}{}", u16::from_be_bytes([c, d]));
            self.made.push(ns.clone());
            outside_commands.extend([
                format!("netns add {ns}"),
                format!("link add {outside} type veth peer name eth0 netns {ns}"),
                format!("addr add {gateway}/32 dev {outside}"),
                format!("link set {outside} up"),
                format!("route add {ip}/32 dev {outside}"),
            ]);
        }
        ip_batch(None, &outside_commands).context("cannot make the peers' network namespaces")?;
        let insides = new.iter().map(|(_, ip, ns)| {
            let commands = [
                format!("addr add {ip}/32 dev eth0"),
                "link set eth0 up".to_string(),
                "link set lo up".to_string(),
                format!("route add default via {gateway} dev eth0 onlink"),
            ];
            ip_batch_spawn(Some(ns), &commands)
        });
        let running: Vec<anyhow::Result<std::process::Child>> = insides.collect();
        for ((name, ip, ns), child) in new.into_iter().zip(running) {
            child.and_then(ip_batch_wait).with_context(|| format!("cannot make {name}'s network namespace"))?;
            let handle = std::fs::File::open(format!("{NETNS_DIR}/{ns}"))
                .with_context(|| format!("cannot open {name}'s network namespace"))?;
            self.hosts.insert(name.to_owned(), Host { ns, ip, handle: handle.into(), links: Links::default() });
        }
        Ok(())
    }

    /// A handle on `name`'s namespace, for its process to enter ([`enter`]).
    pub fn handle_of(&self, name: &str) -> anyhow::Result<&OwnedFd> {
        Ok(&self.host(name)?.handle)
    }

    fn host(&self, name: &str) -> anyhow::Result<&Host> {
        self.hosts.get(name).with_context(|| format!("{name} has no network namespace yet"))
    }

    /// Makes `name`'s namespace drop and shape what `links` say.
    pub async fn set_links(&mut self, name: &str, links: &Links) -> anyhow::Result<()> {
        let host = self.host(name)?;
        if host.links == *links {
            return Ok(());
        }
        let enter = format!("--net={NETNS_DIR}/{}", host.ns);
        apply_links(&Entered(&["nsenter", &enter]), "eth0", &host.links, links, |other| Ok(Some(self.host(other)?.ip)))
            .await
            .with_context(|| format!("cannot apply {name}'s cuts and conditions in its network namespace"))?;
        self.hosts.get_mut(name).expect("found above").links = links.clone();
        Ok(())
    }

    /// Removes the namespaces and the host rule. Safe to call more than once.
    pub fn remove(&mut self) {
        if std::mem::replace(&mut self.removed, true) {
            return;
        }
        self.hosts.clear();
        remove_network(&self.made, Some(&self.forward_rule));
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        self.remove();
    }
}

/// A random `s` whose 10.s.0.0/16 holds no route or address of this host: not another network
/// of the host's, nor another lab's (also one whose namespaces the kernel is still tearing
/// down, which keeps their routes for a while; a clash makes `route add` fail).
fn free_subnet() -> anyhow::Result<u8> {
    let mut taken = Vec::new();
    for args in [&["-o", "-4", "route", "show", "table", "all"][..], &["-o", "-4", "addr", "show"]] {
        let out = Command::new("ip").args(args).output().context("cannot run ip (iproute2)")?;
        anyhow::ensure!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        taken.extend(String::from_utf8_lossy(&out.stdout).lines().filter_map(prefix_in));
    }
    let mut candidates: Vec<u8> = (1..=254).collect();
    rand::seq::SliceRandom::shuffle(&mut candidates[..], &mut rand::rng());
    candidates
        .into_iter()
        .find(|&s| subnet_is_free(s, &taken))
        .context("every 10.s.0.0/16 of this host holds a route or an address: the netns backend has no subnet left")
}

/// The first IPv4 prefix a line of `ip -o -4 route` or `ip -o -4 addr` names (not `default`).
fn prefix_in(line: &str) -> Option<(Ipv4Addr, u8)> {
    line.split_whitespace().find_map(|word| {
        let (ip, len) = word.split_once('/').unwrap_or((word, "32"));
        Some((ip.parse().ok()?, len.parse().ok().filter(|len| (1..=32).contains(len))?))
    })
}

/// Whether no prefix in `taken` lies in 10.s.0.0/16. A wider one (a VPN's 10.0.0.0/8) is no
/// clash: the run's host routes are more specific.
fn subnet_is_free(s: u8, taken: &[(Ipv4Addr, u8)]) -> bool {
    !taken.iter().any(|&(ip, len)| len >= 16 && ip.octets()[..2] == [10, s])
}

/// Runs `ip -batch -` with `commands`, one per line, in namespace `ns` or the host's,
/// stopping at the first that fails.
fn ip_batch(ns: Option<&str>, commands: &[String]) -> anyhow::Result<()> {
    ip_batch_spawn(ns, commands).and_then(ip_batch_wait)
}

/// Starts an `ip -batch -` with `commands` ([`ip_batch`]), for [`ip_batch_wait`].
fn ip_batch_spawn(ns: Option<&str>, commands: &[String]) -> anyhow::Result<std::process::Child> {
    let mut child = Command::new("ip")
        .args(ns.map_or(vec![], |ns| vec!["-n", ns]))
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run ip (iproute2)")?;
    child.stdin.take().expect("piped").write_all(commands.join("\n").as_bytes())?;
    Ok(child)
}

fn ip_batch_wait(child: std::process::Child) -> anyhow::Result<()> {
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program).args(args).stdout(Stdio::null()).stderr(Stdio::piped()).output()?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The host's FORWARD rule for the run's links (`mlvRUN*`), tagged with the run's stem, without
/// -I or -D. Docker sets the FORWARD policy to DROP.
fn forward_rule(id: &str, stem: &str) -> Vec<String> {
    let links = format!("mlv{id}+");
    ["FORWARD", "-i", &links, "-o", &links, "-m", "comment", "--comment", stem, "-j", "ACCEPT"]
        .map(String::from)
        .to_vec()
}

fn remove_network(namespaces: &[String], forward_rule: Option<&[String]>) {
    let commands: Vec<String> = namespaces.iter().map(|ns| format!("netns del {ns}")).collect();
    // `-force` goes on past a command that fails (a namespace that was never made).
    let _ = Command::new("ip")
        .args(["-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .and_then(|mut child| {
            child.stdin.take().expect("piped").write_all(commands.join("\n").as_bytes())?;
            child.wait()
        });
    if let Some(rule) = forward_rule {
        let args: Vec<&str> = std::iter::once("-D").chain(rule.iter().map(String::as_str)).collect();
        let _ = run("iptables", &args);
    }
}

/// The pid in a `meshlab-PID-RUN` stem, if `name` starts with one.
fn owner_of(name: &str) -> Option<(i32, String)> {
    let rest = name.strip_prefix(&format!("{PREFIX}-"))?;
    let mut parts = rest.splitn(3, '-');
    let pid = parts.next()?.parse().ok()?;
    let run = parts.next()?;
    Some((pid, format!("{PREFIX}-{pid}-{run}")))
}

fn alive(pid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Removes the namespaces and host rules of labs that are no longer running.
fn remove_leftovers() {
    let mut dead: HashMap<String, Vec<String>> = HashMap::new();
    for entry in std::fs::read_dir(NETNS_DIR).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some((_, stem)) = owner_of(&name).filter(|(pid, _)| !alive(*pid)) {
            dead.entry(stem).or_default().push(name);
        }
    }
    for namespaces in dead.values() {
        remove_network(namespaces, None);
    }
    let rules = Command::new("iptables").args(["-S", "FORWARD"]).output().map(|o| o.stdout).unwrap_or_default();
    for line in String::from_utf8_lossy(&rules).lines() {
        let stem = line.split("--comment ").nth(1).and_then(|c| c.split_whitespace().next());
        if let Some((_, stem)) = stem.and_then(owner_of).filter(|(pid, _)| !alive(*pid)) {
            let id = stem.rsplit('-').next().unwrap_or_default().to_owned();
            remove_network(&[], Some(&forward_rule(&id, &stem)));
        }
    }
}

/// Enters `handle`'s network namespace: for a child between fork and exec.
pub fn enter(handle: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: setns(2) with an open namespace fd; async-signal-safe.
    if unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subnet_holding_a_route_or_an_address_is_not_free() {
        let lines = [
            "default via 192.0.2.1 dev eth0",
            "10.7.0.2 dev mlvab12cd2 scope link",
            "local 10.9.255.254 dev mlvab12cd2 table local proto kernel scope host src 10.9.255.254",
            "2: eth0    inet 10.12.3.4/24 brd 10.12.3.255 scope global eth0",
            "10.0.0.0/8 via 192.0.2.9 dev tun0",
        ];
        let taken: Vec<_> = lines.iter().filter_map(|l| prefix_in(l)).collect();
        for s in [7, 9, 12] {
            assert!(!subnet_is_free(s, &taken), "10.{s}.0.0/16 is taken");
        }
        assert!(subnet_is_free(8, &taken), "a /8 around it is no clash");
    }
}
