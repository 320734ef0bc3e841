//! What `vppd run` tells systemd while it runs: a `STATUS=` line that
//! `systemctl status vppd` shows (jobs running, installs pending), and
//! `WATCHDOG=1` keep-alives when the unit sets `WatchdogSec=`.
//!
//! The keep-alive is sent only after the store answered, so a daemon whose
//! runtime or store hangs stops pinging and systemd restarts it; unfinished
//! jobs resume from the store on the next start.

use std::sync::Arc;
use std::time::Duration;

use crate::domain::job::JobState;
use crate::runtime::context::Context;

/// How often STATUS= is refreshed without a watchdog.
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// The watchdog interval systemd asks for (`WATCHDOG_USEC`), if it is meant
/// for this process (`WATCHDOG_PID`, when set, names it).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.trim().parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// The STATUS= text: what an operator wants from `systemctl status`.
pub async fn status_line(ctx: &Context) -> Result<String, crate::store::StoreError> {
    let jobs = ctx.store.jobs().await?;
    let running = jobs
        .iter()
        .filter(|j| j.state() == JobState::Running)
        .count();
    let waiting = jobs
        .iter()
        .filter(|j| j.state() == JobState::Accepted)
        .count();
    let pending: u64 = jobs.iter().map(|j| j.installs().pending).sum();
    // With replicas, each speaks for the tokens it works.
    let tokens: Vec<_> = ctx
        .tokens
        .all()
        .into_iter()
        .filter(|t| !ctx.shared_store || t.is_worked())
        .collect();
    let ready = tokens.iter().filter(|t| t.is_ready()).count();
    let failed = tokens
        .iter()
        .filter(|t| t.state() == crate::runtime::tokens::State::Failed)
        .count();
    let failed = if failed > 0 {
        format!(" ({failed} failed: vppd token list)")
    } else {
        String::new()
    };
    Ok(format!(
        "{ready} of {} tokens ready{failed}; {running} jobs running, {waiting} waiting, {pending} installs pending",
        tokens.len()
    ))
}

/// Runs until shutdown: STATUS= every 10 s (or each watchdog period) and
/// WATCHDOG=1 at half the watchdog interval, as sd_watchdog_enabled(3)
/// advises.
pub async fn report(ctx: Arc<Context>) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let watchdog = watchdog_interval();
    let every = watchdog.map_or(STATUS_EVERY, |w| (w / 2).min(STATUS_EVERY));
    let mut last_status = String::new();
    loop {
        let read = status_line(&ctx).await;
        match read {
            Ok(status) => {
                if status != last_status {
                    sd_notify(&format!("STATUS={status}"));
                    last_status = status;
                }
                if watchdog.is_some() {
                    sd_notify("WATCHDOG=1");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read the store for systemd's status");
                sd_notify("STATUS=cannot read the store; see the log");
                last_status.clear();
            }
        }
        if !ctx.sleep(every).await {
            return;
        }
    }
}

/// Sends a state line to `$NOTIFY_SOCKET`, if systemd gave one.
pub fn sd_notify(state: &str) {
    #[cfg(target_os = "linux")]
    {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return;
        };
        let path = path.to_string_lossy().into_owned();
        let addr = match path.strip_prefix('@') {
            Some(name) => UnixAddr::from_abstract_name(name.as_bytes()),
            None => UnixAddr::from_pathname(&path),
        };
        let Ok(addr) = addr else { return };
        if let Ok(sock) = UnixDatagram::unbound()
            && let Err(e) = sock.send_to_addr(state.as_bytes(), &addr)
        {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = state;
}
