//! Where a webhook may point: the URL's form (checked at registration) and
//! the addresses the hub may connect to (checked at registration for a
//! literal address, and for every resolved address at each connection:
//! the server-side request forgery guard).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::error::{Error, Result};

/// The longest URL a spoke may register.
const MAX_URL_CHARS: usize = 2048;

/// Cloud metadata services outside the link-local ranges.
const METADATA: [IpAddr; 2] = [
    // AWS (IPv6).
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
    // Alibaba Cloud.
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
];

/// A webhook URL in an accepted form: `https://`, or `http://` for a
/// loopback host; no user info or fragment; a host; at most 2048
/// characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl(url::Url);

impl WebhookUrl {
    /// Checks a URL as a spoke registers it (INVALID_ARGUMENT naming
    /// `webhook_url`).
    pub fn parse(text: &str) -> Result<Self> {
        let invalid = |why: &str| Error::invalid("webhook_url", why);
        if text.chars().count() > MAX_URL_CHARS {
            return Err(invalid("at most 2048 characters"));
        }
        let url = url::Url::parse(text).map_err(|e| invalid(&format!("not a URL: {e}")))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(invalid("must not carry a user name or password"));
        }
        if url.fragment().is_some() {
            return Err(invalid("must not have a fragment"));
        }
        if url.host().is_none() {
            return Err(invalid("must name a host"));
        }
        let url = Self(url);
        match url.0.scheme() {
            "https" => Ok(url),
            "http" if url.is_loopback_host() => Ok(url),
            "http" => Err(invalid(
                "must use https:// (http:// only for a loopback host: 127.0.0.1, [::1], localhost)",
            )),
            other => Err(invalid(&format!(
                "scheme {other:?}: must be https:// (or http:// for a loopback host)"
            ))),
        }
    }

    /// The parsed URL.
    pub fn url(&self) -> &url::Url {
        &self.0
    }

    /// The port connections go to (the scheme's default when not given).
    pub fn port(&self) -> u16 {
        self.0.port_or_known_default().unwrap_or(443)
    }

    /// Whether the host is a loopback address or `localhost`.
    pub fn is_loopback_host(&self) -> bool {
        match self.0.host() {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            Some(url::Host::Domain(name)) => {
                name.eq_ignore_ascii_case("localhost") || name.eq_ignore_ascii_case("localhost.")
            }
            None => false,
        }
    }

    /// The host as an address, when it is one.
    pub fn literal_ip(&self) -> Option<IpAddr> {
        match self.0.host()? {
            url::Host::Ipv4(ip) => Some(IpAddr::V4(ip)),
            url::Host::Ipv6(ip) => Some(IpAddr::V6(ip)),
            url::Host::Domain(_) => None,
        }
    }
}

impl std::fmt::Display for WebhookUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.as_str())
    }
}

/// Which addresses a webhook may reach.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    /// Allow link-local and cloud metadata addresses
    /// (`--webhook-allow-link-local`).
    pub allow_link_local: bool,
    /// The hub's own ports (gRPC and HTTP), refused on any address of this
    /// machine.
    pub own_ports: Vec<u16>,
}

impl AddressPolicy {
    /// Why the hub must not connect to `addr`, if it must not.
    /// `loopback_only`: the URL is `http://`, so only loopback addresses
    /// will do.
    pub fn refuse(&self, addr: SocketAddr, loopback_only: bool) -> Option<String> {
        let ip = addr.ip().to_canonical();
        if ip.is_unspecified() {
            return Some(format!("{ip} is an unspecified address"));
        }
        if ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
            return Some(format!("{ip} is a multicast or broadcast address"));
        }
        if !self.allow_link_local && (is_link_local(ip) || METADATA.contains(&ip)) {
            return Some(format!(
                "{ip} is a link-local or cloud metadata address (allowed only with \
                 --webhook-allow-link-local)"
            ));
        }
        if loopback_only && !ip.is_loopback() {
            return Some(format!(
                "{ip} is not a loopback address, and http:// is allowed only for loopback"
            ));
        }
        if self.own_ports.contains(&addr.port()) && is_this_machine(ip) {
            return Some(format!("{addr} is one of the hub's own ports"));
        }
        None
    }

    /// Checks a URL at registration: a literal address must be allowed
    /// (host names are checked at each connection, once resolved).
    pub fn check(&self, url: &WebhookUrl) -> Result<()> {
        let ip = match url.literal_ip() {
            Some(ip) => ip,
            // Checked for its own ports as 127.0.0.1 would be.
            None if url.is_loopback_host() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            None => return Ok(()),
        };
        let loopback_only = url.url().scheme() == "http";
        match self.refuse(SocketAddr::new(ip, url.port()), loopback_only) {
            Some(why) => Err(Error::invalid("webhook_url", why)),
            None => Ok(()),
        }
    }
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// Whether `ip` is an address of this machine: loopback, or one a socket
/// can bind to (binding needs no traffic and fails for foreign addresses).
fn is_this_machine(ip: IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> AddressPolicy {
        AddressPolicy {
            allow_link_local: false,
            own_ports: vec![50051, 8080],
        }
    }

    fn refused(url: &str) -> String {
        let url = WebhookUrl::parse(url).expect("a well-formed URL");
        match policy().check(&url) {
            Err(Error::InvalidArgument { field, reason }) => {
                assert_eq!(field, "webhook_url");
                reason
            }
            other => panic!("{url}: expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn forms() {
        for ok in [
            "https://spoke.example.com/hooks/hub",
            "https://10.1.2.3:8443/x?y=1",
            "http://127.0.0.1:9000/hook",
            "http://[::1]:9000/",
            "http://localhost:9000/",
        ] {
            let url = WebhookUrl::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
            policy().check(&url).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "spoke.example.com/hook",
            "http://spoke.example.com/hook",
            "http://10.0.0.1/hook",
            "ftp://spoke.example.com/",
            "https://user:pw@spoke.example.com/",
            "https://spoke.example.com/#frag",
            "file:///etc/passwd",
        ] {
            assert!(WebhookUrl::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let long = format!("https://a.example/{}", "x".repeat(2048));
        assert!(WebhookUrl::parse(&long).is_err());
    }

    #[test]
    fn the_ssrf_guard_refuses_metadata_link_local_and_the_hubs_own_ports() {
        assert!(refused("https://169.254.169.254/latest/meta-data/").contains("link-local"));
        assert!(refused("https://[fe80::1]/").contains("link-local"));
        assert!(refused("https://[fd00:ec2::254]/").contains("metadata"));
        assert!(refused("https://[::ffff:169.254.169.254]/").contains("link-local"));
        assert!(refused("https://0.0.0.0/").contains("unspecified"));
        assert!(refused("https://224.0.0.1/").contains("multicast"));
        assert!(refused("http://127.0.0.1:50051/").contains("own ports"));
        assert!(refused("https://localhost:8080/").contains("own ports"));
        // Another port on this machine is a spoke beside the hub: fine.
        policy()
            .check(&WebhookUrl::parse("http://127.0.0.1:50052/").unwrap())
            .unwrap();
        let allowed = AddressPolicy {
            allow_link_local: true,
            ..policy()
        };
        let metadata = WebhookUrl::parse("https://169.254.169.254/").unwrap();
        allowed.check(&metadata).unwrap();
    }

    #[test]
    fn resolved_addresses_of_an_http_url_must_be_loopback() {
        let p = policy();
        let lan = SocketAddr::from(([192, 168, 1, 5], 80));
        assert!(p.refuse(lan, true).is_some());
        assert!(p.refuse(lan, false).is_none());
        assert!(
            p.refuse(SocketAddr::from(([127, 0, 0, 1], 80)), true)
                .is_none()
        );
    }
}
