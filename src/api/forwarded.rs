//! Who the client really is when Trow runs behind a reverse proxy (an
//! Ingress, a load balancer that terminates TLS).
//!
//! `X-Forwarded-For`, `X-Forwarded-Proto` and `X-Forwarded-Host` are written
//! by whoever sends the request, so they are believed only when the TCP peer
//! is one of the `--trusted-proxies`. Then the client is the right-most
//! address in `X-Forwarded-For` that is not itself a trusted proxy: entries
//! to its left were written by the client and prove nothing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use axum::http::HeaderMap;

/// An address block: `10.0.0.0/8`, `fd00::/8`, or one address.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is inside the block. IPv4-mapped IPv6 addresses
    /// (`::ffff:10.0.0.1`, what a dual-stack socket reports) count as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// As written (`10.0.0.0/8`), so that `--dry-run` prints it readably.
impl std::fmt::Debug for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// IPv4-mapped IPv6 addresses as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// clap value parser for one `--trusted-proxies` entry: an address or
/// `address/prefix`.
pub fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let s = s.trim();
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| {
        format!(
            "`{s}` is not an IP address or CIDR block (e.g. 10.0.0.0/8, 192.168.1.10, fd00::/8)"
        )
    })?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("`{s}`: the prefix length must be 0 to {max}"))?,
    };
    // `::ffff:a.b.c.d/n` is the IPv4 block `a.b.c.d/(n-96)`.
    match (canonical(addr), addr) {
        (IpAddr::V4(v4), IpAddr::V6(_)) => prefix
            .checked_sub(96)
            .map(|prefix| Cidr {
                addr: IpAddr::V4(v4),
                prefix,
            })
            .ok_or_else(|| format!("`{s}`: an IPv4-mapped block needs a prefix of at least 96")),
        _ => Ok(Cidr { addr, prefix }),
    }
}

/// The `--trusted-proxies`: peers whose `X-Forwarded-*` headers are believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<Cidr>);

/// What a request says about its client, after deciding whom to believe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientView {
    /// The client's address: the TCP peer, or the address a trusted proxy
    /// forwarded.
    pub ip: IpAddr,
    /// A trusted proxy says the client used HTTPS.
    pub forwarded_https: bool,
    /// The host the client addressed, as a trusted proxy forwarded it.
    pub forwarded_host: Option<String>,
}

impl TrustedProxies {
    pub fn new(nets: Vec<Cidr>) -> TrustedProxies {
        TrustedProxies(nets)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(ip))
    }

    /// The client of a request that came from `peer` (`None`: unknown, as
    /// in tests without a socket) with `headers`.
    pub fn client(&self, peer: Option<SocketAddr>, headers: &HeaderMap) -> ClientView {
        let peer_ip = peer.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |p| canonical(p.ip()));
        if !self.trusts(peer_ip) {
            return ClientView {
                ip: peer_ip,
                forwarded_https: false,
                forwarded_host: None,
            };
        }
        ClientView {
            ip: self.forwarded_for(peer_ip, headers),
            forwarded_https: last_value(headers, "x-forwarded-proto")
                .is_some_and(|v| v.eq_ignore_ascii_case("https")),
            forwarded_host: last_value(headers, "x-forwarded-host").map(str::to_string),
        }
    }

    /// Walks `X-Forwarded-For` from the right, past trusted proxies, to the
    /// first address that is not one. An entry that is not an address ends
    /// the walk at the last address seen, which a trusted proxy vouched for.
    fn forwarded_for(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = peer;
        let entries = headers
            .get_all("x-forwarded-for")
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("").split(','))
            .collect::<Vec<_>>();
        for entry in entries.iter().rev() {
            let Some(ip) = parse_forwarded_addr(entry) else {
                break;
            };
            client = ip;
            if !self.trusts(ip) {
                break;
            }
        }
        client
    }
}

/// The last comma-separated value of the last `name` header: what the
/// nearest proxy wrote.
fn last_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(name)
        .iter()
        .next_back()?
        .to_str()
        .ok()?
        .rsplit(',')
        .next()
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// One `X-Forwarded-For` entry: an address, possibly with a port
/// (`1.2.3.4:5678`, `[::1]:5678`) as some proxies write it.
fn parse_forwarded_addr(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))
                .and_then(|e| e.parse::<Ipv6Addr>().ok())
                .map(IpAddr::V6)
        })
        .map(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(list: &[&str]) -> TrustedProxies {
        TrustedProxies::new(list.iter().map(|s| parse_cidr(s).unwrap()).collect())
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    fn peer(s: &str) -> Option<SocketAddr> {
        Some(SocketAddr::new(s.parse().unwrap(), 4000))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs() {
        let n = parse_cidr("10.1.0.0/16").unwrap();
        assert!(n.contains(ip("10.1.200.3")));
        assert!(!n.contains(ip("10.2.0.1")));
        assert!(n.contains(ip("::ffff:10.1.0.9")));
        let one = parse_cidr("192.168.1.10").unwrap();
        assert!(one.contains(ip("192.168.1.10")));
        assert!(!one.contains(ip("192.168.1.11")));
        let v6 = parse_cidr(" fd00::/8 ").unwrap();
        assert!(v6.contains(ip("fd12::1")));
        assert!(!v6.contains(ip("fe80::1")));
        assert!(!v6.contains(ip("10.0.0.1")));
        assert!(parse_cidr("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(parse_cidr("::/0").unwrap().contains(ip("2001:db8::1")));
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "host.example",
            "10.0.0.0/x",
            "10.0.0/8",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_cidr("::ffff:10.0.0.1").unwrap().to_string(),
            "10.0.0.1/32"
        );
        assert_eq!(
            parse_cidr("::ffff:10.0.0.0/104").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert!(parse_cidr("::ffff:10.0.0.0/64").is_err());
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_says() {
        let p = proxies(&["10.0.0.0/8"]);
        let h = headers(&[
            ("x-forwarded-for", "198.51.100.1"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
        ]);
        let v = p.client(peer("192.0.2.7"), &h);
        assert_eq!(v.ip, ip("192.0.2.7"));
        assert!(!v.forwarded_https);
        assert_eq!(v.forwarded_host, None);
        // No trusted proxies at all: the same.
        let v = TrustedProxies::default().client(peer("10.0.0.1"), &h);
        assert_eq!(v.ip, ip("10.0.0.1"));
        assert!(!v.forwarded_https);
    }

    #[test]
    fn the_right_most_untrusted_address_is_the_client() {
        let p = proxies(&["10.0.0.0/8", "fd00::/8"]);
        let client = |xff: &[&str]| {
            let pairs: Vec<(&'static str, &str)> =
                xff.iter().map(|v| ("x-forwarded-for", *v)).collect();
            p.client(peer("10.0.0.2"), &headers(&pairs)).ip
        };
        assert_eq!(client(&["198.51.100.1"]), ip("198.51.100.1"));
        // What the client wrote itself is to the left: ignored.
        assert_eq!(client(&["1.1.1.1, 198.51.100.1"]), ip("198.51.100.1"));
        // Trusted hops are skipped, across several headers too.
        assert_eq!(
            client(&["1.1.1.1, 198.51.100.1", "10.3.3.3, fd00::5"]),
            ip("198.51.100.1")
        );
        // All trusted: the left-most.
        assert_eq!(client(&["10.9.9.9, 10.3.3.3"]), ip("10.9.9.9"));
        // Ports and brackets.
        assert_eq!(client(&["198.51.100.1:5555"]), ip("198.51.100.1"));
        assert_eq!(client(&["[2001:db8::1]:80"]), ip("2001:db8::1"));
        assert_eq!(client(&["[2001:db8::1]"]), ip("2001:db8::1"));
        // Garbage stops the walk at the last address a trusted proxy wrote.
        assert_eq!(client(&["unknown"]), ip("10.0.0.2"));
        assert_eq!(client(&["unknown, 10.4.4.4"]), ip("10.4.4.4"));
        assert_eq!(client(&["198.51.100.1, unknown"]), ip("10.0.0.2"));
        // No header: the proxy itself.
        assert_eq!(client(&[]), ip("10.0.0.2"));
    }

    #[test]
    fn proto_and_host_from_the_nearest_trusted_proxy() {
        let p = proxies(&["127.0.0.1"]);
        let v = p.client(
            peer("127.0.0.1"),
            &headers(&[
                ("x-forwarded-proto", "http, HTTPS"),
                ("x-forwarded-host", "registry.example.com"),
            ]),
        );
        assert!(v.forwarded_https);
        assert_eq!(v.forwarded_host.as_deref(), Some("registry.example.com"));
        let v = p.client(
            peer("127.0.0.1"),
            &headers(&[("x-forwarded-proto", "https, http")]),
        );
        assert!(!v.forwarded_https);
        // A dual-stack socket reports IPv4 peers as mapped addresses.
        let v = p.client(
            peer("::ffff:127.0.0.1"),
            &headers(&[("x-forwarded-for", "198.51.100.1")]),
        );
        assert_eq!(v.ip, ip("198.51.100.1"));
    }
}
