//! `TCP_NODELAY` on the connections to PostgreSQL.
//!
//! sqlx 0.9.0 opens its TCP sockets with Nagle's algorithm on (a regression
//! of that release, sqlx issue 4335; fixed upstream, not yet released). A
//! message written in more than one piece — a batch statement whose
//! parameters pass a TLS record's 16 kB, say five creates with 4 kB
//! contexts — then waits for PostgreSQL's delayed acknowledgement of the
//! first piece: 40 ms per statement, with both cores idle. Measured: 16
//! concurrent creates of 3.9 kB bodies, 306/s and p50 55 ms before, against
//! 700/s with one request in flight.
//!
//! sqlx gives no access to its socket, so after each new pool connection the
//! process's descriptors are scanned, and every TCP socket whose peer is at
//! the database's port gets `TCP_NODELAY` (idempotent; a socket of ours to
//! that port is a database connection). Where `/proc/self/fd` does not
//! exist, nothing is set and the connection works as before.

use std::os::fd::{BorrowedFd, RawFd};

/// Set `TCP_NODELAY` on every TCP socket of this process whose peer listens
/// on `port`; how many were found.
pub(crate) fn set_on_sockets_to(port: u16) -> std::io::Result<usize> {
    let mut found = 0;
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Some(fd) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        // SAFETY: the descriptor is only borrowed for the two calls below.
        // Closed meanwhile by another thread, they fail (EBADF); reused,
        // they act on whatever socket now has a peer at the database's
        // port, which should have TCP_NODELAY as well.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&fd);
        let to_port = sock
            .peer_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .is_some_and(|a| a.port() == port);
        if to_port && sock.set_tcp_nodelay(true).is_ok() {
            found += 1;
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_to_the_port_get_nodelay_and_others_keep_nagle() {
        let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let to_target = std::net::TcpStream::connect(target.local_addr().unwrap()).unwrap();
        let to_other = std::net::TcpStream::connect(other.local_addr().unwrap()).unwrap();
        assert!(!to_target.nodelay().unwrap(), "Nagle is on by default");

        let n = set_on_sockets_to(target.local_addr().unwrap().port()).unwrap();

        assert_eq!(n, 1);
        assert!(to_target.nodelay().unwrap());
        assert!(!to_other.nodelay().unwrap());
    }
}
