//! The agent's side of the floating address (`[vip]`).
//!
//! Each loop, before the executor carries out the decision, the agent asks
//! [`ha::vip::should_hold_address`](crate::ha::vip::should_hold_address)
//! and makes the interface match ([`Agent::reconcile_vip`]). Adding is
//! followed by gratuitous ARP announcements on a task of their own, so the
//! loop never waits for them. A failure to add is shown in the status and
//! retried next loop, never a reason to demote: the leader still serves
//! every client that reaches it another way. A failure to remove is
//! logged as an error every loop until it succeeds.
//!
//! On start the agent removes a copy left by an earlier run (it holds no
//! usable lease yet); on shutdown it removes the address before stopping
//! PostgreSQL. A frozen agent cannot do either: the fence keeper removes
//! the address when it fences (see `fence_keeper`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Agent;
use super::vip_net::{FloatingAddress, VipError};
use crate::config::{ConfigError, VipConfig};
use crate::ha::{Decision, Snapshot};
use crate::util::boottime_ms;

/// What `/status` shows about the floating address.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VipStatus {
    /// `address/prefix`.
    pub address: String,
    pub interface: String,
    /// The interface carried the address at the end of the last loop.
    pub held: bool,
    /// Whether this member should hold it (the writable leader).
    pub wanted: bool,
    /// The last failure to add or remove it, until one succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The floating address and what the agent last did with it.
pub(super) struct Vip {
    address: FloatingAddress,
    arp_count: u32,
    arp_interval: Duration,
    status: VipStatus,
    announcer: Option<tokio::task::JoinHandle<()>>,
}

impl Vip {
    /// Checks that the interface exists (a configuration error otherwise,
    /// naming the file and key) and removes a copy of the address left by
    /// an earlier run: this agent holds no usable lease yet, and the loop
    /// adds the address again once it does.
    pub(super) fn open(cfg: &VipConfig, config_path: &std::path::Path) -> Result<Vip, ConfigError> {
        let address = FloatingAddress::from_config(cfg);
        if let Err(e) = address.interface_index() {
            return Err(ConfigError::invalid(
                config_path,
                "vip.interface",
                format!("{e} on this host"),
            ));
        }
        let mut vip = Vip {
            status: VipStatus {
                address: address.cidr(),
                interface: address.interface.clone(),
                ..Default::default()
            },
            address,
            arp_count: cfg.arp_count,
            arp_interval: cfg.arp_interval,
            announcer: None,
        };
        match vip.address.remove() {
            Ok(true) => tracing::warn!(
                address = %vip.status.address,
                interface = %vip.status.interface,
                "removed the floating address left by an earlier run"
            ),
            Ok(false) => {}
            Err(e) => vip.removal_failed(&e),
        }
        Ok(vip)
    }

    pub(super) fn status(&self) -> VipStatus {
        self.status.clone()
    }

    pub(super) fn address(&self) -> &FloatingAddress {
        &self.address
    }

    /// Makes the interface carry the address exactly when `wanted`.
    fn reconcile(&mut self, wanted: bool) {
        self.status.wanted = wanted;
        let present = match self.address.is_present() {
            Ok(p) => p,
            Err(e) => {
                self.failed(&e, wanted);
                return;
            }
        };
        match (wanted, present) {
            (true, false) => match self.address.add() {
                Ok(_) => {
                    tracing::info!(address = %self.status.address, interface = %self.status.interface, "added the floating address");
                    self.status.held = true;
                    self.status.error = None;
                    self.start_announcing();
                }
                Err(e) => self.failed(&e, wanted),
            },
            (false, true) => self.release(),
            (held, _) => {
                self.status.held = held;
                self.status.error = None;
            }
        }
    }

    /// Removes the address if the interface carries it.
    pub(super) fn release(&mut self) {
        if let Some(a) = self.announcer.take() {
            a.abort();
        }
        match self.address.remove() {
            Ok(removed) => {
                if removed {
                    tracing::info!(address = %self.status.address, interface = %self.status.interface, "removed the floating address");
                }
                self.status.held = false;
                self.status.error = None;
            }
            Err(e) => self.removal_failed(&e),
        }
    }

    fn removal_failed(&mut self, e: &VipError) {
        // Loud and every time: another member may be about to add it.
        tracing::error!(error = %crate::util::chain(e), "cannot remove the floating address; retrying next loop");
        self.status.held = true;
        self.status.error = Some(crate::util::chain(e).to_string());
    }

    fn failed(&mut self, e: &VipError, wanted: bool) {
        let text = crate::util::chain(e).to_string();
        if wanted {
            // Once per distinct failure: a leader that cannot add its
            // address keeps leading, and the status shows why.
            if self.status.error.as_deref() != Some(text.as_str()) {
                tracing::error!(error = %text, "cannot add the floating address; retrying every loop");
            }
        } else {
            tracing::error!(error = %text, "cannot check or remove the floating address; retrying next loop");
        }
        self.status.error = Some(text);
    }

    /// Gratuitous ARP, `arp_count` times `arp_interval` apart, while the
    /// address is still up: hosts that cached the previous leader's MAC
    /// address switch at the first frame they receive.
    fn start_announcing(&mut self) {
        if let Some(a) = self.announcer.take() {
            a.abort();
        }
        let address = self.address.clone();
        let (count, interval) = (self.arp_count, self.arp_interval);
        self.announcer = Some(tokio::spawn(async move {
            for i in 0..count {
                if i > 0 {
                    tokio::time::sleep(interval).await;
                }
                if !address.is_present().unwrap_or(false) {
                    return;
                }
                if let Err(e) = address.announce() {
                    tracing::warn!(error = %crate::util::chain(&e), "gratuitous ARP failed");
                }
            }
        }));
    }
}

impl Agent {
    /// Before the executor acts: hold the address exactly when this member
    /// is the writable leader with a usable lease and this loop does not
    /// stop writes (so the address goes before a demotion starts).
    pub(super) fn reconcile_vip(&mut self, decision: &Decision, s: &Snapshot) {
        let Some(vip) = self.vip.as_mut() else { return };
        let wanted = crate::ha::vip::should_hold_address(
            &s.local.pg,
            &decision.action,
            &self.lease.snapshot(),
            boottime_ms(),
            self.cfg.ha.fence_margin.as_millis() as u64,
        );
        vip.reconcile(wanted);
    }

    /// After an action that made the server writable (start, promotion,
    /// bootstrap): look again at once rather than one loop later, so the
    /// address follows the promotion within milliseconds.
    pub(super) async fn reconcile_vip_after(&mut self, decision: &Decision) {
        if self.vip.is_none() || !decision.action.makes_writable() {
            return;
        }
        let obs = self.observer.observe().await;
        let wanted = crate::ha::vip::should_hold_address(
            &obs.status,
            &crate::ha::Action::Wait,
            &self.lease.snapshot(),
            boottime_ms(),
            self.cfg.ha.fence_margin.as_millis() as u64,
        );
        if let Some(vip) = self.vip.as_mut() {
            vip.reconcile(wanted);
        }
    }
}
