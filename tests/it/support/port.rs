//! Free TCP ports for servers started by tests.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;

/// Every port handed out so far: the kernel may offer a port again once
/// its probe listener is closed, before the server that was meant to use
/// it has bound it, and two tests must never get the same port.
static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A port on 127.0.0.1 that nothing listened on a moment ago and that no
/// other caller in this process received. Other processes may still race
/// for it, so fixtures that can retry with another port should.
pub fn free_port() -> u16 {
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener
            .local_addr()
            .expect("local_addr of a bound listener")
            .port();
        if given.insert(port) {
            return port;
        }
    }
}
