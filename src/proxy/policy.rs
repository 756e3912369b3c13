//! Where the pull-through cache may connect: the address policy applied to
//! every upstream connection, redirect and token realm.
//!
//! An upstream listed in the configuration is reached wherever it is (the
//! operator chose it). Anything it points Trow at (a redirect, a token
//! realm) may be at a public address, or at an address of a kind the
//! upstream itself was reached at: an upstream on loopback may redirect to
//! another loopback port, one on a private network to that private network,
//! a public one only to public addresses. Unlisted upstreams (with
//! `allow_any_public`) and everything they point at must be public.
//!
//! Host names are checked after resolution, in the resolver the HTTP client
//! connects through ([`GuardedResolver`]), so a name cannot resolve to one
//! address when checked and another when connected (DNS rebinding). Literal
//! IP addresses never reach a resolver; [`check_url`] checks them, for the
//! first request, each redirect ([`redirect_policy`]) and token realms.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::redirect::Policy;
use reqwest::Url;

/// Most redirects followed for one upstream request.
pub const MAX_REDIRECTS: usize = 5;

/// The kinds of address the policy tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrClass {
    /// Globally routable.
    Public,
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// RFC 1918 (10/8, 172.16/12, 192.168/16) and deprecated IPv6
    /// site-local fec0::/10.
    Private,
    /// Carrier-grade NAT, 100.64.0.0/10.
    SharedCgnat,
    /// 169.254.0.0/16, fe80::/10.
    LinkLocal,
    /// Cloud metadata services: 169.254.169.254, 169.254.170.2,
    /// 100.100.100.200, fd00:ec2::254.
    Metadata,
    /// fc00::/7.
    UniqueLocal,
    /// 0.0.0.0/8, :: (Linux connects 0.0.0.0 to the local host).
    Unspecified,
    Multicast,
    Broadcast,
    /// 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32.
    Documentation,
    /// Everything else that is not globally routable (240/4, 192.0.0/24,
    /// 198.18/15, ::/96, 100::/64, outside 2000::/3).
    Reserved,
}

impl AddrClass {
    fn bit(self) -> u16 {
        1 << (self as u16)
    }

    fn describe(self) -> &'static str {
        match self {
            AddrClass::Public => "public",
            AddrClass::Loopback => "loopback",
            AddrClass::Private => "private-network",
            AddrClass::SharedCgnat => "carrier-grade NAT",
            AddrClass::LinkLocal => "link-local",
            AddrClass::Metadata => "cloud metadata service",
            AddrClass::UniqueLocal => "unique-local",
            AddrClass::Unspecified => "unspecified",
            AddrClass::Multicast => "multicast",
            AddrClass::Broadcast => "broadcast",
            AddrClass::Documentation => "documentation",
            AddrClass::Reserved => "reserved",
        }
    }
}

impl fmt::Display for AddrClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

const METADATA_V4: [Ipv4Addr; 3] = [
    Ipv4Addr::new(169, 254, 169, 254),
    Ipv4Addr::new(169, 254, 170, 2),
    Ipv4Addr::new(100, 100, 100, 200),
];
const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254);

/// The kind of an address. IPv4 addresses embedded in IPv6 ones (mapped
/// `::ffff:a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) are classified
/// as the IPv4 address they reach.
pub fn classify(ip: IpAddr) -> AddrClass {
    match ip {
        IpAddr::V4(a) => classify_v4(a),
        IpAddr::V6(a) => classify_v6(a),
    }
}

fn classify_v4(a: Ipv4Addr) -> AddrClass {
    let o = a.octets();
    if METADATA_V4.contains(&a) {
        AddrClass::Metadata
    } else if o[0] == 0 {
        AddrClass::Unspecified
    } else if a.is_loopback() {
        AddrClass::Loopback
    } else if a.is_private() {
        AddrClass::Private
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        AddrClass::SharedCgnat
    } else if a.is_link_local() {
        AddrClass::LinkLocal
    } else if a.is_broadcast() {
        AddrClass::Broadcast
    } else if a.is_multicast() {
        AddrClass::Multicast
    } else if a.is_documentation() {
        AddrClass::Documentation
    } else if o[0] >= 240
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)
        || (o[0] == 198 && (o[1] & 0xfe) == 18)
    {
        AddrClass::Reserved
    } else {
        AddrClass::Public
    }
}

fn classify_v6(a: Ipv6Addr) -> AddrClass {
    let s = a.segments();
    let embedded = |hi: u16, lo: u16| {
        let [a, b] = hi.to_be_bytes();
        let [c, d] = lo.to_be_bytes();
        classify_v4(Ipv4Addr::new(a, b, c, d))
    };
    if a == METADATA_V6 {
        AddrClass::Metadata
    } else if a.is_unspecified() {
        AddrClass::Unspecified
    } else if a.is_loopback() {
        AddrClass::Loopback
    } else if let Some(v4) = a.to_ipv4_mapped() {
        classify_v4(v4)
    } else if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4] {
        embedded(s[6], s[7])
    } else if s[0] == 0x2002 {
        embedded(s[1], s[2])
    } else if s[0..6] == [0; 6] {
        // Deprecated IPv4-compatible addresses.
        AddrClass::Reserved
    } else if s[0] & 0xff00 == 0xff00 {
        AddrClass::Multicast
    } else if s[0] & 0xffc0 == 0xfe80 {
        AddrClass::LinkLocal
    } else if s[0] & 0xffc0 == 0xfec0 {
        AddrClass::Private
    } else if s[0] & 0xfe00 == 0xfc00 {
        AddrClass::UniqueLocal
    } else if s[0] == 0x2001 && s[1] == 0x0db8 {
        AddrClass::Documentation
    } else if s[0] & 0xe000 != 0x2000 || (s[0] == 0x0100 && s[1..4] == [0; 3]) {
        AddrClass::Reserved
    } else {
        AddrClass::Public
    }
}

/// Why a connection, redirect or token realm was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("refused {url}: only https:// URLs are followed (plain http only for an upstream marked `insecure: true`)")]
    Scheme { url: String },
    #[error("refused {url}: it has no host")]
    NoHost { url: String },
    #[error("refused to follow more than {MAX_REDIRECTS} redirects")]
    TooManyRedirects,
    #[error("refused to connect to {host} at {ip}: it is a {class} address, and {rule}")]
    Address {
        host: String,
        ip: IpAddr,
        class: AddrClass,
        rule: &'static str,
    },
}

const RULE_PUBLIC_ONLY: &str = "an upstream not listed in registry_proxies.registries may only use public addresses (list it to reach it elsewhere)";
const RULE_LISTED: &str = "a listed upstream may only point Trow at public addresses or at addresses of the kind it is at itself";

/// The address policy of one upstream (or of all unlisted ones).
#[derive(Debug)]
pub struct AddressGuard {
    /// The listed upstream's host name or address as Trow connects to it
    /// (`registry-1.docker.io`, `10.0.0.5`), lowercase; `None` for unlisted
    /// upstreams, which must be public.
    upstream: Option<String>,
    /// Classes of the addresses the upstream was reached at, as bits:
    /// redirects and realms may go to those and to public addresses.
    upstream_classes: AtomicU16,
}

impl AddressGuard {
    /// The guard for a listed upstream at `host` (no port).
    pub fn listed(host: &str) -> AddressGuard {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let classes = host.parse::<IpAddr>().map_or(0, |ip| classify(ip).bit());
        AddressGuard {
            upstream: Some(host),
            upstream_classes: AtomicU16::new(classes),
        }
    }

    /// The guard for unlisted upstreams: public addresses only.
    pub fn public_only() -> AddressGuard {
        AddressGuard {
            upstream: None,
            upstream_classes: AtomicU16::new(0),
        }
    }

    /// Whether Trow may connect to `ip`, an address of `host`.
    pub fn check(&self, host: &str, ip: IpAddr) -> Result<(), Refusal> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let class = classify(ip);
        if let Some(upstream) = &self.upstream {
            if upstream.eq_ignore_ascii_case(host) {
                self.upstream_classes
                    .fetch_or(class.bit(), Ordering::Relaxed);
                return Ok(());
            }
        }
        if class == AddrClass::Public
            || self.upstream_classes.load(Ordering::Relaxed) & class.bit() != 0
        {
            return Ok(());
        }
        Err(Refusal::Address {
            host: host.to_string(),
            ip,
            class,
            rule: if self.upstream.is_some() {
                RULE_LISTED
            } else {
                RULE_PUBLIC_ONLY
            },
        })
    }
}

/// Checks a URL before Trow requests it: its scheme (`https`, or `http`
/// when `allow_http`) and, when its host is a literal IP address, that
/// address. Host names are checked when resolved.
pub fn check_url(guard: &AddressGuard, url: &Url, allow_http: bool) -> Result<(), Refusal> {
    match url.scheme() {
        "https" => {}
        "http" if allow_http => {}
        _ => {
            return Err(Refusal::Scheme {
                url: url.to_string(),
            })
        }
    }
    // The URL parser has already normalised other spellings of an IPv4
    // address (`2130706433`, `0x7f.1`) to dotted form.
    let Some(host) = url.host_str() else {
        return Err(Refusal::NoHost {
            url: url.to_string(),
        });
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(ip) => guard.check(bare, ip),
        Err(_) => Ok(()),
    }
}

/// The redirect rule: at most [`MAX_REDIRECTS`] hops, each to a URL that
/// [`check_url`] accepts.
pub fn redirect_policy(guard: Arc<AddressGuard>, allow_http: bool) -> Policy {
    Policy::custom(move |attempt| {
        // `previous` starts with the original URL: its length is the number
        // of the redirect being considered.
        if attempt.previous().len() > MAX_REDIRECTS {
            return attempt.error(Refusal::TooManyRedirects);
        }
        match check_url(&guard, attempt.url(), allow_http) {
            Ok(()) => attempt.follow(),
            Err(e) => attempt.error(e),
        }
    })
}

/// A resolver that refuses a name when any of its addresses is not allowed.
pub struct GuardedResolver(pub Arc<AddressGuard>);

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.0.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if addrs.is_empty() {
                return Err(format!("{host} resolves to no address").into());
            }
            for a in &addrs {
                guard.check(&host, a.ip())?;
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// The policy refusal somewhere in an error's chain of causes, if any.
pub fn refusal_in<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refusal> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<Refusal>() {
            return Some(r);
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> AddrClass {
        classify(s.parse().unwrap())
    }

    #[test]
    fn classes() {
        assert_eq!(c("8.8.8.8"), AddrClass::Public);
        assert_eq!(c("2606:4700::1111"), AddrClass::Public);
        assert_eq!(c("127.0.0.1"), AddrClass::Loopback);
        assert_eq!(c("127.255.0.9"), AddrClass::Loopback);
        assert_eq!(c("::1"), AddrClass::Loopback);
        assert_eq!(c("0.0.0.0"), AddrClass::Unspecified);
        assert_eq!(c("0.1.2.3"), AddrClass::Unspecified);
        assert_eq!(c("::"), AddrClass::Unspecified);
        assert_eq!(c("10.1.2.3"), AddrClass::Private);
        assert_eq!(c("172.16.0.1"), AddrClass::Private);
        assert_eq!(c("172.31.255.255"), AddrClass::Private);
        assert_eq!(c("172.32.0.1"), AddrClass::Public);
        assert_eq!(c("192.168.1.1"), AddrClass::Private);
        assert_eq!(c("100.64.0.1"), AddrClass::SharedCgnat);
        assert_eq!(c("100.127.255.255"), AddrClass::SharedCgnat);
        assert_eq!(c("100.128.0.1"), AddrClass::Public);
        assert_eq!(c("169.254.1.1"), AddrClass::LinkLocal);
        assert_eq!(c("169.254.169.254"), AddrClass::Metadata);
        assert_eq!(c("169.254.170.2"), AddrClass::Metadata);
        assert_eq!(c("100.100.100.200"), AddrClass::Metadata);
        assert_eq!(c("fd00:ec2::254"), AddrClass::Metadata);
        assert_eq!(c("fe80::1"), AddrClass::LinkLocal);
        assert_eq!(c("fc00::1"), AddrClass::UniqueLocal);
        assert_eq!(c("fdff::1"), AddrClass::UniqueLocal);
        assert_eq!(c("fec0::1"), AddrClass::Private);
        assert_eq!(c("224.0.0.1"), AddrClass::Multicast);
        assert_eq!(c("ff02::1"), AddrClass::Multicast);
        assert_eq!(c("255.255.255.255"), AddrClass::Broadcast);
        assert_eq!(c("192.0.2.1"), AddrClass::Documentation);
        assert_eq!(c("198.51.100.7"), AddrClass::Documentation);
        assert_eq!(c("203.0.113.9"), AddrClass::Documentation);
        assert_eq!(c("2001:db8::1"), AddrClass::Documentation);
        assert_eq!(c("240.0.0.1"), AddrClass::Reserved);
        assert_eq!(c("198.18.0.1"), AddrClass::Reserved);
        assert_eq!(c("192.0.0.8"), AddrClass::Reserved);
        assert_eq!(c("::7f00:1"), AddrClass::Reserved);
        assert_eq!(c("100::1"), AddrClass::Reserved);
    }

    #[test]
    fn embedded_ipv4_is_classified_as_what_it_reaches() {
        assert_eq!(c("::ffff:127.0.0.1"), AddrClass::Loopback);
        assert_eq!(c("::ffff:10.0.0.1"), AddrClass::Private);
        assert_eq!(c("::ffff:169.254.169.254"), AddrClass::Metadata);
        assert_eq!(c("::ffff:8.8.8.8"), AddrClass::Public);
        assert_eq!(c("64:ff9b::a9fe:a9fe"), AddrClass::Metadata);
        assert_eq!(c("64:ff9b::808:808"), AddrClass::Public);
        assert_eq!(c("2002:7f00:1::1"), AddrClass::Loopback);
        assert_eq!(c("2002:c0a8:101::1"), AddrClass::Private);
    }

    #[test]
    fn unlisted_upstreams_are_public_only() {
        let g = AddressGuard::public_only();
        assert!(g
            .check("example.com", "93.184.215.14".parse().unwrap())
            .is_ok());
        for bad in [
            "127.0.0.1",
            "::1",
            "0.0.0.0",
            "10.0.0.1",
            "172.20.1.1",
            "192.168.0.1",
            "100.64.1.1",
            "169.254.169.254",
            "169.254.3.3",
            "fd00:ec2::254",
            "fe80::1",
            "fc00::5",
            "::ffff:127.0.0.1",
            "::ffff:192.168.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.2.1",
        ] {
            let e = g.check("evil.example", bad.parse().unwrap()).unwrap_err();
            assert!(e.to_string().contains("public addresses"), "{bad}: {e}");
        }
    }

    #[test]
    fn listed_upstreams_may_point_at_their_own_kind_and_public() {
        // An upstream on loopback: other loopback ports, and public CDNs.
        let lo = AddressGuard::listed("127.0.0.1");
        assert!(lo.check("127.0.0.1", "127.0.0.1".parse().unwrap()).is_ok());
        assert!(lo.check("cdn", "127.0.0.2".parse().unwrap()).is_ok());
        assert!(lo.check("cdn", "8.8.4.4".parse().unwrap()).is_ok());
        assert!(lo.check("x", "10.0.0.1".parse().unwrap()).is_err());
        assert!(lo.check("x", "169.254.169.254".parse().unwrap()).is_err());

        // A public one (by name): nothing inside, whatever the form.
        let public = AddressGuard::listed("registry-1.docker.io");
        assert!(public
            .check("registry-1.docker.io", "44.1.2.3".parse().unwrap())
            .is_ok());
        for bad in [
            "127.0.0.1",
            "10.0.0.1",
            "100.64.0.1",
            "169.254.169.254",
            "::ffff:169.254.169.254",
            "fe80::1",
            "fd12::1",
        ] {
            assert!(public.check("cdn", bad.parse().unwrap()).is_err(), "{bad}");
        }

        // A private one, learnt when its name was resolved: private
        // addresses are then allowed, loopback and metadata still not.
        let private = AddressGuard::listed("registry.corp");
        assert!(private
            .check("blobs.corp", "10.9.9.9".parse().unwrap())
            .is_err());
        assert!(private
            .check("REGISTRY.corp", "10.0.0.5".parse().unwrap())
            .is_ok());
        assert!(private
            .check("blobs.corp", "10.9.9.9".parse().unwrap())
            .is_ok());
        assert!(private.check("x", "127.0.0.1".parse().unwrap()).is_err());
        assert!(private
            .check("x", "169.254.169.254".parse().unwrap())
            .is_err());
        assert!(private.check("x", "fd00::1".parse().unwrap()).is_err());
    }

    #[test]
    fn urls() {
        let g = AddressGuard::listed("10.0.0.5");
        let u = |s: &str| Url::parse(s).unwrap();
        assert!(check_url(&g, &u("https://cdn.example/x"), false).is_ok());
        assert!(matches!(
            check_url(&g, &u("http://cdn.example/x"), false),
            Err(Refusal::Scheme { .. })
        ));
        assert!(check_url(&g, &u("http://cdn.example/x"), true).is_ok());
        assert!(matches!(
            check_url(&g, &u("ftp://cdn.example/x"), true),
            Err(Refusal::Scheme { .. })
        ));
        assert!(check_url(&g, &u("https://10.1.1.1/x"), false).is_ok());
        assert!(check_url(&g, &u("https://127.0.0.1:5000/x"), false).is_err());
        assert!(check_url(&g, &u("https://[::ffff:127.0.0.1]/x"), false).is_err());
        // Other spellings of loopback and metadata are normalised by the
        // URL parser before the check.
        assert!(check_url(&g, &u("https://2130706433/x"), false).is_err());
        assert!(check_url(&g, &u("https://0x7f.1/x"), false).is_err());
        assert!(check_url(&g, &u("https://169.254.169.254/latest/meta-data"), false).is_err());
    }
}
