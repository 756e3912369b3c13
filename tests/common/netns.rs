//! A private network namespace joined to the test's own by a veth pair, so
//! that a test can put an upstream at a non-loopback (private) address
//! without any traffic leaving the machine. Needs root and `ip`
//! (iproute2); without them the test is skipped, or fails under
//! `TROW_TEST_STRICT`.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;

pub struct NetNs {
    pub name: String,
    /// The test's side of the veth pair.
    pub host_addr: Ipv4Addr,
    /// The namespace's side: where its listeners are.
    pub ns_addr: Ipv4Addr,
    veth: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetNs {
    /// Creates the namespace with a /30 of 10.231.0.0/16 chosen from the
    /// process id (one per test process, so parallel runs do not collide).
    pub fn create() -> Option<NetNs> {
        if !super::have_tool("ip") {
            return None;
        }
        let uid = Command::new("id").arg("-u").output().expect("run id");
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            assert!(
                !super::strict(),
                "network namespaces need root (TROW_TEST_STRICT is set)"
            );
            eprintln!("SKIPPED: network namespaces need root");
            return None;
        }
        let pid = std::process::id();
        let block = pid % 16384;
        let (third, fourth) = ((block / 64) as u8, ((block % 64) * 4) as u8);
        let ns = NetNs {
            name: format!("trow-test-{pid}"),
            host_addr: Ipv4Addr::new(10, 231, third, fourth + 1),
            ns_addr: Ipv4Addr::new(10, 231, third, fourth + 2),
            veth: format!("tt{pid}a"),
        };
        let peer = format!("tt{pid}b");
        // Leftovers of an earlier process with the same id.
        let _ = ip(&["netns", "del", &ns.name]);
        let _ = ip(&["link", "del", &ns.veth]);
        let host_cidr = format!("{}/30", ns.host_addr);
        let ns_cidr = format!("{}/30", ns.ns_addr);
        let (name, veth) = (ns.name.clone(), ns.veth.clone());
        let setup = [
            vec!["netns", "add", &name],
            vec!["link", "add", &veth, "type", "veth", "peer", "name", &peer],
            vec!["link", "set", &peer, "netns", &name],
            vec!["addr", "add", &host_cidr, "dev", &veth],
            vec!["link", "set", &veth, "up"],
            vec!["-n", &name, "addr", "add", &ns_cidr, "dev", &peer],
            vec!["-n", &name, "link", "set", &peer, "up"],
            vec!["-n", &name, "link", "set", "lo", "up"],
        ];
        for args in setup {
            if let Err(e) = ip(&args) {
                drop(ns);
                assert!(!super::strict(), "cannot set up a network namespace: {e}");
                eprintln!("SKIPPED: cannot set up a network namespace: {e}");
                return None;
            }
        }
        Some(ns)
    }

    /// A TCP listener inside the namespace, on its address (any port). A
    /// socket stays in the namespace it was created in, so a thread joins
    /// the namespace, binds, and hands the listener back.
    pub fn listen(&self) -> std::net::TcpListener {
        let path = format!("/var/run/netns/{}", self.name);
        let addr = self.ns_addr;
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open the namespace");
            // SAFETY: setns on a valid namespace fd changes only this
            // thread's network namespace; the thread ends right after.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            std::net::TcpListener::bind((addr, 0)).expect("bind in the namespace")
        })
        .join()
        .expect("namespace thread")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and so both.
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.veth]);
    }
}
