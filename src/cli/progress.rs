//! The live progress bar of `vppd status --watch`: decided pairs against the
//! job's total, with rate and ETA.
//!
//! Drawn only when stderr is a terminal: redirected to a file or a pipe
//! (cron, CI, `2>log`) it would fill it with `\r` frames, so there it stays
//! silent and only state changes are written, one line each.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::domain::job::{JobState, JobStatus};

pub struct JobProgress {
    bar: ProgressBar,
    on_terminal: bool,
    last_state: Option<JobState>,
}

impl JobProgress {
    /// A bar on stderr when it is a terminal; plain state lines otherwise.
    pub fn stderr() -> JobProgress {
        JobProgress::new(std::io::stderr().is_terminal())
    }

    pub fn new(on_terminal: bool) -> JobProgress {
        let target = if on_terminal {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(None, target);
        // The template is a constant; should it ever fail to parse, the
        // default style still shows position and length.
        if let Ok(style) = ProgressStyle::with_template(
            "[{elapsed_precise}] [{bar:30}] {percent:>3}%  {pos}/{len} pairs decided, {per_sec}, ETA {eta}  {msg}",
        ) {
            bar.set_style(style.progress_chars("#>-"));
        }
        bar.enable_steady_tick(Duration::from_millis(250));
        JobProgress {
            bar,
            on_terminal,
            last_state: None,
        }
    }

    pub fn update(&mut self, s: &JobStatus) {
        let total = s.assignments.total + s.disassociations.total;
        let decided = s.assignments.confirmed
            + s.assignments.failed
            + s.disassociations.confirmed
            + s.disassociations.failed;
        self.bar.set_length(total.max(1));
        self.bar.set_position(decided);
        self.bar.set_message(format!(
            "{} failed, {} installs released, requests {}/{}, {}",
            s.assignments.failed + s.disassociations.failed,
            s.installs.released,
            s.requests.submitted,
            s.requests.planned,
            s.state.as_str()
        ));
        if self.last_state != Some(s.state) {
            self.last_state = Some(s.state);
            if !self.on_terminal {
                eprintln!(
                    "job {}: {} ({decided} of {total} pairs decided)",
                    s.id,
                    s.state.as_str()
                );
            }
        }
    }

    /// A line of its own (above the bar on a terminal).
    pub fn note(&self, line: &str) {
        if self.on_terminal {
            self.bar.println(line);
        } else {
            eprintln!("{line}");
        }
    }

    /// Leaves the last frame on screen.
    pub fn finish(&self) {
        self.bar.abandon();
    }
}
