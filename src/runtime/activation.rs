//! Listeners handed over by the process that started vppd, by systemd's
//! socket activation protocol (`LISTEN_PID`, `LISTEN_FDS`, descriptors from
//! 3 on). A socket unit keeps the ports open across restarts, so Apple's
//! notifications and admin clients wait in the backlog instead of meeting a
//! refused connection; tests use the same door to restart the real binary
//! on ports they bound once.
//!
//! Each inherited listener goes to the listener whose configured address it
//! is bound to (`ListenStream=` must equal `admin.listen` or
//! `notifications.listen`); one that matches neither is an error, so a
//! socket unit and a config that drifted apart fail at start.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::runtime::config::Config;

/// Listeners bound before the daemon starts: tests bind port 0 and hand them
/// over, `vppd run` takes those systemd passes (socket activation). A `None`
/// binds the configured address.
#[derive(Debug, Default)]
pub struct Listeners {
    pub admin: Option<tokio::net::TcpListener>,
    pub notifications: Option<tokio::net::TcpListener>,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("socket activation: LISTEN_FDS `{0}` is not a number of descriptors")]
    Count(String),
    #[error("socket activation: descriptor {fd} is not a TCP listener: {source}")]
    NotTcp { fd: i32, source: std::io::Error },
    #[error(
        "socket activation: descriptor {fd} listens on {addr}, which is neither admin.listen ({admin}) nor notifications.listen ({notifications}); make the socket unit's ListenStream= match the config"
    )]
    Unmatched {
        fd: i32,
        addr: SocketAddr,
        admin: String,
        notifications: String,
    },
    #[error("socket activation: two descriptors listen on {0}")]
    Twice(SocketAddr),
}

/// systemd passes descriptors from this number on.
const FIRST_FD: i32 = 3;

static TAKEN: AtomicBool = AtomicBool::new(false);

/// The listeners passed to this process, matched to the config; empty when
/// nothing was passed (or it was meant for another process).
///
/// Must run inside the runtime (the listeners are registered with it).
pub fn take(config: &Config) -> Result<Listeners, ActivationError> {
    let mut listeners = Listeners::default();
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        == Some(std::process::id());
    if !ours {
        return Ok(listeners);
    }
    let count = match std::env::var("LISTEN_FDS") {
        Ok(n) => n
            .trim()
            .parse::<i32>()
            .ok()
            .filter(|n| (0..=64).contains(n))
            .ok_or(ActivationError::Count(n))?,
        Err(_) => return Ok(listeners),
    };
    // The descriptors belong to whoever takes them first; a second call
    // would wrap descriptors this process may since have reused.
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(listeners);
    }
    let admin = config.admin.listen.parse::<SocketAddr>().ok();
    let notifications = config.notifications.listen.parse::<SocketAddr>().ok();
    for fd in FIRST_FD..FIRST_FD + count {
        let listener = adopt(fd)?;
        let addr = listener
            .local_addr()
            .map_err(|source| ActivationError::NotTcp { fd, source })?;
        let slot = if Some(addr) == admin {
            &mut listeners.admin
        } else if Some(addr) == notifications {
            &mut listeners.notifications
        } else {
            return Err(ActivationError::Unmatched {
                fd,
                addr,
                admin: config.admin.listen.clone(),
                notifications: config.notifications.listen.clone(),
            });
        };
        if slot.is_some() {
            return Err(ActivationError::Twice(addr));
        }
        *slot = Some(listener);
    }
    Ok(listeners)
}

fn adopt(fd: i32) -> Result<tokio::net::TcpListener, ActivationError> {
    use std::os::fd::FromRawFd;
    let not_tcp = |source| ActivationError::NotTcp { fd, source };
    // SAFETY: LISTEN_PID names this process, so by the protocol descriptors
    // 3 to 3+LISTEN_FDS-1 were opened for it and nothing else owns them;
    // TAKEN makes sure they are wrapped once.
    let inherited = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    // A duplicate is close-on-exec (inherited descriptors are not); the
    // original closes when `inherited` drops.
    let listener = inherited.try_clone().map_err(not_tcp)?;
    drop(inherited);
    listener.local_addr().map_err(not_tcp)?;
    listener.set_nonblocking(true).map_err(not_tcp)?;
    tokio::net::TcpListener::from_std(listener).map_err(not_tcp)
}
