//! Dialable addresses: `host:port`, where host is a name, an IPv4 address or `[v6]`.
//!
//! Addresses come from the command line, from `--advertise` and from other peers' gossip, so one
//! validator serves all three. They stay strings until dialled: a name is resolved at each dial,
//! because a container's address may change when it restarts.

use std::net::{IpAddr, SocketAddr};

/// Longest accepted address: a 253-character DNS name, a colon and a port.
pub const MAX_ADDR_LEN: usize = 253 + 6;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AddrError {
    #[error("expected host:port, got {0:?}")]
    Shape(String),
    #[error("bad port in {0:?}: expected 1-65535")]
    Port(String),
    #[error("bad host in {0:?}")]
    Host(String),
    #[error("address longer than {MAX_ADDR_LEN} characters")]
    TooLong,
}

/// Checks that `s` is `host:port` and returns it normalised (an IP literal in canonical form).
pub fn parse(s: &str) -> Result<String, AddrError> {
    if s.len() > MAX_ADDR_LEN {
        return Err(AddrError::TooLong);
    }
    if let Ok(sock) = s.parse::<SocketAddr>() {
        return if sock.port() == 0 { Err(AddrError::Port(s.into())) } else { Ok(sock.to_string()) };
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(|| AddrError::Shape(s.into()))?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(AddrError::Port(s.into())),
    }
    let name_ok = !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if name_ok { Ok(s.to_owned()) } else { Err(AddrError::Host(s.into())) }
}

/// The address others dial to reach a peer seen at `observed` that listens on `port`.
pub fn dialable(observed: IpAddr, port: u16) -> String {
    SocketAddr::new(observed.to_canonical(), port).to_string()
}

/// The host an address belongs to, for per-host limits: an IPv4 address (also IPv4-mapped), or
/// an IPv6 /64, since one IPv6 host usually holds a whole /64.
pub fn host_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

/// The host of a dialable address, when it is an IP literal (names are resolved at each dial).
pub fn host_of_addr(addr: &str) -> Option<IpAddr> {
    addr.parse::<SocketAddr>().ok().map(|s| host_of(s.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_names_ipv4_and_bracketed_ipv6() {
        assert_eq!(parse("localhost:3001").unwrap(), "localhost:3001");
        assert_eq!(parse("peer1:4000").unwrap(), "peer1:4000");
        assert_eq!(parse("10.0.0.7:9").unwrap(), "10.0.0.7:9");
        assert_eq!(parse("[::1]:4000").unwrap(), "[::1]:4000");
    }

    #[test]
    fn rejects_malformed_addresses() {
        for bad in ["", "host", ":4000", "host:", "host:0", "host:70000", "a b:1", "::1:4000", "x..y:1"] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse(&format!("{}:1", "a".repeat(300))), Err(AddrError::TooLong));
    }

    #[test]
    fn an_ipv6_host_is_its_slash_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(host_of(a), host_of(b));
        assert_ne!(host_of(a), host_of(other));
        assert_eq!(host_of("::ffff:10.0.0.1".parse().unwrap()), host_of("10.0.0.1".parse().unwrap()));
        assert_eq!(host_of_addr("[2001:db8:1:2::7]:4000"), Some(host_of(a)));
        assert_eq!(host_of_addr("peer1:4000"), None);
    }

    #[test]
    fn dialable_unmaps_ipv4_in_ipv6() {
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(dialable(mapped, 4000), "10.1.2.3:4000");
    }
}
