//! Operating-system settings: options of accepted sockets, and the
//! process's file-descriptor limit that bounds how many can be open.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// TCP keepalive: after this long without a packet the kernel probes the
/// peer. It finds clients that vanished without closing (a node that lost
/// power, a NAT that forgot the flow) while Trow is busy on their behalf,
/// which the idle timeout deliberately does not cut.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// Between probes.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes before the kernel gives up: a dead peer is noticed
/// about two minutes after it went silent.
const KEEPALIVE_PROBES: u32 = 6;

/// Descriptors a connection may use at once: its socket and the blob file it
/// reads or writes.
const FDS_PER_CONNECTION: u64 = 2;
/// Descriptors besides connections: the listener, the SQLite connections,
/// the log, upstream connections of the pull-through cache.
const FDS_RESERVED: u64 = 256;

/// Sets the options every accepted connection gets.
pub(super) fn configure(tcp: &TcpStream) {
    // Small responses (manifests, upload acks) must not wait for Nagle.
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "could not set TCP_NODELAY");
    }
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    if let Err(e) = SockRef::from(tcp).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "could not set TCP keepalive");
    }
}

/// Raises the soft limit on open files to the hard limit (often 1024 soft
/// against a far higher hard limit), and warns when `max_connections`
/// connections could still run out of descriptors: `accept` would then fail
/// instead of connections waiting in the listen queue.
pub fn raise_fd_limit(max_connections: u32) {
    let Some(limit) = raise_nofile() else {
        tracing::debug!("could not read the open-file limit");
        return;
    };
    let needed = u64::from(max_connections) * FDS_PER_CONNECTION + FDS_RESERVED;
    if limit < needed {
        tracing::warn!(
            open_file_limit = limit,
            max_connections,
            needed,
            "--max-connections allows more connections than the open-file limit can serve; raise the limit (ulimit -n) or lower --max-connections"
        );
    } else {
        tracing::debug!(open_file_limit = limit, "open-file limit");
    }
}

/// `RLIMIT_NOFILE`'s soft limit after raising it as far as allowed.
#[allow(clippy::useless_conversion)] // rlim_t is u64 on Linux, not everywhere
fn raise_nofile() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass and nothing else.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        } else {
            // macOS refuses an unlimited hard limit; the soft one stays.
            tracing::debug!(error = %std::io::Error::last_os_error(), "could not raise the open-file limit");
        }
    }
    Some(u64::from(limit.rlim_cur))
}
