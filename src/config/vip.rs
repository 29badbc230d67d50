//! The `[vip]` table: a floating address that only the writable leader
//! holds, for clients that can use neither a multi-host connection string
//! nor the proxy. What the agent does with it is in `agent::vip`; the rule
//! for when it holds the address is `ha::vip`.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// `[vip]` as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVip {
    /// `address/prefix`, e.g. `"10.0.0.50/24"`.
    pub address: String,
    /// The network interface the address is added to, e.g. `"eth0"`.
    pub interface: String,
    /// Gratuitous ARP announcements sent after the address is added.
    #[serde(default = "default_arp_count")]
    pub arp_count: u32,
    /// Time between two announcements.
    #[serde(default = "default_arp_interval", with = "humantime_serde")]
    pub arp_interval: Duration,
}

/// Three announcements 200 ms apart, as keepalived's default repeats do in
/// spirit: one lost frame, or a switch that was still learning the port,
/// does not leave clients with the old MAC address for the cache lifetime.
fn default_arp_count() -> u32 {
    3
}
fn default_arp_interval() -> Duration {
    Duration::from_millis(200)
}

/// Validated `[vip]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipConfig {
    pub address: IpAddr,
    pub prefix_len: u8,
    pub interface: String,
    pub arp_count: u32,
    pub arp_interval: Duration,
}

impl VipConfig {
    pub fn validate(path: &Path, raw: RawVip) -> Result<VipConfig, ConfigError> {
        let bad = |key: &str, msg: String| ConfigError::invalid(path, key, msg);
        let (address, prefix_len) =
            parse_address(&raw.address).map_err(|m| bad("vip.address", m))?;
        // IFNAMSIZ is 16 with the terminating NUL; the kernel rejects
        // longer names, and '/' or whitespace never name an interface.
        if raw.interface.is_empty()
            || raw.interface.len() > 15
            || raw.interface.contains(['/', ':'])
            || raw.interface.chars().any(char::is_whitespace)
        {
            return Err(bad(
                "vip.interface",
                format!(
                    "{:?} is not an interface name (1-15 characters, no '/', ':' or spaces)",
                    raw.interface
                ),
            ));
        }
        if !(1..=100).contains(&raw.arp_count) {
            return Err(bad(
                "vip.arp_count",
                format!("{} must be 1-100", raw.arp_count),
            ));
        }
        if raw.arp_interval < Duration::from_millis(10)
            || raw.arp_interval > Duration::from_secs(10)
        {
            return Err(bad(
                "vip.arp_interval",
                format!(
                    "{} must be between 10ms and 10s",
                    humantime::format_duration(raw.arp_interval)
                ),
            ));
        }
        Ok(VipConfig {
            address,
            prefix_len,
            interface: raw.interface,
            arp_count: raw.arp_count,
            arp_interval: raw.arp_interval,
        })
    }

    /// `address/prefix`, as in the file and in `ip addr`.
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.address, self.prefix_len)
    }
}

/// Parses `address/prefix`. The prefix is required: without it the kernel
/// would add a /32 and the address would have no connected route, which
/// is rarely what an operator moving a service address wants.
pub fn parse_address(text: &str) -> Result<(IpAddr, u8), String> {
    let net: ipnet::IpNet = text.parse().map_err(|_| {
        format!("{text:?} must be an address with its prefix length, e.g. \"10.0.0.50/24\"")
    })?;
    let address = net.addr();
    let unusable = match address {
        IpAddr::V4(a) => {
            a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback()
        }
        IpAddr::V6(a) => a.is_unspecified() || a.is_multicast() || a.is_loopback(),
    };
    if unusable {
        return Err(format!(
            "{address} cannot be a service address (unspecified, loopback, broadcast or multicast)"
        ));
    }
    if net.prefix_len() == net.max_prefix_len() {
        return Ok((address, net.prefix_len()));
    }
    // The network and broadcast addresses of the prefix would make the
    // address unreachable or answer for the whole subnet.
    if let ipnet::IpNet::V4(v4) = net
        && net.prefix_len() < 31
        && (v4.addr() == v4.network() || v4.addr() == v4.broadcast())
    {
        return Err(format!(
            "{address} is the network or broadcast address of /{}",
            net.prefix_len()
        ));
    }
    Ok((address, net.prefix_len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let ok = [
            ("10.0.0.50/24", "10.0.0.50", 24),
            ("192.168.1.1/32", "192.168.1.1", 32),
            ("10.0.0.0/31", "10.0.0.0", 31),
            ("fd00::50/64", "fd00::50", 64),
        ];
        for (text, addr, prefix) in ok {
            assert_eq!(
                parse_address(text),
                Ok((addr.parse().unwrap(), prefix)),
                "{text}"
            );
        }
        for bad in [
            "10.0.0.50",
            "10.0.0.50/33",
            "10.0.0.0/24",
            "10.0.0.255/24",
            "127.0.0.5/8",
            "0.0.0.0/0",
            "224.0.0.1/4",
            "::1/128",
            "eth0",
            "",
        ] {
            assert!(parse_address(bad).is_err(), "{bad}");
        }
    }

    fn raw(interface: &str, count: u32, interval_ms: u64) -> RawVip {
        RawVip {
            address: "10.0.0.50/24".into(),
            interface: interface.into(),
            arp_count: count,
            arp_interval: Duration::from_millis(interval_ms),
        }
    }

    #[test]
    fn keys_are_named_in_errors() {
        let p = Path::new("/etc/pgha/n1.toml");
        let cases = [
            (raw("", 3, 200), "vip.interface"),
            (raw("a-very-long-interface-name", 3, 200), "vip.interface"),
            (raw("eth0:1", 3, 200), "vip.interface"),
            (raw("eth0", 0, 200), "vip.arp_count"),
            (raw("eth0", 3, 1), "vip.arp_interval"),
            (raw("eth0", 3, 20_000), "vip.arp_interval"),
        ];
        for (r, key) in cases {
            match VipConfig::validate(p, r) {
                Err(ConfigError::Invalid { key: k, path, .. }) => {
                    assert_eq!(k, key);
                    assert_eq!(path, p);
                }
                other => panic!("{key}: {other:?}"),
            }
        }
        let ok = VipConfig::validate(p, raw("eth0", 3, 200)).unwrap();
        assert_eq!(ok.cidr(), "10.0.0.50/24");
    }
}
