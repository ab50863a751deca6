//! Link conditions: loss, rate, delay and jitter on the traffic from one peer to another.
//!
//! A condition is set on a directed pair (from → to) and applies to what `from` sends `to`, as
//! an egress qdisc would. The lab keeps the table ([`Conditions`]); each backend makes it real
//! its own way: on netns and docker, iptables' `statistic` match drops packets and tc queues
//! shape them (`htb` for rate, `netem` for delay and jitter, see [`shaping_commands`]); on the
//! process backend the peer's lab hook drops and holds back its own frames (cooperative, as its
//! cuts are). Unlike a cut, a condition never separates two peers: the mesh and delivery checks
//! expect a conditioned link to carry on.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::time::Duration;

/// What happens to traffic on one direction of a link. Every part is optional; an empty
/// condition is no condition.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Condition {
    /// Packets (frames, on the process backend) dropped, in percent: above 0, below 100.
    pub loss: Option<f64>,
    /// Bits per second.
    pub rate: Option<u64>,
    pub delay: Option<Duration>,
    /// Each packet's delay varies by up to this much either way (needs `delay`).
    pub jitter: Option<Duration>,
}

impl Condition {
    /// Whether it needs a delaying qdisc (netem).
    pub fn delays(&self) -> bool {
        self.delay.is_some() || self.jitter.is_some()
    }

    /// Whether it needs a queue on the sender's interface (tc), rather than a packet filter only.
    pub fn shapes(&self) -> bool {
        self.rate.is_some() || self.delays()
    }

    /// This condition with `other`'s parts laid over it.
    pub fn merged(self, other: Condition) -> Condition {
        Condition {
            loss: other.loss.or(self.loss),
            rate: other.rate.or(self.rate),
            delay: other.delay.or(self.delay),
            jitter: other.jitter.or(self.jitter),
        }
    }

    /// Checks the parts' ranges (a scenario's or the nemesis's).
    pub fn check(&self) -> Result<(), String> {
        if self.loss.is_none() && !self.shapes() {
            return Err("a condition needs `loss`, `rate`, `delay` or `jitter`".into());
        }
        if let Some(loss) = self.loss
            && !(loss > 0.0 && loss < 100.0)
        {
            return Err(format!("`loss` must be above 0% and below 100% (a cut drops everything), not {loss}%"));
        }
        if self.rate.is_some_and(|r| !(MIN_RATE..=MAX_RATE).contains(&r)) {
            return Err(format!("`rate` must be {MIN_RATE} to {MAX_RATE} bits per second"));
        }
        let too_long = |d: Option<Duration>| d.is_some_and(|d| d > MAX_DELAY || d.subsec_nanos() % 1_000_000 != 0);
        if too_long(self.delay) || too_long(self.jitter) {
            return Err(format!("`delay` and `jitter` are whole milliseconds, at most {}", MAX_DELAY.as_secs()));
        }
        if self.jitter.is_some() && self.delay.is_none() {
            return Err("`jitter` varies a `delay`: give one".into());
        }
        Ok(())
    }

    /// The words of the peer's `/lab condition NAME …` command, which its hook echoes in its
    /// `hook` event: `loss=10 rate=64000 delay=50ms jitter=10ms`, parts left out when unset.
    pub fn hook_words(&self) -> String {
        let mut words = Vec::new();
        if let Some(l) = self.loss {
            words.push(format!("loss={l}"));
        }
        if let Some(r) = self.rate {
            words.push(format!("rate={r}"));
        }
        if let Some(d) = self.delay {
            words.push(format!("delay={}ms", d.as_millis()));
        }
        if let Some(j) = self.jitter {
            words.push(format!("jitter={}ms", j.as_millis()));
        }
        words.join(" ")
    }
}

/// Slowest and fastest rates a condition may set: below 8 kbit/s a heartbeat barely fits.
pub const MIN_RATE: u64 = 8_000;
pub const MAX_RATE: u64 = 10_000_000_000;
/// Longest delay or jitter.
pub const MAX_DELAY: Duration = Duration::from_secs(10);

impl fmt::Display for Condition {
    /// `10% loss, 1 Mbit/s, 50 ms ± 10 ms`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(l) = self.loss {
            parts.push(format!("{l}% loss"));
        }
        if let Some(r) = self.rate {
            parts.push(human_rate(r));
        }
        match (self.delay, self.jitter) {
            (Some(d), Some(j)) => parts.push(format!("{} ms ± {} ms", d.as_millis(), j.as_millis())),
            (Some(d), None) => parts.push(format!("{} ms delay", d.as_millis())),
            _ => {}
        }
        f.write_str(&parts.join(", "))
    }
}

fn human_rate(bits: u64) -> String {
    match bits {
        b if b >= 1_000_000_000 && b % 1_000_000 == 0 => format!("{} Gbit/s", b as f64 / 1e9),
        b if b >= 1_000_000 && b % 1_000 == 0 => format!("{} Mbit/s", b as f64 / 1e6),
        b if b >= 1_000 => format!("{} kbit/s", b as f64 / 1e3),
        b => format!("{b} bit/s"),
    }
}

/// Reads a rate: bits per second as a number, or with a unit as tc writes it (`64kbit`,
/// `1mbit`, `1gbit`, `500bit`).
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim().to_ascii_lowercase();
    let (number, scale) = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)]
        .iter()
        .find_map(|(unit, scale)| t.strip_suffix(unit).map(|n| (n.trim().to_owned(), *scale)))
        .unwrap_or((t.clone(), 1.0));
    let value: f64 =
        number.parse().map_err(|_| format!("bad rate {text:?}: write bits per second, as 64kbit or 1mbit"))?;
    let bits = value * scale;
    if !(bits.is_finite() && bits >= 1.0 && bits <= MAX_RATE as f64) {
        return Err(format!("bad rate {text:?}: at most {}", human_rate(MAX_RATE)));
    }
    Ok(bits.round() as u64)
}

/// Reads a loss: a percentage, as `10%` or `10`.
pub fn parse_loss(text: &str) -> Result<f64, String> {
    let t = text.trim();
    t.strip_suffix('%')
        .unwrap_or(t)
        .trim()
        .parse()
        .map_err(|_| format!("bad loss {text:?}: write a percentage, as 10%"))
}

/// Conditions by directed pair of peer names: (from, to) applies to what from sends to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Conditions {
    directed: BTreeMap<(String, String), Condition>,
}

impl Conditions {
    /// Lays `c` over what the link from → to has.
    pub fn set(&mut self, from: &str, to: &str, c: Condition) {
        let entry = self.directed.entry((from.to_owned(), to.to_owned())).or_default();
        *entry = entry.merged(c);
    }

    pub fn clear_pair(&mut self, a: &str, b: &str) {
        self.directed.remove(&(a.to_owned(), b.to_owned()));
        self.directed.remove(&(b.to_owned(), a.to_owned()));
    }

    pub fn clear_directed(&mut self, from: &str, to: &str) {
        self.directed.remove(&(from.to_owned(), to.to_owned()));
    }

    pub fn clear_all(&mut self) {
        self.directed.clear();
    }

    /// What `peer` applies to its own sending: (other, condition), by other's name.
    pub fn egress_of(&self, peer: &str) -> Vec<(String, Condition)> {
        self.directed.iter().filter(|((from, _), _)| from == peer).map(|((_, to), c)| (to.clone(), *c)).collect()
    }

    /// Whether any condition needs a delaying qdisc.
    pub fn delays(&self) -> bool {
        self.directed.values().any(Condition::delays)
    }

    pub fn is_empty(&self) -> bool {
        self.directed.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&(String, String), &Condition)> {
        self.directed.iter()
    }
}

/// The `tc -batch` commands that give `dev` (without a root queue) a queue shaping traffic to
/// each address as `conditions` say: an htb root whose unclassified traffic passes unshaped, a
/// class per shaped destination (its rate, or no limit to speak of) with a netem queue under
/// it when it is delayed, and a u32 filter on the destination address. None without shaping.
pub fn shaping_commands(dev: &str, conditions: &[(Ipv4Addr, Condition)]) -> Vec<String> {
    let mut commands = Vec::new();
    let shaped: Vec<&(Ipv4Addr, Condition)> = conditions.iter().filter(|(_, c)| c.shapes()).collect();
    if shaped.is_empty() {
        return commands;
    }
    commands.push(format!("qdisc add dev {dev} root handle 1: htb default 0"));
    for (i, (ip, c)) in shaped.iter().enumerate() {
        let class = format!("1:{:x}", i + 1);
        let rate = c.rate.unwrap_or(MAX_RATE);
        commands.push(format!("class add dev {dev} parent 1: classid {class} htb rate {rate}bit ceil {rate}bit"));
        if let Some(delay) = c.delay {
            let jitter = c.jitter.map_or(String::new(), |j| format!(" {}ms", j.as_millis()));
            commands.push(format!(
                "qdisc add dev {dev} parent {class} handle {:x}: netem delay {}ms{jitter}",
                i + 10,
                delay.as_millis()
            ));
        }
        commands
            .push(format!("filter add dev {dev} parent 1: protocol ip prio 1 u32 match ip dst {ip}/32 flowid {class}"));
    }
    commands
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_losses_read_as_tc_and_people_write_them() {
        assert_eq!(parse_rate("64kbit").unwrap(), 64_000);
        assert_eq!(parse_rate("1.5mbit").unwrap(), 1_500_000);
        assert_eq!(parse_rate("1000").unwrap(), 1000);
        assert!(parse_rate("1mbps").is_err(), "bytes per second units are not guessed at");
        assert!(parse_rate("-5kbit").is_err());
        assert_eq!(parse_loss("10%").unwrap(), 10.0);
        assert_eq!(parse_loss("2.5").unwrap(), 2.5);
        assert!(parse_loss("ten").is_err());
    }

    #[test]
    fn a_condition_is_checked_and_described() {
        let c = Condition { loss: Some(10.0), rate: Some(1_000_000), ..Default::default() };
        assert!(c.check().is_ok());
        assert_eq!(c.to_string(), "10% loss, 1 Mbit/s");
        assert_eq!(c.hook_words(), "loss=10 rate=1000000");
        assert!(Condition::default().check().is_err());
        assert!(Condition { loss: Some(100.0), ..Default::default() }.check().is_err());
        assert!(Condition { jitter: Some(Duration::from_millis(5)), ..Default::default() }.check().is_err());
        assert!(Condition { rate: Some(10), ..Default::default() }.check().is_err());
    }

    #[test]
    fn conditions_are_directed_and_merge() {
        let mut all = Conditions::default();
        all.set("a", "b", Condition { loss: Some(5.0), ..Default::default() });
        all.set("a", "b", Condition { rate: Some(64_000), ..Default::default() });
        assert_eq!(
            all.egress_of("a"),
            vec![("b".into(), Condition { loss: Some(5.0), rate: Some(64_000), ..Default::default() })]
        );
        assert!(all.egress_of("b").is_empty());
        all.clear_pair("b", "a");
        assert!(all.is_empty());
    }

    #[test]
    fn shaping_builds_a_class_per_shaped_destination() {
        let ip = Ipv4Addr::new(10, 1, 0, 2);
        let lossy = (Ipv4Addr::new(10, 1, 0, 3), Condition { loss: Some(5.0), ..Default::default() });
        assert!(shaping_commands("eth0", &[lossy]).is_empty(), "loss is the packet filter's");
        let slow = Condition { rate: Some(64_000), delay: Some(Duration::from_millis(50)), ..Default::default() };
        let commands = shaping_commands("eth0", &[lossy, (ip, slow)]);
        assert_eq!(
            commands,
            [
                "qdisc add dev eth0 root handle 1: htb default 0",
                "class add dev eth0 parent 1: classid 1:1 htb rate 64000bit ceil 64000bit",
                "qdisc add dev eth0 parent 1:1 handle a: netem delay 50ms",
                "filter add dev eth0 parent 1: protocol ip prio 1 u32 match ip dst 10.1.0.2/32 flowid 1:1",
            ]
        );
    }
}
