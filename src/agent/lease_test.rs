//! The lease keeper against the in-memory DCS, with the fence keeper's side
//! played by the test (its acknowledgements written by hand): the lease is
//! usable only up to an acknowledged deadline, renewals stop without a
//! healthy keeper, and taking the lease waits for the acknowledgement.

use std::sync::Arc;
use std::time::Duration;

use super::LeaseKeeper;
use crate::agent::fence::{ACK_FILE, Fence, FenceState, STATE_FILE, render_ack};
use crate::dcs::Dcs;
use crate::dcs::memory::MemoryStore;
use crate::ha::lease::AGENT_LEAD_MS;
use crate::safe_fs::{Owner, Strictness, TrustedDir};
use crate::util::boottime_ms;

const MARGIN_MS: u64 = 500;
const TTL: Duration = Duration::from_secs(3);
/// The pretended keeper: a number no process can have (above the largest
/// possible `pid_max`), because a stopped keeper is replaced with SIGKILL.
/// With a small number, that signal could reach whatever process had it,
/// the test binary included (with `pid_max` at 32768, numbers wrap fast).
const KEEPER_PID: i32 = 0x3fff_fff0;

struct Setup {
    _tmp: tempfile::TempDir,
    dir: Arc<TrustedDir>,
    fence: Fence,
    keeper: LeaseKeeper,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let dir = Arc::new(
        TrustedDir::create(
            &tmp.path().join("state"),
            Owner::current(),
            0o700,
            Strictness::Private,
        )
        .unwrap(),
    );
    let fence = Fence::new(dir.clone());
    let keeper = LeaseKeeper {
        state: Arc::default(),
        fence: fence.clone(),
        fence_margin_ms: MARGIN_MS,
        rounds: None,
    };
    Setup {
        _tmp: tmp,
        dir,
        fence,
        keeper,
    }
}

impl Setup {
    /// What a keeper writes after reading the current state.
    fn acknowledge(&self, pid: i32) {
        let state = self.fence.current();
        self.dir
            .write(
                ACK_FILE,
                render_ack(pid, boottime_ms(), state).as_bytes(),
                0o600,
            )
            .unwrap();
    }

    fn armed_deadline(&self) -> Option<u64> {
        let text = self.dir.read_to_string(STATE_FILE).unwrap()?;
        match FenceState::parse(&text)? {
            FenceState::Armed { deadline_ms, .. } => Some(deadline_ms),
            _ => None,
        }
    }
}

#[tokio::test]
async fn the_lease_is_usable_only_up_to_an_acknowledged_deadline() {
    let t = setup();
    let store = MemoryStore::new();
    let dcs = store.handle("n1");
    let renewal = dcs.acquire_leader().await.unwrap().expect("won");
    t.keeper.record(renewal, None).unwrap();
    let deadline = t.armed_deadline().expect("armed");
    assert_eq!(deadline, renewal.valid_until_ms - MARGIN_MS);

    // etcd granted it, nobody acknowledged it: not usable.
    let lease = t.keeper.snapshot();
    assert!(lease.held);
    assert_eq!(lease.valid_until_ms, None);

    // A keeper acknowledged the deadline: usable up to it (plus the
    // margin the decision keeps), less the agent's lead on the keeper.
    t.acknowledge(KEEPER_PID);
    assert_eq!(
        t.keeper.snapshot().valid_until_ms,
        Some(deadline + MARGIN_MS - AGENT_LEAD_MS)
    );
}

#[tokio::test]
async fn no_renewal_without_a_healthy_keeper() {
    let t = setup();
    let store = MemoryStore::new();
    let dcs = store.handle("n1");
    let renewal = dcs.acquire_leader().await.unwrap().expect("won");
    t.keeper.record(renewal, None).unwrap();
    t.keeper.heartbeat();
    let armed = t.armed_deadline();

    // No keeper process at all (it was SIGKILLed): no renewal is sent
    // (a sent one records its latency).
    t.fence.pretend_keeper(None, false);
    t.acknowledge(KEEPER_PID);
    t.keeper.renew_once(&dcs, TTL).await;
    assert_eq!(
        t.keeper.last_renewal_latency_ms(),
        None,
        "renewed without a keeper"
    );

    // A stopped keeper: the same.
    t.fence.pretend_keeper(Some(KEEPER_PID), true);
    t.keeper.renew_once(&dcs, TTL).await;
    assert_eq!(
        t.keeper.last_renewal_latency_ms(),
        None,
        "renewed with a stopped keeper"
    );

    // A keeper from before (another pid acknowledged): not this one's.
    t.fence.pretend_keeper(Some(KEEPER_PID + 1), false);
    t.keeper.renew_once(&dcs, TTL).await;
    assert_eq!(
        t.keeper.last_renewal_latency_ms(),
        None,
        "renewed on a stranger's word"
    );

    // A running keeper that acknowledges: renewed and re-armed.
    t.fence.pretend_keeper(Some(KEEPER_PID), false);
    t.acknowledge(KEEPER_PID);
    t.keeper.renew_once(&dcs, TTL).await;
    assert!(
        t.keeper.last_renewal_latency_ms().is_some(),
        "a healthy keeper allows renewals"
    );
    assert_eq!(
        t.armed_deadline(),
        armed,
        "the memory DCS grants the same far-future lease"
    );
}

#[tokio::test]
async fn taking_the_lease_waits_for_the_keepers_acknowledgement() {
    let t = setup();
    let store = MemoryStore::new();
    let dcs = store.handle("n1");
    let renewal = dcs.acquire_leader().await.unwrap().expect("won");
    t.fence.pretend_keeper(Some(KEEPER_PID), false);
    t.keeper.record(renewal, None).unwrap();

    // Nobody acknowledges: the wait gives up.
    let r = t.keeper.wait_until_guarded(Duration::from_millis(50)).await;
    assert!(r.is_err(), "{r:?}");

    // An acknowledgement of an older state does not count either.
    t.dir
        .write(
            ACK_FILE,
            render_ack(KEEPER_PID, boottime_ms(), Some(FenceState::Exit)).as_bytes(),
            0o600,
        )
        .unwrap();
    assert!(
        t.keeper
            .wait_until_guarded(Duration::from_millis(50))
            .await
            .is_err()
    );

    // The keeper acknowledges the armed deadline while the agent waits.
    let acknowledging = {
        let dir = t.dir.clone();
        let fence = t.fence.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            dir.write(
                ACK_FILE,
                render_ack(KEEPER_PID, boottime_ms(), fence.current()).as_bytes(),
                0o600,
            )
            .unwrap();
        })
    };
    t.keeper
        .wait_until_guarded(Duration::from_secs(2))
        .await
        .expect("guarded once acknowledged");
    acknowledging.await.unwrap();
}
