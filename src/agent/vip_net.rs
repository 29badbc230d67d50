//! The floating address on the wire: add, remove and look up an address
//! with rtnetlink, and announce it with gratuitous ARP.
//!
//! Synchronous on purpose: the fence keeper (no async runtime) removes the
//! address with the same calls, and each call is one netlink round trip
//! to the local kernel (microseconds), so the agent runs them in place.
//! Every socket has a receive timeout, so a call never blocks a caller
//! that has a deadline to keep.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// How long one netlink or packet call may wait for the kernel.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(1);

/// What went wrong, with what was being attempted.
#[derive(Debug, thiserror::Error)]
pub enum VipError {
    #[error("network interface {interface:?} does not exist")]
    NoInterface {
        interface: String,
        #[source]
        source: nix::Error,
    },
    #[error("network interface {interface:?} has no Ethernet address to announce from")]
    NoHardwareAddress { interface: String },
    #[error("cannot {action} {address} on {interface}")]
    Netlink {
        action: &'static str,
        address: String,
        interface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot announce {address} on {interface} with gratuitous ARP")]
    Announce {
        address: String,
        interface: String,
        #[source]
        source: std::io::Error,
    },
}

/// A floating address on one interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FloatingAddress {
    pub address: IpAddr,
    pub prefix_len: u8,
    pub interface: String,
}

impl FloatingAddress {
    pub fn from_config(cfg: &crate::config::VipConfig) -> Self {
        FloatingAddress {
            address: cfg.address,
            prefix_len: cfg.prefix_len,
            interface: cfg.interface.clone(),
        }
    }

    pub fn cidr(&self) -> String {
        format!("{}/{}", self.address, self.prefix_len)
    }

    /// The interface's index; also the check that it exists.
    pub fn interface_index(&self) -> Result<u32, VipError> {
        nix::net::if_::if_nametoindex(self.interface.as_str()).map_err(|source| {
            VipError::NoInterface {
                interface: self.interface.clone(),
                source,
            }
        })
    }

    fn netlink_error(&self, action: &'static str, source: std::io::Error) -> VipError {
        VipError::Netlink {
            action,
            address: self.cidr(),
            interface: self.interface.clone(),
            source,
        }
    }

    fn message(&self, index: u32) -> AddressMessage {
        let mut msg = AddressMessage::default();
        msg.header.family = family(self.address);
        msg.header.prefix_len = self.prefix_len;
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(self.address));
        msg
    }

    /// Whether the interface carries the address now.
    pub fn is_present(&self) -> Result<bool, VipError> {
        let index = self.interface_index()?;
        let err = |e| self.netlink_error("look up", e);
        let mut request = AddressMessage::default();
        request.header.family = family(self.address);
        let replies = request_dump(RouteNetlinkMessage::GetAddress(request)).map_err(err)?;
        Ok(replies.iter().any(|m| match m {
            RouteNetlinkMessage::NewAddress(a) => {
                a.header.index == index
                    && a.attributes.iter().any(|attr| {
                        matches!(attr, AddressAttribute::Local(x) | AddressAttribute::Address(x) if *x == self.address)
                    })
            }
            _ => false,
        }))
    }

    /// Adds the address. Returns false when it was already there.
    pub fn add(&self) -> Result<bool, VipError> {
        let index = self.interface_index()?;
        let mut msg = self.message(index);
        msg.attributes.push(AddressAttribute::Address(self.address));
        if self.address.is_ipv6() {
            // Duplicate address detection would keep an IPv6 address
            // unusable ("tentative") for about a second after a failover.
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match request_ack(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(self.netlink_error("add", e)),
        }
    }

    /// Removes the address. Returns false when it was not there. Matches
    /// on the address alone, so a copy added by hand with another prefix
    /// goes too.
    pub fn remove(&self) -> Result<bool, VipError> {
        let index = match self.interface_index() {
            Ok(i) => i,
            // An interface that vanished carries no address.
            Err(VipError::NoInterface { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        match request_ack(RouteNetlinkMessage::DelAddress(self.message(index)), 0) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(false),
            Err(e) => Err(self.netlink_error("remove", e)),
        }
    }

    /// Sends one gratuitous ARP request for the address, so that hosts and
    /// switches on the segment learn its new MAC address at once instead
    /// of when their cache entry expires. IPv6 addresses are not announced
    /// (see docs/configuration.md).
    pub fn announce(&self) -> Result<(), VipError> {
        let IpAddr::V4(ip) = self.address else {
            return Ok(());
        };
        let index = self.interface_index()?;
        let mac = hardware_address(&self.interface).ok_or_else(|| VipError::NoHardwareAddress {
            interface: self.interface.clone(),
        })?;
        send_frame(index, &gratuitous_arp(mac, ip.octets())).map_err(|source| VipError::Announce {
            address: self.address.to_string(),
            interface: self.interface.clone(),
            source,
        })
    }
}

fn family(address: IpAddr) -> AddressFamily {
    match address {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn open_netlink() -> std::io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    set_receive_timeout(socket.as_raw_fd(), SOCKET_TIMEOUT)?;
    Ok(socket)
}

fn set_receive_timeout(fd: i32, timeout: Duration) -> std::io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: `tv` is a valid timeval that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn send(socket: &Socket, payload: RouteNetlinkMessage, flags: u16) -> std::io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | flags;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(payload));
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    socket.send(&buf, 0)?;
    Ok(())
}

/// Reads replies until `done` says the exchange is over; every message
/// seen is passed to it.
fn receive(
    socket: &Socket,
    mut on_message: impl FnMut(NetlinkPayload<RouteNetlinkMessage>) -> Option<std::io::Result<()>>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = socket.recv(&mut &mut buf[..], 0)?;
        let mut offset = 0;
        while offset < n {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..n])
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
            let len = msg.header.length as usize;
            if let Some(result) = on_message(msg.payload) {
                return result;
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

/// One request answered by an acknowledgement or an error.
fn request_ack(payload: RouteNetlinkMessage, flags: u16) -> std::io::Result<()> {
    let socket = open_netlink()?;
    send(&socket, payload, NLM_F_ACK | flags)?;
    receive(&socket, |payload| match payload {
        NetlinkPayload::Error(e) if e.code.is_some() => Some(Err(e.to_io())),
        NetlinkPayload::Error(_) | NetlinkPayload::Done(_) => Some(Ok(())),
        _ => None,
    })
}

/// A dump request: every reply up to the end marker.
fn request_dump(payload: RouteNetlinkMessage) -> std::io::Result<Vec<RouteNetlinkMessage>> {
    let socket = open_netlink()?;
    send(&socket, payload, NLM_F_DUMP)?;
    let mut replies = Vec::new();
    receive(&socket, |payload| match payload {
        NetlinkPayload::InnerMessage(m) => {
            replies.push(m);
            None
        }
        NetlinkPayload::Error(e) if e.code.is_some() => Some(Err(e.to_io())),
        NetlinkPayload::Done(_) | NetlinkPayload::Error(_) => Some(Ok(())),
        _ => None,
    })?;
    Ok(replies)
}

/// The interface's Ethernet address.
fn hardware_address(interface: &str) -> Option<[u8; 6]> {
    nix::ifaddrs::getifaddrs()
        .ok()?
        .filter(|a| a.interface_name == interface)
        .find_map(|a| a.address?.as_link_addr()?.addr())
        .filter(|mac| mac != &[0; 6])
}

const ETH_P_ARP: u16 = 0x0806;
const BROADCAST: [u8; 6] = [0xff; 6];

/// A gratuitous ARP request (RFC 5227 section 3 "ARP Announcement"):
/// sender and target protocol address are both the announced address,
/// the target hardware address is zero, sent to the broadcast address.
/// Requests rather than replies: every stack updates an existing cache
/// entry from a request, while some ignore unsolicited replies.
pub fn gratuitous_arp(mac: [u8; 6], ip: [u8; 4]) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&BROADCAST);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // operation: request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip);
    // f[32..38]: target hardware address, zero.
    f[38..42].copy_from_slice(&ip);
    f
}

/// Sends one complete Ethernet frame out of interface `index`.
fn send_frame(index: u32, frame: &[u8]) -> std::io::Result<()> {
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ARP.to_be()),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = ETH_P_ARP.to_be();
    to.sll_ifindex = index as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&BROADCAST);
    // SAFETY: `frame` and `to` are valid for the lengths given.
    let rc = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&to as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gratuitous_arp_frame() {
        let mac = [0x02, 0, 0, 0, 0, 0x01];
        let f = gratuitous_arp(mac, [10, 0, 0, 50]);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[14..22], &[0, 1, 0x08, 0, 6, 4, 0, 1]);
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[28..32], &[10, 0, 0, 50]);
        assert_eq!(&f[32..38], &[0; 6]);
        assert_eq!(&f[38..42], &[10, 0, 0, 50]);
    }

    #[test]
    fn a_missing_interface_is_named() {
        let a = FloatingAddress {
            address: "10.0.0.50".parse().unwrap(),
            prefix_len: 24,
            interface: "pgha-none0".into(),
        };
        let e = a.interface_index().unwrap_err();
        assert!(e.to_string().contains("pgha-none0"), "{e}");
        // Nothing to remove from an interface that does not exist.
        assert!(!a.remove().unwrap());
    }
}
